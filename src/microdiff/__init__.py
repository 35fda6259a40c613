"""microdiff: train and sample text-to-image diffusion models on a micro budget."""

__version__ = "0.1.0"

"""microdiff: train and sample text-to-image diffusion models on a micro budget."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in models and encoders: load it on first use, keeping `import microdiff` light.
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'microdiff' has no attribute {name!r}")


__all__ = ["Pipeline", "__version__"]

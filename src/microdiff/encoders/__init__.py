"""Text encoders and autoencoders behind two small protocols (see ``base.py``)."""

"""Data: captioned datasets, the built-in datasets, shards and precompute."""

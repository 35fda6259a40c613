"""Small shared helpers: plots, files."""

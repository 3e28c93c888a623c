"""Commands: train, compress, inspect."""

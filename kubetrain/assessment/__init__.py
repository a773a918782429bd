"""After training: evaluate, compress, publish."""

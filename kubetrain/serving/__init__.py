"""Serving a published bundle: raw rows or images in, predictions out (`kubetrain serve`)."""

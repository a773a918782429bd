"""Data stages: ingest, clean, augment, and the dataset artifact format between them."""

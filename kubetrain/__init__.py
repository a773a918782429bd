"""kubetrain: the logic behind every stage of the training pipeline, as plain Python."""

__version__ = "0.1.0"

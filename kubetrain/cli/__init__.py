"""Process entry points: `kubetrain`, the per-stage CLI, Katib trials and torchrun ranks."""

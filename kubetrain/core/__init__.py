"""Shared plumbing every layer may use: errors, progress lines, object storage."""

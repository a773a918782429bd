"""The local runner (kfp.local) and benchmarks."""

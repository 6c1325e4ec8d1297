"""Low-rank representations of cache tensors (xKV)."""

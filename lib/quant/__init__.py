"""Quantized storage of cache tensors: bit packing and group-wise uniform quantizers."""

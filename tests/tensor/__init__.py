"""Tensor-layer and optimizer tests: compressed parameters, model conversion, fused optimizers."""

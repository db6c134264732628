"""Helpers shared by the tests: hypothesis generators, tiny models and training loops, a tiny LightningModule."""

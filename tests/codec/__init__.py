"""Codec tests: bit-exact round trips, blob format, CPU and Triton backends."""

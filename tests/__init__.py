"""The test suite, grouped by layer (codec, tensor, lightning, formats, app); shared helpers in tests/helpers.py."""

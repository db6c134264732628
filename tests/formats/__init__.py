"""File-format tests: the NZSF container, whole-model files, the CLI."""

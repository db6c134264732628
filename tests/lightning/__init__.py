"""Lightning-layer tests: strategies, optimizer translation, checkpoints, callbacks."""

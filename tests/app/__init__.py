"""Application tests: train.py and Hydra configs, evaluation, baselines, benchmark smoke runs."""

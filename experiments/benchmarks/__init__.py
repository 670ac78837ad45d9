"""Measurement scripts (not tests): run as ``python -m vae_priors.experiments.benchmarks.<name>``."""

"""Measurement scripts (not tests): run as ``python -m experiments.benchmarks.<name>``."""

"""Held-out evaluation: per-point importance log weights and the importance-sampled log-likelihood."""

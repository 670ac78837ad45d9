"""Data sets: the embedded digits, file formats, synthetic data with known parameters."""

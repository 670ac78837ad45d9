"""Training: the one SVI loop and its objectives."""

"""Run directories: their layout, and diagnosing a finished run."""

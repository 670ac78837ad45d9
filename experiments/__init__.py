"""Experiments: data, the shared SVI loop, evaluation, diagnostics, reports and the ``vae-priors`` CLI."""

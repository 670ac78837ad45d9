"""Diagnostics: how each fitted q(z|x) relates to p(z), per point and in aggregate; generation and sample scores."""

"""Generative side of every pair: priors, decoders, likelihoods and the models that combine them."""

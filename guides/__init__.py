"""Guides q(z|x) (or q(z|x,y)): every one samples the single latent site ``"z"`` inside the data plate."""

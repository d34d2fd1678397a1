"""Data: sources, the first stage (autoencoder), text encoders, the latent cache, degradations."""

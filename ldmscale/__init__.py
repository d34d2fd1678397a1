"""ldmscale: scaling studies of latent diffusion models (Mei et al., 2024, "Bigger is not Always Better")."""

__version__ = "0.1.0"

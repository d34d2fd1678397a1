"""Diffusion: noise schedule and samplers, sampling from a run, diffusers pipeline export."""

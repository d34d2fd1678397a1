"""Training: the one loop (accelerate), its objectives, experiment trackers."""

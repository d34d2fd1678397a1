"""Evaluation: feature networks, metrics and their registry, reference statistics, evaluate."""

"""Downstream tasks and distillation, and the registry of task kinds a study applies."""

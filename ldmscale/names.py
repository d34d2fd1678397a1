"""What a run is, in the words its config.json, its eval results and a study's rows use: declared once here, so a
comparison cannot misspell them. StrEnum members are the strings themselves (JSON, f-strings, equality)."""

from __future__ import annotations

from enum import StrEnum


class Kind(StrEnum):
    """A run's kind (config.json "kind", a result row's "task" for the tasks that are runs of their own)."""

    TEXT_TO_IMAGE = "text-to-image"
    SUPER_RESOLUTION = "super-resolution"
    DREAMBOOTH = "dreambooth"


class Backbone(StrEnum):
    """The denoiser family (config.json "backbone")."""

    UNET = "unet-sd15"
    DIT = "dit"
    MMDIT = "mmdit"


def task_of(row: dict) -> str:
    """The task of a result row (rows from before tasks existed are text-to-image)."""
    return row.get("task", Kind.TEXT_TO_IMAGE)


def backbone_of(row: dict) -> str:
    """The backbone of a result row or run config (those from before transformers are UNets)."""
    return row.get("backbone", Backbone.UNET)

"""Stages: one file each, registered with `@register_stage`. Importing this package registers them all."""

from compress.stages import distill, engine, export, finetune, prune, quantize  # noqa: F401

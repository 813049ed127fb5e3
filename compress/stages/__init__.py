"""Stages: one file each, registered with `@register_stage`. Importing this package registers them all."""

from compress.stages import export, finetune, quantize  # noqa: F401

"""Integrations with training frameworks: `AdapterCallback` for `transformers.Trainer`."""

from .trainer import AdapterCallback

__all__ = ["AdapterCallback"]

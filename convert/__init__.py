"""The torch side of flax_latentup: torch checkpoints to Flax pipeline folders."""

from .convert_checkpoint import convert, main, verify

__all__ = ["convert", "main", "verify"]

"""Flax NNX modules of the upscaler's three models."""

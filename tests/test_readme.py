"""README.md's Python examples run as written, on a tiny local model in place of the hub's.

Each ```python block is executed in order in one namespace (the later blocks use the
``upscaler`` the first one makes), with the hub repo id replaced by a local pipeline folder
and the inputs a reader brings (``low_res_latents``, ``prompts``, ``pictures``, ...) made here
at the tiny model's sizes. In the multi-host block, ``jax.distributed`` is not started (a
session-wide change; test_parallel.py starts it in processes of their own): the call and its
arguments are recorded instead.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import PIL.Image
import pytest

from flax_latentup import parallel
from tests import helpers

README = os.path.join(helpers.ROOT, "README.md")
REPO = "stabilityai/sd-x2-latent-upscaler"


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


@pytest.mark.heavy
def test_readme_python_examples_run(flax_pipe_dir, tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) == 6, "README's Python blocks changed: update this test"
    calls = []
    monkeypatch.setattr(parallel, "initialize_distributed", lambda *a, **k: calls.append((a, k)))

    def config(part):
        with open(os.path.join(flax_pipe_dir, part, "config.json")) as f:
            return json.load(f)

    unet, text, vae = config("unet"), config("text_encoder"), config("vae")
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    ns = {
        "low_res_latents": normal(1, 8, 8, 4),
        "prompts": ["a cat", "a dog"],
        "latents": normal(2, 8, 8, 4),
        "sample": normal(1, 16, 16, unet["in_channels"]),
        "timestep": np.array([0.5], np.float32),
        "encoder_hidden_states": normal(1, 77, text["hidden_size"]),
        "timestep_cond": normal(1, unet["time_cond_proj_dim"]),
        "pictures": np.tanh(normal(1, 8 * scale, 8 * scale, 3)),
        "big_latents": normal(1, 12, 12, 4),
        "seeds": [11, 12],
    }
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        code = block.replace(f'"{REPO}"', repr(str(flax_pipe_dir)))
        exec(compile(code, README, "exec"), ns)
        if "upscaler" in ns:
            ns["upscaler"].set_progress_bar_config(disable=True)

    # what the blocks promise
    with PIL.Image.open(tmp_path / "astronaut_1024.png") as picture:
        assert picture.size == (2 * 8 * scale,) * 2  # 2x the pictures of 8x8 latents
    assert len(ns["images"]) == 1  # the VAE block's last decode: its tiled big latents
    assert ns["images"].shape == (1, 12 * scale, 12 * scale, 3)
    assert ns["out"].shape == (1, 16, 16, unet["out_channels"])  # the UNet's output
    assert ns["latents"].shape == (1, 8, 8, 4)  # the VAE's encode of the pictures

    assert calls == [((), {})]  # the environment's settings, or JAX's detection
    assert ns["mine"] == [0, 1]  # one process: its share is all

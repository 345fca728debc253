"""A tiny random-weight pipeline folder, built without torch or network.

It has the published architecture in miniature (CLIP text tower, 4-level VAE, K-UNet) and the
hub's scheduler config, so the whole upscaling path — hub-layout loading, tokenizer, VAE
encode, sampling, decode, image writing — can be checked on a fresh install offline:
``flax-latentup selftest``. Its outputs are noise-like pictures, not upscales.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax.numpy as jnp
from flax import nnx

from flax_latentup.configs import AutoencoderKLConfig, CLIPTextConfig, UNet2DConditionConfig
from flax_latentup.sampling import EulerSchedulerConfig

_WORDS = ("a", "photo", "of", "the", "cat", "dog", "castle", "landscape", "astronaut", "horse")


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols that byte-level BPE uses for the bytes 0..255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def write_tiny_tokenizer(folder: str) -> str:
    """A small CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json).

    Every byte symbol alone and word-final, merges that spell a few words, and the special
    tokens last (``<|endoftext|>`` has the highest id, as in the real CLIP vocabulary).
    """
    os.makedirs(folder, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    merges: list[str] = []
    for word in _WORDS:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            },
            f,
        )
    return folder


def tiny_configs() -> tuple[CLIPTextConfig, AutoencoderKLConfig, UNet2DConditionConfig]:
    """Small configs with the published structure (VAE downsample factor 8)."""
    clip = CLIPTextConfig.tiny()
    vae = AutoencoderKLConfig(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=64,
    )
    unet = dataclasses.replace(UNet2DConditionConfig.tiny(), layers_per_block=1)
    return clip, vae, unet


def make_tiny_pipeline(folder: str, seed: int = 0):
    """Build a tiny random pipeline (JAX initialisers, seeded), save it to ``folder`` in the
    Flax diffusers layout and return it."""
    from transformers import CLIPTokenizer

    from flax_latentup.models.clip import FlaxCLIPTextModel
    from flax_latentup.models.unet import FlaxUNet2DConditionModel
    from flax_latentup.models.vae import FlaxAutoencoderKL
    from flax_latentup.pipeline import FlaxStableDiffusionLatentUpscalePipeline

    clip_cfg, vae_cfg, unet_cfg = tiny_configs()
    rngs = nnx.Rngs(seed)
    kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=jnp.float32)
    tok_dir = write_tiny_tokenizer(os.path.join(folder + ".tokenizer-src"))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    pipe = FlaxStableDiffusionLatentUpscalePipeline(
        FlaxCLIPTextModel(clip_cfg, **kw),
        FlaxAutoencoderKL(vae_cfg, **kw),
        FlaxUNet2DConditionModel(unet_cfg, **kw),
        tokenizer,
        EulerSchedulerConfig.sd_x2_latent_upscaler(),
    )
    pipe.save_pretrained(folder)
    return pipe

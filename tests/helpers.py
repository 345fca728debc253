"""Builders of tiny seeded torch models saved as real checkpoint folders (no network, no hub).

Parameters are randomised beyond the libraries' default init (norm scales around 1, non-zero
biases) so that parity tests exercise every weight, not only the matrices.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------------
# Subprocesses (fake device counts, several jax.distributed processes)
# --------------------------------------------------------------------------------------------


def xla_flags(*flags: str) -> str:
    """This session's XLA_FLAGS (see conftest) extended with ``flags``, for a subprocess."""
    return " ".join(filter(None, [os.environ.get("XLA_FLAGS"), *flags]))


def assert_same_state_dict(got: torch.nn.Module, want: torch.nn.Module, dtype=None, what=""):
    """``got``'s state dict has ``want``'s keys and, bit for bit, its tensors (cast to
    ``dtype`` when given)."""
    got, want = got.state_dict(), want.state_dict()
    assert sorted(got) == sorted(want), what
    for key, value in want.items():
        expected = value if dtype is None else value.to(dtype)
        assert torch.equal(got[key], expected), f"{what}: {key}"


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -c code`` (dedented) with this checkout importable and JAX on the CPU."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 900) -> str:
    """Wait for ``proc``; its stdout (the end of its stderr is the message if it failed)."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out


def free_port() -> int:
    """A TCP port free on this machine just now (for a jax.distributed coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# Parameter randomisation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Perturb every parameter with seeded noise (norm weights stay near 1)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
        if name.endswith("bias"):
            p.copy_(noise * scale)
        elif p.ndim == 1 and "norm" in name:
            p.copy_(1.0 + noise * scale)
        else:
            p.add_(noise * scale * p.float().std().clamp(min=1e-3).to(p.dtype))
    return module


# --------------------------------------------------------------------------------------------
# A hand-written CLIP BPE tokenizer
# --------------------------------------------------------------------------------------------


def write_clip_tokenizer(folder: str) -> str:
    """Write vocab.json, merges.txt and tokenizer_config.json of a small CLIP tokenizer
    (every byte symbol, a few merged words, the special tokens last so ``<|endoftext|>`` has
    the highest id as in the real CLIP vocab)."""
    from flax_latentup.tiny import write_tiny_tokenizer

    return write_tiny_tokenizer(folder)


def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder)


PROMPTS = (
    "a photo of the cat",
    "",
    "astronaut riding a horse in a castle landscape, 4k!",
    # long enough to be truncated at 77 tokens
    " ".join(["a photo of the dog"] * 30),
)


def tokenize(tokenizer, prompts) -> np.ndarray:
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids
    return ids.astype(np.int32)


# --------------------------------------------------------------------------------------------
# CLIP text encoders
# --------------------------------------------------------------------------------------------

TINY_CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    pad_token_id=1,
)

VIT_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    pad_token_id=1,
    eos_token_id=2,
    projection_dim=768,
)


def make_clip_text_model(seed: int = 0, **config):
    """A seeded random transformers ``CLIPTextModel`` (eval mode)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(CLIPTextConfig(**config)).eval()
    return randomize_(model, seed + 1)


def save_clip_text_model(model, folder: str, legacy_keys: bool = False) -> str:
    """Save like transformers does; ``legacy_keys`` writes the 4.x spelling of the hub files
    (``text_model.`` prefix and the ``position_ids`` buffer)."""
    model.save_pretrained(folder)
    if legacy_keys:
        from safetensors.torch import save_file

        sd = {f"text_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        n = model.config.max_position_embeddings
        sd["text_model.embeddings.position_ids"] = torch.arange(n)[None]
        save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


# --------------------------------------------------------------------------------------------
# K-diffusion UNets (diffusers UNet2DConditionModel with K blocks)
# --------------------------------------------------------------------------------------------

_K_DOWN = (
    "KDownBlock2D",
    "KCrossAttnDownBlock2D",
    "KCrossAttnDownBlock2D",
    "KCrossAttnDownBlock2D",
)
_K_UP = ("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D")

# diffusers' fast-test UNet of StableDiffusionLatentUpscalePipeline.
TINY_UNET = dict(
    act_fn="gelu",
    attention_head_dim=8,
    norm_num_groups=None,
    block_out_channels=[32, 32, 64, 64],
    time_cond_proj_dim=160,
    conv_in_kernel=1,
    conv_out_kernel=1,
    cross_attention_dim=32,
    down_block_types=_K_DOWN,
    in_channels=8,
    mid_block_type=None,
    only_cross_attention=False,
    out_channels=5,
    resnet_time_scale_shift="scale_shift",
    time_embedding_type="fourier",
    timestep_post_act="gelu",
    up_block_types=_K_UP,
)

# Three blocks, three layers per block, one head size per block (up block i uses entry i, not
# reversed), silu, sin-before-cos, norm_eps far from the 1e-5 that diffusers keeps in the
# attention norms, 3x3 conv_in/conv_out, an activation on the time embedding, no post-act,
# centred input.
SMALL_UNET = dict(
    act_fn="silu",
    attention_head_dim=[8, 16, 32],
    norm_num_groups=None,
    block_out_channels=[32, 64, 64],
    layers_per_block=3,
    norm_eps=1e-3,
    time_cond_proj_dim=12,
    conv_in_kernel=3,
    conv_out_kernel=3,
    cross_attention_dim=24,
    down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
    up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
    in_channels=4,
    out_channels=4,
    mid_block_type=None,
    flip_sin_to_cos=False,
    time_embedding_type="fourier",
    time_embedding_act_fn="mish",
    timestep_post_act=None,
    center_input_sample=True,
)

# The published stabilityai/sd-x2-latent-upscaler UNet.
SD_X2_UNET = dict(
    TINY_UNET,
    attention_head_dim=64,
    block_out_channels=[384, 384, 768, 768],
    cross_attention_dim=768,
    layers_per_block=4,
    time_cond_proj_dim=896,
)


def make_unet(seed: int = 0, **config):
    """A seeded random diffusers ``UNet2DConditionModel`` (eval mode, every parameter perturbed)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**config).eval()
    return randomize_(model, seed + 1)


def save_unet(model, folder: str) -> str:
    """Save like diffusers does (config.json + diffusion_pytorch_model.safetensors)."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def unet_inputs(config: dict, batch: int, height: int, width: int, seed: int = 0, length: int = 7):
    """Random NCHW sample, per-row timesteps around the upscaler's range, text and cond."""
    rng = np.random.RandomState(seed)
    inputs = {
        "sample": rng.randn(batch, config["in_channels"], height, width).astype(np.float32),
        "timestep": (rng.randn(batch) * 0.5).astype(np.float32),
        "encoder_hidden_states": rng.randn(batch, length, config["cross_attention_dim"]).astype(
            np.float32
        ),
    }
    if config.get("time_cond_proj_dim"):
        inputs["timestep_cond"] = rng.randn(batch, config["time_cond_proj_dim"]).astype(np.float32)
    return inputs


@torch.no_grad()
def torch_unet_output(model, inputs: dict) -> np.ndarray:
    """diffusers' output for ``unet_inputs``, as NHWC numpy."""
    cond = inputs.get("timestep_cond")
    out = model(
        torch.from_numpy(inputs["sample"]),
        torch.from_numpy(inputs["timestep"]),
        torch.from_numpy(inputs["encoder_hidden_states"]),
        timestep_cond=None if cond is None else torch.from_numpy(cond),
    ).sample
    return out.numpy().transpose(0, 2, 3, 1)


# --------------------------------------------------------------------------------------------
# VAEs (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)

# The published SD 1.x kl-f8 VAE (stabilityai/sd-x2-latent-upscaler, vae/config.json).
SD_KL_F8_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    latent_channels=4,
    sample_size=256,
    scaling_factor=0.18215,
)

# How diffusers < 0.14 spelled the mid-block attention projections.
_LEGACY_ATTENTION_NAMES = {
    "to_q": "query",
    "to_k": "key",
    "to_v": "value",
    "to_out.0": "proj_attn",
}


def make_vae(seed: int = 0, **config):
    """A seeded random diffusers ``AutoencoderKL`` (eval mode)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    model = AutoencoderKL(**config).eval()
    return randomize_(model, seed + 1)


def save_vae(model, folder: str, legacy_attention: str | None = None) -> str:
    """Save like diffusers does. ``legacy_attention="linear"`` renames the mid-block attention
    keys to the old ``query/key/value/proj_attn`` spelling; ``"conv"`` also stores those
    weights as 1x1 convolutions ``[C, C, 1, 1]``."""
    model.save_pretrained(folder)
    if legacy_attention is not None:
        from safetensors.torch import save_file

        sd = {}
        for key, value in model.state_dict().items():
            for new, old in _LEGACY_ATTENTION_NAMES.items():
                marker = f".mid_block.attentions.0.{new}."
                if marker in key:
                    key = key.replace(marker, f".mid_block.attentions.0.{old}.")
                    if legacy_attention == "conv" and key.endswith("weight"):
                        value = value[:, :, None, None]
            sd[key] = value.contiguous()
        path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        save_file(sd, path, metadata={"format": "pt"})
    return folder


# --------------------------------------------------------------------------------------------
# A whole tiny torch pipeline
# --------------------------------------------------------------------------------------------

HUB_SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    num_train_timesteps=1000,
    interpolation_type="log_linear",
    prediction_type="original_sample",
    trained_betas=None,
)
# diffusers' own fast test: EulerDiscreteScheduler(prediction_type="sample"), linear
FAST_TEST_SCHEDULER = dict(prediction_type="sample")

# the fast-test UNet with one layer per block, to keep whole sampled runs quick
PIPE_UNET = dict(TINY_UNET, layers_per_block=1)

PIPE_VAE = dict(
    block_out_channels=(32, 32, 32, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=32,
    sample_size=64,
    scaling_factor=0.18215,
)


def make_torch_pipeline(
    seed: int = 0,
    scheduler: dict | None = None,
    tokenizer_dir: str | None = None,
    *,
    unet: dict | None = None,
    vae: dict | None = None,
    text: dict | None = None,
):
    """A seeded ``StableDiffusionLatentUpscalePipeline`` (every weight randomised), tiny by
    default; ``unet``, ``vae``, ``text``: other diffusers/transformers configs (e.g. the
    published ones, ``SD_X2_UNET``, ``SD_KL_F8_VAE``, ``VIT_L14_TEXT``)."""
    import tempfile

    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionLatentUpscalePipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(seed)
    unet_model = randomize_(UNet2DConditionModel(**(unet or PIPE_UNET)).eval(), seed + 1)
    vae_model = randomize_(AutoencoderKL(**(vae or PIPE_VAE)).eval(), seed + 2, scale=0.05)
    text_encoder = make_clip_text_model(seed + 3, **(text or dict(TINY_CLIP, eos_token_id=2)))
    if tokenizer_dir is None:
        tokenizer_dir = write_clip_tokenizer(tempfile.mkdtemp(prefix="tok-"))
    pipe = StableDiffusionLatentUpscalePipeline(
        vae=vae_model,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(tokenizer_dir),
        unet=unet_model,
        scheduler=EulerDiscreteScheduler(**(scheduler or HUB_SCHEDULER)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def torch_tiling(model, tile_sample_size: int):
    """diffusers' ``enable_tiling()`` with a small tile (the latent tile follows the factor)."""
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    old = (model.tile_sample_min_size, model.tile_latent_min_size)
    model.enable_tiling()
    model.tile_sample_min_size = tile_sample_size
    model.tile_latent_min_size = tile_sample_size // factor
    try:
        yield model
    finally:
        model.disable_tiling()
        model.tile_sample_min_size, model.tile_latent_min_size = old


def fake_hub(monkeypatch, snapshot, repo, source=None, repo_id=None, revisions=None) -> list[str]:
    """``huggingface_hub.snapshot_download`` over a repo of the file names ``repo`` (named
    ``repo_id`` if given: another id fails): each file fetched (by huggingface_hub's own
    pattern matching) is copied from the folder ``source`` into the folder ``snapshot``, or
    written empty without ``source``; the revision each call asks for is put in the list
    ``revisions`` if given. Returns the list the fetched names are put in."""
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    fetched: list[str] = []

    def snapshot_download(asked, *, allow_patterns, ignore_patterns, **kwargs):
        assert repo_id is None or asked == repo_id, asked
        if revisions is not None:
            revisions.append(kwargs.get("revision"))
        for name in filter_repo_objects(
            repo, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns
        ):
            fetched.append(name)
            target = os.path.join(snapshot, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if source is None:
                open(target, "w").close()
            else:
                shutil.copy(os.path.join(source, name), target)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return fetched

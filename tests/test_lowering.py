"""The whole upscaling program at the published sizes, lowered for TPUs and CUDA GPUs.

No accelerator is needed to lower a program for one (``Traced.lower(lowering_platforms=...)``
gives the StableHLO that the accelerator's compiler takes); the automatic choices are made
for the device named with :func:`~flax_latentup.models.target.compiling_for`. This checks, on
a CPU machine, that the branches taken on TPUs and GPUs trace, and what their program is
made of: bfloat16 convolutions, float32 latents between steps, the step loop not unrolled,
the VAE's attention over 128x128 latents chunked. The weights are abstract (shapes only).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from flax_latentup import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from flax_latentup.configs import AutoencoderKLConfig, CLIPTextConfig, UNet2DConditionConfig
from flax_latentup.models.target import compiling_for
from flax_latentup.parallel import _sharded_program
from flax_latentup.pipeline import CoreOptions, GraphDefs, preferred_dtype, upscale_core

BATCH = 8  # the GPU benchmark's workload: 64x64 -> 128x128 latents (512 -> 1024 px), CFG
LOW = 64


class Device:
    """What the automatic choices read of a device: its platform and compute capability."""

    def __init__(self, platform: str, compute_capability: str | None = None):
        self.platform, self.compute_capability = platform, compute_capability


# (lowering platform, device compiled for): a TPU, and a T4 GPU (Colab's; no cuDNN fused
# attention there, whose lowering needs cuDNN itself, absent on a CPU machine)
TARGETS = {"tpu": ("tpu", Device("tpu")), "cuda": ("cuda", Device("gpu", "7.5"))}


@pytest.fixture(scope="module")
def abstract_pipeline():
    """Graph definitions and abstract bfloat16 parameters of the published three models, in
    the dtype chosen for an accelerator."""
    dtype = preferred_dtype(Device("tpu"))
    assert dtype == jnp.bfloat16
    kw = dict(dtype=dtype, param_dtype=dtype)
    models = {
        "text_encoder": FlaxCLIPTextModel.abstract(CLIPTextConfig.vit_l14(), **kw),
        "vae": FlaxAutoencoderKL.abstract(AutoencoderKLConfig.sd_kl_f8(), **kw),
        "unet": FlaxUNet2DConditionModel.abstract(
            UNet2DConditionConfig.sd_x2_latent_upscaler(), **kw
        ),
    }
    split = {part: nnx.split(model) for part, model in models.items()}
    graphdefs = GraphDefs(**{part: s[0] for part, s in split.items()})
    return graphdefs, {part: s[1] for part, s in split.items()}


def abstract_batch(steps: int) -> dict[str, jax.ShapeDtypeStruct]:
    s, f32 = jax.ShapeDtypeStruct, jnp.float32
    return {
        "ids": s((BATCH, 77), jnp.int32),
        "negative_ids": s((BATCH, 77), jnp.int32),
        "image": s((BATCH, LOW, LOW, 4), f32),
        "keys": s((BATCH, 2), jnp.uint32),
        "sigmas": s((steps + 1,), f32),
        "timesteps": s((steps,), f32),
        "init_noise_sigma": s((), f32),
        "guidance_scale": s((), f32),
        "callback_steps": s((), jnp.int32),
    }


def lower(abstract_pipeline, target: str, steps: int = 20) -> str:
    graphdefs, params = abstract_pipeline
    platform, device = TARGETS[target]
    with compiling_for(device):
        program = jax.jit(functools.partial(upscale_core, graphdefs, options=CoreOptions(cfg=True)))
        lowered = program.trace(params, abstract_batch(steps)).lower(lowering_platforms=(platform,))
    return lowered.as_text()


def tensor_types(text: str) -> set[tuple[tuple[int, ...], str]]:
    """Every ranked tensor type in the module: (shape, element type)."""
    out = set()
    for dims, dtype in re.findall(r"tensor<((?:\d+x)+)(\w+)>", text):
        out.add((tuple(int(d) for d in dims.rstrip("x").split("x")), dtype))
    return out


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_whole_program_lowers_for_the_accelerator(abstract_pipeline, target):
    text = lower(abstract_pipeline, target)
    high = 2 * LOW
    # every convolution (UNet and VAE, 100 and more) computes in bfloat16
    convs = [ln for ln in text.splitlines() if "stablehlo.convolution" in ln]
    assert len(convs) > 100
    operands = [re.search(r": \((tensor<[^>]+>), (tensor<[^>]+>)\)", ln) for ln in convs]
    assert all(m and m[1].endswith("xbf16>") and m[2].endswith("xbf16>") for m in operands)
    # the step loop carries the latents (and the sigmas) in float32
    loops = [ln.split(") : ", 1)[1] for ln in text.splitlines() if "stablehlo.while" in ln]
    carried = [tensor_types(types) for types in loops]
    assert any(((BATCH, high, high, 4), "f32") in c and ((20,), "f32") in c for c in carried)
    assert not any(((BATCH, high, high, 4), "bf16") in c for c in carried)
    # no intermediate holds the VAE mid-block's whole attention score matrix (16384^2 per
    # image: 8 GiB in float32 for the batch): its attention runs over query chunks
    tokens = high * high
    assert not [t for t in tensor_types(text) if t[0].count(tokens) >= 2]
    # nothing that needs the host or a library the accelerator's compiler lacks
    assert "custom_call" not in text


def test_steps_do_not_unroll(abstract_pipeline):
    """The Euler loop is one scan: 2 steps and 20 steps lower to the same operations."""
    ops = {}
    for steps in (2, 20):
        text = lower(abstract_pipeline, "tpu", steps)
        ops[steps] = re.findall(r"= (stablehlo\.\w+|\"?[\w.]+\"?)\(", text)
    assert len(ops[2]) == len(ops[20]) and sorted(ops[2]) == sorted(ops[20])
    assert ops[20].count("stablehlo.convolution") > 100


def test_sharded_program_lowers_for_a_pod_slice(abstract_pipeline):
    """The sharded program over 8 TPU devices ("data" mesh, as on a v5e-8 or across hosts):
    one SPMD program of 8 partitions, the batch split over them, the weights replicated."""
    graphdefs, params = abstract_pipeline
    batch = abstract_batch(20)
    mesh = AbstractMesh((8,), ("data",))
    with compiling_for(Device("tpu")):
        program = _sharded_program(graphdefs, CoreOptions(cfg=True), mesh, tuple(sorted(batch)))
        text = program.trace(params, batch).lower(lowering_platforms=("tpu",)).as_text()
    assert re.search(r"mhlo.num_partitions = 8\b", text)
    assert re.search(r'sdy.mesh @mesh = <\["data"=8\]>', text)
    signature = re.search(r"func.func public @main\((.*?)\) ->", text, re.S)[1]
    args = re.findall(
        r"%arg\d+: (tensor<[^>]+>) \{sdy.sharding = #sdy.sharding<@mesh, \[(.*?)\]>", signature
    )
    shardings = {}
    for tensor, dims in args:  # per dimension, the mesh axes it is split over
        shardings.setdefault(tensor, set()).add(dims.replace(" ", ""))
    assert shardings["tensor<8x77xi32>"] == {'{"data"},{}'}  # token ids: split
    assert shardings["tensor<8x64x64x4xf32>"] == {'{"data"},{},{},{}'}  # low-res latents
    assert shardings["tensor<3x3x384x384xbf16>"] == {"{},{},{},{}"}  # UNet kernels: copies
    assert shardings["tensor<21xf32>"] == {"{}"}  # the sigmas

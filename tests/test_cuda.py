"""torch on CUDA against the port on the same GPU: the published full-size configs.

Skipped unless a CUDA GPU is visible to torch *and* to JAX. ``tests/conftest.py`` pins JAX to
the CPU with ``os.environ.setdefault("JAX_PLATFORMS", "cpu")``, so the GPU run sets
``JAX_PLATFORMS=cuda`` itself (``benchmarks/gpu_run.sh`` does, together with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that JAX leaves GPU memory to torch); both
frameworks then run in this process and compare arrays directly::

    JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false python -m pytest -m cuda -v

Weights are seeded random ones (``tests/helpers.py`` builders); with
``FLAX_LATENTUP_REAL_MODEL=/path/to/sd-x2-latent-upscaler`` (a diffusers-layout folder with
the torch safetensors) the same comparisons also run on the published weights.

float32 on both sides, TF32 off in torch and "highest" matmul precision in JAX, so the two
sides differ only by the order of float32 operations.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests import helpers

REAL_MODEL = os.environ.get("FLAX_LATENTUP_REAL_MODEL")
# max |err| / max |ref| of a whole float32 model: both sides compute in float32 without TF32,
# so they differ by float32 rounding in another order (the same comparisons on the CPU: 1e-6
# to 4e-6)
REL_TOL = 1e-4


def _cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch (torch.cuda.is_available() is False)"
    import jax

    try:
        jax.devices("gpu")
    except RuntimeError as e:
        return (
            f"no GPU visible to JAX ({e.__class__.__name__}: {str(e)[:120]}); "
            "run with JAX_PLATFORMS=cuda (see benchmarks/gpu_run.sh)"
        )
    return None


_REASON = _cuda_skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]

WEIGHTS = [
    "random",
    pytest.param(
        "real",
        marks=pytest.mark.skipif(
            REAL_MODEL is None, reason="set FLAX_LATENTUP_REAL_MODEL to a pipeline folder"
        ),
    ),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """No TF32 in torch, full float32 matmuls in JAX, for the duration of a test."""
    import jax

    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with jax.default_matmul_precision("highest"):
        yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def relative_error(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def assert_rel(name: str, got, ref, tol: float = REL_TOL) -> None:
    rel = relative_error(got, ref)
    print(f"{name}: max |err| / max |ref| = {rel:.3g}")
    assert rel <= tol, f"{name}: max |err| / max |ref| = {rel:.3g} > {tol} (float32, no TF32)"


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).cuda()


def component_folder(weights: str, part: str, tmp_path) -> tuple[torch.nn.Module, str, str]:
    """(torch model on the GPU, folder, subfolder) of one component, random or published."""
    if weights == "real":
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        cls = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
        model = cls[part].from_pretrained(REAL_MODEL, subfolder=part, dtype=torch.float32)
        return model.eval().cuda(), REAL_MODEL, part
    if part == "unet":
        model = helpers.make_unet(seed=30, **helpers.SD_X2_UNET)
        folder = helpers.save_unet(model, str(tmp_path / "unet"))
    elif part == "vae":
        model = helpers.make_vae(seed=31, **helpers.SD_KL_F8_VAE)
        folder = helpers.save_vae(model, str(tmp_path / "vae"))
    else:
        model = helpers.make_clip_text_model(seed=32, **helpers.VIT_L14_TEXT)
        folder = helpers.save_clip_text_model(model, str(tmp_path / "text_encoder"))
    return model.cuda(), folder, None


# --------------------------------------------------------------------------------------------
# Each model, float32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", WEIGHTS)
def test_unet_float32(weights, tmp_path):
    import jax.numpy as jnp

    from flax_latentup import FlaxUNet2DConditionModel

    model, folder, sub = component_folder(weights, "unet", tmp_path)
    # 64x64 latents (512 px output), batch 2 as under classifier-free guidance
    inputs = helpers.unet_inputs(
        helpers.SD_X2_UNET, batch=2, height=64, width=64, seed=5, length=77
    )
    with torch.no_grad():
        ref = model(
            torch.from_numpy(inputs["sample"]).cuda(),
            torch.from_numpy(inputs["timestep"]).cuda(),
            torch.from_numpy(inputs["encoder_hidden_states"]).cuda(),
            timestep_cond=torch.from_numpy(inputs["timestep_cond"]).cuda(),
        ).sample
    ref = ref.cpu().numpy().transpose(0, 2, 3, 1)
    del model
    torch.cuda.empty_cache()
    flax_model = FlaxUNet2DConditionModel.from_pretrained(folder, sub)
    got = flax_model(
        jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)),
        jnp.asarray(inputs["timestep"]),
        jnp.asarray(inputs["encoder_hidden_states"]),
        jnp.asarray(inputs["timestep_cond"]),
    )
    assert_rel("UNet 64x64 latents", got, ref)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_vae_float32(weights, tmp_path):
    import jax.numpy as jnp

    from flax_latentup import FlaxAutoencoderKL

    model, folder, sub = component_folder(weights, "vae", tmp_path)
    rng = np.random.default_rng(6)
    pictures = rng.uniform(-1, 1, (1, 256, 256, 3)).astype(np.float32)
    latents = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    with torch.no_grad():
        ref_mean = model.encode(nchw(pictures)).latent_dist.mean.cpu().numpy()
        ref_dec = model.decode(nchw(latents)).sample.cpu().numpy()
    del model
    torch.cuda.empty_cache()
    flax_model = FlaxAutoencoderKL.from_pretrained(folder, sub)
    assert_rel(
        "VAE encode 256 px (mean)",
        flax_model.encode(jnp.asarray(pictures)).mean,
        ref_mean.transpose(0, 2, 3, 1),
    )
    assert_rel(
        "VAE decode 64x64 latents",
        flax_model.decode(jnp.asarray(latents)),
        ref_dec.transpose(0, 2, 3, 1),
    )


@pytest.mark.parametrize("weights", WEIGHTS)
def test_clip_float32(weights, tmp_path, tokenizer):
    import jax.numpy as jnp

    from flax_latentup import FlaxCLIPTextModel

    model, folder, sub = component_folder(weights, "text_encoder", tmp_path)
    if weights == "real":
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(REAL_MODEL, subfolder="tokenizer")
    ids = helpers.tokenize(tokenizer, helpers.PROMPTS)
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)).cuda())
    ref_hidden = out.last_hidden_state.cpu().numpy()
    ref_pooled = out.pooler_output.cpu().numpy()
    got = FlaxCLIPTextModel.from_pretrained(folder, sub)(jnp.asarray(ids))
    assert_rel("CLIP last_hidden_state", got.last_hidden_state, ref_hidden)
    assert_rel("CLIP pooler_output", got.pooler_output, ref_pooled)


# --------------------------------------------------------------------------------------------
# The whole pipeline, 256x256 -> 512x512
# --------------------------------------------------------------------------------------------

STEPS = 10
# float32: both sides compute in float32 without TF32, so they differ only in the order of
# float32 operations; after 10 Euler steps through the full UNet and the VAE decode a whole
# sampled image stays within 1e-3 (pictures in [0, 1]).
PIPE_TOL_FP32 = 1e-3  # max abs pixel error
# bfloat16 (8-bit mantissa: 2^-8 = 0.4 % rounding per operation) cannot match a float32
# reference pixel for pixel; what it must do is lose no more than torch itself loses in
# bfloat16 on the same run. The bound: the port's mean abs pixel error against torch float32
# at most twice torch bfloat16's own (the two round in different places; the port also keeps
# its latents and sampler update in float32, torch casts them back to bfloat16 every step),
# and at most 0.01 (2.5 / 255) in any case.
BF16_VS_TORCH_BF16 = 2.0
PIPE_MEAN_TOL_BF16 = 0.01


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory, tokenizer_dir):
    """A diffusers folder: the published config with random weights, or the real model."""
    if REAL_MODEL:
        return REAL_MODEL
    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline

    pipe = StableDiffusionLatentUpscalePipeline(
        vae=helpers.make_vae(seed=41, **helpers.SD_KL_F8_VAE),
        text_encoder=helpers.make_clip_text_model(seed=42, **helpers.VIT_L14_TEXT),
        tokenizer=helpers.load_tokenizer(tokenizer_dir),
        unet=helpers.make_unet(seed=43, **helpers.SD_X2_UNET),
        scheduler=EulerDiscreteScheduler(**helpers.HUB_SCHEDULER),
    )
    folder = str(tmp_path_factory.mktemp("sd_x2_pipe"))
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pipeline_case(pipeline_folder):
    """Inputs (the 32x32 latents of a 256 px picture, the noise), diffusers' float32 output and
    how far its bfloat16 output is from that."""
    from diffusers import StableDiffusionLatentUpscalePipeline

    rng = np.random.default_rng(7)
    low = rng.standard_normal((1, 32, 32, 4)).astype(np.float32)
    noise = rng.standard_normal((1, 64, 64, 4)).astype(np.float32)
    kw = dict(
        prompt="a photo of the cat",
        negative_prompt="the dog",
        num_inference_steps=STEPS,
        guidance_scale=6.0,
    )
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(
                pipeline_folder, dtype=dtype
            ).to("cuda")
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad():
                out[dtype] = pipe(
                    image=nchw(low).to(dtype), latents=nchw(noise).to(dtype), output_type="np", **kw
                ).images.astype(np.float64)
            del pipe
            torch.cuda.empty_cache()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    ref, ref_bf16 = out[torch.float32], out[torch.bfloat16]
    assert ref.shape == ref_bf16.shape == (1, 512, 512, 3)
    torch_bf16_err = np.abs(ref_bf16 - ref).mean()
    print(f"torch bfloat16 vs torch float32: mean abs pixel error {torch_bf16_err:.3g}")
    return dict(low=low, noise=noise, kw=kw, ref=ref, torch_bf16_err=torch_bf16_err)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pipeline_256_to_512(pipeline_folder, pipeline_case, dtype):
    import jax.numpy as jnp

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline

    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
        pipeline_folder, dtype=jnp.dtype(dtype)
    )
    pipe.set_progress_bar_config(disable=True)
    c = pipeline_case
    got = pipe(image=c["low"], latents=c["noise"], output_type="np", **c["kw"]).images
    assert got.shape == c["ref"].shape
    err = np.abs(got.astype(np.float64) - c["ref"])
    print(f"pipeline {dtype}: max abs {err.max():.3g}, mean abs {err.mean():.3g}")
    if dtype == "float32":
        assert err.max() <= PIPE_TOL_FP32, (
            f"float32 pipeline: max abs pixel error {err.max():.3g} > {PIPE_TOL_FP32} (both "
            f"sides float32 without TF32; {STEPS} Euler steps amplify rounding differences)"
        )
    else:
        bound = min(BF16_VS_TORCH_BF16 * c["torch_bf16_err"], PIPE_MEAN_TOL_BF16)
        assert err.mean() <= bound, (
            f"bfloat16 pipeline vs float32 diffusers: mean abs pixel error {err.mean():.3g} > "
            f"{bound:.3g} = min({BF16_VS_TORCH_BF16} x torch bfloat16's own error "
            f"{c['torch_bf16_err']:.3g}, {PIPE_MEAN_TOL_BF16})"
        )

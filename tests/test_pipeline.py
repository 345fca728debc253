"""The Flax pipeline against diffusers' StableDiffusionLatentUpscalePipeline, end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from flax import nnx
from transformers import CLIPTokenizer

from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
from flax_latentup.models.conv import conv_config
from tests import helpers

TOL = 1e-3  # max abs difference of float32 images in [0, 1] after a whole sampled run


@pytest.fixture(scope="module")
def torch_pipe(tokenizer_dir):
    return helpers.make_torch_pipeline(seed=0, tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def pipe_dir(torch_pipe, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("torch_pipe"))
    torch_pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flax_pipe(pipe_dir):
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(batch: int, seed: int = 0, h: int = 8, w: int = 8):
    """Low-res latents and initial noise, NHWC numpy."""
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((batch, h, w, 4)).astype(np.float32)
    noise = rng.standard_normal((batch, 2 * h, 2 * w, 4)).astype(np.float32)
    return low, noise


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def run_torch(pipe, prompt, low, noise, **kw):
    with torch.no_grad():
        return pipe(
            prompt=prompt, image=nchw(low), latents=nchw(noise), output_type="np", **kw
        ).images


def run_flax(pipe, prompt, low, noise, **kw):
    return pipe(prompt=prompt, image=low, latents=noise, output_type="np", **kw).images


def two_step_call(seed: int) -> dict:
    """Arguments of a short, guidance-free call on one random input."""
    low, noise = inputs(1, seed=seed)
    return dict(
        prompt="x",
        image=low,
        latents=noise,
        num_inference_steps=2,
        guidance_scale=0.0,
        output_type="np",
    )


def assert_close(got, want, tol=TOL):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = float(np.max(np.abs(got - want)))
    assert err <= tol, f"max abs image error {err:.3g} > {tol}"


CASES = {
    "guidance0-2steps": dict(
        prompt="a photo of the cat", batch=1, num_inference_steps=2, guidance_scale=0.0
    ),
    "cfg6-negative": dict(
        prompt="a photo of the cat",
        batch=1,
        num_inference_steps=2,
        guidance_scale=6.0,
        negative_prompt="the dog",
    ),
    "batch2-10steps": dict(
        prompt=["a photo of the cat", "astronaut in a castle landscape"],
        batch=2,
        num_inference_steps=10,
        guidance_scale=0.0,
    ),
    "batch2-cfg": dict(
        prompt=["a photo of the cat", "the horse"],
        batch=2,
        num_inference_steps=2,
        guidance_scale=7.5,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_hub_scheduler(torch_pipe, flax_pipe, case):
    kw = dict(CASES[case])
    batch = kw.pop("batch")
    prompt = kw.pop("prompt")
    low, noise = inputs(batch, seed=len(case))
    want = run_torch(torch_pipe, prompt, low, noise, **kw)
    got = run_flax(flax_pipe, prompt, low, noise, **kw)
    assert_close(got, want)


@pytest.mark.parametrize("implementation", ["fast", "xla"])
def test_parity_with_each_convolution_implementation(torch_pipe, pipe_dir, implementation):
    """The rewritten convolutions forced on everywhere (Winograd kernels transformed once,
    ahead of the sampling loop), and XLA's own convolutions everywhere: both match."""
    fp = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(pipe_dir)
    fp.set_progress_bar_config(disable=True)
    low, noise = inputs(1, seed=21)
    kw = dict(num_inference_steps=3, guidance_scale=6.0)
    want = run_torch(torch_pipe, "a photo of the cat", low, noise, **kw)
    with conv_config(implementation):
        got = run_flax(fp, "a photo of the cat", low, noise, **kw)
    assert_close(got, want)


def test_winograd_kernels_computed_once_per_setting(pipe_dir):
    fp = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(pipe_dir)
    with conv_config("fast"):
        kernels = fp._unet_winograd_kernels()
        assert kernels and fp._unet_winograd_kernels() is kernels  # kept, not recomputed
    with conv_config("xla"):
        assert fp._unet_winograd_kernels() == {}
    fp._refresh_params()
    with conv_config("fast"):
        assert fp._unet_winograd_kernels() is not kernels  # params split again: recomputed


def test_parity_fast_test_scheduler(tokenizer_dir, tmp_path):
    """diffusers' own fast-test scheduler: prediction_type "sample", linear interpolation."""
    tp = helpers.make_torch_pipeline(
        seed=5, scheduler=helpers.FAST_TEST_SCHEDULER, tokenizer_dir=tokenizer_dir
    )
    tp.save_pretrained(str(tmp_path))
    fp = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path))
    fp.set_progress_bar_config(disable=True)
    low, noise = inputs(1, seed=11)
    for steps, g in ((2, 0.0), (3, 6.0)):
        want = run_torch(
            tp, "a photo of the dog", low, noise, num_inference_steps=steps, guidance_scale=g
        )
        got = run_flax(
            fp, "a photo of the dog", low, noise, num_inference_steps=steps, guidance_scale=g
        )
        assert_close(got, want)


def test_scheduler_set_as_in_diffusers(torch_pipe, flax_pipe, tmp_path):
    """``pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, ...)``
    changes what the pipeline samples with, as in diffusers, and what it saves; so does
    setting ``scheduler_config``, checked as the constructor checks it. The constructor takes
    the scheduler by diffusers' name too."""
    import copy

    from diffusers import EulerDiscreteScheduler, StableDiffusionLatentUpscalePipeline

    from flax_latentup.configs import ConfigError
    from flax_latentup.sampling import EulerSchedulerConfig

    low, noise = inputs(1, seed=17)
    kw = dict(num_inference_steps=3, guidance_scale=0.0)
    changes = dict(timestep_spacing="trailing", interpolation_type="linear")
    swapped = StableDiffusionLatentUpscalePipeline(
        **{
            **torch_pipe.components,
            "scheduler": EulerDiscreteScheduler.from_config(torch_pipe.scheduler.config, **changes),
        }
    )
    want = run_torch(swapped, "a photo of the cat", low, noise, **kw)
    pipe = copy.copy(flax_pipe)
    before = run_flax(pipe, "a photo of the cat", low, noise, **kw)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **changes)
    assert pipe.scheduler_config.timestep_spacing == "trailing"
    assert flax_pipe.scheduler_config.timestep_spacing == "linspace"  # the copy's own
    got = run_flax(pipe, "a photo of the cat", low, noise, **kw)
    assert_close(got, want)
    assert np.max(np.abs(got - before)) > 1e-3
    pipe.save_pretrained(tmp_path / "p")
    again = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "p"))
    assert again.scheduler_config == pipe.scheduler_config
    # a dict, or a config; a bad one is refused and the pipeline keeps its own
    pipe.scheduler_config = {**dict(torch_pipe.scheduler.config), "timestep_spacing": "leading"}
    assert pipe.scheduler.timestep_spacing == "leading"
    pipe.scheduler_config = EulerSchedulerConfig.sd_x2_latent_upscaler()
    assert pipe.scheduler_config == EulerSchedulerConfig.sd_x2_latent_upscaler()
    with pytest.raises(ConfigError, match="prediction_type"):
        pipe.scheduler = {"prediction_type": "epsilon"}
    with pytest.raises(TypeError, match="scheduler must be an EulerSchedulerConfig"):
        pipe.scheduler_config = 3
    # another diffusers scheduler, whose config need not name its class, by its type
    from diffusers import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    other = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", prediction_type="sample")
    assert "_class_name" not in other.config
    for bad in (other, EulerAncestralDiscreteScheduler.from_config(torch_pipe.scheduler.config)):
        with pytest.raises(
            TypeError, match=f"an EulerDiscreteScheduler .* got a {type(bad).__name__}"
        ):
            pipe.scheduler = bad
    assert pipe.scheduler_config == EulerSchedulerConfig.sd_x2_latent_upscaler()
    # built with scheduler=, as diffusers names it; given once
    parts = {k: v for k, v in flax_pipe.components.items() if k != "scheduler_config"}
    built = FlaxStableDiffusionLatentUpscalePipeline(**parts, scheduler=swapped.scheduler)
    assert built.scheduler_config.timestep_spacing == "trailing"
    with pytest.raises(TypeError, match="give the pipeline's scheduler once: .* got neither"):
        FlaxStableDiffusionLatentUpscalePipeline(**parts)
    with pytest.raises(TypeError, match="got both"):
        FlaxStableDiffusionLatentUpscalePipeline(
            **flax_pipe.components, scheduler=swapped.scheduler
        )


def test_parity_pictures_argmax(torch_pipe, flax_pipe):
    """Pictures in: Flax encodes with the posterior mode; torch is fed those mode latents."""
    rng = np.random.default_rng(3)
    pixels = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        mode = torch_pipe.vae.encode(nchw(pixels)).latent_dist.mode()
        low = (mode * torch_pipe.vae.config.scaling_factor).numpy().transpose(0, 2, 3, 1)
    _, noise = inputs(1, seed=4)
    kw = dict(num_inference_steps=2, guidance_scale=0.0)
    want = run_torch(torch_pipe, "a photo", low, noise, **kw)
    got = flax_pipe(
        prompt="a photo",
        image=pixels,
        latents=noise,
        output_type="np",
        vae_sample_mode="argmax",
        **kw,
    ).images
    assert_close(got, want)
    # The same picture as a PIL image (uint8) goes through the same path.
    pil = PIL.Image.fromarray(((pixels[0] + 1) * 127.5).round().astype(np.uint8))
    out = flax_pipe(prompt="a photo", image=pil, output_type="pil", rng=0, **kw).images
    assert len(out) == 1 and out[0].size == (128, 128)


def test_picture_sides_are_cut_back_as_diffusers_does(torch_pipe, flax_pipe):
    """Picture sides up to 7 beyond a multiple of 32 are brought down to it as diffusers'
    image processor does (PIL pictures resized bicubic, arrays and tensors by torch's nearest
    rows): the same pixels go to the VAE. Sides diffusers would bring to a size its UNet
    cannot take (72: 8 beyond 64) are refused by name, before any work."""
    import torch.nn.functional as F

    from flax_latentup.pipeline import _nearest_rows, prepare_image

    for size_in in range(64, 200):
        size_out = size_in - size_in % 8
        rows = torch.arange(size_in, dtype=torch.float32)[None, None, :, None]
        want = F.interpolate(rows, size=(size_out, 1))[0, 0, :, 0].long().numpy()
        np.testing.assert_array_equal(_nearest_rows(size_in, size_out), want, str(size_in))

    rng = np.random.default_rng(11)
    u8 = rng.integers(0, 256, (2, 71, 101, 3), dtype=np.uint8)  # 71 -> 64, 101 -> 96
    pil = [PIL.Image.fromarray(x) for x in u8]
    floats = rng.uniform(0, 1, (2, 70, 103, 3)).astype(np.float32)
    tensor = torch.from_numpy(floats).permute(0, 3, 1, 2)
    mixed = [pil[0], PIL.Image.fromarray(rng.integers(0, 256, (130, 90, 3), dtype=np.uint8))]
    for given in (pil, pil[0], floats, floats[0], tensor, u8, mixed):
        got, kind = prepare_image(given, 4, 8)
        # diffusers' image processor takes floats in [0, 1] (uint8 arrays: as 0..1 floats)
        theirs = u8.astype(np.float32) / 255 if given is u8 else given
        want = torch_pipe.image_processor.preprocess(theirs).permute(0, 2, 3, 1).numpy()
        assert kind == "pixels" and got.shape == want.shape, (got.shape, want.shape)
        assert got.shape[1:] == (64, 96, 3)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)

    kw = dict(prompt="a photo", num_inference_steps=1, guidance_scale=0.0)
    out = flax_pipe(image=pil[0], rng=1, output_type="np", **kw).images
    assert out.shape == (1, 128, 192, 3)  # 2x the 64x96 the picture was brought to

    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    too_far = PIL.Image.fromarray(u8[0, :, :72].copy())  # 71x72: 72 is 8 beyond 64
    with pytest.raises(ValueError, match=r"^image: pictures .* or up to 7 more.*got 71x72$"):
        flax_pipe(image=too_far, **kw)
    assert counter.count == 0
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
        torch_pipe(image=too_far, output_type="latent", **kw)


def test_prompt_embeds_match_prompt(flax_pipe):
    low, noise = inputs(1, seed=8)
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np", image=low, latents=noise)
    embeds, pooled = flax_pipe.encode_prompt("a photo of the cat")
    neg, neg_pooled = flax_pipe.encode_prompt("the dog")
    a = flax_pipe(prompt="a photo of the cat", negative_prompt="the dog", **kw).images
    b = flax_pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled,
        **kw,
    ).images
    # two different compiled programs (text encoded inside vs outside): float32 rounding only
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_encode_ids_matches_the_torch_text_encoder(torch_pipe, flax_pipe):
    """encode_ids embeds token ids as diffusers' pipeline embeds its prompts (the last hidden
    state before the final norm, and the pooled output); bad ids are named before anything
    runs."""
    prompts = ["a photo of the cat", "", "the dog"]
    ids = flax_pipe.tokenize(prompts)
    embeds, pooled = flax_pipe.encode_ids(ids)
    with torch.no_grad():
        out = torch_pipe.text_encoder(torch.from_numpy(ids).long(), output_hidden_states=True)
    np.testing.assert_allclose(embeds, out.hidden_states[-1].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), rtol=0, atol=1e-5)
    vocab = flax_pipe.text_encoder.config.vocab_size
    for bad, message in (
        (ids[0], r"input_ids must be an integer array \[batch, length\], got shape \(77,\)"),
        (ids.astype(np.float32), "input_ids must have an integer dtype, got float32"),
        (np.full_like(ids, vocab), rf"input_ids must be in \[0, {vocab}\)"),
    ):
        with pytest.raises(ValueError, match=message):
            flax_pipe.encode_ids(bad)


# --------------------------------------------------------------------------------------------
# Compilation, determinism, outputs
# --------------------------------------------------------------------------------------------


class CompileCounter:
    """Counts programs lowered for compiling: every jit cache miss, whether the backend
    compile then runs or the persistent compilation cache has the program."""

    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            self.count += 1


def test_no_recompile_for_guidance_prompt_seed(flax_pipe):
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    low, _ = inputs(1, seed=20)
    kw = dict(image=low, num_inference_steps=3, output_type="np")
    flax_pipe(prompt="a photo of the cat", guidance_scale=6.0, rng=1, **kw)
    first = counter.count
    assert first >= 1
    flax_pipe(
        prompt="astronaut riding a horse", negative_prompt="dog", guidance_scale=8.5, rng=7, **kw
    )
    flax_pipe(prompt="the castle", guidance_scale=2.0, rng=jax.random.key(3), **kw)
    assert counter.count == first, f"{counter.count - first} new compilation(s)"
    flax_pipe(
        prompt="the castle",
        guidance_scale=2.0,
        rng=3,
        num_inference_steps=4,
        image=low,
        output_type="np",
    )
    assert counter.count > first  # a new step count compiles once ...
    n = counter.count
    flax_pipe(
        prompt="a cat",
        guidance_scale=3.0,
        rng=4,
        num_inference_steps=4,
        image=low,
        output_type="np",
    )
    assert counter.count == n  # ... and only once


def test_a_raising_callback_stops_the_run_on_one_device(flax_pipe):
    """On one device, an exception raised in ``callback`` stops the program at that step and
    is raised as it is (not as JAX's runtime error); the pipeline runs normally afterwards."""
    import io

    low, _ = inputs(1, seed=22)
    kw = dict(prompt="a cat", image=low, num_inference_steps=12, rng=3, output_type="latent")
    reached = []
    on_progress = flax_pipe._on_progress

    def count(i):  # every host call the program makes, delivered or not
        reached.append(int(i))
        on_progress(i)

    class Stop(Exception):
        pass

    def stop(i, t, x):
        if i == 1:
            raise Stop("enough")

    flax_pipe.set_progress_bar_config(file=io.StringIO())
    flax_pipe._on_progress = count
    try:
        with pytest.raises(Stop, match="enough"):
            flax_pipe(callback=stop, **kw)
    finally:
        del flax_pipe._on_progress
        flax_pipe.set_progress_bar_config(disable=True)
    assert reached and max(reached) < 11, reached  # the later steps did not run
    seen = []
    out = flax_pipe(callback=lambda i, t, x: seen.append(i), **kw).images
    assert seen == list(range(12)) and np.isfinite(out).all()


def test_changed_weights_and_replaced_models_are_used(pipe_dir):
    """Weights updated in place (``nnx.update(pipe.unet, ...)``, as after training) and a model
    replaced (``pipe.vae = other``) are what the next call runs, as a pipeline built anew from
    them runs (before, the weights split off at construction went on running); an in-place
    update compiles nothing new. A replacement of the wrong kind, or one that does not fit
    the other models, is refused and changes nothing."""
    import copy

    from flax import nnx

    from flax_latentup import FlaxAutoencoderKL

    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    low, _ = inputs(1, seed=21)
    kw = dict(prompt="a cat", image=low, num_inference_steps=2, guidance_scale=6.0, rng=3)
    before = pipe(output_type="np", **kw).images
    state = nnx.state(pipe.unet, nnx.Param)
    nnx.update(pipe.unet, jax.tree.map(lambda x: x * 1.1, state))
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    changed = pipe(output_type="np", **kw).images
    assert counter.count == 0, f"{counter.count} new compilation(s) for new weights"
    fresh = FlaxStableDiffusionLatentUpscalePipeline(**pipe.components)
    fresh.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(changed, fresh(output_type="np", **kw).images)
    assert np.max(np.abs(changed - before)) > 1e-3

    other = FlaxAutoencoderKL.from_pretrained(os.path.join(pipe_dir, "vae"))
    nnx.update(other, jax.tree.map(lambda x: x * 0.9, nnx.state(other, nnx.Param)))
    pipe.vae = other
    assert pipe.vae is other and pipe.components["vae"] is other
    swapped = pipe(output_type="np", **kw).images
    fresh = FlaxStableDiffusionLatentUpscalePipeline(**pipe.components)
    fresh.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(swapped, fresh(output_type="np", **kw).images)
    assert np.max(np.abs(swapped - changed)) > 1e-3

    with pytest.raises(TypeError, match=r"^vae must be a FlaxAutoencoderKL"):
        pipe.vae = torch.nn.Linear(2, 2)
    wide = FlaxAutoencoderKL.abstract(dataclasses.replace(other.config, latent_channels=8))
    with pytest.raises(ValueError, match=r"unet.config.in_channels \(8\) must be twice"):
        pipe.vae = wide
    assert pipe.vae is other
    np.testing.assert_array_equal(pipe(output_type="np", **kw).images, swapped)
    # a shallow copy's replacement is its own
    twin = copy.copy(pipe)
    twin.vae = FlaxAutoencoderKL.from_pretrained(os.path.join(pipe_dir, "vae"))
    assert pipe.vae is other and twin.vae is not other


def test_determinism_and_batch_independence(flax_pipe):
    low, _ = inputs(2, seed=30)
    kw = dict(num_inference_steps=2, guidance_scale=0.0, output_type="np", rng=1234)
    a = flax_pipe(prompt=["a", "b"], image=low, **kw).images
    b = flax_pipe(prompt=["a", "b"], image=low, **kw).images
    np.testing.assert_array_equal(a, b)
    alone = flax_pipe(prompt="a", image=low[:1], **kw).images
    # Same noise (the key of index 0), same arithmetic; XLA may round a batch of 1 and a batch
    # of 2 differently in the last float32 bits, nothing more.
    np.testing.assert_allclose(a[:1], alone, rtol=0, atol=1e-5)
    other = flax_pipe(prompt=["a", "b"], image=low, **{**kw, "rng": 99}).images
    assert np.max(np.abs(other - a)) > 1e-3
    # one key per image: an array of keys is the list of them
    keys = jax.random.split(jax.random.key(7), 2)
    listed = flax_pipe(prompt=["a", "b"], image=low, **{**kw, "rng": list(keys)}).images
    split = flax_pipe(prompt=["a", "b"], image=low, **{**kw, "rng": keys}).images
    np.testing.assert_array_equal(listed, split)
    raw = np.asarray(jax.random.key_data(keys))
    np.testing.assert_array_equal(
        listed, flax_pipe(prompt=["a", "b"], image=low, **{**kw, "rng": raw}).images
    )
    with pytest.raises(ValueError, match="rng has 2 per-image seeds/keys but the image batch"):
        flax_pipe(prompt="a", image=low[:1], **{**kw, "rng": keys})


def test_output_types_and_tuple(flax_pipe):
    low, noise = inputs(1, seed=40)
    kw = dict(prompt="x", image=low, latents=noise, num_inference_steps=2, guidance_scale=0.0)
    lat = flax_pipe(output_type="latent", **kw).images
    assert lat.shape == (1, 16, 16, 4)
    (imgs,) = flax_pipe(output_type="np", return_dict=False, **kw)
    assert imgs.shape == (1, 128, 128, 3) and imgs.dtype == np.float32
    assert 0.0 <= imgs.min() and imgs.max() <= 1.0
    pil = flax_pipe(output_type="pil", **kw).images
    np.testing.assert_array_equal(np.asarray(pil[0]), (imgs[0] * 255).round().astype(np.uint8))
    # read as diffusers' outputs are
    out = flax_pipe(output_type="latent", **kw)
    assert out[0] is out.images and out["images"] is out.images and out[-1] is out.images
    assert len(out.to_tuple()) == 1 and out.to_tuple()[0] is out.images
    assert out.keys() == ["images"] and list(out) == ["images"] and len(out) == 1
    assert "images" in out and "latents" not in out and out.get("latents") is None
    assert out.items() == [("images", out.images)] and out.values()[0] is out.images
    with pytest.raises(KeyError, match="'latents': an upscale output holds"):
        out["latents"]
    with pytest.raises(IndexError):
        out[1]


def test_callback_and_progress_bar(flax_pipe, capsys):
    low, noise = inputs(1, seed=50)
    seen = []
    flax_pipe.set_progress_bar_config(disable=False, desc="upscaling")
    try:
        flax_pipe(
            prompt="x",
            image=low,
            latents=noise,
            num_inference_steps=5,
            guidance_scale=0.0,
            output_type="latent",
            callback=lambda i, t, x: seen.append((i, t, x.shape)),
            callback_steps=2,
        )
    finally:
        flax_pipe.set_progress_bar_config(disable=True)
    assert [s[0] for s in seen] == [0, 2, 4]
    assert all(s[2] == (1, 16, 16, 4) for s in seen)
    assert "upscaling" in capsys.readouterr().err


def test_torch_tensor_inputs(flax_pipe):
    low, noise = inputs(1, seed=60)
    kw = dict(prompt="x", num_inference_steps=2, guidance_scale=0.0, output_type="np")
    a = flax_pipe(image=low, latents=noise, **kw).images
    b = flax_pipe(image=nchw(low), latents=nchw(noise), **kw).images
    np.testing.assert_array_equal(a, b)
    # a 0-d tensor guidance scale, as diffusers takes it
    kw = {**kw, "guidance_scale": 3.0}
    a = flax_pipe(image=low, latents=noise, **kw).images
    b = flax_pipe(image=low, latents=noise, **{**kw, "guidance_scale": torch.tensor(3.0)}).images
    np.testing.assert_array_equal(a, b)


def test_bfloat16_and_torch_uint8_inputs(flax_pipe):
    """bfloat16 arrays (what a bfloat16 pipeline's encode_prompt returns, or latents from
    another bfloat16 model) are taken as the float32 of their values; a uint8 torch picture
    as the uint8 numpy one (0..255)."""
    from flax_latentup.pipeline import prepare_image

    low, noise = inputs(1, seed=61)
    embeds, pooled = flax_pipe.encode_prompt("a photo of the cat")
    bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (low, noise, embeds, pooled)]
    as_f32 = [np.asarray(x, np.float32) for x in bf16]
    kw = dict(num_inference_steps=2, guidance_scale=0.0, output_type="latent")
    names = ("image", "latents", "prompt_embeds", "pooled_prompt_embeds")
    a = flax_pipe(**dict(zip(names, bf16, strict=True)), **kw).images
    b = flax_pipe(**dict(zip(names, as_f32, strict=True)), **kw).images
    np.testing.assert_array_equal(a, b)
    picture = torch.randint(
        0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    got, kind = prepare_image(picture, 4, 2)
    want, _ = prepare_image(picture.permute(0, 2, 3, 1).numpy(), 4, 2)
    assert kind == "pixels"
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match=r"latents must have shape \[1, 4, 16, 16\] \(NCHW"):
        flax_pipe(prompt="x", image=low, latents=torch.zeros(1, 4, 8, 8), **kw)


def test_encode_prompt_checks_and_long_prompts(flax_pipe):
    """encode_prompt names a bad prompt; a prompt longer than the text encoder's tokens is
    cut as diffusers cuts it, with a warning that quotes the text left out."""
    for bad, message in ((None, "got NoneType"), (5, "got int"), ([], "empty list")):
        with pytest.raises(ValueError, match=f"prompt .*{message}"):
            flax_pipe.encode_prompt(bad)
    long = " ".join(["cat"] * 40 + ["dog"] * 40)
    with pytest.warns(UserWarning, match="prompt 0 is longer than the text encoder's 77 tokens"):
        ids = flax_pipe.tokenize([long, "a cat"])
    tok = flax_pipe.tokenizer
    whole = tok(long).input_ids
    assert len(whole) > 77
    np.testing.assert_array_equal(ids[0], whole[:76] + whole[-1:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        flax_pipe.tokenize(["a cat", "a dog"])


def test_save_and_reload(flax_pipe, tmp_path):
    flax_pipe.save_pretrained(tmp_path / "flax")
    for part in ("unet", "vae", "text_encoder"):
        assert os.path.isfile(tmp_path / "flax" / part / "flax_model.safetensors")
    again = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "flax"))
    again.set_progress_bar_config(disable=True)
    kw = two_step_call(seed=70)
    np.testing.assert_array_equal(flax_pipe(**kw).images, again(**kw).images)
    assert again.scheduler_config == flax_pipe.scheduler_config
    # the hub's tokenizer files are written too (transformers 4 loads the folder from them)
    tok = tmp_path / "flax" / "tokenizer"
    from_files = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"))
    np.testing.assert_array_equal(
        helpers.tokenize(from_files, helpers.PROMPTS),
        helpers.tokenize(again.tokenizer, helpers.PROMPTS),
    )
    assert from_files.get_vocab() == flax_pipe.tokenizer.get_vocab()
    # a folder whose tokenizer is tokenizer.json alone (transformers 5's save) loads too
    (tok / "vocab.json").unlink()
    (tok / "merges.txt").unlink()
    only_json = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "flax"))
    np.testing.assert_array_equal(
        only_json.tokenize(helpers.PROMPTS), flax_pipe.tokenize(helpers.PROMPTS)
    )


def test_torch_layout_save_goes_back_to_diffusers(torch_pipe, flax_pipe, tmp_path):
    """A torch-layout save is what diffusers and transformers load: every component's state
    dict equals, bit for bit, the torch pipeline the port was loaded from, with no key missing
    or left over; and it loads back here."""
    from diffusers import AutoencoderKL, StableDiffusionLatentUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from flax_latentup import FlaxUNet2DConditionModel

    folder = tmp_path / "torch"
    flax_pipe.save_pretrained(folder, torch_layout=True)
    for part, name in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("vae", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        assert sorted(os.listdir(folder / part)) == ["config.json", name]
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    for part, cls in classes.items():
        model, info = cls.from_pretrained(str(folder / part), output_loading_info=True)
        problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
        assert not problems and not info.get("error_msgs"), (part, problems)
        helpers.assert_same_state_dict(model, getattr(torch_pipe, part), what=part)
    loaded = StableDiffusionLatentUpscalePipeline.from_pretrained(str(folder))
    public = [
        {k: v for k, v in p.scheduler.config.items() if not k.startswith("_")}
        for p in (loaded, torch_pipe)
    ]
    assert public[0] == public[1]
    assert loaded.tokenizer.get_vocab() == torch_pipe.tokenizer.get_vocab()
    # and back into the port
    again = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder))
    for part in ("unet", "vae", "text_encoder"):
        got = jax.tree.leaves(nnx.state(getattr(again, part)))
        want = jax.tree.leaves(nnx.state(getattr(flax_pipe, part)))
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), part
    # a model folder holding Flax weights (which load first here) is refused, untouched
    flax_pipe.unet.save_pretrained(tmp_path / "unet")
    before = sorted(os.listdir(tmp_path / "unet"))
    with pytest.raises(FileExistsError, match="flax_model.safetensors"):
        flax_pipe.unet.save_pretrained(tmp_path / "unet", torch_layout=True)
    assert sorted(os.listdir(tmp_path / "unet")) == before
    flax_pipe.unet.save_pretrained(tmp_path / "unet_pt", torch_layout=True)
    assert FlaxUNet2DConditionModel.from_pretrained(str(tmp_path / "unet_pt")).config == (
        flax_pipe.unet.config
    )


def file_ids(folder) -> dict[str, tuple[int, int, float, int]]:
    """Each file under ``folder`` (relative path) with its inode, size, mtime and mode."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            key = os.path.relpath(os.path.join(root, f), folder)
            out[key] = (st.st_ino, st.st_size, st.st_mtime, st.st_mode)
    return out


def test_variant_a_model_lacks_loads_its_plain_weights(torch_pipe, pipe_dir, tmp_path, monkeypatch):
    """As in diffusers, variant= loads the plain weights of a model that has none of that
    variant, with a warning naming it: the weights diffusers loads from the same folder. From
    the hub, only the weights each model loads are fetched, all of the commit first seen. A
    pipeline none of whose (loaded) models has the variant is refused, naming them."""
    import copy

    from diffusers import StableDiffusionLatentUpscalePipeline

    from flax_latentup import WeightsError

    folder = tmp_path / "mixed"
    shutil.copytree(pipe_dir, folder)
    copy.deepcopy(torch_pipe.unet).to(torch.float16).save_pretrained(
        folder / "unet", variant="fp16"
    )
    want = StableDiffusionLatentUpscalePipeline.from_pretrained(str(folder), variant="fp16")
    assert want.unet.dtype == torch.float32  # the float16 weights, cast up
    with pytest.warns(
        UserWarning, match=r"variant 'fp16': text_encoder, vae in \S*mixed have no weights of it"
    ):
        got = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder), variant="fp16")
    got.save_pretrained(tmp_path / "back", torch_layout=True)
    back = StableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "back"))
    for part in ("text_encoder", "vae", "unet"):
        helpers.assert_same_state_dict(getattr(back, part), getattr(want, part), what=part)
    rounded = torch_pipe.unet.conv_in.weight.to(torch.float16).float()
    assert torch.equal(back.unet.conv_in.weight, rounded)
    assert not torch.equal(rounded, torch_pipe.unet.conv_in.weight)

    # from the hub: the unet's variant and the others' plain weights, of one commit
    commit = "1" * 40
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    revisions: list = []
    fetched = helpers.fake_hub(
        monkeypatch,
        tmp_path / "cache" / "snapshots" / commit,
        names,
        source=folder,
        repo_id="someone/mixed",
        revisions=revisions,
    )
    with pytest.warns(UserWarning, match=r"variant 'fp16': text_encoder, vae in "):
        hub = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            "someone/mixed", variant="fp16"
        )
    weights = sorted(n for n in fetched if n.endswith(".safetensors"))
    assert weights == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert revisions == [None, commit, commit]
    for part in ("text_encoder", "vae", "unet"):
        a = jax.tree.leaves(nnx.state(getattr(hub, part)))
        b = jax.tree.leaves(nnx.state(getattr(got, part)))
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), part

    # no model that loads has the variant: refused before any weights are read
    with pytest.raises(
        WeightsError, match=r"none of text_encoder, vae, unet has weights of variant 'bf16': "
    ):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder), variant="bf16")
    with pytest.raises(WeightsError, match=r"none of text_encoder, vae has weights of variant"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            str(folder), variant="fp16", unet=got.unet
        )


def test_variant_saved_beside_the_pipeline(torch_pipe, pipe_dir, flax_pipe, tmp_path):
    """save_pretrained(variant=) adds each model's NAME.<variant>.safetensors to a pipeline
    folder and keeps the rest as it was (same files); both load, here and in diffusers (the
    torch layout), and the variant holds the plain weights rounded to its dtype. A folder of
    another layout or of other models is refused with nothing written."""
    from diffusers import AutoencoderKL, StableDiffusionLatentUpscalePipeline

    # Flax layout: a bfloat16 variant beside the float32 pipeline
    folder = tmp_path / "flax"
    flax_pipe.save_pretrained(folder)
    os.chmod(folder / "unet" / "flax_model.safetensors", 0o444)  # kept as it is, mode too
    before = file_ids(folder)
    half = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
        str(folder), param_dtype=jnp.bfloat16
    )
    half.save_pretrained(folder, variant="bf16")
    after = file_ids(folder)
    added = sorted(set(after) - set(before))
    assert added == [f"{p}/flax_model.bf16.safetensors" for p in ("text_encoder", "unet", "vae")]
    assert {k: after[k] for k in before} == before  # the same files, untouched
    plain = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder))
    bf16 = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder), variant="bf16")
    for part in ("text_encoder", "vae", "unet"):
        want = jax.tree.leaves(nnx.state(getattr(flax_pipe, part)))
        got = jax.tree.leaves(nnx.state(getattr(plain, part)))
        assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), part
        got = jax.tree.leaves(nnx.state(getattr(bf16, part)))
        assert all(
            np.array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16).astype(np.float32))
            for a, b in zip(got, want, strict=True)
        ), part
        assert not all(np.array_equal(a, b) for a, b in zip(got, want, strict=True)), part
    # saving the variant again replaces only its own files
    half.save_pretrained(folder, variant="bf16")
    again = file_ids(folder)
    assert {k: again[k] for k in before} == before and set(again) == set(after)

    # torch layout: diffusers loads the float16 variant and the plain weights of one folder
    folder = tmp_path / "torch"
    flax_pipe.save_pretrained(folder, torch_layout=True)
    fp16 = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
        pipe_dir, param_dtype=jnp.float16
    )
    fp16.save_pretrained(folder, torch_layout=True, variant="fp16")
    for variant, dtype in ((None, torch.float32), ("fp16", torch.float16)):
        loaded = StableDiffusionLatentUpscalePipeline.from_pretrained(
            str(folder), variant=variant, dtype=dtype
        )
        for part in ("text_encoder", "vae", "unet"):
            helpers.assert_same_state_dict(
                getattr(loaded, part), getattr(torch_pipe, part), dtype, f"{variant} {part}"
            )

    # refused, nothing written: another layout, other models, a Flax variant in the way
    before = file_ids(tmp_path)
    with pytest.raises(ValueError, match="torch-layout variant 'bf16' belongs beside a torch"):
        half.save_pretrained(tmp_path / "flax", torch_layout=True, variant="bf16")
    with pytest.raises(ValueError, match="Flax-layout variant 'bf16' belongs beside a Flax"):
        half.save_pretrained(tmp_path / "torch", variant="bf16")
    with pytest.raises(
        ValueError, match="vae holds another model: its config.json is not this model's"
    ):
        half.unet.save_pretrained(tmp_path / "flax" / "vae", variant="bf16")
    with pytest.raises(FileExistsError, match="flax_model.bf16.safetensors"):
        half.unet.save_pretrained(tmp_path / "flax" / "unet", torch_layout=True, variant="bf16")
    # the folder's scheduler and tokenizer would load with the variant: they must be its own
    spacing = dataclasses.replace(half.scheduler_config, timestep_spacing="trailing")
    other = FlaxStableDiffusionLatentUpscalePipeline(
        **{**half.components, "scheduler_config": spacing}
    )
    with pytest.raises(
        ValueError, match="scheduler holds another scheduler: .* differs .* in timestep_spacing"
    ):
        other.save_pretrained(tmp_path / "flax", variant="bf16")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "flax" / "tokenizer"))
    tokenizer.add_tokens(["zebra"])
    other = FlaxStableDiffusionLatentUpscalePipeline(**{**half.components, "tokenizer": tokenizer})
    with pytest.raises(ValueError, match="tokenizer holds another tokenizer: its vocabulary"):
        other.save_pretrained(tmp_path / "flax", variant="bf16")
    assert file_ids(tmp_path) == before
    mixed = tmp_path / "mixed" / "unet"
    mixed.mkdir(parents=True)
    config = json.loads((tmp_path / "flax" / "unet" / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps(config | {"norm_eps": 0.5}))
    with pytest.raises(
        ValueError, match="mixed/unet holds another model: .* differs .* in norm_eps"
    ):
        half.save_pretrained(tmp_path / "mixed", variant="bf16")
    assert sorted(os.listdir(tmp_path / "mixed")) == ["unet"] and os.listdir(mixed) == [
        "config.json"
    ]

    # a model save removes a sharded checkpoint of the name it writes (loaders read it first)
    folder = tmp_path / "vae"
    torch_pipe.vae.save_pretrained(folder, max_shard_size="100KB")
    assert os.path.isfile(folder / "diffusion_pytorch_model.safetensors.index.json")
    flax_pipe.vae.save_pretrained(folder, torch_layout=True)
    assert sorted(os.listdir(folder)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    vae = AutoencoderKL.from_pretrained(str(folder))
    for key, value in torch_pipe.vae.state_dict().items():
        assert torch.equal(vae.state_dict()[key], value), key


class FakeHubApi:
    """huggingface_hub.HfApi with one repo kept in a local folder: upload_folder deletes the
    repo's files matching delete_patterns that the upload does not bring (huggingface_hub's
    own pattern matching), then copies the upload in."""

    repo: str = ""
    calls: list = []
    uploaded: list = []  # the files of the last upload
    # a snapshot as the local cache gives it after earlier downloads: every file of the repo,
    # whatever was asked for
    snapshot_holds_all = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, *, private=None, exist_ok=False):
        import types

        FakeHubApi.calls.append(("create_repo", repo_id, private, exist_ok, self.token))
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, delete_patterns, **kwargs):
        import shutil

        from huggingface_hub.utils import filter_repo_objects

        FakeHubApi.calls.append(("upload_folder", repo_id, kwargs))
        uploaded = {
            os.path.relpath(os.path.join(root, f), folder_path)
            for root, _, files in os.walk(folder_path)
            for f in files
        }
        FakeHubApi.uploaded = sorted(uploaded)
        present = [
            os.path.relpath(os.path.join(root, f), self.repo)
            for root, _, files in os.walk(self.repo)
            for f in files
        ]
        for f in filter_repo_objects(present, allow_patterns=delete_patterns):
            if f not in uploaded:
                os.remove(os.path.join(self.repo, f))
        shutil.copytree(folder_path, self.repo, dirs_exist_ok=True)
        return "commit-info"

    def snapshot_download(self, *, repo_id, revision=None, allow_patterns=None):
        import tempfile

        from huggingface_hub.utils import filter_repo_objects

        FakeHubApi.calls.append(("snapshot_download", repo_id, allow_patterns))
        out = tempfile.mkdtemp(prefix="fake-snapshot-")
        present = [
            os.path.relpath(os.path.join(root, f), self.repo)
            for root, _, files in os.walk(self.repo)
            for f in files
        ]
        wanted = None if FakeHubApi.snapshot_holds_all else allow_patterns
        for f in filter_repo_objects(present, allow_patterns=wanted):
            os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
            shutil.copy(os.path.join(self.repo, f), os.path.join(out, f))
        return out


def test_push_to_hub_uploads_what_save_writes(flax_pipe, tmp_path, monkeypatch):
    """push_to_hub creates the repo, then uploads save_pretrained's files in one commit that
    replaces the pipeline's (or model's) own entries and keeps the repo's other files; what
    lands loads back. A bad repo id is refused before anything is saved."""
    import huggingface_hub

    from flax_latentup import FlaxUNet2DConditionModel

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    FakeHubApi.repo, FakeHubApi.calls = str(tmp_path / "repo"), []
    (tmp_path / "repo" / "unet").mkdir(parents=True)
    (tmp_path / "repo" / "unet" / "flax_model.safetensors").write_text("an older upload")
    (tmp_path / "repo" / "README.md").write_text("model card")
    got = flax_pipe.push_to_hub("me/upscaler", torch_layout=True, private=True, token="t")
    assert got == "commit-info"
    assert FakeHubApi.calls[0] == ("create_repo", "me/upscaler", True, True, "t")
    assert FakeHubApi.calls[1][:2] == ("upload_folder", "me/upscaler")
    assert not (tmp_path / "repo" / "unet" / "flax_model.safetensors").exists()
    assert (tmp_path / "repo" / "README.md").read_text() == "model card"
    again = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "repo"))
    got = jax.tree.leaves(nnx.state(again.unet))
    want = jax.tree.leaves(nnx.state(flax_pipe.unet))
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    # a model alone: its weights files of the other layout go, other files stay
    FakeHubApi.repo = str(tmp_path / "unet-repo")
    os.makedirs(FakeHubApi.repo)
    for name in ("diffusion_pytorch_model.safetensors", "notes.md"):
        (tmp_path / "unet-repo" / name).write_text("older")
    flax_pipe.unet.push_to_hub("me/unet")
    assert sorted(os.listdir(FakeHubApi.repo)) == [
        "config.json",
        "flax_model.safetensors",
        "notes.md",
    ]
    unet = FlaxUNet2DConditionModel.from_pretrained(FakeHubApi.repo)
    assert unet.config == flax_pipe.unet.config
    # a model loaded from a folder that holds it in a subfolder says which
    with pytest.raises(
        FileNotFoundError,
        match="subfolders text_encoder, unet, vae have one: pass one of them as subfolder=",
    ):
        FlaxUNet2DConditionModel.from_pretrained(str(tmp_path / "repo"))
    # a malformed repo id: nothing is saved, nothing created
    FakeHubApi.calls = []
    saves = []
    monkeypatch.setattr(type(flax_pipe), "save_pretrained", lambda *a, **k: saves.append(a))
    for bad in ("me/up/scaler", "", None):
        with pytest.raises(ValueError, match="repo_id"):
            flax_pipe.push_to_hub(bad)
    assert saves == [] and FakeHubApi.calls == []


# --------------------------------------------------------------------------------------------
# Bad input: every error names the argument, before anything compiles
# --------------------------------------------------------------------------------------------

LOW, NOISE = inputs(1, seed=90)
E = np.zeros((1, 77, 32), np.float32)
P = np.zeros((1, 32), np.float32)

BAD = [
    ("prompt", dict(prompt="x", prompt_embeds=E, pooled_prompt_embeds=P)),
    ("pooled_prompt_embeds", dict(prompt_embeds=E)),
    (
        "negative_pooled_prompt_embeds",
        dict(prompt_embeds=E, pooled_prompt_embeds=P, negative_prompt_embeds=E, guidance_scale=5.0),
    ),
    (
        "negative_prompt",
        dict(
            prompt="x",
            negative_prompt="y",
            negative_prompt_embeds=E,
            negative_pooled_prompt_embeds=P,
        ),
    ),
    ("prompt", dict(prompt=["a", "b"])),
    ("negative_prompt", dict(prompt="a", negative_prompt=["a", "b"], guidance_scale=5.0)),
    ("prompt", dict(prompt=3)),
    ("image", dict(prompt="x", image=None)),
    ("image", dict(prompt="x", image=np.zeros((1, 8, 8, 5), np.float32))),
    ("image", dict(prompt="x", image=np.zeros((1, 10, 8, 4), np.float32))),
    ("image", dict(prompt="x", image=np.zeros((1, 4, 4, 4), np.float32))),
    ("image", dict(prompt="x", image=np.zeros((1, 104, 96, 3), np.uint8))),  # 104: 8 past 96
    ("image", dict(prompt="x", image=np.full((1, 64, 64, 3), 3.0, np.float32))),
    ("image", dict(prompt="x", image=np.full((1, 8, 8, 4), np.nan, np.float32))),
    ("image", dict(prompt="x", image="picture.png")),
    ("image", dict(prompt="x", image=np.zeros((1, 64, 64, 4), np.uint8))),  # RGBA, not latents
    ("image", dict(prompt="x", image=np.zeros((0, 8, 8, 4), np.float32))),  # a batch of 0
    ("image", dict(prompt="x", image=np.zeros((1, 64, 64, 3), np.int64))),
    ("image", dict(prompt="x", image=np.full((1, 8, 8, 4), None, object))),
    ("image", dict(prompt="x", image=np.full((1, 8, 8, 4), 1e300))),  # overflows float32
    (  # short embeddings with guidance: the negative prompt would be 77 tokens
        "negative_prompt_embeds",
        dict(prompt_embeds=E[:, :10], pooled_prompt_embeds=P, guidance_scale=5.0),
    ),
    ("latents", dict(prompt="x", latents=np.full((1, 16, 16, 4), 1e300))),
    ("latents", dict(prompt="x", latents=np.zeros((1, 16, 16, 4), np.int32))),
    ("negative_prompt", dict(prompt="a", negative_prompt=["a", "b"])),  # checked without CFG
    ("negative_prompt", dict(prompt="a", negative_prompt=[], guidance_scale=5.0)),
    ("prompt", dict(prompt=("a", None))),
    ("guidance_scale", dict(prompt="x", guidance_scale="5")),
    ("num_inference_steps", dict(prompt="x", num_inference_steps=0)),
    ("num_inference_steps", dict(prompt="x", num_inference_steps=2.5)),
    ("guidance_scale", dict(prompt="x", guidance_scale=float("nan"))),
    ("guidance_scale", dict(prompt="x", guidance_scale="high")),
    ("latents", dict(prompt="x", latents=np.zeros((1, 8, 8, 4), np.float32))),
    ("output_type", dict(prompt="x", output_type="torch")),
    ("output_type", dict(prompt="x", output_type="pt")),  # diffusers' torch output
    ("callback_steps", dict(prompt="x", callback_steps=0)),
    ("rng", dict(prompt="x", rng="seed")),
    ("vae_sample_mode", dict(prompt="x", vae_sample_mode="mean")),
    (
        "prompt_embeds",
        dict(prompt_embeds=np.zeros((1, 77, 31), np.float32), pooled_prompt_embeds=P),
    ),
    (
        "pooled_prompt_embeds",
        dict(prompt_embeds=E, pooled_prompt_embeds=np.zeros((2, 32), np.float32)),
    ),
    ("negative_pooled_prompt_embeds", dict(prompt="x", negative_pooled_prompt_embeds=P)),
    ("latents", dict(prompt="x", latents=torch.zeros(1, 4, 8, 8))),  # NCHW, a side too short
]


@pytest.mark.parametrize("arg,kwargs", BAD, ids=[f"{i}-{a}" for i, (a, _) in enumerate(BAD)])
def test_bad_input_names_argument(flax_pipe, arg, kwargs):
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    kwargs = {"image": LOW, "num_inference_steps": 2, **kwargs}
    with pytest.raises(ValueError, match=arg):
        flax_pipe(**kwargs)
    assert counter.count == 0, "the error came after a compilation"


def test_float_pictures_a_little_out_of_range_are_taken_as_diffusers_takes_them(torch_pipe):
    """An unclamped decode ([-1.1, 1.05]) or a [0, 1] picture overshooting to 1.05 goes to the
    VAE as diffusers' image processor sends it; 0..255 held as floats is refused."""
    from flax_latentup.pipeline import prepare_image

    rng = np.random.default_rng(5)
    for lo, hi in ((-1.1, 1.05), (0.0, 1.05), (-1.49, 1.49)):
        x = rng.uniform(lo, hi, (2, 64, 96, 3)).astype(np.float32)
        got, kind = prepare_image(torch.from_numpy(x).permute(0, 3, 1, 2), 4, 8)
        want = torch_pipe.image_processor.preprocess(torch.from_numpy(x).permute(0, 3, 1, 2))
        assert kind == "pixels"
        np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    for bad in (rng.uniform(0, 255, (1, 64, 64, 3)), np.full((1, 64, 64, 3), -1.6)):
        with pytest.raises(ValueError, match=r"^image: float pictures must be in \[0, 1\]"):
            prepare_image(bad.astype(np.float32), 4, 8)


def test_diffusers_only_keywords_say_what_to_pass(flax_pipe, pipe_dir):
    """diffusers' ``generator=`` and ``torch_dtype=`` (and other torch-side loading options)
    are refused with what to pass here, before any work; so is diffusers' "pt" output, with
    the numpy recipe for it."""
    from flax_latentup import FlaxUNet2DConditionModel

    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    with pytest.raises(TypeError, match=r"^__call__\(\) takes no generator= .*pass rng="):
        flax_pipe(prompt="x", image=LOW, generator=object())
    with pytest.raises(TypeError, match=r"^__call__\(\) got an unexpected keyword .*'steps'"):
        flax_pipe(prompt="x", image=LOW, steps=2)
    with pytest.raises(ValueError, match=r"got 'pt': .*torch\.from_numpy\(images\.transpose"):
        flax_pipe(prompt="x", image=LOW, output_type="pt")
    assert counter.count == 0
    unet = os.path.join(pipe_dir, "unet")
    for load, folder in (
        (FlaxStableDiffusionLatentUpscalePipeline, pipe_dir),
        (FlaxUNet2DConditionModel, unet),
    ):
        with pytest.raises(TypeError, match=r"takes no torch_dtype= .*pass dtype= \(jnp"):
            load.from_pretrained(folder, torch_dtype="float16")
        with pytest.raises(TypeError, match=r"takes no use_safetensors= .*always read from"):
            load.from_pretrained(folder, use_safetensors=True)


def test_diffusers_only_methods_say_what_stands_for_them(flax_pipe):
    """``pipe.to("cuda")``, the offload and attention-slicing switches: an AttributeError
    (``hasattr`` stays False) that names the method and says what to do here instead; other
    missing names get Python's usual message."""
    with pytest.raises(AttributeError, match=r"has no to\(\) .*default device.*dtype=jnp\.bf"):
        flax_pipe.to("cuda")
    with pytest.raises(AttributeError, match=r"no enable_model_cpu_offload\(\) .*vae_tiling"):
        flax_pipe.enable_model_cpu_offload()
    with pytest.raises(AttributeError, match=r"attention_config\(query_chunk_size="):
        flax_pipe.enable_attention_slicing()
    assert not hasattr(flax_pipe, "enable_xformers_memory_efficient_attention")
    with pytest.raises(AttributeError, match=r"^'FlaxStableDiffusionLatentUpscalePipeline' obj"):
        flax_pipe.no_such_method  # noqa: B018
    assert flax_pipe.enable_vae_tiling and flax_pipe.dtype == jnp.float32


def test_missing_component_folder(pipe_dir, tmp_path):
    import shutil

    shutil.copytree(pipe_dir, tmp_path / "p")
    shutil.rmtree(tmp_path / "p" / "vae")
    with pytest.raises(FileNotFoundError, match="vae"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(tmp_path / "p"))


def test_given_components_replace_the_folders(pipe_dir, flax_pipe, tmp_path):
    """Components given to from_pretrained are used as they are, and the folder's own are not
    read: a folder without unet/, vae/, tokenizer/ and scheduler/ loads with them given."""
    import shutil

    from diffusers import EulerDiscreteScheduler

    from flax_latentup.sampling import EulerSchedulerConfig

    shutil.copytree(pipe_dir, tmp_path / "p")
    for part in ("unet", "vae", "tokenizer", "scheduler"):
        shutil.rmtree(tmp_path / "p" / part)
    scheduler = EulerDiscreteScheduler.from_pretrained(os.path.join(pipe_dir, "scheduler"))
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
        str(tmp_path / "p"),
        unet=flax_pipe.unet,
        vae=flax_pipe.vae,
        tokenizer=flax_pipe.tokenizer,
        scheduler=scheduler,
    )
    assert pipe.unet is flax_pipe.unet and pipe.vae is flax_pipe.vae
    assert pipe.tokenizer is flax_pipe.tokenizer
    assert pipe.scheduler_config == flax_pipe.scheduler_config
    assert pipe.scheduler_config == EulerSchedulerConfig.from_dict(dict(scheduler.config))
    # the text encoder still came from the folder, with the requested dtype
    assert pipe.text_encoder is not flax_pipe.text_encoder
    leaves = jax.tree.leaves(nnx.state(pipe.text_encoder))
    want = jax.tree.leaves(nnx.state(flax_pipe.text_encoder))
    assert all(np.array_equal(a, b) for a, b in zip(leaves, want, strict=True))
    # components rebuild the pipeline, with one part swapped
    again = FlaxStableDiffusionLatentUpscalePipeline(**{**pipe.components, "vae": pipe.vae})
    assert again.unet is flax_pipe.unet and again.scheduler_config == pipe.scheduler_config
    # without the part given, its missing folder is named
    with pytest.raises(FileNotFoundError, match="unet"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            str(tmp_path / "p"),
            vae=flax_pipe.vae,
            tokenizer=flax_pipe.tokenizer,
            scheduler=scheduler,
        )


def test_given_components_checked_before_any_weights_are_read(pipe_dir, flax_pipe, tmp_path):
    """A given component of the wrong kind, or one that does not fit the folder's, is named
    before any weights are read (here there are none to read)."""
    import json
    import shutil

    from flax_latentup import ConfigError

    shutil.copytree(pipe_dir, tmp_path / "p")
    for part in ("text_encoder", "vae", "unet"):
        for f in os.listdir(tmp_path / "p" / part):
            if f.endswith(".safetensors"):
                os.remove(tmp_path / "p" / part / f)
    cfg_path = tmp_path / "p" / "vae" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["latent_channels"] = 8
    cfg_path.write_text(json.dumps(cfg))
    folder = str(tmp_path / "p")
    load = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained
    # the folder's 8-channel VAE against the given 4-channel latent UNet
    with pytest.raises(ValueError, match=r"unet.config.in_channels \(8\) must be twice"):
        load(folder, unet=flax_pipe.unet)
    # the folder's text encoder (hidden 32) against a UNet made for another width
    with pytest.raises(ValueError, match="cross_attention_dim"):
        load(folder, vae=flax_pipe.vae, unet=_unet_with(flax_pipe, cross_attention_dim=16))
    with pytest.raises(TypeError, match="unet must be a FlaxUNet2DConditionModel"):
        load(folder, unet=torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="tokenizer must be a CLIP tokenizer"):
        load(folder, tokenizer="openai/clip-vit-large-patch14")
    with pytest.raises(TypeError, match="scheduler must be"):
        load(folder, scheduler=42)
    # a scheduler option the port does not implement, before the folder is even looked up
    with pytest.raises(ConfigError, match="prediction_type"):
        load(str(tmp_path / "nowhere"), scheduler={"prediction_type": "epsilon"})
    # the folder's own scheduler config, read before the text encoder's (absent) weights
    sched = tmp_path / "p" / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "epsilon"}))
    with pytest.raises(ConfigError, match=r"scheduler_config\.json.*prediction_type"):
        load(folder, vae=flax_pipe.vae, unet=flax_pipe.unet)

    class BigTokenizer:
        model_max_length = 77

        def __call__(self, *args, **kwargs):
            raise AssertionError("not called")

        def __len__(self):
            return 49408

    with pytest.raises(ValueError, match="vocab_size is 1000"):
        load(folder, vae=flax_pipe.vae, tokenizer=BigTokenizer())
    with pytest.raises(ValueError, match="vocab_size"):
        FlaxStableDiffusionLatentUpscalePipeline(
            **{**flax_pipe.components, "tokenizer": BigTokenizer()}
        )


def _unet_with(pipe, **changes):
    """An abstract UNet (shapes only) whose config differs from ``pipe``'s in ``changes``."""
    import dataclasses

    from flax_latentup import FlaxUNet2DConditionModel

    config = dataclasses.replace(pipe.unet.config, **changes)
    return FlaxUNet2DConditionModel.abstract(config)


def test_offline_hub_error(tmp_path, monkeypatch):
    from flax_latentup import HubError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="not in the Hugging Face cache"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            "stabilityai/sd-x2-latent-upscaler", cache_dir=str(tmp_path / "cache")
        )
    # a cached snapshot that lacks files (an earlier download cut short) is said to be partial
    import huggingface_hub
    from huggingface_hub import errors

    def partial(*args, **kwargs):
        raise errors.IncompleteSnapshotError("2 files are missing", "/cache/snapshots/x")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", partial)
    with pytest.raises(HubError, match=r"the Hugging Face cache holds only part of .*2 files"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            "stabilityai/sd-x2-latent-upscaler"
        )


def test_hub_cache_is_used(pipe_dir, tmp_path, monkeypatch):
    """A repo already in the HF cache loads offline through the hub path (no network)."""
    import shutil

    cache = tmp_path / "cache"
    repo = cache / "models--someone--tiny-upscaler"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(pipe_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
        "someone/tiny-upscaler", cache_dir=str(cache)
    )
    assert pipe.unet.config.in_channels == 8
    # offline, what the cache lacks is named as such: a variant (never fetched, or none) and a
    # revision
    from flax_latentup import HubError, WeightsError

    with pytest.raises(WeightsError, match=r"variant 'fp16' is not in this Hugging Face cache"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            "someone/tiny-upscaler", cache_dir=str(cache), variant="fp16"
        )
    with pytest.raises(HubError, match=r"'someone/tiny-upscaler' at revision 'v2': "):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            "someone/tiny-upscaler", cache_dir=str(cache), revision="v2"
        )


def test_vae_tiling_in_pipeline(flax_pipe):
    """Tiled decode through the pipeline: 16-px tiles on a 128-px output really tile."""
    kw = two_step_call(seed=80)
    whole = flax_pipe(**kw).images
    flax_pipe.enable_vae_tiling(tile_sample_size=64)
    try:
        tiled = flax_pipe(**kw).images
    finally:
        flax_pipe.disable_vae_tiling()
    assert tiled.shape == whole.shape
    assert np.max(np.abs(tiled - whole)) > 1e-3, "64-px tiles on a 128-px output must tile"
    # the pipeline's tiled pictures are the VAE's tiled decode (matched to diffusers in
    # test_vae.py) of the same final latents
    latents = flax_pipe(**{**kw, "output_type": "latent"}).images
    z = jnp.asarray(latents / flax_pipe.vae.config.scaling_factor)
    want = np.clip(
        np.asarray(flax_pipe.vae.decode(z, tiled=True, tile_sample_size=64)) / 2 + 0.5, 0, 1
    )
    np.testing.assert_allclose(tiled, want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tile_sample_size"):
        flax_pipe.enable_vae_tiling(tile_sample_size=50)


def tiling_on(pipe, tile_sample_size: int):
    """``pipe.enable_vae_tiling(tile_sample_size)`` for the ``with`` block."""
    import contextlib

    @contextlib.contextmanager
    def block():
        pipe.enable_vae_tiling(tile_sample_size=tile_sample_size)
        try:
            yield pipe
        finally:
            pipe.disable_vae_tiling()

    return block()


def test_tiled_encode_and_decode_match_diffusers(torch_pipe, flax_pipe):
    """With VAE tiling on, a picture larger than one tile is encoded in tiles and the output
    decoded in tiles, as diffusers does with its VAE's tiling on (64-px tiles: a 128x96 picture
    in, 256x192 out). diffusers samples the posterior with a torch generator, so both sides
    take its mode: torch is fed the mode latents of its own tiled encode."""
    pixels = np.random.default_rng(12).uniform(-1, 1, (2, 128, 96, 3)).astype(np.float32)
    _, noise = inputs(2, seed=13, h=16, w=12)
    kw = dict(num_inference_steps=2, guidance_scale=0.0)
    with helpers.torch_tiling(torch_pipe.vae, 64), torch.no_grad():
        mode = torch_pipe.vae.encode(nchw(pixels)).latent_dist.mode()
        low = (mode * torch_pipe.vae.config.scaling_factor).numpy().transpose(0, 2, 3, 1)
        want = run_torch(torch_pipe, ["a photo"] * 2, low, noise, **kw)
    call = dict(prompt="a photo", image=pixels, latents=noise, output_type="np", **kw)
    with tiling_on(flax_pipe, 64):
        got = flax_pipe(vae_sample_mode="argmax", **call).images
    assert_close(got, want)
    # the tiles matter: an untiled run is far from diffusers' tiled one
    untiled = flax_pipe(vae_sample_mode="argmax", **call).images
    assert np.max(np.abs(untiled - want)) > 10 * TOL, "64-px tiles on 128-px pictures must tile"


def test_tiled_encode_samples_the_posterior(flax_pipe):
    """Sampled tiled encode: image i's low-res latent is ``mean + std * eps`` of the tiled
    posterior, ``eps`` drawn from ``fold_in(fold_in(key, i), 1)`` as for an untiled encode."""
    pixels = np.random.default_rng(14).uniform(-1, 1, (2, 128, 96, 3)).astype(np.float32)
    kw = dict(prompt="a photo", num_inference_steps=2, guidance_scale=0.0, output_type="latent")
    with tiling_on(flax_pipe, 64):
        got = np.asarray(flax_pipe(image=pixels, rng=5, **kw).images)
        mode = np.asarray(flax_pipe(image=pixels, rng=5, vae_sample_mode="argmax", **kw).images)
    post = flax_pipe.vae.encode(jnp.asarray(pixels), tiled=True, tile_sample_size=64)
    key = jax.random.key(5)
    eps = np.stack(
        [
            jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, i), 1), (16, 12, 4))
            for i in range(2)
        ]
    )
    low = (np.asarray(post.mean) + np.asarray(post.std) * eps) * flax_pipe.vae.config.scaling_factor
    want = np.asarray(flax_pipe(image=low, rng=5, **kw).images)
    scale = float(np.max(np.abs(want)))
    err = float(np.max(np.abs(got - want)))
    assert err <= 1e-5 * scale, f"sampled tiled encode: max abs error {err:.3g} (scale {scale:.3g})"
    assert np.max(np.abs(mode - want)) > 1e-2 * scale, "the sample must differ from the mode"


def test_float16_decode_retried_in_float32(pipe_dir, flax_pipe):
    """A float16 VAE decode that overflows is redone in float32 for the affected images."""
    from flax_latentup import nonfinite_images

    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(pipe_dir, dtype=jnp.float16)
    pipe.set_progress_bar_config(disable=True)
    low, noise = inputs(2, seed=81)
    kw = dict(prompt="x", image=low, latents=noise, num_inference_steps=2, guidance_scale=0.0)
    latents = np.array(pipe(output_type="latent", **kw).images)
    latents[1] *= 1e5  # final latents that drive the float16 decoder out of range
    raw = pipe.vae.decode(jnp.asarray(latents / pipe.vae.config.scaling_factor))
    assert list(np.asarray(nonfinite_images(raw))) == [False, True], "the test needs an overflow"
    images = pipe._finish_images({"latents": latents})
    assert np.isfinite(images).all()
    want = flax_pipe._decode(flax_pipe.vae, latents[1:])  # the float32 pipeline's decode
    np.testing.assert_allclose(images[1:], want, rtol=0, atol=1e-5)
    # the image that decoded fine in float16 is kept as it was
    np.testing.assert_array_equal(
        images[:1], np.clip(np.asarray(raw[:1], np.float32) / 2 + 0.5, 0, 1)
    )


def test_mixed_list_converts_pictures_to_rgb():
    """A list mixing PIL pictures (any mode) and arrays: the pictures become RGB, as alone."""
    import PIL.Image

    from flax_latentup.pipeline import prepare_image

    rgba = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgb = np.ascontiguousarray(rgba[..., :3])
    arr, kind = prepare_image([PIL.Image.fromarray(rgba, "RGBA"), rgb])
    assert kind == "pixels" and arr.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(arr[0], arr[1])
    # a palette picture with per-entry transparency: its colours, without Pillow's warning
    pal = PIL.Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = bytes([0, 128] + [255] * 254)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        arr, _ = prepare_image(pal)
    want = np.asarray(pal.convert("RGBA"))[..., :3].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(arr[0], want)
    # a float picture has no agreed range: refused by name, not clipped by Pillow
    floats = PIL.Image.fromarray(rgb[..., 0].astype(np.float32) / 255, "F")
    for given in (floats, [floats], [floats, rgb]):
        with pytest.raises(
            ValueError, match=r"^image: 32-bit floating-point pictures \(PIL mode F\)"
        ):
            prepare_image(given)


def test_float_pictures_follow_diffusers():
    """Float pictures (numpy, JAX, torch) are read as diffusers' image processor reads them:
    [0, 1] mapped to [-1, 1], negative values meaning [-1, 1] already; uint8 and PIL agree."""
    from diffusers.image_processor import VaeImageProcessor

    from flax_latentup.pipeline import prepare_image

    processor = VaeImageProcessor(vae_scale_factor=8, do_resize=False)
    rng = np.random.default_rng(5)
    unit = rng.uniform(0.0, 1.0, (2, 64, 64, 3)).astype(np.float32)  # [0, 1]
    signed = rng.uniform(-1.0, 1.0, (2, 64, 64, 3)).astype(np.float32)  # [-1, 1]
    for pictures in (unit, signed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers on [-1, 1] input
            want = processor.preprocess(pictures).numpy().transpose(0, 2, 3, 1)
        for given in (
            pictures,
            jnp.asarray(pictures),
            torch.from_numpy(pictures).permute(0, 3, 1, 2),
        ):
            got, kind = prepare_image(given)
            assert kind == "pixels"
            np.testing.assert_allclose(got, want, atol=1e-6)
    as_uint8 = (unit * 255).round().astype(np.uint8)
    from_uint8, _ = prepare_image(as_uint8)
    from_pil, _ = prepare_image([PIL.Image.fromarray(p) for p in as_uint8])
    from_float, _ = prepare_image(as_uint8.astype(np.float32) / 255)
    np.testing.assert_array_equal(from_uint8, from_pil)
    np.testing.assert_allclose(from_float, from_uint8, atol=1e-6)
    # 0..255 floats are neither convention: refused with the range seen
    with pytest.raises(ValueError, match=r"\[0, 1\].*\[0, 255\]"):
        prepare_image(as_uint8.astype(np.float32))


def test_np_output_goes_back_in(flax_pipe):
    """An "np" output ([0, 1] floats) given back as pictures is read as the same picture
    would be as uint8."""
    low, noise = inputs(1, seed=12)
    out = flax_pipe(
        prompt="", image=low, latents=noise, num_inference_steps=1, output_type="np"
    ).images
    from flax_latentup.pipeline import prepare_image

    from_np, _ = prepare_image(out)
    from_uint8, _ = prepare_image((out * 255).round().astype(np.uint8))
    assert float(np.min(out)) >= 0.0
    np.testing.assert_allclose(from_np, from_uint8, atol=1 / 255 + 1e-6)


def test_callbacks_reach_the_user_in_step_order(flax_pipe):
    """Host calls that arrive out of step order and from several threads (unordered effects,
    on several devices) reach ``callback`` in step order, one at a time, padding rows cut."""
    import random
    import threading
    import time

    seen, active = [], []

    def callback(step, t, x):
        active.append(step)
        assert len(active) == 1, "callback entered twice at once"
        time.sleep(0.001)
        seen.append((step, t, x.shape[0]))
        active.pop()

    order = list(range(0, 40, 3))
    random.Random(0).shuffle(order)
    with flax_pipe._host_calls(40, 2, callback, 3, show_bar=False, one_device=False):
        threads = [
            threading.Thread(
                target=flax_pipe._on_callback, args=(np.int32(i), float(i) / 2, np.zeros((4, 1)))
            )
            for i in order
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    assert seen == [(i, i / 2, 2) for i in range(0, 40, 3)]


def test_save_keeps_other_content_and_the_folder_itself(flax_pipe, tmp_path, monkeypatch):
    """A save writes the pipeline's entries into ``path`` and leaves the rest alone: other
    files stay, ``path`` itself is not renamed (a mount point, a read-only parent), a link is
    followed, permissions follow the umask, a failed save changes nothing and what a killed
    save left behind goes with the next one."""
    from flax_latentup.files import TMP_PREFIX, temporary_prefix

    target = tmp_path / "project"
    (target / "data").mkdir(parents=True)
    (target / "data" / "train.csv").write_text("a,b\n")
    (target / "unet").mkdir()
    (target / "unet" / "stale.bin").write_bytes(b"old weights")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = temporary_prefix().split("@")[1]
    leftover = target / f"{TMP_PREFIX}{dead.pid}@{host}@abc"
    (leftover / "unet").mkdir(parents=True)
    inode = os.stat(target).st_ino
    link = tmp_path / "link"
    link.symlink_to(target)
    flax_pipe.save_pretrained(link)
    assert link.is_symlink() and os.stat(target).st_ino == inode
    assert (target / "data" / "train.csv").read_text() == "a,b\n"
    assert not (target / "unet" / "stale.bin").exists(), "the unet entry is replaced whole"
    assert not leftover.exists(), "a killed save's staging folder is removed"
    assert sorted(p.name for p in target.iterdir()) == sorted(
        ["data", "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    )
    umask = os.umask(0o022)
    os.umask(umask)
    assert (os.stat(target / "unet").st_mode & 0o777) == 0o777 & ~umask
    assert (os.stat(target / "unet" / "flax_model.safetensors").st_mode & 0o777) == 0o666 & ~umask
    again = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(target))
    assert again.unet.config == flax_pipe.unet.config

    def broken(self, path, **kwargs):
        raise OSError("disk full")

    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    monkeypatch.setattr(type(flax_pipe.vae), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        flax_pipe.save_pretrained(target)
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        flax_pipe.save_pretrained(tmp_path / "afile")
    assert (tmp_path / "afile").read_text() == "x"


def test_model_save_into_a_folder(flax_pipe, tmp_path):
    """A model's save writes its two files into the folder, keeps the rest, removes what a
    killed save left there, and refuses a file or a folder under a file."""
    from flax_latentup import FlaxAutoencoderKL
    from flax_latentup.files import TMP_PREFIX, temporary_prefix

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = temporary_prefix().split("@")[1]
    leftover = folder / f"{TMP_PREFIX}{dead.pid}@{host}@flax_model.safetensors"
    leftover.write_bytes(b"half a file")
    flax_pipe.vae.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "flax_model.safetensors",
        "notes.txt",
    ]
    again = FlaxAutoencoderKL.from_pretrained(str(folder))
    assert again.config == flax_pipe.vae.config
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        flax_pipe.vae.save_pretrained(tmp_path / "afile")
    with pytest.raises(NotADirectoryError, match="under a file"):
        flax_pipe.vae.save_pretrained(tmp_path / "afile" / "vae")


def test_attention_and_conv_settings_reach_compiled_programs(flax_pipe):
    """A call under attention_config / conv_config compiles for those settings (the programs
    key on them) instead of reusing one traced under others; the results agree."""
    from flax_latentup import attention_config, conv_config

    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    low, noise = inputs(1, seed=21)
    kw = dict(prompt="x", image=low, latents=noise, num_inference_steps=2, output_type="np")
    base = flax_pipe(**kw).images
    before = counter.count
    assert np.array_equal(flax_pipe(**kw).images, base) and counter.count == before
    with attention_config("chunked", query_chunk_size=16):
        chunked = flax_pipe(**kw).images
    after_attention = counter.count
    assert after_attention > before, "attention_config did not reach the pipeline's program"
    with conv_config("xla"):
        xla = flax_pipe(**kw).images
    assert counter.count > after_attention, "conv_config did not reach the pipeline's program"
    np.testing.assert_allclose(chunked, base, atol=1e-5)
    np.testing.assert_allclose(xla, base, atol=1e-5)
    # the VAE's own compiled calls follow the settings as well
    z = jnp.asarray(noise[:, :8, :8])
    flax_pipe.vae.decode(z)
    n = counter.count
    with conv_config("xla"):
        flax_pipe.vae.decode(z)
    assert counter.count > n, "conv_config did not reach the VAE's compiled decode"


def test_nested_attention_config_keeps_what_it_does_not_set():
    from flax_latentup import attention_config
    from flax_latentup.models.layers import attention_settings

    with attention_config("chunked", query_chunk_size=1024):
        with attention_config(query_chunk_size=64):
            assert attention_settings()[:2] == ("chunked", 64)
        with attention_config(None):
            assert attention_settings()[0] is None
        assert attention_settings()[:2] == ("chunked", 1024)
    with pytest.raises(ValueError, match="query_chunk_size"):
        with attention_config(query_chunk_size=0):
            pass


def test_module_inputs_checked(flax_pipe):
    """Direct module calls: ids out of the vocabulary, an empty UNet batch and malformed
    attention inputs get errors naming the argument (not NaN, a wrap-around or a broadcast)."""
    from flax_latentup import attention
    from flax_latentup.models.layers import attention as layers_attention

    vocab = flax_pipe.text_encoder.config.vocab_size
    for bad in (vocab, -1):
        ids = np.zeros((1, 5), np.int32)
        ids[0, 2] = bad
        with pytest.raises(ValueError, match="input_ids must be in"):
            flax_pipe.text_encoder(jnp.asarray(ids))
    cfg = flax_pipe.unet.config
    with pytest.raises(ValueError, match="sample holds no images"):
        flax_pipe.unet(
            jnp.zeros((0, 16, 16, cfg.in_channels)),
            jnp.zeros((0,)),
            jnp.zeros((0, 77, cfg.cross_attention_dim)),
            jnp.zeros((0, cfg.time_cond_proj_dim)),
        )
    q = jnp.zeros((2, 8, 2, 4))
    assert attention is layers_attention
    with pytest.raises(ValueError, match="q must be"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="k and v must be"):
        attention(q, q[:1], q[:1])
    with pytest.raises(ValueError, match="query_chunk_size"):
        attention(q, q, q, implementation="chunked", query_chunk_size=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(devices=["cpu"]), r"devices\[0\] must be a JAX device"),
        (dict(devices="cpu"), "devices must be a sequence"),
        (dict(devices=jax.devices()[0]), "got one device"),
        (dict(devices=jax.devices()[:1] * 2), "more than once"),
        (dict(mesh=jax.devices()), "mesh must be a jax.sharding.Mesh"),
        (
            dict(mesh=jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))),
            "mesh must have a 'data' axis",
        ),
        (dict(use_pmap="no"), "use_pmap must be True or False"),
    ],
)
def test_device_arguments_checked(flax_pipe, kw, message):
    low, _ = inputs(1, seed=22)
    with pytest.raises(ValueError, match=message):
        flax_pipe(prompt="x", image=low, num_inference_steps=2, **kw)


def test_incomplete_hub_cache_is_named(pipe_dir, tmp_path, monkeypatch):
    """A cached snapshot whose weights are missing says why that may be: a download cut
    short, or a repo whose weights are torch pickles (only safetensors are fetched)."""
    import shutil

    import huggingface_hub.constants as c

    snap = tmp_path / "cache" / "models--someone--cut-short" / "snapshots" / ("0" * 40)
    shutil.copytree(pipe_dir, snap)
    for f in (snap / "unet").iterdir():
        if f.name.endswith(".safetensors"):
            f.unlink()
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match="download was cut short") as e:
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            "someone/cut-short", cache_dir=str(tmp_path / "cache")
        )
    # or the repo's weights are torch pickles, which are not fetched: what to do about it
    assert "torch pickles only" in str(e.value)
    assert "`flax-latentup convert someone/cut-short FOLDER`" in str(e.value)
    # a repo without an owner, and a snapshot folder given relative to here
    from flax_latentup.weights import missing_weights_error

    gpt2 = tmp_path / "hub" / "models--gpt2" / "snapshots" / ("1" * 40)
    gpt2.mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "hub")
    message = str(missing_weights_error(os.path.relpath(gpt2), ["model.safetensors"]))
    assert "`flax-latentup convert gpt2 FOLDER`" in message


def test_automatic_choices_follow_the_device_compiled_for():
    """cuDNN attention and the CPU convolution forms are chosen for the device a program is
    compiled for (compiling_for), not for the default backend: a GPU host running on its CPU
    must not get cuDNN, a CPU host compiling for a GPU gets it."""
    from flax_latentup.models.conv import use_winograd
    from flax_latentup.models.layers import (
        choose_attention_implementation,
        cudnn_attention_max_head_dim,
        trace_settings,
    )
    from flax_latentup.models.target import compiling_for

    class Device:
        def __init__(self, platform, compute_capability=None):
            self.platform, self.compute_capability = platform, compute_capability

    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    wide = (3, 3, 512, 512)
    assert cudnn_attention_max_head_dim() is None  # this machine: a CPU
    assert use_winograd((), wide, jnp.float32)
    with compiling_for(Device("gpu", "9.0")):  # an H100
        assert cudnn_attention_max_head_dim() == 256
        assert choose_attention_implementation(q, q) == "cudnn"
        assert not use_winograd((), wide, jnp.float32)
        h100 = trace_settings()
        with compiling_for(Device("cpu")):
            assert cudnn_attention_max_head_dim() is None
            assert choose_attention_implementation(q, q) == "xla"
            assert use_winograd((), wide, jnp.float32)
        with compiling_for(Device("gpu", "8.0")):  # an A100
            assert cudnn_attention_max_head_dim() == 128
            assert trace_settings() != h100, "programs for two GPUs must not share a cache entry"
        with compiling_for(Device("gpu", "7.5")):  # a T4: no fused attention
            assert choose_attention_implementation(q, q) == "xla"
    assert trace_settings() != h100


def test_push_to_hub_variant_goes_beside_the_repo(flax_pipe, pipe_dir, tmp_path, monkeypatch):
    """push_to_hub(variant=) reads the repo's configs, uploads that variant's weights beside
    the plain ones and replaces only that variant's older files; a repo of other models is
    refused before anything is uploaded."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    repo = tmp_path / "repo"
    FakeHubApi.repo, FakeHubApi.calls = str(repo), []
    flax_pipe.push_to_hub("me/upscaler", torch_layout=True)
    (repo / "README.md").write_text("model card")
    old = ["diffusion_pytorch_model.fp16-00001-of-00002.safetensors"]
    old.append("diffusion_pytorch_model.safetensors.index.fp16.json")
    for name in old:
        (repo / "unet" / name).write_text("an older fp16 upload")
    before = {k: (repo / k).read_bytes() for k in file_ids(repo) if ".fp16" not in k}
    fp16 = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
        pipe_dir, param_dtype=jnp.float16
    )
    FakeHubApi.calls = []
    monkeypatch.setattr(FakeHubApi, "snapshot_holds_all", True)
    fp16.push_to_hub("me/upscaler", torch_layout=True, variant="fp16")
    assert [c[0] for c in FakeHubApi.calls] == ["create_repo", "snapshot_download", "upload_folder"]
    # only the variant's weights go up (not the plain ones the cached snapshot also holds)
    weights = [f for f in FakeHubApi.uploaded if f.endswith(".safetensors")]
    assert weights and all(".fp16." in f for f in weights), FakeHubApi.uploaded
    assert "README.md" not in FakeHubApi.uploaded
    now = file_ids(repo)
    assert {k: (repo / k).read_bytes() for k in now if ".fp16" not in k} == before
    assert sorted(k for k in now if ".fp16" in k) == [
        f"{part}/{name}.fp16.safetensors"
        for part, name in (
            ("text_encoder", "model"),
            ("unet", "diffusion_pytorch_model"),
            ("vae", "diffusion_pytorch_model"),
        )
    ]
    got = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(repo), variant="fp16")
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(nnx.state(got.unet)), jax.tree.leaves(nnx.state(fp16.unet)), strict=True
        )
    )
    # a model pushed as a variant into a repo that holds another model
    FakeHubApi.repo = str(tmp_path / "vae-repo")
    os.makedirs(FakeHubApi.repo)
    flax_pipe.vae.push_to_hub("me/vae")
    before = file_ids(FakeHubApi.repo)
    FakeHubApi.calls = []
    with pytest.raises(ValueError, match="^hub repo me/vae holds another model"):
        fp16.unet.push_to_hub("me/vae", variant="fp16")
    assert "upload_folder" not in [c[0] for c in FakeHubApi.calls]
    assert file_ids(FakeHubApi.repo) == before


def test_diffusers_spellings_work_or_say_what_stands_for_them(flax_pipe, torch_pipe, tmp_path):
    """What a diffusers user writes: numpy_to_pil, vae_scale_factor and output_type=None work as
    there; encode_prompt's extra arguments, save_pretrained's serialization options and the
    device attribute say what to do instead; negative prompt embeddings of a wrong shape are
    refused with guidance off too (diffusers checks them on every call)."""
    low, noise = inputs(1, seed=31)
    kw = dict(prompt="x", image=low, latents=noise, num_inference_steps=2, guidance_scale=0.0)
    as_np = flax_pipe(output_type="np", **kw).images
    as_none = flax_pipe(output_type=None, **kw).images
    assert isinstance(as_none, np.ndarray) and np.array_equal(as_none, as_np)
    pil = flax_pipe(**kw).images
    converted = flax_pipe.numpy_to_pil(as_np)
    assert np.array_equal(np.asarray(converted[0]), np.asarray(pil[0]))
    assert np.array_equal(np.asarray(converted[0]), np.asarray(torch_pipe.numpy_to_pil(as_np)[0]))
    assert (
        flax_pipe.vae_scale_factor
        == torch_pipe.vae_scale_factor
        == (2 ** (len(flax_pipe.vae.config.block_out_channels) - 1))
    )
    with pytest.raises(TypeError, match=r"call encode_prompt\(negative_prompt\) for those"):
        flax_pipe.encode_prompt("a cat", "cpu", True, "a dog")
    with pytest.raises(TypeError, match="takes no safe_serialization= .* always written as"):
        flax_pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    assert not (tmp_path / "saved").exists()
    with pytest.raises(AttributeError, match=r"has no device \(a diffusers pipeline attribute\)"):
        flax_pipe.device  # noqa: B018
    with pytest.raises(AttributeError, match=r"has no progress_bar\(\) \(a diffusers pipeline m"):
        flax_pipe.progress_bar  # noqa: B018
    width = flax_pipe.text_encoder.config.hidden_size
    embeds, pooled = flax_pipe.encode_prompt("x")
    with pytest.raises(ValueError, match=r"negative_prompt_embeds must have shape \[1, 77, "):
        flax_pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=np.zeros((1, 5, width), np.float32),
            negative_pooled_prompt_embeds=np.zeros((1, width), np.float32),
            **{k: v for k, v in kw.items() if k != "prompt"},
        )

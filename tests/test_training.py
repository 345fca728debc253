"""The fine-tuning objective against an independent numpy computation, a short fine-tune of a
tiny UNet whose loss must fall, a checkpointed run resumed bit for bit, and the checks of the
settings, batches, pictures and checkpoints (the API's and the example script's)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flax_latentup import AutoencoderKLConfig, FlaxAutoencoderKL, FlaxUNet2DConditionModel, training
from flax_latentup.configs import UNet2DConditionConfig
from flax_latentup.sampling import noise_level_embedding as pipeline_noise_embedding
from flax_latentup.training import (
    Draws,
    NonFiniteError,
    TrainConfig,
    Trainer,
    checkpoint_info,
    denoiser_loss,
    draw,
    karras_scalings,
    latest_checkpoint,
    make_latents,
    noise_level_embedding,
)
from tests import helpers
from tests.helpers import finish, run_python, xla_flags

B, D, L = 4, 32, 7  # batch, text width (the tiny UNet's cross_attention_dim), text length

# --------------------------------------------------------------------------------------------
# The objective against numpy
# --------------------------------------------------------------------------------------------


def _fake_weights(seed=0):
    rng = np.random.RandomState(seed)
    return {
        "a": rng.randn(8, 5) * 0.4,
        "t": rng.randn(5),
        "c": rng.randn(D, 5) * 0.3,
        "e": rng.randn(128 + D, 5) * 0.1,
    }


def _fake_model(w):
    """A small differentiable stand-in for the UNet, using every input."""

    def model(x, t, ctx, cond):
        h = x @ w["a"] + t[:, None, None, None] * w["t"]
        h = h + (ctx.mean(1) @ w["c"])[:, None, None, :] + (cond @ w["e"])[:, None, None, :]
        return np.tanh(h) if isinstance(x, np.ndarray) else jnp.tanh(h)

    return model


def _numpy_loss(w, batch, draws, uncond, level, embed_weight, objective="variance"):
    """The k-diffusion upscaler objective, re-derived in float64: ``DenoiserWithVariance``'s
    (the log-variance, the model's last channel averaged over the picture, broadcast over
    every element of the error) or ``Denoiser``'s."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x0, low = f64(batch["latents"]), f64(batch["low_res"])
    sigma, noise = f64(draws.sigma), f64(draws.noise)
    s = sigma[:, None, None, None]
    c_skip, c_out, c_in = 1 / (s**2 + 1), s / np.sqrt(s**2 + 1), 1 / np.sqrt(s**2 + 1)
    noised = x0 + noise * s
    low = (low + level * f64(draws.aug_noise)) / np.sqrt(level**2 + 1)
    image_cond = low.repeat(2, axis=1).repeat(2, axis=2)
    drop = np.asarray(draws.drop_text)
    ctx = np.where(drop[:, None, None], f64(uncond[0])[None], f64(batch["context"]))
    pooled = np.where(drop[:, None], f64(uncond[1])[None], f64(batch["pooled"]))
    freq = 2 * np.pi * np.log1p(level) * f64(embed_weight)
    emb = np.concatenate([np.cos(freq), np.sin(freq)])[None].repeat(len(x0), 0)
    cond = np.concatenate([emb, pooled], axis=1)
    model_in = np.concatenate([noised * c_in, image_cond], axis=-1)
    full = _fake_model(w)(model_in, np.log(sigma) / 4, ctx, cond)
    out = full[..., :4]
    target = (x0 - c_skip * noised) / c_out
    if objective == "mse":
        return np.mean(np.mean((out - target) ** 2, axis=(1, 2, 3)))
    logvar = full[..., 4].reshape(len(x0), -1).mean(1)[:, None, None, None]
    losses = ((out - target) ** 2 / np.exp(logvar) + logvar) / 2
    return np.mean(losses.reshape(len(x0), -1).mean(1))


def _random_batch(seed=0, size=8):
    rng = np.random.RandomState(seed)
    f32 = lambda *s: rng.randn(*s).astype(np.float32)  # noqa: E731
    batch = {
        "latents": f32(B, size, size, 4),
        "low_res": f32(B, size // 2, size // 2, 4),
        "context": f32(B, L, D),
        "pooled": f32(B, D),
    }
    return batch, (f32(L, D), f32(D))


@pytest.mark.parametrize("objective", ["variance", "mse"])
@pytest.mark.parametrize("level", [0.0, 0.3])
def test_loss_matches_numpy(level, objective):
    batch, uncond = _random_batch()
    rng = np.random.RandomState(1)
    draws = Draws(
        sigma=np.asarray([0.03, 0.4, 1.7, 12.0], np.float32),
        noise=rng.randn(*batch["latents"].shape).astype(np.float32),
        drop_text=np.asarray([False, True, False, True]),
        aug_noise=rng.randn(*batch["low_res"].shape).astype(np.float32),
    )
    embed_weight = (rng.randn(64) * 2).astype(np.float32)
    w = _fake_weights()
    weight = embed_weight if level else np.zeros(64)
    want = _numpy_loss(w, batch, draws, uncond, level, weight, objective)
    jw = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), w)
    got, per_example = jax.jit(
        lambda batch, draws: denoiser_loss(
            _fake_model(jw),
            batch,
            draws,
            uncond,
            objective=objective,
            noise_aug_level=level,
            noise_aug_embed_weight=embed_weight if level else None,
        )
    )(batch, draws)
    err = abs(float(got) - want)
    print(f"level {level}: loss {float(got):.6f}, numpy {want:.6f}, |diff| {err:.1e}")
    assert err < 1e-6 * max(1.0, abs(want))
    assert per_example.shape == (B,)


def test_scalings_and_noise_embedding():
    sigma = jnp.asarray([0.1, 1.0, 10.0])
    c_skip, c_out, c_in = karras_scalings(sigma)
    # D(x) = c_skip x + c_out F reproduces x0 at F = target for any sigma (sigma_data = 1)
    np.testing.assert_allclose(c_skip + c_out**2, 1.0, rtol=1e-6)
    np.testing.assert_allclose(c_in * jnp.sqrt(sigma**2 + 1), 1.0, rtol=1e-6)
    # level 0 is the pipeline's 64 ones and 64 zeros, whatever the Fourier weight
    np.testing.assert_array_equal(
        noise_level_embedding(jnp.zeros(3), jnp.arange(64.0)), pipeline_noise_embedding(3)
    )
    with pytest.raises(ValueError, match="noise_aug_embed_weight"):
        TrainConfig(noise_aug_level=0.1)


def test_draws_follow_config():
    cfg = TrainConfig(sigma_loc=-1.2, sigma_scale=1.2, cfg_dropout=0.25)
    d = draw(jax.random.key(0), (4096, 2, 2, 4), (4096, 1, 1, 4), cfg)
    log_sigma = np.log(np.asarray(d.sigma))
    assert abs(log_sigma.mean() + 1.2) < 0.06 and abs(log_sigma.std() - 1.2) < 0.06
    assert abs(np.asarray(d.drop_text).mean() - 0.25) < 0.03


# --------------------------------------------------------------------------------------------
# Fine-tuning a tiny model
# --------------------------------------------------------------------------------------------


def make_pictures(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth coloured pictures in [-1, 1]: gradients and a disc each."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        img = a * xx[..., None] + b * yy[..., None] + c * 0.5
        cy, cx, r = rng.uniform(0.2, 0.8, 3) * [1, 1, 0.4]
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2)[..., None]
        img = np.where(disc, rng.uniform(-1, 1, 3), img)
        out.append(np.clip(img, -1, 1))
    return np.stack(out).astype(np.float32)


def random_model(cls, config, seed: int):
    """A model with seeded random weights, filled from numpy (eager NNX init is slow on CPU)."""
    graphdef, abstract = nnx.split(cls.abstract(config))
    rng = np.random.RandomState(seed)
    flat = []
    for path, var in nnx.to_flat_state(abstract):
        shape, name = var.shape, path[-1]
        if name == "scale":
            value = 1.0 + 0.1 * rng.randn(*shape)
        elif name == "bias":
            value = 0.1 * rng.randn(*shape)
        elif len(shape) >= 2:
            value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
        else:  # the Fourier projection weight (diffusers draws it with std 16)
            value = 16.0 * rng.randn(*shape)
        flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def setup():
    unet_config = UNet2DConditionConfig.from_dict(helpers.PIPE_UNET)
    unet = random_model(FlaxUNet2DConditionModel, unet_config, 0)
    vae = random_model(FlaxAutoencoderKL, AutoencoderKLConfig.tiny(), 1)
    pictures = jnp.asarray(make_pictures(B, 32))
    batch = dict(make_latents(vae, pictures, jax.random.key(2)))
    rng = np.random.RandomState(3)
    batch["context"] = rng.randn(B, L, D).astype(np.float32)
    batch["pooled"] = rng.randn(B, D).astype(np.float32)
    uncond = (rng.randn(L, D).astype(np.float32), rng.randn(D).astype(np.float32))
    # two warm-up steps, then constant (test_steps_follow_the_schedules checks the warm-up)
    config = TrainConfig(
        learning_rate=1e-3, lr_warmup_steps=2, ema_decay=0.9, cfg_dropout=0.1, seed=4
    )
    return Trainer(unet, uncond, config), batch


def test_latents_shapes(setup):
    _, batch = setup
    assert batch["latents"].shape == (B, 16, 16, 4)
    assert batch["low_res"].shape == (B, 8, 8, 4)


def test_finetune_loss_goes_down(setup):
    trainer, batch = setup
    # a fixed evaluation set: one sigma per row across the training range, fixed noise
    k = jax.random.key(5)
    fixed = Draws(
        sigma=jnp.asarray([0.1, 0.3, 1.0, 3.0]),
        noise=jax.random.normal(k, batch["latents"].shape),
        drop_text=jnp.zeros((B,), bool),
        aug_noise=jnp.zeros(batch["low_res"].shape),
    )
    state = trainer.init_state()
    before = trainer.loss(state, batch, fixed)
    losses, errors = [], []
    for _ in range(40):
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        errors.append(float(metrics["mse"]))
    after = trainer.loss(state, batch, fixed)
    after_ema = trainer.loss(state, batch, fixed, ema=True)
    print(f"fixed-draw loss {before:.4f} -> {after:.4f} (EMA {after_ema:.4f}) in 40 steps")
    print(
        f"squared error of the steps' draws: first 5 {np.mean(errors[:5]):.4f}, last 5 "
        f"{np.mean(errors[-5:]):.4f}"
    )
    assert int(state.step) == 40 and np.all(np.isfinite(losses))
    # the variance objective: the loss may go below 0, so it is compared by its drop
    assert before - after > 0.5 * abs(before)
    assert after_ema < before
    assert np.mean(errors[-5:]) < 0.5 * np.mean(errors[:5])


def test_steps_follow_the_schedules(setup):
    """Warm-up: the first update has learning rate 0 (the weights stay as they are), the second
    half the peak; the EMA's first update copies the weights, its second averages."""
    trainer, batch = setup
    state = trainer.init_state()
    p0 = jax.device_get(state.params)  # host copies: a step donates the state it is given
    state, m1 = trainer.step(state, batch)
    p1, e1 = jax.device_get(state.params), jax.device_get(state.ema)
    state, m2 = trainer.step(state, batch)
    p2, e2 = jax.device_get(state.params), jax.device_get(state.ema)
    assert float(m1["learning_rate"]) == 0.0 and float(m2["learning_rate"]) == pytest.approx(5e-4)
    same = jax.tree.map(lambda a, b: bool(np.all(a == b)), p0, p1)
    assert all(jax.tree.leaves(same)), "an update at learning rate 0 changed the weights"
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p1, p2)
    assert max(jax.tree.leaves(moved)) > 0
    # EMA: update 1 has weight 0 (a copy), update 2 weight 2 / 11
    assert all(jax.tree.leaves(jax.tree.map(lambda e, p: bool(np.all(e == p)), e1, p1)))
    d = 2 / 11
    err = jax.tree.map(
        lambda e, old, p: float(np.max(np.abs(e - (d * old + (1 - d) * p)))), e2, e1, p2
    )
    assert max(jax.tree.leaves(err)) <= 1e-6


def test_resume_is_bitwise_identical(setup, tmp_path):
    trainer, batch = setup
    state = trainer.init_state()
    for i in range(6):
        if i == 3:
            path = trainer.save_checkpoint(tmp_path, state)
        state, _ = trainer.step(state, batch)
    assert latest_checkpoint(tmp_path) == path and path.endswith("checkpoint-00000003")
    assert sorted(os.listdir(path)) == [
        "optimizer.safetensors",
        "trainer_state.json",
        "unet",
        "unet_ema",
    ]

    resumed = trainer.load_checkpoint(path)
    assert int(resumed.step) == 3
    for _ in range(3):
        resumed, _ = trainer.step(resumed, batch)
    flat_a, tree_a = jax.tree.flatten(jax.device_get(state))
    flat_b, tree_b = jax.tree.flatten(jax.device_get(resumed))
    assert tree_a == tree_b
    for a, b in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # the saved UNet loads as a plain model with the state's weights
    unet = FlaxUNet2DConditionModel.from_pretrained(os.path.join(path, "unet"))
    assert isinstance(unet, FlaxUNet2DConditionModel)

    # a Trainer of a UNet with other frozen weights (another model's Fourier projection, which
    # the checkpoint's steps were computed with) cannot resume it
    other = random_model(FlaxUNet2DConditionModel, trainer.unet_config, 5)
    uncond = (np.zeros((L, D), np.float32), np.zeros(D, np.float32))
    with pytest.raises(ValueError, match=r"unet was trained with other frozen weights \("):
        Trainer(other, uncond, trainer.config).load_checkpoint(path)

    # an optimizer state of another layout (as written when the learning rate was a constant,
    # which keeps no step count) is refused with what to do about it
    params = jax.device_get(resumed.params)
    constant = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    training._save_leaves(constant.init(params), os.path.join(path, "optimizer.safetensors"))
    with pytest.raises(ValueError, match="another optimizer layout.*unet/ folder"):
        trainer.load_checkpoint(path)


@pytest.fixture(scope="module")
def finetune():
    """examples/finetune.py as a module (its main runs in this process)."""
    spec = importlib.util.spec_from_file_location("finetune", "examples/finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_draws_depend_on_seed_and_step_only(finetune, tmp_path):
    import argparse

    from PIL import Image

    for i, p in enumerate(make_pictures(3, 40, seed=1)):
        Image.fromarray(((p + 1) * 127.5).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("a photo of the cat\n")
    paths = finetune.list_pictures(str(tmp_path))
    assert [finetune.caption_of(p) for p in paths] == ["", "a photo of the cat", ""]
    args = argparse.Namespace(seed=7, batch_size=2, resolution=32)
    a, idx_a = finetune.step_pictures(paths, 5, args)
    b, idx_b = finetune.step_pictures(paths, 5, args)
    c, _ = finetune.step_pictures(paths, 6, args)
    assert a.shape == (2, 32, 32, 3) and a.min() >= -1 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert idx_a == idx_b and not np.array_equal(a, c)


def test_example_crops_do_not_follow_the_picture_choice(finetune, monkeypatch):
    """A row's crop is drawn apart from the choice of its picture: over many steps each
    picture is cropped all across its width (numpy pads seeds with zeros, so sharing a stream
    with the choice tied row 0's crop position to the picture chosen)."""
    import argparse

    offsets: dict[int, list[int]] = {}

    def spy(path, size, rng):
        offsets.setdefault(int(path), []).append(int(rng.integers(0, 769)))
        return np.zeros((size, size, 3), np.float32)

    monkeypatch.setattr(finetune, "load_crop", spy)
    args = argparse.Namespace(seed=3, batch_size=1, resolution=8)
    for step in range(300):
        finetune.step_pictures(["0", "1", "2"], step, args)
    for picture, xs in offsets.items():
        assert max(xs) - min(xs) > 600, f"picture {picture}: crops only within {min(xs)}..{max(xs)}"


def test_example_crops_pictures_upright(finetune, tmp_path):
    """A picture stored sideways with an EXIF orientation is cropped as it is shown (upright,
    as PIL.ImageOps.exif_transpose turns it), not as stored."""
    from PIL import Image, ImageOps

    stored = np.random.default_rng(4).integers(0, 256, (4, 8, 3), dtype=np.uint8)  # 8 wide
    path = str(tmp_path / "sideways.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 4 wide, 8 tall
    Image.fromarray(stored).save(path, exif=exif)
    with Image.open(path) as im:
        upright = np.asarray(ImageOps.exif_transpose(im), np.float32) / 127.5 - 1.0
    assert upright.shape == (8, 4, 3)
    windows = [upright[y : y + 4] for y in range(5)]
    windows += [w[:, ::-1] for w in windows]  # the random h-flip
    for seed in range(6):
        crop = finetune.load_crop(path, 4, np.random.default_rng(seed))
        assert any(np.array_equal(crop, w) for w in windows), f"seed {seed}: not an upright crop"


def test_example_tokenizes_captions(finetune, tmp_path, capsys, monkeypatch):
    """Captions are tokenized (a chunk at a time) as the pipeline tokenizes prompts; those cut
    at the text encoder's length are counted in one warning; a byte-order mark is not part of
    a caption."""
    monkeypatch.setattr(finetune, "TOKENIZE_CHUNK", 2)
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    tok = helpers.write_clip_tokenizer(str(tmp_path / "tok"))
    pipe_dir = str(tmp_path / "pipe")
    P.from_pretrained(_torch_pipe(tok, tmp_path)).save_pretrained(pipe_dir)
    pipe = P.from_pretrained(pipe_dir)
    captions = [f"a photo of the cat {i}" for i in range(3)] + [" ".join(["cat"] * 90)] * 2
    got = finetune.tokenize_captions(pipe, captions)
    assert "warning: 2 caption(s) are longer than the text encoder's 77 tokens" in (
        capsys.readouterr().err
    )
    want = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True)
    np.testing.assert_array_equal(got, np.asarray(want.input_ids))
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "x.txt").write_bytes("\ufeffa photo".encode())
    assert finetune.caption_of(str(tmp_path / "x.png")) == "a photo"


def _torch_pipe(tokenizer_dir, tmp_path):
    folder = str(tmp_path / "torch")
    helpers.make_torch_pipeline(seed=1, tokenizer_dir=tokenizer_dir).save_pretrained(folder)
    return folder


def test_trainer_refuses_low_precision_weights():
    """Training bfloat16 parameters would round small updates away: refused by name."""
    config = UNet2DConditionConfig.from_dict(helpers.PIPE_UNET)
    unet = random_model(FlaxUNet2DConditionModel, config, 0)
    graphdef, state = nnx.split(unet)
    unet = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state))
    uncond = (np.zeros((L, D), np.float32), np.zeros(D, np.float32))
    with pytest.raises(
        ValueError, match=r"trainable parameters must be float32, got \['bfloat16'\]"
    ):
        Trainer(unet, uncond)


def test_variance_objective_needs_the_log_variance_channel():
    """The default objective reads the log-variance from the UNet's channel after the latents':
    a UNet without it (out_channels 4) is refused by name, by the Trainer before anything is
    traced and by denoiser_loss for a model callable; "mse" trains it."""
    config = UNet2DConditionConfig.from_dict(dict(helpers.PIPE_UNET, out_channels=4))
    unet = random_model(FlaxUNet2DConditionModel, config, 0)
    uncond = (np.zeros((L, D), np.float32), np.zeros(D, np.float32))
    with pytest.raises(ValueError, match='"variance" needs a UNet with 5 output channels'):
        Trainer(unet, uncond)
    Trainer(unet, uncond, TrainConfig(objective="mse"))

    batch, uncond = _random_batch()
    draws = Draws(
        sigma=np.ones(B, np.float32),
        noise=np.zeros(batch["latents"].shape, np.float32),
        drop_text=np.zeros(B, bool),
        aug_noise=np.zeros(batch["low_res"].shape, np.float32),
    )
    four = lambda x, *rest: x[..., :4]  # noqa: E731
    with pytest.raises(ValueError, match='"variance" needs a model with 5 output channels'):
        denoiser_loss(four, batch, draws, uncond)
    assert np.isfinite(float(denoiser_loss(four, batch, draws, uncond, objective="mse")[0]))


def test_loss_takes_the_empty_prompt_as_encode_prompt_gives_it():
    """``uncond`` as ``encode_prompt([""])`` returns it (a batch of one), as the Trainer takes
    it: the same loss as the unbatched pair."""
    batch, (ctx, pooled) = _random_batch()
    rng = np.random.RandomState(2)
    draws = Draws(
        sigma=np.asarray([0.1, 0.5, 2.0, 8.0], np.float32),
        noise=rng.randn(*batch["latents"].shape).astype(np.float32),
        drop_text=np.asarray([True, False, True, True]),
        aug_noise=np.zeros(batch["low_res"].shape, np.float32),
    )
    model = _fake_model(jax.tree.map(jnp.asarray, _fake_weights()))
    plain = float(denoiser_loss(model, batch, draws, (ctx, pooled))[0])
    batched = float(denoiser_loss(model, batch, draws, (ctx[None], pooled[None]))[0])
    assert batched == plain
    with pytest.raises(ValueError, match=r"or that batch of one; got shapes \[2, 7, 32\]"):
        denoiser_loss(model, batch, draws, (np.stack([ctx, ctx]), np.stack([pooled, pooled])))


def test_checkpoints_without_an_objective_were_trained_with_mse():
    """A checkpoint of a build that knew only the squared error records no objective: resuming
    it with the variance objective is a change of setting, and with "mse" none."""
    recorded = {k: v for k, v in TrainConfig().to_dict().items() if k != "objective"}
    assert TrainConfig().changes_from(recorded) == [("objective", "mse", "variance")]
    assert TrainConfig(objective="mse").changes_from(recorded) == []


def test_trainer_warns_of_config_dropout():
    """A UNet config with dropout > 0 (which diffusers' K blocks apply in training) is
    fine-tuned without it here: said once, at the Trainer's start; dropout 0 says nothing."""
    uncond = (np.zeros((L, D), np.float32), np.zeros(D, np.float32))
    for dropout, warns in ((0.1, True), (0.0, False)):
        config = UNet2DConditionConfig.from_dict(dict(helpers.PIPE_UNET, dropout=dropout))
        unet = random_model(FlaxUNet2DConditionModel, config, 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(unet, uncond)
        said = [w for w in caught if "dropout" in str(w.message)]
        assert len(said) == warns, said
        # shown at the caller's line, not inside the library
        assert all(w.filename == __file__ for w in said), [w.filename for w in said]
        said = [str(w.message) for w in said]
        if warns:
            assert "dropout=0.1" in said[0] and "fine-tuned without" in said[0]


def test_example_checks_batch_over_local_devices(finetune, tmp_path, monkeypatch):
    """A batch that does not divide over this host's devices stops before the model loads."""
    (tmp_path / "data").mkdir()
    monkeypatch.setattr(jax, "local_device_count", lambda *a: 2)
    argv = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")]
    argv += ["--output", str(tmp_path / "run"), "--steps", "10", "--batch-size", "1"]
    with pytest.raises(SystemExit, match="--batch-size 1 must divide over the devices"):
        finetune.main(argv)
    assert not (tmp_path / "run").exists()


def test_example_checks_schedule_before_loading(finetune, tmp_path):
    argv = ["--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data")]
    argv += ["--output", str(tmp_path / "run"), "--steps", "1000"]
    with pytest.raises(SystemExit, match="bad training settings: lr_schedule 'cosine'"):
        finetune.main(argv + ["--lr-schedule", "cosine", "--lr-warmup-steps", "1000"])
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Learning-rate schedules and the EMA's warm-up, against diffusers' own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, diffusers_name, warmup",
    [
        ("constant", "constant", 0),
        ("constant", "constant_with_warmup", 7),
        ("linear", "linear", 5),
        ("cosine", "cosine", 5),
        ("cosine", "cosine", 0),
    ],
)
def test_learning_rate_schedules_match_diffusers(kind, diffusers_name, warmup):
    import torch
    from diffusers.optimization import get_scheduler

    total = 30
    config = TrainConfig(
        learning_rate=2e-4,
        lr_schedule=kind,
        lr_warmup_steps=warmup,
        total_steps=None if kind == "constant" else total,
    )
    ours = config.learning_rate_schedule()
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    ref = get_scheduler(diffusers_name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for count in range(total + 1):  # the learning rate of the update after `count` updates
        want = opt.param_groups[0]["lr"]
        got = float(ours(count))
        assert abs(got - want) <= 1e-6 * 2e-4, f"{kind}, update {count}: {got} vs {want}"
        opt.step()
        ref.step()
    if kind != "constant":  # past total_steps the rate stays at 0 (diffusers' cosine rises again)
        assert float(ours(total + 5)) == 0.0


def test_ema_warmup_matches_diffusers_ema_model():
    import torch
    from diffusers.training_utils import EMAModel

    ref = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.999)
    warm = TrainConfig(ema_decay=0.999)
    flat = TrainConfig(ema_decay=0.999, ema_warmup=False)
    for count in range(0, 20000, 7):
        want = ref.get_decay(count + 1)  # diffusers counts the update being made from 1
        assert abs(float(warm.ema_decay_at(jnp.int32(count))) - want) <= 1e-7, count
        assert float(flat.ema_decay_at(jnp.int32(count))) == np.float32(0.999)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr_schedule="step"), "lr_schedule must be one of"),
        (dict(lr_warmup_steps=-1), "lr_warmup_steps must be >= 0"),
        (dict(lr_schedule="cosine"), "decays to 0 at total_steps"),
        (dict(lr_schedule="linear", lr_warmup_steps=10, total_steps=10), "exceed lr_warmup_steps"),
        (dict(total_steps=0), "total_steps must be >= 1"),
    ],
)
def test_schedule_settings_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def parallel_case():
    """``(batch, uncond, config)`` of the data-parallel tests (the whole batch, host arrays)."""
    vae = random_model(FlaxAutoencoderKL, AutoencoderKLConfig.tiny(), 1)
    latents = make_latents(vae, jnp.asarray(make_pictures(B, 32)), jax.random.key(2))
    batch = {k: np.asarray(v) for k, v in latents.items()}
    rng = np.random.RandomState(3)
    batch["context"] = rng.randn(B, L, D).astype(np.float32)
    batch["pooled"] = rng.randn(B, D).astype(np.float32)
    uncond = (rng.randn(L, D).astype(np.float32), rng.randn(D).astype(np.float32))
    # Adam's eps well above float32 noise: a weight whose gradient is zero up to rounding (a
    # bias ahead of a group norm) would otherwise move by +-lr on the noise's sign
    config = TrainConfig(learning_rate=1e-3, adam_eps=1e-3, ema_decay=0.9, cfg_dropout=0.5, seed=4)
    return batch, uncond, config


def parallel_trainer(uncond, config, mesh=None) -> Trainer:
    unet_config = UNet2DConditionConfig.from_dict(helpers.PIPE_UNET)
    return Trainer(
        random_model(FlaxUNet2DConditionModel, unet_config, 0), uncond, config, mesh=mesh
    )


def _relative_gap(a_leaves, b_leaves) -> float:
    assert len(a_leaves) == len(b_leaves) > 10
    return max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
        for a, b in zip(a_leaves, b_leaves, strict=True)
    )


@pytest.fixture(scope="module")
def one_device_run():
    """One device, the whole batch: ``(metrics [4, 2] (loss, grad norm) of four steps,
    (params, ema) after three)``, what the data-parallel runs must reproduce."""
    batch, uncond, config = parallel_case()
    trainer = parallel_trainer(uncond, config)
    state = trainer.init_state()
    metrics = []
    for i in range(4):
        if i == 3:
            after_three = jax.device_get((state.params, state.ema))
        state, m = trainer.step(state, batch)
        metrics.append([float(m["loss"]), float(m["grad_norm"])])
    return np.asarray(metrics), after_three


def test_trainer_inside_the_callers_mesh_context(one_device_run):
    """A Trainer used inside the caller's own ``jax.set_mesh`` block (a mesh of
    ``jax.make_mesh``, Explicit axes) trains on its own mesh, as outside the block."""
    batch, uncond, config = parallel_case()
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        trainer = parallel_trainer(uncond, config)
        state, m = trainer.step(trainer.init_state(), batch)
        draws = draw(jax.random.key(0), batch["latents"].shape, batch["low_res"].shape, config)
        loss = trainer.loss(state, batch, draws)
    metrics, _ = one_device_run
    np.testing.assert_allclose([float(m["loss"]), float(m["grad_norm"])], metrics[0], rtol=1e-6)
    assert np.isfinite(loss)


@pytest.mark.heavy
def test_two_devices_train_as_one(tmp_path, one_device_run):
    """Data parallelism: the batch split over two devices (gradients reduced across them)
    takes the same steps as one device with the whole batch: the same losses and gradient
    norms, and the same weights and EMA after three steps."""
    out_file = tmp_path / "params.npz"
    code = f"""
    import jax, numpy as np
    from tests.test_training import parallel_case, parallel_trainer
    assert jax.device_count() == 2, jax.devices()
    batch, uncond, config = parallel_case()
    # a mesh over both devices, as jax.make_mesh makes it (Explicit axes)
    trainer = parallel_trainer(uncond, config, jax.make_mesh((2,), ("data",)))
    state = trainer.init_state()
    metrics = []
    for _ in range(3):
        state, m = trainer.step(state, batch)
        metrics.append([float(m["loss"]), float(m["grad_norm"])])
    leaves = jax.tree.leaves(jax.device_get((state.params, state.ema)))
    np.savez({str(out_file)!r}, metrics=np.asarray(metrics), *leaves)
    print("ok")
    """
    out = finish(
        run_python(code, {"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=2")})
    )
    assert out.strip().endswith("ok")
    res = dict(np.load(out_file))
    metrics, after_three = one_device_run
    np.testing.assert_allclose(res["metrics"], metrics[:3], rtol=1e-5)
    ref = jax.tree.leaves(after_three)
    gap = _relative_gap([res[f"arr_{i}"] for i in range(len(ref))], ref)
    print(f"two devices vs one: weights within {gap:.3g} (relative) after 3 steps")
    assert gap <= 1e-5, f"two devices' weights after 3 steps differ by {gap:.3g} (relative)"


@pytest.mark.heavy
def test_two_processes_train_as_one(tmp_path, one_device_run):
    """Two processes (jax.distributed, one device each) train one model, each stepping on its
    half of every batch: the losses and gradient norms of one process with the whole batch,
    one checkpoint (written by process 0, after which both go on), the same weights in it,
    and a resumed step that matches too."""
    port = helpers.free_port()
    code = f"""
    import jax, numpy as np
    from flax_latentup import parallel
    parallel.initialize_distributed()
    from tests.test_training import parallel_case, parallel_trainer
    me, count = jax.process_index(), jax.process_count()
    assert count == 2 and jax.device_count() == 2, jax.devices()
    batch, uncond, config = parallel_case()
    trainer = parallel_trainer(uncond, config)
    share = len(batch["latents"]) // count
    mine = {{k: v[me * share:(me + 1) * share] for k, v in batch.items()}}
    state = trainer.init_state()
    metrics = []
    for _ in range(3):
        state, m = trainer.step(state, mine)
        metrics.append([float(m["loss"]), float(m["grad_norm"])])
    path = trainer.save_checkpoint({str(tmp_path / "run")!r}, state)
    state, m = trainer.step(trainer.load_checkpoint(path), mine)
    metrics.append([float(m["loss"]), float(m["grad_norm"])])
    np.save({str(tmp_path)!r} + f"/metrics{{me}}.npy", np.asarray(metrics))
    if me == 0:  # process 0 cannot write the next one: both stop, neither waits
        from flax_latentup import training
        from safetensors.numpy import save_file

        def full_disk(leaves, path):  # safetensors' own error, as on a full disk
            save_file({{"a": np.zeros(1, np.float32)}}, "/dev/null/optimizer")

        training._save_leaves = full_disk
    try:
        trainer.save_checkpoint({str(tmp_path / "run")!r}, state)
    except OSError as e:
        print("refused:", e)
    print("ok")
    """
    env = dict(FLAX_LATENTUP_COORDINATOR=f"127.0.0.1:{port}", FLAX_LATENTUP_NUM_PROCESSES="2")
    procs = [run_python(code, {**env, "FLAX_LATENTUP_PROCESS_ID": str(i)}) for i in range(2)]
    out = [finish(proc) for proc in procs]
    assert all(o.strip().endswith("ok") for o in out), out
    assert f"refused: {tmp_path / 'run' / 'checkpoint-00000004'}: " in out[0], out[0]
    assert (
        "refused: process 0 could not write the checkpoint of step 4 "
        f"({tmp_path / 'run' / 'checkpoint-00000004'}); its own message says why"
    ) in out[1], out[1]

    metrics, (ref_params, ref_ema) = one_device_run
    for i in range(2):
        got = np.load(tmp_path / f"metrics{i}.npy")
        np.testing.assert_allclose(got, metrics, rtol=1e-5, err_msg=f"process {i}")
    assert os.listdir(tmp_path / "run") == ["checkpoint-00000003"]
    for sub, ref in (("unet", ref_params), ("unet_ema", ref_ema)):
        saved = FlaxUNet2DConditionModel.from_pretrained(
            str(tmp_path / "run" / "checkpoint-00000003" / sub)
        )
        leaves = jax.tree.leaves(nnx.split(saved, training.TRAINABLE, ...)[1])
        gap = _relative_gap([np.asarray(x) for x in leaves], jax.tree.leaves(ref))
        assert gap <= 1e-5, f"{sub} of the two-process checkpoint differs by {gap:.3g} (relative)"


@pytest.mark.heavy
def test_example_on_two_processes(flax_pipe_dir, finetune, tmp_path):
    """``examples/finetune.py --distributed`` on two processes: one progress bar, one set of
    checkpoints (written by process 0 into the shared folder, the older one pruned). Resuming
    on several processes is tested with the Trainer above. At step 3, a picture that process 1
    cannot decode stops both processes (the other does not wait for it in the step)."""
    import argparse

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, p in enumerate(make_pictures(4, 40, seed=2)):
        Image.fromarray(((p + 1) * 127.5).round().astype(np.uint8)).save(data / f"{i}.png")
    (data / "0.txt").write_text("a photo of the cat\n")
    run = tmp_path / "run"
    # a seed whose third step gives process 1 (row 1) a picture the first two steps do not use
    paths = finetune.list_pictures(str(data))

    def used(seed: int, step: int, rows: list[int]) -> list[str]:
        """The pictures ``rows`` of ``step`` crop (what load_crop is asked for)."""
        seen = []
        real = finetune.load_crop
        finetune.load_crop = lambda path, *_: seen.append(path) or np.zeros(1)
        try:
            args = argparse.Namespace(seed=seed, batch_size=2, resolution=8)
            finetune.step_pictures(paths, step, args, rows)
        finally:
            finetune.load_crop = real
        return seen

    seed = next(
        s for s in range(100) if used(s, 2, [1])[0] not in used(s, 0, [0, 1]) + used(s, 1, [0, 1])
    )
    (cut,) = used(seed, 2, [1])
    whole = open(cut, "rb").read()
    open(cut, "wb").write(whole[: len(whole) // 2])  # its header reads, its pixels do not

    port = helpers.free_port()
    argv = ["--model", flax_pipe_dir, "--data", str(data), "--output", str(run)]
    argv += ["--resolution", "128", "--batch-size", "2", "--steps", "3", "--seed", str(seed)]
    argv += ["--checkpoint-every", "1", "--keep", "1", "--distributed"]
    code = f"""
    import runpy, sys
    sys.argv = ["finetune.py", *{argv!r}]
    try:
        runpy.run_path("examples/finetune.py", run_name="__main__")
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        sys.exit(3 if e.code else 0)
    """
    env = dict(FLAX_LATENTUP_COORDINATOR=f"127.0.0.1:{port}", FLAX_LATENTUP_NUM_PROCESSES="2")
    procs = [run_python(code, {**env, "FLAX_LATENTUP_PROCESS_ID": str(i)}) for i in range(2)]
    errs = []
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 3, err[-3000:]
        errs.append(err)
    assert "fine-tune" in errs[0] and "fine-tune" not in errs[1], "one progress bar, process 0's"
    assert sorted(os.listdir(run)) == ["checkpoint-00000002"]
    with open(run / "checkpoint-00000002" / "trainer_state.json") as f:
        assert json.load(f)["step"] == 2
    assert "step 3: process 1 cannot decode one of its pictures" in errs[0], errs[0][-2000:]
    assert f"step 3: cannot decode the picture {cut}" in errs[1], errs[1][-2000:]


# --------------------------------------------------------------------------------------------
# Settings, batches and checkpoints: the API's checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(learning_rate=0.0), ValueError, "learning_rate must be a finite number > 0"),
        (dict(learning_rate=-1e-5), ValueError, "learning_rate must be a finite number > 0"),
        (dict(learning_rate=math.inf), ValueError, "learning_rate must be a finite number"),
        (dict(learning_rate="1e-5"), TypeError, "learning_rate must be a real number, got str"),
        (dict(learning_rate=True), TypeError, "learning_rate must be a real number, got bool"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay must be a finite number >= 0"),
        (dict(weight_decay=math.nan), ValueError, "weight_decay must be a finite number"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm must be a finite number > 0"),
        (dict(max_grad_norm=math.nan), ValueError, "max_grad_norm must be a finite number"),
        (dict(sigma_loc=math.nan), ValueError, "sigma_loc must be a finite number"),
        (dict(sigma_scale=math.inf), ValueError, "sigma_scale must be a finite number >= 0"),
        (dict(noise_aug_level=math.nan), ValueError, "noise_aug_level must be a finite number"),
        (dict(adam_b1=1.0), ValueError, "adam_b1 must be a finite number >= 0 and < 1"),
        (dict(adam_b2=-0.1), ValueError, "adam_b2 must be a finite number >= 0 and < 1"),
        (dict(adam_eps=0.0), ValueError, "adam_eps must be a finite number > 0"),
        (dict(ema_decay="0.99"), TypeError, "ema_decay must be a real number, got str"),
        (dict(lr_warmup_steps=2.0), TypeError, "lr_warmup_steps must be an int, got float"),
        (dict(total_steps=True), TypeError, "total_steps must be an int, got bool"),
        (dict(total_steps="100"), TypeError, "total_steps must be an int, got str"),
        (dict(objective="l2"), ValueError, r"objective must be one of \('variance', 'mse'\)"),
        (dict(seed=-1), ValueError, r"seed must be in \[0, "),
        (dict(seed=1.0), TypeError, "seed must be an int, got float"),
        (dict(noise_aug_embed_weight=(math.nan,) * 64), ValueError, r"noise_aug_embed_weight\[0\]"),
    ],
)
def test_train_config_refuses_bad_values(kwargs, error, message):
    with pytest.raises(error, match=message):
        TrainConfig(**kwargs)


def test_train_config_normalises_numbers():
    config = TrainConfig(learning_rate=np.float32(0.5), seed=np.int64(3), lr_warmup_steps=2)
    assert type(config.learning_rate) is float and type(config.seed) is int
    assert json.loads(json.dumps(config.to_dict(), allow_nan=False))["seed"] == 3


def test_batch_is_checked_before_compiling(setup):
    """Each malformed batch is refused by name before anything is traced or compiled (a
    1-row context used to be broadcast over the batch)."""
    trainer, batch = setup
    state = trainer.init_state()
    cases = [
        ({k: v for k, v in batch.items() if k != "pooled"}, "batch lacks pooled"),
        (dict(batch, context=batch["context"][:1]), "one first axis.*context 1"),
        (dict(batch, pooled=batch["pooled"][:2]), "one first axis.*pooled 2"),
        ({k: np.asarray(v)[:0] for k, v in batch.items()}, "B >= 1"),
        (dict(batch, low_res=batch["latents"]), r"batch\['low_res'\] must be \[B, H/2, W/2, 4\]"),
        (dict(batch, latents=np.asarray(batch["latents"])[..., :3]), r"batch\['latents'\]"),
        (
            dict(batch, context=batch["context"][..., :16]),
            r"batch\['context'\] must be \[B, 7, 32\]",
        ),
        (dict(batch, pooled=batch["pooled"][:, :16]), r"batch\['pooled'\] must be \[B, 32\]"),
        (dict(batch, latents=np.asarray(batch["latents"])[0]), r"batch\['latents'\]"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            trainer.step(state, bad)
    # the "" prompt's embeddings must fit the UNet too
    unet = trainer.unet(state)
    with pytest.raises(ValueError, match=r"uncond\[0\].*\[L, 32\]"):
        Trainer(unet, (np.zeros((L, 16)), np.zeros(D)))
    with pytest.raises(ValueError, match=r"uncond\[1\].*\[32\]"):
        Trainer(unet, (np.zeros((L, D)), np.zeros(D + 1)))
    # encode_prompt([""]) as it comes, a batch of one, is the same ""-prompt embedding
    ctx, pooled = (np.asarray(u) for u in trainer.uncond)
    batched = Trainer(unet, (ctx[None], pooled[None]), trainer.config)
    for got, want in zip(batched.uncond, (ctx, pooled), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match=r"uncond\[0\].*\[L, 32\]"):
        Trainer(unet, (np.stack([ctx, ctx]), np.stack([pooled, pooled])))


def _poisoned(tree, value):
    leaves, treedef = jax.tree.flatten(jax.device_get(tree))
    leaves[0] = np.array(leaves[0])
    leaves[0].flat[0] = value
    return jax.tree.unflatten(treedef, leaves)


def test_checkpoint_refuses_nonfinite_weights(setup, tmp_path):
    trainer, _ = setup
    state = trainer.init_state()
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="step 0: its weights hold NaN"):
        trainer.save_checkpoint(run, state.replace(params=_poisoned(state.params, np.nan)))
    with pytest.raises(NonFiniteError, match="step 0: its EMA hold NaN or infinite"):
        trainer.save_checkpoint(run, state.replace(ema=_poisoned(state.ema, np.inf)))
    assert not run.exists(), "nothing is written"


def test_checkpoint_that_cannot_be_written(setup, tmp_path, monkeypatch):
    """A checkpoint write that fails (a full disk) raises its OSError and leaves nothing of
    that checkpoint; the checkpoints before it stay."""
    trainer, _ = setup
    state = trainer.init_state()
    run = tmp_path / "run"
    before = trainer.save_checkpoint(run, state)

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    def cannot_write(leaves, path):  # safetensors' own error (a SafetensorError), as on a full disk
        from safetensors.numpy import save_file

        save_file({"a": np.zeros(1, np.float32)}, os.path.join(os.devnull, "optimizer"))

    state = state.replace(step=np.asarray(1, np.int32))
    final = os.path.join(run, "checkpoint-00000001")
    for fail, message in ((full_disk, "No space left on device"), (cannot_write, final)):
        monkeypatch.setattr(training, "_save_leaves", fail)
        with pytest.raises(OSError, match=message):
            trainer.save_checkpoint(run, state)
        assert os.listdir(run) == [os.path.basename(before)]
    monkeypatch.undo()
    # the same step saved again, and the last rename fails: the earlier save of it stays whole
    saved = {n: open(os.path.join(before, n, "config.json")).read() for n in ("unet", "unet_ema")}
    replace = os.replace

    def no_final_rename(src, dst):
        if src.endswith(".tmp") and os.path.basename(dst).startswith("checkpoint-"):
            raise OSError(5, "Input/output error")
        replace(src, dst)

    monkeypatch.setattr(training.os, "replace", no_final_rename)
    with pytest.raises(OSError, match="Input/output error"):
        trainer.save_checkpoint(run, state.replace(step=np.asarray(0, np.int32)))
    assert os.listdir(run) == [os.path.basename(before)]
    monkeypatch.undo()
    # what a save killed between its renames leaves (the old copy set aside) goes with the next
    shutil.copytree(before, before + ".old")
    assert trainer.save_checkpoint(run, state.replace(step=np.asarray(0, np.int32))) == before
    assert os.listdir(run) == [os.path.basename(before)]
    assert checkpoint_info(before)["step"] == 0
    for n, text in saved.items():
        assert open(os.path.join(before, n, "config.json")).read() == text


def test_checkpoint_is_on_disk_before_it_is_named(setup, tmp_path, monkeypatch):
    """Every file and folder of a checkpoint is flushed to disk before it takes its name,
    and the folder holding it after (so pruning older checkpoints then loses nothing to a
    crash); a flush that fails (a failing disk) leaves no checkpoint of that step, and a file
    system that cannot flush at all is no failure."""
    import errno

    trainer, _ = setup
    state = trainer.init_state()
    run = tmp_path / "run"
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("sync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src, dst):
        replace(src, dst)
        events.append(("rename", os.path.realpath(dst)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    final = os.path.realpath(trainer.save_checkpoint(run, state))
    named = events.index(("rename", final))
    synced = {path for kind, path in events[:named] if kind == "sync"}
    tmp = final + ".tmp"
    for root, dirs, files in os.walk(final):
        for name in (*dirs, *files):
            inside = os.path.join(tmp, os.path.relpath(os.path.join(root, name), final))
            assert inside in synced, name
    assert tmp in synced
    assert ("sync", os.path.realpath(run)) in events[named + 1 :]

    def failing_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("optimizer.safetensors"):
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        trainer.save_checkpoint(run, state.replace(step=np.asarray(1, np.int32)))
    assert os.listdir(run) == [os.path.basename(final)]

    def cannot_sync(fd):  # a file system that cannot flush (some FUSE mounts) says so
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", cannot_sync)
    saved = trainer.save_checkpoint(run, state.replace(step=np.asarray(1, np.int32)))
    assert checkpoint_info(saved)["step"] == 1


def test_checkpoint_records_run_settings_as_strict_json(setup, tmp_path):
    trainer, _ = setup
    state = trainer.init_state()
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="step 0: run must hold JSON values"):
        trainer.save_checkpoint(run, state, run={"resolution": math.nan})
    assert not run.exists()
    settings = {"model": "m", "data": "/d", "resolution": 128, "batch_size": 2}
    path = trainer.save_checkpoint(run, state, run=settings)
    assert checkpoint_info(path)["run"] == settings

    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    with open(os.path.join(path, "trainer_state.json")) as f:
        info = json.loads(f.read(), parse_constant=refuse)
    assert info["step"] == 0 and info["config"] == trainer.config.to_dict()


# --------------------------------------------------------------------------------------------
# The example script's checks
# --------------------------------------------------------------------------------------------


class _ModelLoaded(Exception):
    """Raised where the script would load the model: every check before it passed."""


class _NoModel:
    @staticmethod
    def from_pretrained(*args, **kwargs):
        raise _ModelLoaded


def _save_picture(path, size, seed=0):
    from PIL import Image

    w, h = (size, size) if isinstance(size, int) else size
    pixels = np.random.RandomState(seed).randint(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _argv(model, data, output, *more):
    return ["--model", str(model), "--data", str(data), "--output", str(output), *more]


@pytest.mark.parametrize(
    "more, message",
    [
        (["--resolution", "0"], "--resolution must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
        (["--keep", "-1"], "--keep must be >= 0, got -1"),
        (["--seed", "-3"], "--seed must be >= 0, got -3"),
        (["--learning-rate", "0"], "bad training settings: learning_rate must be a finite"),
        (["--max-grad-norm", "nan"], "bad training settings: max_grad_norm must be a finite"),
    ],
)
def test_example_checks_arguments_first(finetune, tmp_path, more, message):
    argv = _argv(tmp_path / "no-model", tmp_path / "no-data", tmp_path / "run", *more)
    with pytest.raises(SystemExit, match=message):
        finetune.main(argv)
    assert not (tmp_path / "run").exists()


def test_example_checks_resolution_against_the_model(finetune, flax_pipe_dir, tmp_path):
    """A --resolution whose latents the UNet cannot take (a multiple of twice the VAE's factor,
    but not of the UNet's unit) stops with the rule once the model has loaded, before any step
    and with nothing written."""
    from flax_latentup import AutoencoderKLConfig, UNet2DConditionConfig
    from flax_latentup.models.base import read_json

    vae = AutoencoderKLConfig.from_dict(read_json(os.path.join(flax_pipe_dir, "vae/config.json")))
    unet = UNet2DConditionConfig.from_dict(
        read_json(os.path.join(flax_pipe_dir, "unet/config.json"))
    )
    f, step = vae.downsample_factor, 2**unet.num_resamplers
    unit = f * step
    assert unit > 2 * f
    data = tmp_path / "data"
    data.mkdir()
    _save_picture(data / "a.png", 200)
    for resolution in (3 * unit + 2 * f, unit):
        argv = _argv(flax_pipe_dir, data, tmp_path / "run", "--resolution", str(resolution))
        rule = f"--resolution must be a multiple of {unit} and at least {2 * unit}, got"
        with pytest.raises(SystemExit, match=rule):
            finetune.main(argv)
    assert not (tmp_path / "run").exists()


def test_example_refuses_processes_that_see_other_checkpoints(finetune, tmp_path, monkeypatch):
    """With several processes, each reads --output itself: when they found their latest
    checkpoints at other steps (each host its own folder), the run stops with why, before the
    model loads (before, each failed in JAX placing the mismatched states)."""
    monkeypatch.setattr(finetune, "FlaxStableDiffusionLatentUpscalePipeline", _NoModel)
    monkeypatch.setattr(finetune.jax, "process_count", lambda: 2)
    monkeypatch.setattr(finetune, "all_processes", lambda v: np.array([int(v), 4]))
    data = tmp_path / "data"
    data.mkdir()
    _save_picture(data / "a.png", 130)
    argv = _argv(tmp_path / "model", data, tmp_path / "run", "--resolution", "128")
    with pytest.raises(
        SystemExit, match=r"at steps \[-1, 4\] \(in process order; -1: none\): --output"
    ):
        finetune.main(argv + ["--batch-size", "2"])


def test_example_checks_output_first(finetune, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    for output, message in (
        (tmp_path / "file", "--output .*file' is a file; expected a folder"),
        (tmp_path / "file" / "run", "--output .*run' lies under a file; expected a folder"),
    ):
        with pytest.raises(SystemExit, match=message):
            finetune.main(_argv(tmp_path / "no-model", tmp_path / "no-data", output))


def test_example_checks_pictures_first(finetune, tmp_path, monkeypatch):
    """Every picture's header and caption is read before the model loads; the unreadable ones
    are listed (ten, then a count); a folder named like a picture is no picture."""
    monkeypatch.setattr(finetune, "FlaxStableDiffusionLatentUpscalePipeline", _NoModel)
    data = tmp_path / "data"
    data.mkdir()
    _save_picture(data / "a.png", 130)
    (data / "a.txt").write_bytes(b"caf\xe9 au lait\n")  # Latin-1, not UTF-8
    (data / "nested.png").mkdir()
    for i in range(11):
        (data / f"bad{i:02d}.jpg").write_bytes(b"not a picture")
    with pytest.raises(SystemExit) as e:
        finetune.main(_argv(tmp_path / "model", data, tmp_path / "run", "--resolution", "128"))
    msg = str(e.value.code)
    assert msg.startswith("12 file(s) in --data cannot be read")
    assert "a.txt: not a readable UTF-8 caption" in msg and "bad00.jpg: not a readable" in msg
    assert "... and 2 more" in msg and "bad10.jpg" not in msg and "nested.png" not in msg

    for i in range(11):
        os.remove(data / f"bad{i:02d}.jpg")
    (data / "a.txt").write_text("café au lait\n", encoding="utf-8")
    with pytest.raises(_ModelLoaded):  # every check passed
        finetune.main(_argv(tmp_path / "model", data, tmp_path / "run", "--resolution", "128"))
    assert finetune.list_pictures(str(data)) == [str(data / "a.png")]
    assert finetune.caption_of(str(data / "a.png")) == "café au lait"
    # macOS's "._a.png" beside a copied picture (its metadata, no picture) is no input
    (data / "._a.png").write_bytes(b"\x00\x05\x16\x07 Mac OS X resource fork")
    assert finetune.list_pictures(str(data)) == [str(data / "a.png")]
    with pytest.raises(_ModelLoaded):
        finetune.main(_argv(tmp_path / "model", data, tmp_path / "run", "--resolution", "128"))


def test_example_decodes_pictures(finetune, tmp_path):
    """16-bit grey PNGs are scaled, not clipped to white; a picture truncated past its header
    passes the header check and fails when decoded, with an error naming it."""
    from PIL import Image

    Image.fromarray(np.full((40, 48), 30000, np.uint16)).save(tmp_path / "grey16.png")
    crop = finetune.load_crop(str(tmp_path / "grey16.png"), 32, np.random.default_rng(0))
    np.testing.assert_allclose(crop, round(30000 / 257) / 127.5 - 1, atol=1e-6)

    _save_picture(tmp_path / "cut.png", 64)
    whole = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    path = str(tmp_path / "cut.png")
    assert finetune.scan_pictures([path], 32) == ([""], [])
    with pytest.raises(ValueError, match="cannot decode the picture .*cut.png"):
        finetune.load_crop(path, 32, np.random.default_rng(0))


def test_prune_keeps_what_it_must(finetune, tmp_path):
    """Only ``checkpoint-<digits>`` folders count, newest by step number; the checkpoint just
    written stays; killed saves' ``.tmp`` folders go."""
    names = ["checkpoint-00000002", "checkpoint-00000004", "checkpoint-10", "checkpoint-best"]
    names += ["checkpoint-00000003.tmp", "checkpoint-00000004.tmp", "checkpoint-9.tmp.keep"]
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-00000001").write_text("a file, not a checkpoint")
    finetune.prune(str(tmp_path), 1, str(tmp_path / "checkpoint-00000004"))
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint-00000001",
        "checkpoint-00000004",  # just written (an earlier run's checkpoint-10 is newer)
        "checkpoint-00000004.tmp",  # being written
        "checkpoint-10",
        "checkpoint-9.tmp.keep",
        "checkpoint-best",
    ]
    finetune.prune(str(tmp_path), 0)  # keep all: only the leftovers go
    assert "checkpoint-00000004.tmp" not in os.listdir(tmp_path)
    assert len(os.listdir(tmp_path)) == 5


@pytest.fixture(scope="module")
def diverged_run(finetune, flax_pipe_dir, tmp_path_factory):
    """A real run of the script whose learning rate (1e30) makes step 2's loss NaN, with three
    of four pictures under --resolution, a folder named like a picture, a user's
    ``checkpoint-best`` and a killed save's leftover in --output: ``(argv, SystemExit
    message, stderr)``."""
    root = tmp_path_factory.mktemp("diverged")
    data, run = root / "data", root / "run"
    data.mkdir()
    for i in range(3):
        _save_picture(data / f"small{i}.png", (40, 60), seed=i)
    _save_picture(data / "large.png", 136, seed=3)
    (data / "small0.txt").write_text("a photo of the cat\n")
    (data / "nested.png").mkdir()
    (run / "checkpoint-best").mkdir(parents=True)
    (run / "checkpoint-best" / "keep.txt").write_text("mine")
    (run / "checkpoint-00000099.tmp").mkdir()
    argv = _argv(flax_pipe_dir, data, run, "--resolution", "128", "--batch-size", "2")
    argv += ["--steps", "3", "--checkpoint-every", "1", "--keep", "1"]
    argv += ["--learning-rate", "1e30"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e, record_steps(finetune):
        finetune.main(argv)
    return argv, e.value.code, err.getvalue()


STEPS = []  # (pictures, batch) of every step of the script's last run under record_steps


@contextlib.contextmanager
def record_steps(finetune):
    """Record in :data:`STEPS` every training step's pictures and batch (context, pooled)."""
    real_pictures, real_trainer = finetune.step_pictures, finetune.Trainer
    drawn = []

    def step_pictures(paths, step, args, rows):
        pictures, idx = real_pictures(paths, step, args, rows)
        drawn.append([paths[i] for i in idx])
        return pictures, idx

    class Trainer(real_trainer):
        def step(self, state, batch):
            STEPS.append((drawn[-1], {k: np.asarray(batch[k]) for k in ("context", "pooled")}))
            return super().step(state, batch)

    STEPS.clear()
    finetune.step_pictures, finetune.Trainer = step_pictures, Trainer
    try:
        yield
    finally:
        finetune.step_pictures, finetune.Trainer = real_pictures, real_trainer


def test_example_embeds_each_steps_captions(finetune, flax_pipe_dir, diverged_run):
    """Each step's batch holds the embeddings of its pictures' captions (the pipeline's
    encode_prompt of them), the empty prompt for a picture without a caption."""
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    pipe = P.from_pretrained(flax_pipe_dir)
    assert len(STEPS) == 2, "steps 1 and 2 ran (step 2 diverged)"
    captions = [finetune.caption_of(p) for pictures, _ in STEPS for p in pictures]
    assert "a photo of the cat" in captions and "" in captions, captions
    for pictures, batch in STEPS:
        context, pooled = pipe.encode_prompt([finetune.caption_of(p) for p in pictures])
        np.testing.assert_allclose(batch["context"], context, rtol=0, atol=1e-5)
        np.testing.assert_allclose(batch["pooled"], pooled, rtol=0, atol=1e-5)


@pytest.mark.heavy
def test_example_stops_at_a_nonfinite_loss(diverged_run):
    """A NaN loss stops the run (exit status 1) saving and pruning nothing: the last good
    checkpoint stays, the user's checkpoint-best too; the killed save's leftover went with
    the first pruning."""
    argv, message, stderr = diverged_run
    run = argv[argv.index("--output") + 1]
    assert isinstance(message, str), "a message, exit status 1"
    assert message.startswith("step 2: the loss is nan")
    assert "learning rate too high (--learning-rate 1e+30)" in message
    assert f"the last good checkpoint is {os.path.join(run, 'checkpoint-00000001')}" in message
    assert sorted(os.listdir(run)) == ["checkpoint-00000001", "checkpoint-best"]
    assert os.listdir(os.path.join(run, "checkpoint-best")) == ["keep.txt"]


def test_example_warns_of_small_pictures_once(diverged_run):
    _, _, stderr = diverged_run
    warnings = [line for line in stderr.splitlines() if "upsampled" in line]
    assert len(warnings) == 1, stderr[-2000:]
    assert "3 of 4 pictures" in warnings[0] and "small0.png, small1.png" in warnings[0]


def test_example_records_and_compares_settings(finetune, diverged_run, monkeypatch, capsys):
    """The checkpoint records the run's settings; a resume with others is refused before the
    model loads, listing each; --steps alone may change under a constant schedule; a run
    already at --steps has nothing to do and loads nothing."""
    monkeypatch.setattr(finetune, "FlaxStableDiffusionLatentUpscalePipeline", _NoModel)
    argv, _, _ = diverged_run
    run = argv[argv.index("--output") + 1]
    info = checkpoint_info(os.path.join(run, "checkpoint-00000001"))
    data = argv[argv.index("--data") + 1]
    model = argv[argv.index("--model") + 1]
    assert info["run"] == {
        "model": os.path.realpath(model),
        "data": os.path.realpath(data),
        "resolution": 128,
        "batch_size": 2,
        "processes": 1,
        "draws": 3,
    }

    def with_(**flags):
        out = list(argv)
        for flag, value in flags.items():
            out[out.index("--" + flag.replace("_", "-")) + 1] = value
        return out

    with pytest.raises(SystemExit) as e:
        finetune.main(with_(learning_rate="1e-4", batch_size="4", resolution="256"))
    msg = e.value.code
    assert "holds a run at step 1 (checkpoint-00000001) whose settings differ" in msg
    assert "learning_rate (--learning-rate): 1e+30 -> 0.0001" in msg
    assert "batch_size (--batch-size): 2 -> 4" in msg and "resolution (--resolution)" in msg
    assert "choose another --output" in msg and "--steps" not in msg
    with pytest.raises(_ModelLoaded):  # --steps alone, constant schedule: resumed
        finetune.main(with_(steps="5"))
    moved = os.path.join(os.path.dirname(run), "moved-data")
    shutil.copytree(data, moved)
    capsys.readouterr()
    with pytest.raises(_ModelLoaded):  # a data folder that moved: resumed, with a note
        finetune.main(with_(data=moved))
    err = capsys.readouterr().err
    assert "note: --data was" in err and "drew pictures" not in err

    def no_data(*args):
        raise AssertionError("the pictures were read")

    monkeypatch.setattr(finetune, "list_pictures", no_data)
    assert finetune.main(with_(steps="1")) == 0
    assert "at step 1 of --steps 1: nothing to do" in capsys.readouterr().out


def _fake_checkpoint(folder, step, config: TrainConfig, run=None):
    """A checkpoint folder holding only its trainer_state.json (what the checks read)."""
    path = folder / f"checkpoint-{step:08d}"
    path.mkdir(parents=True)
    info = {"step": step, "config": config.to_dict(), **({"run": run} if run else {})}
    (path / "trainer_state.json").write_text(json.dumps(info))
    return path


def test_example_resume_checks_of_schedules_and_older_checkpoints(
    finetune, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(finetune, "FlaxStableDiffusionLatentUpscalePipeline", _NoModel)
    data = tmp_path / "data"
    data.mkdir()
    _save_picture(data / "a.png", 128)
    base = ["--resolution", "128", "--batch-size", "2", "--learning-rate", "1e-5"]

    # linear schedule: --steps moves where the rate reaches 0, so it must stay
    linear = tmp_path / "linear"
    config = TrainConfig(learning_rate=1e-5, lr_schedule="linear", total_steps=10)
    _fake_checkpoint(linear, 4, config)
    argv = _argv(tmp_path / "model", data, linear, *base, "--lr-schedule", "linear")
    with pytest.raises(
        SystemExit, match=r"(?s)total_steps \(--steps\): 10 -> 12.*linear or cosine"
    ):
        finetune.main(argv + ["--steps", "12"])
    with pytest.raises(_ModelLoaded):
        finetune.main(argv + ["--steps", "10"])

    # a checkpoint of an earlier build records no run settings: only its config is compared
    older = tmp_path / "older"
    _fake_checkpoint(older, 4, TrainConfig(learning_rate=1e-5, total_steps=10))
    argv = _argv(tmp_path / "model", data, older, *base, "--steps", "10")
    capsys.readouterr()
    with pytest.raises(_ModelLoaded):
        finetune.main(argv + ["--batch-size", "4"])
    # its draws were made by an earlier scheme: said, as the run goes on
    assert "drew pictures and crops by an earlier scheme (now scheme 3)" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"seed \(--seed\): 0 -> 1"):
        finetune.main(argv + ["--seed", "1"])
    # a recorded scheme other than this script's: named
    other = tmp_path / "other"
    run = finetune.run_settings(finetune.parse_args(argv), 1) | {"draws": 2}
    _fake_checkpoint(other, 4, TrainConfig(learning_rate=1e-5, total_steps=10), run)
    with pytest.raises(_ModelLoaded):
        finetune.main(_argv(tmp_path / "model", data, other, *base, "--steps", "10"))
    assert "by scheme 2 (now scheme 3)" in capsys.readouterr().err

    # --no-resume into a folder with checkpoints of another run (a checkpoint-best is none)
    with pytest.raises(SystemExit, match="checkpoints of an earlier run, up to step 4"):
        finetune.main(argv + ["--no-resume"])
    mine = tmp_path / "mine"
    (mine / "checkpoint-best").mkdir(parents=True)
    with pytest.raises(_ModelLoaded):
        finetune.main(_argv(tmp_path / "model", data, mine, *base, "--no-resume"))
    # a newer checkpoint folder without trainer_state.json is neither resumed nor pruned away
    (older / "checkpoint-00000009").mkdir()
    with pytest.raises(SystemExit, match="checkpoint-00000009 has no trainer_state.json"):
        finetune.main(argv)
    shutil.rmtree(older / "checkpoint-00000009")
    # another trainer's checkpoint (the transformers Trainer's trainer_state.json): named
    (hf := tmp_path / "hf" / "checkpoint-500").mkdir(parents=True)
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 500, "epoch": 1.0}))
    with pytest.raises(SystemExit, match=r"checkpoint-500/trainer_state.json is not a checkp"):
        finetune.main(_argv(tmp_path / "model", data, tmp_path / "hf", *base, "--steps", "10"))

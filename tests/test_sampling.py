"""Sigma schedules against diffusers, and the sampler against an independent numpy derivation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import EulerDiscreteScheduler

from flax_latentup import ConfigError
from flax_latentup.sampling import (
    EulerSchedulerConfig,
    denoise,
    euler_sample,
    euler_step,
    make_schedule,
    noise_level_embedding,
)
from tests import helpers

HUB = helpers.HUB_SCHEDULER
CONFIGS = {
    "hub": HUB,
    "fast-test": dict(prediction_type="sample"),
    "leading": dict(HUB, timestep_spacing="leading", steps_offset=1),
    "linear-trailing": dict(HUB, interpolation_type="linear", timestep_spacing="trailing"),
    "linear-leading": dict(HUB, interpolation_type="linear", timestep_spacing="leading"),
    "karras-log": dict(HUB, use_karras_sigmas=True),
    "karras-linear": dict(HUB, interpolation_type="linear", use_karras_sigmas=True),
    "sigma-min-final": dict(HUB, final_sigmas_type="sigma_min"),
}


# diffusers' Karras ramp divides by zero at one step, so Karras configs start at two.
CASES = [
    (name, steps)
    for name in CONFIGS
    for steps in (1, 2, 4, 20, 75)
    if steps > 1 or not CONFIGS[name].get("use_karras_sigmas")
]


@pytest.mark.parametrize("name,steps", CASES)
def test_schedule_matches_diffusers(name, steps):
    ref = EulerDiscreteScheduler(**CONFIGS[name])
    ref.set_timesteps(steps)
    got = make_schedule(EulerSchedulerConfig.from_dict(ref.config), steps)
    want = ref.sigmas.numpy()
    assert got.sigmas.dtype == np.float32 and got.sigmas.shape == want.shape
    # float32 cumprod/linspace rounding differs by a few ulps from torch's kernels
    np.testing.assert_allclose(got.sigmas, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=1e-3)
    assert got.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=1e-6)


def test_hub_schedule_values():
    """The values the reference notes give for the hub config at 4 steps."""
    s = make_schedule(EulerSchedulerConfig.sd_x2_latent_upscaler(), 4)
    np.testing.assert_allclose(
        s.sigmas, [14.6146, 3.0890, 0.6529, 0.1380, 0.0292, 0.0], rtol=2e-4, atol=1e-4
    )
    assert len(s.step_sigmas) == 5 and s.step_sigmas[-1] > 0  # the final 0 is never reached
    fast = make_schedule(EulerSchedulerConfig(prediction_type="sample"), 4)
    np.testing.assert_allclose(
        fast.sigmas, [157.41, 9.4889, 1.4624, 0.0100, 0.0], rtol=2e-4, atol=1e-4
    )
    assert fast.step_sigmas[-1] == 0.0 and len(fast.step_sigmas) == 5


@pytest.mark.parametrize(
    "key,value",
    [
        ("prediction_type", "epsilon"),
        ("interpolation_type", "cubic"),
        ("timestep_spacing", "weird"),
        ("use_exponential_sigmas", True),
        ("_class_name", "DDIMScheduler"),
    ],
)
def test_unsupported_scheduler_config(key, value):
    with pytest.raises(ConfigError, match=key):
        EulerSchedulerConfig.from_dict(dict(HUB, **{key: value}))


def test_every_scheduler_field_is_read_with_its_type():
    """Each field of EulerSchedulerConfig is read from scheduler_config.json, type-checked:
    the reader's table covers the dataclass, and a value of another type is named."""
    import dataclasses

    from flax_latentup import sampling

    fields = {f.name for f in dataclasses.fields(EulerSchedulerConfig)}
    assert set(sampling._SCHEDULER_FIELDS) == fields
    config = EulerSchedulerConfig.from_dict(dict(HUB, steps_offset=1, trained_betas=None))
    assert config.steps_offset == 1 and config.beta_schedule == HUB["beta_schedule"]
    with pytest.raises(ConfigError, match=r"`beta_end` = '0.012' is not a number"):
        EulerSchedulerConfig.from_dict(dict(HUB, beta_end="0.012"))
    with pytest.raises(ConfigError, match=r"`trained_betas\[1\]` = None is not a number"):
        EulerSchedulerConfig.from_dict(dict(HUB, trained_betas=[0.1, None]))


def test_bad_step_count():
    for n in (0, -1, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            make_schedule(EulerSchedulerConfig.sd_x2_latent_upscaler(), n)


# --------------------------------------------------------------------------------------------
# The sampler against numpy
# --------------------------------------------------------------------------------------------

B, H, W = 2, 4, 6


def fake_unet_np(sample, t, ctx, tcond):
    # A smooth stand-in model with every input mattering: [B, H, W, 8] -> [B, H, W, 5].
    w = np.linspace(-0.5, 0.5, 8 * 5).reshape(8, 5)
    bias = (
        ctx.mean(axis=(1, 2))[:, None, None, None] + 0.1 * tcond.mean(axis=1)[:, None, None, None]
    )
    return np.tanh(sample @ w + t[:, None, None, None] + bias)


def fake_unet_jnp(sample, t, ctx, tcond):
    w = jnp.linspace(-0.5, 0.5, 8 * 5).reshape(8, 5)
    bias = (
        ctx.mean(axis=(1, 2))[:, None, None, None] + 0.1 * tcond.mean(axis=1)[:, None, None, None]
    )
    return jnp.tanh(sample @ w + t[:, None, None, None] + bias)


def numpy_reference(x, sigmas, image_cond, ctx, tcond, guidance):
    """Euler with the Karras preconditioning, written out step by step in float64."""
    x = x.astype(np.float64)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        rows = [x, x] if guidance is not None else [x]
        outs = []
        for r, xr in enumerate(rows):
            c = ctx[r * B : (r + 1) * B]
            tc = tcond[r * B : (r + 1) * B]
            inp = np.concatenate([xr / np.sqrt(s**2 + 1), image_cond], axis=-1)
            out = fake_unet_np(inp, np.full(B, np.log(s) / 4), c, tc)[..., :4]
            outs.append(xr / (s**2 + 1) + s / np.sqrt(s**2 + 1) * out)
        den = outs[0] if guidance is None else outs[0] + guidance * (outs[1] - outs[0])
        x = x + (x - den) / s * (s_next - s)
    return x


@pytest.mark.parametrize("guidance", [None, 6.5])
@pytest.mark.parametrize("config", ["hub", "fast-test"])
def test_sampler_matches_numpy(guidance, config):
    rng = np.random.default_rng(0)
    sched = make_schedule(EulerSchedulerConfig.from_dict(CONFIGS[config]), 5)
    rows = 2 * B if guidance is not None else B
    x0 = rng.standard_normal((B, H, W, 4)).astype(np.float32) * sched.init_noise_sigma
    cond = rng.standard_normal((B, H, W, 4)).astype(np.float32)
    ctx = rng.standard_normal((rows, 7, 3)).astype(np.float32)
    tcond = rng.standard_normal((rows, 9)).astype(np.float32)
    want = numpy_reference(x0, sched.step_sigmas, cond, ctx, tcond, guidance)
    g = None if guidance is None else jnp.float32(guidance)

    @jax.jit
    def run(x0, sigmas):
        return euler_sample(
            lambda x, s: denoise(fake_unet_jnp, x, s, cond, ctx, tcond, g), x0, sigmas
        )

    got = np.asarray(run(jnp.asarray(x0), jnp.asarray(sched.step_sigmas)))
    err = np.max(np.abs(got - want))
    assert err <= 1e-6 * max(1.0, np.max(np.abs(want))), f"max abs error {err:.3g}"


def test_scan_equals_python_loop():
    rng = np.random.default_rng(1)
    sched = make_schedule(EulerSchedulerConfig.from_dict(HUB), 6)
    x0 = jnp.asarray(rng.standard_normal((B, H, W, 4)), jnp.float32) * sched.init_noise_sigma
    cond = jnp.asarray(rng.standard_normal((B, H, W, 4)), jnp.float32)
    ctx = jnp.asarray(rng.standard_normal((B, 7, 3)), jnp.float32)
    tcond = jnp.asarray(rng.standard_normal((B, 9)), jnp.float32)
    sig = jnp.asarray(sched.step_sigmas)

    def den(x, s):
        return denoise(fake_unet_jnp, x, s, cond, ctx, tcond, None)

    seen = []
    scanned = euler_sample(den, x0, sig, on_step=lambda i, x: seen.append(i))
    x = x0
    for i in range(len(sig) - 1):
        x = euler_step(x, den(x, sig[i]), sig[i], sig[i + 1])
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(x), rtol=0, atol=1e-6)
    assert len(seen) == 1  # the step hook is traced once, inside the scan body


def test_sigmas_stay_float32_with_bf16_model():
    sched = make_schedule(EulerSchedulerConfig.from_dict(HUB), 3)
    x0 = jnp.ones((1, 4, 4, 4), jnp.float32)
    cond = jnp.zeros((1, 4, 4, 4), jnp.float32)
    seen = {}

    def unet(sample, t, ctx, tcond):
        seen["dtype"] = sample.dtype
        return jnp.zeros(sample.shape[:-1] + (5,), jnp.bfloat16)

    out = euler_sample(
        lambda x, s: denoise(
            unet,
            x,
            s,
            cond,
            jnp.zeros((1, 1, 1)),
            jnp.zeros((1, 1)),
            None,
            model_dtype=jnp.bfloat16,
        ),
        x0,
        jnp.asarray(sched.step_sigmas),
    )
    assert seen["dtype"] == jnp.bfloat16 and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def test_noise_level_embedding():
    e = np.asarray(noise_level_embedding(3))
    assert e.shape == (3, 128) and (e[:, :64] == 1).all() and (e[:, 64:] == 0).all()

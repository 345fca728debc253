"""Sigma schedules, the upscaler's Karras-preconditioned denoiser, and Euler via ``lax.scan``.

The schedule is computed on the host in numpy exactly as diffusers' ``EulerDiscreteScheduler``
computes it from its config (``interpolation_type`` "linear"/"log_linear",
``timestep_spacing`` "linspace"/"leading"/"trailing", ``use_karras_sigmas``) and enters the
jitted program as an array, so a new schedule of the same length does not recompile. Sigmas
and the Euler update stay float32 whatever dtype the model computes in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_latentup.configs import ConfigError, _require, _typed, _typed_list

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class EulerSchedulerConfig:
    """The fields of diffusers' ``EulerDiscreteScheduler`` config that shape the schedule."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    def __post_init__(self) -> None:
        name = "EulerDiscreteScheduler"
        _require(
            name,
            "beta_schedule",
            self.beta_schedule,
            ("linear", "scaled_linear", "squaredcos_cap_v2"),
        )
        _require(
            name,
            "prediction_type",
            self.prediction_type,
            ("original_sample", "sample"),
            "the upscaler's denoiser predicts the clean sample",
        )
        _require(name, "interpolation_type", self.interpolation_type, ("linear", "log_linear"))
        _require(
            name, "timestep_spacing", self.timestep_spacing, ("linspace", "leading", "trailing")
        )
        _require(name, "final_sigmas_type", self.final_sigmas_type, ("zero", "sigma_min"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EulerSchedulerConfig:
        """Build from a ``scheduler_config.json`` dict; unsupported options are rejected by name."""
        name = d.get("_class_name", "EulerDiscreteScheduler")
        _require("scheduler", "_class_name", name, ("EulerDiscreteScheduler",))
        for flag in ("use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
            if d.get(flag):
                raise ConfigError(
                    f"EulerDiscreteScheduler config: `{flag}` = True is not supported"
                )
        if d.get("timestep_type", "discrete") != "discrete":
            _require("EulerDiscreteScheduler", "timestep_type", d["timestep_type"], ("discrete",))
        kwargs = {}
        for key, (kind, minimum) in _SCHEDULER_FIELDS.items():
            if d.get(key) is None:
                continue
            read = _typed_list if key == "trained_betas" else _typed
            kwargs[key] = read("EulerDiscreteScheduler", key, d[key], kind, minimum)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["trained_betas"] = list(self.trained_betas) if self.trained_betas else None
        d["_class_name"] = "EulerDiscreteScheduler"
        return d

    @property
    def config(self) -> dict[str, Any]:
        """:meth:`to_dict`, by the name a diffusers scheduler gives its config:
        ``EulerDiscreteScheduler.from_config(pipe.scheduler.config)`` reads it."""
        return self.to_dict()

    @classmethod
    def sd_x2_latent_upscaler(cls) -> EulerSchedulerConfig:
        """The scheduler config of stabilityai/sd-x2-latent-upscaler."""
        return cls(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            interpolation_type="log_linear",
            prediction_type="original_sample",
        )


# The fields read from a scheduler_config.json: (kind, minimum) for configs._typed.
_SCHEDULER_FIELDS: dict[str, tuple[str, int | None]] = {
    "num_train_timesteps": ("int", 1),
    "beta_start": ("float", None),
    "beta_end": ("float", None),
    "beta_schedule": ("str", None),
    "trained_betas": ("float", None),
    "prediction_type": ("str", None),
    "interpolation_type": ("str", None),
    "use_karras_sigmas": ("bool", None),
    "sigma_min": ("float", None),
    "sigma_max": ("float", None),
    "timestep_spacing": ("str", None),
    "steps_offset": ("int", 0),
    "final_sigmas_type": ("str", None),
}


def _betas(cfg: EulerSchedulerConfig) -> np.ndarray:
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        return np.asarray(cfg.trained_betas, np.float32)
    if cfg.beta_schedule == "linear":
        return np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
    if cfg.beta_schedule == "scaled_linear":
        return np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float32) ** 2

    # squaredcos_cap_v2: the cosine alpha-bar schedule, each beta capped at 0.999
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)], np.float32
    )


def training_sigmas(cfg: EulerSchedulerConfig) -> np.ndarray:
    """sigma(t) = sqrt((1 - alpha_bar) / alpha_bar) for t = 0 .. T-1, float32, increasing."""
    alphas_cumprod = np.cumprod(1.0 - _betas(cfg), dtype=np.float32)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).astype(np.float32)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace computed the way torch does (from both ends towards the middle)."""
    start, end = np.float32(start), np.float32(end)
    if steps == 1:
        return np.array([start], np.float32)
    step = (end - start) / np.float32(steps - 1)
    i = np.arange(steps)
    head = start + i.astype(np.float32) * step
    tail = end - (steps - 1 - i).astype(np.float32) * step
    return np.where(i < steps // 2, head, tail).astype(np.float32)


def _sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high]), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What ``set_timesteps(num_inference_steps)`` leaves in the scheduler.

    ``sigmas``: all the scheduler's sigmas (float32, the trailing final sigma included).
    ``timesteps``: the discrete timesteps diffusers reports to callbacks.
    ``init_noise_sigma``: the scale of the initial noise. The sampler runs
    ``num_inference_steps`` Euler steps, step i going from ``sigmas[i]`` to ``sigmas[i + 1]``.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    init_noise_sigma: float
    num_inference_steps: int

    @property
    def step_sigmas(self) -> np.ndarray:
        """``sigmas[: N + 1]``: the N steps' start and end sigmas (float32)."""
        return self.sigmas[: self.num_inference_steps + 1]


def make_schedule(cfg: EulerSchedulerConfig, num_inference_steps: int) -> Schedule:
    """The sigma schedule diffusers' EulerDiscreteScheduler builds for ``num_inference_steps``."""
    if not isinstance(num_inference_steps, int | np.integer) or num_inference_steps < 1:
        raise ValueError(
            f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}"
        )
    n, t_train = int(num_inference_steps), cfg.num_train_timesteps
    if cfg.timestep_spacing == "linspace":
        timesteps = np.linspace(0, t_train - 1, n, dtype=np.float32)[::-1].copy()
    elif cfg.timestep_spacing == "leading":
        ratio = t_train // n
        timesteps = (np.arange(0, n) * ratio).round()[::-1].astype(np.float32)
        timesteps += cfg.steps_offset
    else:  # trailing
        timesteps = np.arange(t_train, 0, -t_train / n).round().astype(np.float32) - 1

    train = training_sigmas(cfg)
    log_train = np.log(train)
    if cfg.interpolation_type == "linear":
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
    else:  # log_linear: N + 1 log-spaced sigmas from the largest to the smallest
        sigmas = np.exp(_linspace_f32(np.log(train[-1]), np.log(train[0]), n + 1))
    if cfg.use_karras_sigmas:
        lo = cfg.sigma_min if cfg.sigma_min is not None else float(sigmas[-1])
        hi = cfg.sigma_max if cfg.sigma_max is not None else float(sigmas[0])
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        timesteps = _sigma_to_t(sigmas, log_train)
    last = float(train[0]) if cfg.final_sigmas_type == "sigma_min" else 0.0
    sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
    if len(sigmas) < n + 1:
        raise ValueError(f"the schedule has {len(sigmas)} sigmas, too few for {n} steps")
    top = float(sigmas.max())
    init = top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    return Schedule(
        sigmas=sigmas,
        timesteps=np.asarray(timesteps, np.float32),
        init_noise_sigma=float(np.float32(init)),
        num_inference_steps=n,
    )


# --------------------------------------------------------------------------------------------
# The denoiser and the Euler loop
# --------------------------------------------------------------------------------------------

# The model is called as model(sample [B, H, W, C], timestep [B], context, timestep_cond).
UNetFn = Callable[[Array, Array, Array, Array], Array]


def noise_level_embedding(batch: int, dtype=jnp.float32) -> Array:
    """The 128-vector conditioning the model on an image noise level of 0: 64 ones, 64 zeros."""
    return jnp.concatenate([jnp.ones((batch, 64), dtype), jnp.zeros((batch, 64), dtype)], axis=1)


def denoise(
    unet: UNetFn,
    x: Array,
    sigma: Array,
    image_cond: Array,
    context: Array,
    timestep_cond: Array,
    guidance_scale: Array | None,
    *,
    model_dtype=jnp.float32,
) -> Array:
    """The upscaler's Karras-preconditioned denoiser, with classifier-free guidance.

    ``x [B, H, W, 4]`` float32 at noise level ``sigma``; ``image_cond [B, H, W, 4]`` (the
    upsampled low-res latents). With ``guidance_scale`` given, ``context [2B, L, D]`` and
    ``timestep_cond [2B, E]`` hold the unconditional rows first, then the text rows, and
    the result is ``uncond + g * (text - uncond)``; with ``None`` they have ``B`` rows.
    Returns the denoised estimate ``[B, H, W, 4]`` in float32.
    """
    cfg = guidance_scale is not None
    x_in = jnp.concatenate([x, x]) if cfg else x
    cond = jnp.concatenate([image_cond, image_cond]) if cfg else image_cond
    c_in = jax.lax.rsqrt(sigma * sigma + 1.0)
    model_in = jnp.concatenate([x_in * c_in, cond], axis=-1).astype(model_dtype)
    t = jnp.broadcast_to(jnp.log(sigma) * 0.25, (x_in.shape[0],))
    out = unet(model_in, t, context, timestep_cond)[..., :-1].astype(jnp.float32)
    denoised = x_in / (sigma * sigma + 1.0) + sigma * c_in * out
    if cfg:
        uncond, text = jnp.split(denoised, 2)
        denoised = uncond + guidance_scale * (text - uncond)
    return denoised


def euler_step(x: Array, denoised: Array, sigma: Array, sigma_next: Array) -> Array:
    """One Euler step of the probability-flow ODE: ``x + (x - denoised) / sigma * (next - sigma)``."""
    return x + (x - denoised) / sigma * (sigma_next - sigma)


StepCallback = Callable[[Array, Array], None]  # (step index, x after the step)


def euler_sample(
    denoiser: Callable[[Array, Array], Array],
    x: Array,
    sigmas: Array,
    *,
    on_step: StepCallback | None = None,
) -> Array:
    """Run Euler from ``sigmas[0]`` to ``sigmas[-1]`` as one ``lax.scan`` (len(sigmas) - 1 steps).

    ``denoiser(x, sigma) -> denoised``; ``x`` float32, already scaled by the initial sigma.
    ``on_step(i, x)`` is traced into the loop (use ``jax.debug.callback`` inside it to reach
    the host); without it the loop carries no host callback at all.
    """
    sigmas = sigmas.astype(jnp.float32)
    pairs = (jnp.arange(sigmas.shape[0] - 1), sigmas[:-1], sigmas[1:])

    def body(x, step):
        i, sigma, sigma_next = step
        x = euler_step(x, denoiser(x, sigma), sigma, sigma_next)
        if on_step is not None:
            on_step(i, x)
        return x, None

    x, _ = jax.lax.scan(body, x.astype(jnp.float32), pairs)
    return x

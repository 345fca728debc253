"""Fine-tuning the upscaler's UNet with k-diffusion's training objective.

The model is the same Karras-preconditioned denoiser the sampler uses (``sigma_data = 1``)::

    c_skip = 1 / (σ² + 1)    c_out = σ / √(σ² + 1)    c_in = 1 / √(σ² + 1)    c_noise = log(σ) / 4
    D(x; σ) = c_skip · x + c_out · F(c_in · x, c_noise, cond)

and the network output ``F`` is regressed onto the target ``(x0 - c_skip · x_σ) / c_out``,
where ``x_σ = x0 + σ · n`` (the error of ``F`` is that of the denoised estimate over
``c_out``). The published UNet has one output channel more than the latents (5 for 4): the
log-variance head of a k-diffusion model trained with ``has_variance``, whose loss is
``DenoiserWithVariance.loss``: with ``v`` the spatial mean of that channel (one value per
example) and ``e`` the mean over the example of ``(F - target)²``, the example's loss is
``(e / exp(v) + v) / 2``, the Gaussian negative log-likelihood of the error up to a constant
(the variance is learnt, and weighs each example's error). This is the default objective
(:attr:`TrainConfig.objective` ``"variance"``); ``"mse"`` is k-diffusion's plain
``Denoiser.loss``, ``e`` alone. The loss is the mean of the per-example losses over the
batch. σ is drawn log-normally, ``σ = exp(loc + scale · N(0, 1))`` (k-diffusion's
``rand_log_normal``).

Conditioning is the pipeline's: the low-res latents upsampled 2x (nearest), concatenated to the
scaled noisy latents on channels; ``timestep_cond = concat(noise-level embedding, pooled text)``;
the cross-attention context is the text encoder's last hidden state before its final norm. With
probability ``cfg_dropout`` a row's text is replaced by the embeddings of the ``""`` prompt, so
the model keeps an unconditional mode for classifier-free guidance.

Noise augmentation of the low-res latents (k-diffusion's ``NoiseLevelAndTextConditionedUpscaler``):
the low-res latents get Gaussian noise of standard deviation ``s``, are scaled by
``1 / √(s² + 1)``, and the model is told ``s`` through the first 128 entries of
``timestep_cond``: Fourier features ``[cos(2π·log1p(s)·w), sin(2π·log1p(s)·w)]`` of a fixed
random vector ``w`` (64 values, drawn with std 2 when the model was trained). At ``s = 0`` the
features are 64 ones and 64 zeros whatever ``w``, which is why the published (diffusers)
checkpoint does not carry ``w`` and the pipeline always runs at level 0. A nonzero level
therefore needs ``w`` from the original k-diffusion checkpoint (``low_res_noise_embed.weight``),
given as :attr:`TrainConfig.noise_aug_embed_weight`.

Only the UNet is trained (the text encoder and the VAE are frozen: embeddings and latents are
computed outside the step). :class:`Trainer` runs one jitted step (optax AdamW with gradient
clipping by default, an EMA of the weights) over a ``("data",)`` device mesh: the batch is
sharded along its first axis, the parameters and optimizer state are replicated. Checkpoints
(:meth:`Trainer.save_checkpoint`) hold the UNet and its EMA as ``save_pretrained`` folders plus
the optimizer state and the step, so a run resumes exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_latentup.files import atomic_write, sync_folder, sync_tree
from flax_latentup.models.base import read_json
from flax_latentup.models.unet import FlaxUNet2DConditionModel
from flax_latentup.models.vae import FlaxAutoencoderKL
from flax_latentup.parallel import auto_axes, make_mesh, outside_context_mesh

Array = jax.Array
# model(sample [B, H, W, 8], timestep [B], context [B, L, D], timestep_cond [B, 128 + D])
UNetFn = Callable[[Array, Array, Array, Array], Array]

NOISE_EMBED_DIM = 128  # the noise-level part of timestep_cond
LR_SCHEDULES = ("constant", "linear", "cosine")
OBJECTIVES = ("variance", "mse")

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

SEED_LIMIT = 2**32  # jax.random.key keeps 32 bits of a seed (without jax_enable_x64)


def _what(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    above: float | None = None,
    high: float | None = None,
    below: float | None = None,
) -> float:
    """``value`` as a float, if it is a finite real number (not a bool or a string) within
    the bounds (``low``/``high`` inclusive, ``above``/``below`` exclusive)."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {_what(value)}")
    x = float(value)
    bounds = [(">=", low), (">", above), ("<=", high), ("<", below)]
    bounds = [(sign, bound) for sign, bound in bounds if bound is not None]
    tests = {">=": x.__ge__, ">": x.__gt__, "<=": x.__le__, "<": x.__lt__}
    if not (math.isfinite(x) and all(tests[sign](bound) for sign, bound in bounds)):
        want = " and ".join(f"{sign} {bound:g}" for sign, bound in bounds)
        raise ValueError(f"{name} must be a finite number{' ' + want if want else ''}, got {x}")
    return x


def _integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int, if it is an integer (not a bool, a float or a string) within
    ``[low, high]``."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {_what(value)}")
    n = int(value)
    if (low is not None and n < low) or (high is not None and n > high):
        want = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {want}, got {n}")
    return n


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :class:`Trainer`.

    ``objective``: ``"variance"`` (the default), k-diffusion's ``DenoiserWithVariance`` loss,
    for a UNet with one output channel more than the latents (the published one: 5 for 4),
    the spatial mean of that channel being the predicted log-variance ``v`` of the error:
    ``((F - target)² / exp(v) + v) / 2``; or ``"mse"``, its plain ``Denoiser`` loss
    ``(F - target)²`` (the extra channel, if any, gets no gradient; weight decay still
    shrinks its weights). See the module docstring.
    ``sigma_loc``/``sigma_scale``: mean and std of ``log σ`` (k-diffusion's ``rand_log_normal``
    ``loc``/``scale``); the defaults -1.2/1.2 are the training distribution of Karras et al.
    (2022, "EDM": P_mean, P_std), which k-diffusion's example configs use; the settings the
    upscaler was trained with are not published.
    ``cfg_dropout``: probability of replacing a row's text by the ``""`` prompt.
    ``noise_aug_level``: std of the noise added to the low-res latents (0: none, as the
    pipeline samples); a nonzero level needs ``noise_aug_embed_weight`` (64 floats, see the
    module docstring). ``max_grad_norm``: clip by global norm (``None``: no clipping).
    ``ema_decay``: weight of the old EMA in each update, at most; with ``ema_warmup`` (the
    default, as diffusers' ``EMAModel``) the weight of update ``k`` (1, 2, ...) is
    ``min(ema_decay, k / (9 + k))`` and 0 for the first, so the EMA follows the weights closely
    early on and averages over more steps as training goes.
    ``lr_schedule``: ``"constant"``, ``"linear"`` (down to 0 at ``total_steps``) or
    ``"cosine"`` (half a cosine down to 0 at ``total_steps``), after ``lr_warmup_steps`` of
    linear warm-up from 0: diffusers' ``get_scheduler`` schedules of those names, where
    ``"constant"`` with warm-up steps is diffusers' ``"constant_with_warmup"`` (diffusers'
    ``"constant"`` ignores ``num_warmup_steps``).
    ``seed``: with the step number it determines every random draw of a step, so a resumed
    run draws what an uninterrupted one would.

    Every field is checked on construction: a value of the wrong type (a string such as
    ``"1e-5"``, a bool for a number, a float for a step count) raises a TypeError, one out of
    range or not finite a ValueError, each naming the field. Numbers are stored as Python
    ``float``/``int`` (so :meth:`to_dict` is plain JSON).
    """

    learning_rate: float = 1e-5
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    total_steps: int | None = None
    objective: str = "variance"
    sigma_loc: float = -1.2
    sigma_scale: float = 1.2
    cfg_dropout: float = 0.1
    noise_aug_level: float = 0.0
    noise_aug_embed_weight: tuple[float, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:  # normalised value (frozen dataclass)
            object.__setattr__(self, name, value)

        for name in ("learning_rate", "adam_eps"):
            put(name, _number(name, getattr(self, name), above=0.0))
        for name in ("adam_b1", "adam_b2"):
            put(name, _number(name, getattr(self, name), low=0.0, below=1.0))
        put("weight_decay", _number("weight_decay", self.weight_decay, low=0.0))
        if self.max_grad_norm is not None:
            put("max_grad_norm", _number("max_grad_norm", self.max_grad_norm, above=0.0))
        put("ema_decay", _number("ema_decay", self.ema_decay, low=0.0, high=1.0))
        if not isinstance(self.ema_warmup, bool | np.bool_):
            raise TypeError(f"ema_warmup must be a bool, got {_what(self.ema_warmup)}")
        put("ema_warmup", bool(self.ema_warmup))
        if not isinstance(self.lr_schedule, str) or self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        put("lr_warmup_steps", _integer("lr_warmup_steps", self.lr_warmup_steps, low=0))
        if self.total_steps is not None:
            put("total_steps", _integer("total_steps", self.total_steps, low=1))
        if self.lr_schedule != "constant" and (
            self.total_steps is None or self.total_steps <= self.lr_warmup_steps
        ):
            raise ValueError(
                f"lr_schedule {self.lr_schedule!r} decays to 0 at total_steps, which must be "
                f"given and exceed lr_warmup_steps ({self.lr_warmup_steps}); got "
                f"{self.total_steps}"
            )
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        put("sigma_loc", _number("sigma_loc", self.sigma_loc))
        put("sigma_scale", _number("sigma_scale", self.sigma_scale, low=0.0))
        put("cfg_dropout", _number("cfg_dropout", self.cfg_dropout, low=0.0, high=1.0))
        put("noise_aug_level", _number("noise_aug_level", self.noise_aug_level, low=0.0))
        w = self.noise_aug_embed_weight
        if w is not None:
            n = NOISE_EMBED_DIM // 2
            if isinstance(w, str | bytes) or not isinstance(w, Iterable):
                raise TypeError(f"noise_aug_embed_weight must be {n} numbers, got {_what(w)}")
            w = tuple(_number(f"noise_aug_embed_weight[{i}]", v) for i, v in enumerate(w))
            if len(w) != n:
                raise ValueError(f"noise_aug_embed_weight must hold {n} values, got {len(w)}")
            put("noise_aug_embed_weight", w)
        if self.noise_aug_level > 0 and w is None:
            raise ValueError(
                "noise_aug_level > 0 needs noise_aug_embed_weight: the embedding of a nonzero "
                "noise level depends on the random Fourier weights of the original k-diffusion "
                "checkpoint (low_res_noise_embed.weight, 64 values), which the published "
                "diffusers checkpoint does not carry. Pass them, or keep noise_aug_level=0 "
                "(what the pipeline samples with)."
            )
        put("seed", _integer("seed", self.seed, low=0, high=SEED_LIMIT - 1))

    def learning_rate_schedule(self) -> optax.Schedule:
        """The learning rate of the update after ``count`` updates (count = 0, 1, ...)."""
        peak, warmup, kind, total = (
            self.learning_rate,
            self.lr_warmup_steps,
            self.lr_schedule,
            self.total_steps,
        )

        def schedule(count):
            count = jnp.asarray(count, jnp.float32)
            if kind == "constant":
                after = jnp.float32(1.0)
            else:
                progress = jnp.clip((count - warmup) / (total - warmup), 0.0, 1.0)
                after = (
                    1.0 - progress if kind == "linear" else 0.5 * (1 + jnp.cos(jnp.pi * progress))
                )
            factor = jnp.where(count < warmup, count / max(warmup, 1), after)
            return peak * factor

        return schedule

    def ema_decay_at(self, count: Array) -> Array:
        """The EMA weight of the update after ``count`` updates (see ``ema_warmup``)."""
        if not self.ema_warmup:
            return jnp.float32(self.ema_decay)
        k = jnp.asarray(count, jnp.float32) + 1.0
        return jnp.where(k <= 1.0, 0.0, jnp.minimum(self.ema_decay, k / (9.0 + k)))

    def optimizer(self) -> optax.GradientTransformation:
        """Gradient clipping (if any), then AdamW under :meth:`learning_rate_schedule`."""
        adamw = optax.adamw(
            self.learning_rate_schedule(),
            b1=self.adam_b1,
            b2=self.adam_b2,
            eps=self.adam_eps,
            weight_decay=self.weight_decay,
        )
        if self.max_grad_norm is None:
            return adamw
        return optax.chain(optax.clip_by_global_norm(self.max_grad_norm), adamw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["noise_aug_embed_weight"] is not None:
            d["noise_aug_embed_weight"] = list(d["noise_aug_embed_weight"])
        return d

    def changes_from(self, recorded: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
        """``(name, recorded value, this config's value)`` for each setting that differs from
        ``recorded`` (a checkpoint's ``"config"``, as :meth:`to_dict` wrote it), in field order.

        Only the fields ``recorded`` holds are compared (a checkpoint of an older build lacks
        the newer ones), except ``objective``: a checkpoint without it was trained with
        ``"mse"``, the only objective then. ``total_steps`` counts only when either schedule
        decays to 0 at it (``"linear"``/``"cosine"``): under ``"constant"`` it changes no step.
        """
        recorded = {"objective": "mse", **recorded}
        old_schedule = recorded.get("lr_schedule", "constant")
        steps_matter = self.lr_schedule != "constant" or old_schedule != "constant"
        changes = []
        for name, value in self.to_dict().items():
            if name not in recorded or (name == "total_steps" and not steps_matter):
                continue
            if recorded[name] != value:
                changes.append((name, recorded[name], value))
        return changes


# --------------------------------------------------------------------------------------------
# The objective
# --------------------------------------------------------------------------------------------


def karras_scalings(sigma: Array) -> tuple[Array, Array, Array]:
    """``(c_skip, c_out, c_in)`` for ``sigma_data = 1``, same shape as ``sigma``."""
    sigma = jnp.asarray(sigma, jnp.float32)
    c_skip = 1.0 / (sigma * sigma + 1.0)
    c_in = jax.lax.rsqrt(sigma * sigma + 1.0)
    return c_skip, sigma * c_in, c_in


def rand_log_normal(key: Array, shape: tuple[int, ...], loc: float, scale: float) -> Array:
    """``exp(loc + scale · N(0, 1))``, float32 (k-diffusion's ``rand_log_normal``)."""
    return jnp.exp(loc + scale * jax.random.normal(key, shape, jnp.float32))


def upsample_nearest_2x(x: Array) -> Array:
    """``[B, h, w, C]`` -> ``[B, 2h, 2w, C]``, each value repeated on a 2x2 square."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def noise_level_embedding(level: Array, weight: Array | None = None) -> Array:
    """The 128-entry noise-level part of ``timestep_cond`` for levels ``[B]``.

    ``[cos(2π·log1p(level)·w), sin(2π·log1p(level)·w)]`` with ``w = weight [64]``; at level 0
    it is 64 ones and 64 zeros for any ``w`` (``weight`` may then be ``None``).
    """
    level = jnp.asarray(level, jnp.float32)
    if weight is None:
        weight = jnp.zeros((NOISE_EMBED_DIM // 2,), jnp.float32)
    f = 2 * jnp.pi * jnp.log1p(level)[:, None] * jnp.asarray(weight, jnp.float32)[None, :]
    return jnp.concatenate([jnp.cos(f), jnp.sin(f)], axis=-1)


@struct.dataclass
class Draws:
    """The random inputs of one loss evaluation (all float32 except ``drop_text``).

    ``sigma [B]``, ``noise [B, H, W, C]`` (like the target latents), ``drop_text`` bool ``[B]``
    (rows whose text is replaced by the ``""`` prompt), ``aug_noise [B, h, w, C]`` (like the
    low-res latents, scaled by the augmentation level).
    """

    sigma: Array
    noise: Array
    drop_text: Array
    aug_noise: Array


def draw(key: Array, latents_shape, low_res_shape, config: TrainConfig) -> Draws:
    """Sample :class:`Draws` for a batch: log-normal σ, Gaussian noise, text dropout."""
    k_sigma, k_noise, k_drop, k_aug = jax.random.split(key, 4)
    b = latents_shape[0]
    return Draws(
        sigma=rand_log_normal(k_sigma, (b,), config.sigma_loc, config.sigma_scale),
        noise=jax.random.normal(k_noise, latents_shape, jnp.float32),
        drop_text=jax.random.bernoulli(k_drop, config.cfg_dropout, (b,)),
        aug_noise=jax.random.normal(k_aug, low_res_shape, jnp.float32),
    )


def denoiser_loss(
    model: UNetFn,
    batch: Mapping[str, Array],
    draws: Draws,
    uncond: tuple[Array, Array],
    *,
    objective: str = "variance",
    noise_aug_level: float = 0.0,
    noise_aug_embed_weight: Array | None = None,
) -> tuple[Array, Array]:
    """k-diffusion's denoiser loss of the upscaler; returns ``(mean loss, per-example [B])``.

    ``batch``: ``latents [B, H, W, C]`` (the target x0, scaled latents), ``low_res [B, H/2,
    W/2, C]``, ``context [B, L, D]``, ``pooled [B, D]``. ``uncond``: the ``""`` prompt's
    ``(context [L, D], pooled [D])`` (or that batch of one, as ``encode_prompt`` gives it).
    ``model`` returns ``C + 1`` channels for ``objective="variance"`` (the last: the
    log-variance head, averaged over the picture), ``C`` or more for ``"mse"`` (the first ``C``
    are regressed). See :class:`TrainConfig`.
    """
    return _denoiser_terms(
        model,
        batch,
        draws,
        uncond,
        objective=objective,
        noise_aug_level=noise_aug_level,
        noise_aug_embed_weight=noise_aug_embed_weight,
    )[:2]


def _denoiser_terms(
    model: UNetFn,
    batch: Mapping[str, Array],
    draws: Draws,
    uncond: tuple[Array, Array],
    *,
    objective: str,
    noise_aug_level: float,
    noise_aug_embed_weight: Array | None,
) -> tuple[Array, Array, Array]:
    """``(mean loss, per-example loss [B], mean squared error of F)``: the last, the plain
    regression error whatever the objective, is what a run can compare across objectives
    (the variance objective's loss goes below 0 as the predicted variance shrinks)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    x0 = batch["latents"].astype(jnp.float32)
    b, c = x0.shape[0], x0.shape[-1]
    sigma = draws.sigma.astype(jnp.float32)
    c_skip, c_out, c_in = (s.reshape(b, 1, 1, 1) for s in karras_scalings(sigma))
    noised = x0 + draws.noise * sigma.reshape(b, 1, 1, 1)

    low = batch["low_res"].astype(jnp.float32)
    level = jnp.full((b,), noise_aug_level, jnp.float32)
    if noise_aug_level:
        low = (low + noise_aug_level * draws.aug_noise) * jax.lax.rsqrt(
            jnp.float32(noise_aug_level) ** 2 + 1.0
        )
    image_cond = upsample_nearest_2x(low)

    uncond_ctx, uncond_pooled = (jnp.asarray(u) for u in uncond)
    if uncond_ctx.ndim == 3 and uncond_pooled.ndim == 2:  # encode_prompt([""]): a batch of one
        if uncond_ctx.shape[0] != 1 or uncond_pooled.shape[0] != 1:
            raise ValueError(
                "uncond must be the '' prompt's (context [L, D], pooled [D]), or that batch of "
                f"one; got shapes {list(uncond_ctx.shape)} and {list(uncond_pooled.shape)}"
            )
        uncond_ctx, uncond_pooled = uncond_ctx[0], uncond_pooled[0]
    keep = ~draws.drop_text
    context = jnp.where(keep[:, None, None], batch["context"], uncond_ctx[None])
    pooled = jnp.where(keep[:, None], batch["pooled"], uncond_pooled[None])
    timestep_cond = jnp.concatenate(
        [noise_level_embedding(level, noise_aug_embed_weight), pooled.astype(jnp.float32)], -1
    )

    model_in = jnp.concatenate([noised * c_in, image_cond], axis=-1)
    out = model(model_in, jnp.log(sigma) * 0.25, context, timestep_cond).astype(jnp.float32)
    if objective == "variance" and out.shape[-1] != c + 1:
        raise ValueError(
            f'objective "variance" needs a model with {c + 1} output channels (the '
            f"latents' {c} and a log-variance one, as the published UNet has), got "
            f'{out.shape[-1]}: train this one with objective="mse"'
        )
    if out.shape[-1] < c:
        raise ValueError(f"the model returns {out.shape[-1]} channels, fewer than the {c} latents")
    target = (x0 - c_skip * noised) / c_out
    squared = jnp.mean(jnp.square(out[..., :c] - target), axis=(1, 2, 3))  # [B]
    if objective == "variance":
        logvar = jnp.mean(out[..., c], axis=(1, 2))  # [B]
        per_example = (squared * jnp.exp(-logvar) + logvar) / 2
    else:
        per_example = squared
    return jnp.mean(per_example), per_example, jnp.mean(squared)


# --------------------------------------------------------------------------------------------
# Data: frozen VAE latents
# --------------------------------------------------------------------------------------------


def downsample_2x(images: Array) -> Array:
    """Pictures ``[B, H, W, C]`` at half size (antialiased bicubic, like a photo resize)."""
    b, h, w, c = images.shape
    return jax.image.resize(images, (b, h // 2, w // 2, c), "bicubic", antialias=True)


def make_latents(vae: FlaxAutoencoderKL, images: Array, key: Array) -> dict[str, Array]:
    """Target and low-res latents of high-resolution pictures ``[B, H, W, 3]`` in [-1, 1].

    ``latents``: the picture's VAE latents (a posterior sample, times ``scaling_factor``),
    ``[B, H/f, W/f, C]``. ``low_res``: the latents of the picture downsampled 2x
    (:func:`downsample_2x`), ``[B, H/2f, W/2f, C]``: what the pipeline feeds the model at
    inference (the latents of a picture at half the resolution). H and W must be multiples
    of ``2 f``; for the UNet to take the latents, of ``f * 2**num_resamplers`` too (64 for the
    published model).
    """
    f = vae.config.downsample_factor
    if images.shape[1] % (2 * f) or images.shape[2] % (2 * f):
        raise ValueError(
            f"picture sides must be multiples of {2 * f} (2 x the VAE factor), "
            f"got {images.shape[1]}x{images.shape[2]}"
        )
    k_hi, k_lo = jax.random.split(key)
    scale = vae.config.scaling_factor
    hi = vae.encode(images).sample(k_hi) * scale
    lo = vae.encode(downsample_2x(images)).sample(k_lo) * scale
    return {"latents": hi.astype(jnp.float32), "low_res": lo.astype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# The train state and step
# --------------------------------------------------------------------------------------------

# What safetensors raises for its own errors, I/O ones (a full disk) among them.
_SafetensorError = getattr(safetensors, "SafetensorError", OSError)

# The parameters trained: nnx.Param, which the UNet's fixed Fourier vector (a FixedParam, frozen
# in diffusers too) is not.
TRAINABLE = nnx.Param


@struct.dataclass
class TrainState:
    """``step`` (int32 scalar), trainable UNet ``params``, their ``ema`` and ``opt_state``."""

    step: Array
    params: nnx.State
    ema: nnx.State
    opt_state: Any


_STATE_FILE = "trainer_state.json"
_OPT_FILE = "optimizer.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _replace_folder(new: str, final: str) -> None:
    """Rename the folder ``new`` to ``final``; a ``final`` already there (a checkpoint of the
    same step saved again) is set aside first and deleted only once ``new`` has its name, and
    put back if the rename fails: ``final`` is at every moment the old checkpoint, the new
    one, or absent (the older checkpoints then serve), never a partly deleted one."""
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)  # also one a killed save left behind
    had = os.path.lexists(final)
    if had:
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if had:
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


class Trainer:
    """Fine-tunes a :class:`FlaxUNet2DConditionModel` (the frozen parts are left as given).

    ``uncond``: the ``""`` prompt's ``(context [L, D], pooled [D])`` for text dropout
    (``pipe.encode_prompt([""])``, its batch of one taken as it is).
    ``mesh``: a 1-D ``("data",)`` mesh (default: every device of every process); batches must
    divide by its size. ``remat``: rematerialise the UNet's blocks (less memory, more compute).

    Several processes (``jax.distributed``, e.g. the hosts of a TPU pod) train one model: each
    builds the Trainer from the same weights and settings and passes :meth:`step` its own share
    of every batch (the global batch is the processes' shares in process order); gradients are
    reduced over all devices. :meth:`save_checkpoint` is called by all and written by process 0.
    """

    def __init__(
        self,
        unet: FlaxUNet2DConditionModel,
        uncond: tuple[Array, Array],
        config: TrainConfig | None = None,
        *,
        mesh: Mesh | None = None,
        remat: bool = False,
    ):
        self.config = config or TrainConfig()
        self.unet_config = unet.config
        unet.set_remat(remat)
        self.graphdef, params, self.frozen = nnx.split(unet, TRAINABLE, ...)
        unet.set_remat(False)
        stored = sorted({str(x.dtype) for x in jax.tree.leaves(params)} - {"float32"})
        if stored:
            raise ValueError(
                f"unet: its trainable parameters must be float32, got {stored} (small updates "
                "would be rounded away and the EMA would not move): load it with "
                "param_dtype=jnp.float32 (the default; dtype= still sets the compute dtype)"
            )
        dropout = unet.config.extra.get("dropout") or 0.0
        if isinstance(dropout, int | float) and dropout > 0:
            warnings.warn(
                f"unet: its config.json has dropout={dropout}, which diffusers applies in its "
                "K blocks when training; this UNet has no dropout, so it is fine-tuned without",
                UserWarning,
                stacklevel=2,
            )
        c = unet.config.in_channels // 2
        if self.config.objective == "variance" and unet.config.out_channels != c + 1:
            raise ValueError(
                f'config.objective "variance" needs a UNet with {c + 1} output channels (the '
                f"latents' {c} and a log-variance one, as the published UNet has); this one has "
                f'{unet.config.out_channels}: use objective="mse"'
            )
        self._initial_params = params
        if mesh is None:
            mesh = make_mesh(jax.devices())
        if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != ("data",):
            raise ValueError(
                "mesh must be a jax.sharding.Mesh with the single axis ('data',), got "
                + (repr(mesh.axis_names) if isinstance(mesh, Mesh) else type(mesh).__name__)
            )
        mesh = auto_axes(mesh)
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P("data"))
        ctx, pooled = (np.asarray(u, np.float32) for u in uncond)
        if ctx.ndim == 3 and ctx.shape[0] == 1 and pooled.ndim == 2 and pooled.shape[0] == 1:
            ctx, pooled = ctx[0], pooled[0]  # encode_prompt([""]) as it comes: a batch of one
        d_ctx, d_cond = unet.config.cross_attention_dim, unet.config.time_cond_proj_dim
        if ctx.ndim != 2 or ctx.shape[1] != d_ctx:
            raise ValueError(
                f"uncond[0] (the '' prompt's context) must be [L, {d_ctx}] (the UNet's "
                f"cross_attention_dim), got shape {list(ctx.shape)}"
            )
        if pooled.ndim != 1 or (d_cond is not None and NOISE_EMBED_DIM + len(pooled) != d_cond):
            want = "D" if d_cond is None else d_cond - NOISE_EMBED_DIM
            raise ValueError(
                f"uncond[1] (the '' prompt's pooled embedding) must be [{want}] (the UNet's "
                f"time_cond_proj_dim less {NOISE_EMBED_DIM}), got shape {list(pooled.shape)}"
            )
        # host values (the same in every process) placed on the whole mesh
        with outside_context_mesh():
            self.uncond = jax.device_put((ctx, pooled), self.replicated)
            self.frozen = jax.device_put(_host(self.frozen), self.replicated)
        self.optimizer = self.config.optimizer()
        w = self.config.noise_aug_embed_weight
        self._aug_weight = None if w is None else jnp.asarray(w, jnp.float32)
        self._step = jax.jit(
            self._step_fn,
            in_shardings=(self.replicated, self.sharded),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )
        self._eval = jax.jit(self._eval_fn)

    # ---- state -------------------------------------------------------------------------------

    @outside_context_mesh()
    def init_state(self) -> TrainState:
        """Step 0: the UNet's weights, an EMA equal to them, a fresh optimizer state."""
        params = _host(self._initial_params)  # copies: the step donates its state
        state = TrainState(
            step=np.zeros((), np.int32),
            params=params,
            ema=jax.tree.map(np.copy, params),
            opt_state=_host(self.optimizer.init(params)),
        )
        return jax.device_put(state, self.replicated)

    def unet(self, state: TrainState, *, ema: bool = False) -> FlaxUNet2DConditionModel:
        """The UNet with the state's weights (or their EMA)."""
        params = _host(state.ema if ema else state.params)
        model = nnx.merge(self.graphdef, params, _host(self.frozen))
        model.set_remat(False)
        return model

    # ---- the step ----------------------------------------------------------------------------

    def _loss(self, params, batch, draws):
        unet = nnx.merge(self.graphdef, params, self.frozen)
        loss, _, mse = _denoiser_terms(
            unet,
            batch,
            draws,
            self.uncond,
            objective=self.config.objective,
            noise_aug_level=self.config.noise_aug_level,
            noise_aug_embed_weight=self._aug_weight,
        )
        return loss, mse

    def _step_fn(self, state: TrainState, batch: dict[str, Array]):
        key = jax.random.fold_in(jax.random.key(self.config.seed), state.step)
        draws = draw(key, batch["latents"].shape, batch["low_res"].shape, self.config)
        draws = jax.lax.with_sharding_constraint(draws, self.sharded)
        (loss, mse), grads = jax.value_and_grad(self._loss, has_aux=True)(
            state.params, batch, draws
        )
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = self.config.ema_decay_at(state.step)
        ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, params)
        metrics = {
            "loss": loss,
            "mse": mse,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": self.config.learning_rate_schedule()(state.step),
        }
        new = TrainState(step=state.step + 1, params=params, ema=ema, opt_state=opt_state)
        return new, metrics

    def _eval_fn(self, params, batch, draws):
        return self._loss(params, batch, draws)[0]

    def check_batch(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """``batch``'s four entries as float32 host arrays, or a ValueError naming the entry
        that does not fit the UNet: ``latents [B, H, W, C]`` and ``low_res [B, H/2, W/2, C]``
        (``C`` = half the UNet's ``in_channels``), ``context [B, L, D]`` (``L`` and ``D`` as
        the ``""`` prompt's context, ``D`` the UNet's ``cross_attention_dim``) and
        ``pooled [B, P]`` (``P`` as the ``""`` prompt's pooled embedding), one ``B >= 1``."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"batch must be a dict of arrays, got {type(batch).__name__}")
        c = self.unet_config.in_channels // 2
        (n_ctx, d_ctx), (d_pooled,) = self.uncond[0].shape, self.uncond[1].shape
        layout = {
            "latents": f"[B, H, W, {c}]",
            "low_res": f"[B, H/2, W/2, {c}]",
            "context": f"[B, {n_ctx}, {d_ctx}]",
            "pooled": f"[B, {d_pooled}]",
        }
        what = ", ".join(f"{k} {v}" for k, v in layout.items())
        missing = [k for k in layout if k not in batch]
        if missing:
            raise ValueError(f"batch lacks {', '.join(missing)}: a batch holds {what}")
        arrays = {}
        for k in layout:
            try:
                arrays[k] = np.asarray(batch[k], np.float32)
            except (TypeError, ValueError) as e:
                raise ValueError(f"batch[{k!r}] must be a float array {layout[k]}: {e}") from None
        lat, low, ctx, pooled = arrays.values()
        h, w = (lat.shape[1], lat.shape[2]) if lat.ndim == 4 else (0, 0)
        want = {
            "latents": (None, None, None, c),
            "low_res": (None, h // 2, w // 2, c),
            "context": (None, n_ctx, d_ctx),
            "pooled": (None, d_pooled),
        }
        for k, shape in want.items():
            got = arrays[k].shape
            fits = len(got) == len(shape) and all(
                s is None or s == g for s, g in zip(shape, got, strict=True)
            )
            if not fits:
                raise ValueError(
                    f"batch[{k!r}] must be {layout[k]}, got shape {list(got)} (a batch holds "
                    f"{what})"
                )
        if h % 2 or w % 2:
            raise ValueError(f"batch['latents'] must have even sides, got {h}x{w}")
        rows = {k: v.shape[0] for k, v in arrays.items()}
        if len(set(rows.values())) > 1 or lat.shape[0] < 1:
            got = ", ".join(f"{k} {n}" for k, n in rows.items())
            raise ValueError(
                f"the batch's entries must share one first axis B >= 1 (rows), got {got}"
            )
        return arrays

    @outside_context_mesh()
    def shard_batch(self, batch: Mapping[str, Any]) -> dict[str, Array]:
        """Put a host batch on the mesh, split along its first axis. With a mesh over several
        processes, ``batch`` is this process's share, split over its devices in the mesh. The
        batch is checked first (:meth:`check_batch`)."""
        return {k: self._split(v) for k, v in self.check_batch(batch).items()}

    def _split(self, v: np.ndarray) -> Array:
        """``v`` (this process's rows) split along its first axis over the mesh."""
        n = len(self.sharded.addressable_devices)
        several = n < self.mesh.devices.size
        if v.shape[0] % n:
            what = "this process's devices in the mesh" if several else "the device count"
            raise ValueError(f"batch size {v.shape[0]} must be a multiple of {what}, {n}")
        if several:
            return jax.make_array_from_process_local_data(self.sharded, v)
        return jax.device_put(v, self.sharded)

    @outside_context_mesh()
    def step(self, state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
        """One optimizer step on ``batch`` (``latents``, ``low_res``, ``context``, ``pooled``,
        checked by :meth:`check_batch` before anything is compiled).

        The step's random draws come from ``config.seed`` and ``state.step``. ``state`` is
        donated (its buffers are reused): keep the returned one. Returns ``(state, metrics)``
        with ``loss``, ``mse`` (the mean squared error of the UNet's output against its target,
        the loss of ``objective="mse"``: comparable across objectives) and ``grad_norm``
        (before clipping).
        """
        return self._step(state, self.shard_batch(batch))

    @outside_context_mesh()
    def loss(self, state: TrainState, batch: Mapping[str, Any], draws: Draws, *, ema=False):
        """The loss of the state's weights on ``batch`` with fixed ``draws`` (no update);
        with several processes both are this process's rows."""
        params = state.ema if ema else state.params
        draws = jax.tree.map(lambda v: self._split(np.asarray(v)), draws)
        return float(_host(self._eval(params, self.shard_batch(batch), draws)))

    # ---- checkpoints -------------------------------------------------------------------------

    @outside_context_mesh()
    def save_checkpoint(
        self, folder: str | os.PathLike, state: TrainState, run: dict | None = None
    ) -> str:
        """Write ``folder/checkpoint-<step>/`` and return its path.

        It holds ``unet/`` and ``unet_ema/`` (``save_pretrained`` folders), the optimizer
        state (``optimizer.safetensors``, leaves in tree order) and ``trainer_state.json``
        (strict JSON: ``step``, ``config``, and ``run`` if given: the run's settings beyond
        the :class:`TrainConfig`, any JSON-serialisable dict of finite values; the example
        script records its model, data folder, resolution, batch size and process count
        there, to refuse a resume with other settings). Everything is written under a
        temporary name first, so a run killed mid-save leaves no ``checkpoint-*`` folder that
        is incomplete.

        A state whose weights, EMA or optimizer state hold NaN or infinity (a diverged run)
        is refused with :class:`NonFiniteError` (a ValueError) naming the step, and nothing
        is written; so is a ``run`` that is not a dict of finite JSON values. The checkpoint
        is flushed to disk before this returns, so older ones can be deleted then. A write that
        fails (a full disk) raises an OSError, with nothing left of the checkpoint; with
        several processes (process 0 writes, all call this) the others raise an OSError that
        names process 0, rather than wait for it.
        """
        folder = os.fspath(folder)
        step = int(_host(state.step))
        info: dict[str, Any] = {"step": step, "config": self.config.to_dict()}
        if run is not None:
            if not isinstance(run, Mapping):
                raise TypeError(f"run must be a dict of settings, got {type(run).__name__}")
            info["run"] = dict(run)
        try:
            text = json.dumps(info, indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"checkpoint of step {step}: run must hold JSON values (str, int, finite "
                f"float, bool, None, lists and dicts of them): {e}"
            ) from None
        finite = _host(_all_finite(state.params, state.ema, state.opt_state))  # on device
        names = ("weights", "EMA", "optimizer state")
        bad = [what for what, ok in zip(names, finite, strict=True) if not ok]
        if bad:
            raise NonFiniteError(
                f"refusing to save the checkpoint of step {step}: its {' and '.join(bad)} hold "
                "NaN or infinite values (training diverged: a learning rate too high is the "
                "usual cause); nothing was written"
            )
        final = os.path.join(folder, f"checkpoint-{step:08d}")
        failure = None
        if jax.process_index() == 0:
            tmp = final + ".tmp"
            try:
                os.makedirs(folder, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
                os.makedirs(tmp)
                self.unet(state).save_pretrained(os.path.join(tmp, "unet"))
                self.unet(state, ema=True).save_pretrained(os.path.join(tmp, "unet_ema"))
                _save_leaves(_host(state.opt_state), os.path.join(tmp, _OPT_FILE))
                atomic_write(os.path.join(tmp, _STATE_FILE), lambda f: f.write(text), text=True)
                sync_tree(tmp)  # on disk before it takes its name: older ones may go then
                _replace_folder(tmp, final)
                sync_folder(folder)
            except Exception as e:  # a full disk, a folder gone: no half checkpoint is left
                shutil.rmtree(tmp, ignore_errors=True)
                failure = e
                if isinstance(e, _SafetensorError):  # its I/O errors (a full disk) are its own
                    failure = OSError(f"{final}: {e}")
                    failure.__cause__ = e
        if jax.process_count() > 1:  # nobody goes on (or reads it back) before it is whole
            from flax_latentup.parallel import all_processes

            any_failed = all_processes(np.int32(failure is not None)).any()  # all call it
            if failure is None and any_failed:
                raise OSError(
                    f"process 0 could not write the checkpoint of step {step} ({final}); its "
                    "own message says why"
                )
        if failure is not None:
            raise failure
        return final

    @outside_context_mesh()
    def load_checkpoint(self, path: str | os.PathLike) -> TrainState:
        """The :class:`TrainState` saved in the checkpoint folder ``path``."""
        path = os.fspath(path)
        step = checkpoint_info(path)["step"]

        def params_of(sub: str) -> nnx.State:
            model = FlaxUNet2DConditionModel.from_pretrained(os.path.join(path, sub))
            if model.config != self.unet_config:
                raise ValueError(f"{path}/{sub} holds a UNet of another config")
            _, params, frozen = nnx.split(model, TRAINABLE, ...)
            # the weights that are not trained (the Fourier time projection) went into every
            # step of that run: the UNet given now must hold the same ones
            mine = _host(self.frozen)
            for (key, theirs), (_, ours) in zip(
                jax.tree_util.tree_leaves_with_path(_host(frozen)),
                jax.tree_util.tree_leaves_with_path(mine),
                strict=True,
            ):
                if not np.array_equal(theirs, ours):
                    raise ValueError(
                        f"{path}/{sub} was trained with other frozen weights "
                        f"({jax.tree_util.keystr(key)}) than the UNet given to this Trainer: "
                        "resume from the model the run started from"
                    )
            return params

        params = params_of("unet")
        template = self.optimizer.init(params)
        opt_state = _load_leaves(template, os.path.join(path, _OPT_FILE))
        state = TrainState(
            step=np.asarray(step, np.int32),
            params=params,
            ema=params_of("unet_ema"),
            opt_state=opt_state,
        )
        return jax.device_put(_host(state), self.replicated)


def _host(tree: Any) -> Any:
    """Numpy copies of ``tree``'s arrays. An array replicated over the devices of several
    processes is read from this process's own copy."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("an array split over several processes cannot be read here")
            x = x.addressable_data(0)
        return np.array(x)

    return jax.tree.map(one, tree)


class NonFiniteError(ValueError):
    """A train state holding NaN or infinite values (see :meth:`Trainer.save_checkpoint`)."""


@jax.jit
def _all_finite(*trees: Any) -> tuple[Array, ...]:
    """For each tree, whether all its floating-point values are finite (reduced where the
    arrays are, so only the answers reach the host)."""

    def finite(tree: Any) -> Array:
        leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else True

    return tuple(jnp.asarray(finite(t)) for t in trees)


def checkpoint_folders(folder: str | os.PathLike) -> list[tuple[int, str]]:
    """``(step, path)`` of the folders named exactly ``checkpoint-<digits>`` in ``folder``,
    by step (none if ``folder`` does not exist). Other names (``checkpoint-best``, a killed
    save's ``checkpoint-<digits>.tmp``) are not checkpoints of a run."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return []
    found = []
    for name in os.listdir(folder):
        m = _CHECKPOINT.match(name)
        path = os.path.join(folder, name)
        if m and os.path.isdir(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> str | None:
    """The ``checkpoint-<step>`` folder with the highest step in ``folder`` that holds a
    ``trainer_state.json`` (None if none)."""
    found = [
        p for _, p in checkpoint_folders(folder) if os.path.isfile(os.path.join(p, _STATE_FILE))
    ]
    return found[-1] if found else None


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``: ``step``, ``config`` (:meth:`TrainConfig.to_dict`)
    and, if it was saved with one, ``run`` (see :meth:`Trainer.save_checkpoint`). A file of
    another shape (another trainer's ``trainer_state.json``) raises a ValueError."""
    file = os.path.join(os.fspath(path), _STATE_FILE)
    info = read_json(file)
    step = info.get("step")
    if (
        isinstance(step, bool)
        or not isinstance(step, int)
        or step < 0
        or not isinstance(info.get("config"), dict)
        or not isinstance(info.get("run", {}), dict)
    ):
        raise ValueError(
            f"{file} is not a checkpoint of this trainer: expected a step (an int >= 0), a "
            f"config and optionally run settings (objects), got the keys {sorted(info)}"
        )
    return info


def _save_leaves(tree: Any, path: str) -> None:
    from safetensors.numpy import save_file

    leaves = jax.tree.leaves(tree)
    arrays = {f"{i:06d}": np.asarray(v) for i, v in enumerate(leaves)}
    tmp = path + ".tmp"
    save_file(arrays, tmp, metadata={"format": "optax", "leaves": str(len(leaves))})
    os.replace(tmp, path)


def _load_leaves(template: Any, path: str) -> Any:
    from safetensors.numpy import load_file

    arrays = load_file(path)
    leaves, treedef = jax.tree.flatten(template)
    if len(arrays) != len(leaves):
        raise ValueError(
            f"{path} holds {len(arrays)} optimizer arrays, this optimizer has {len(leaves)}: "
            "it was written for another optimizer layout (earlier builds, with a constant "
            "rate, kept no learning-rate schedule state). Its weights still load: start a new "
            "run from the checkpoint's unet/ folder (FlaxUNet2DConditionModel.from_pretrained)"
        )
    out = []
    for i, want in enumerate(leaves):
        got = arrays[f"{i:06d}"]
        if got.shape != np.shape(want) or got.dtype != np.asarray(want).dtype:
            raise ValueError(
                f"{path}: optimizer array {i} is {got.dtype}{list(got.shape)}, expected "
                f"{np.asarray(want).dtype}{list(np.shape(want))}"
            )
        out.append(jnp.asarray(got))
    return jax.tree.unflatten(treedef, out)


__all__ = [
    "OBJECTIVES",
    "Draws",
    "NonFiniteError",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "denoiser_loss",
    "draw",
    "checkpoint_folders",
    "checkpoint_info",
    "karras_scalings",
    "latest_checkpoint",
    "make_latents",
    "noise_level_embedding",
    "rand_log_normal",
    "upsample_nearest_2x",
]

"""Shared building blocks: activations, norms with float32 statistics, attention, resamplers.

Every model of the package routes its attention through :func:`attention`, so the
implementation (plain XLA, query-chunked for long sequences, cuDNN on GPUs) is chosen in
one place and can be overridden with :func:`attention_config`. The K-diffusion UNet's
timestep-conditioned norm (:class:`AdaGroupNorm`) and its fixed-kernel resamplers
(:func:`k_downsample_2d`, :func:`k_upsample_2d`) live here too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# --------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------


def gelu_exact(x: Array) -> Array:
    """GELU in its exact erf form (torch ``nn.GELU()``); JAX defaults to the tanh form.

    Written as ``x/2 * (1 + erf(x/sqrt(2)))``, the formula torch evaluates, rather than
    ``jax.nn.gelu(approximate=False)``'s ``erfc`` form: XLA expands ``erfc`` into several
    polynomial branches joined by selects, ``erf`` into one rational polynomial, about half
    the per-element cost on CPU for the same float32 accuracy (both ~1e-6 of torch's values).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(1.0 / math.sqrt(2.0), x.dtype)))


def gelu_tanh(x: Array) -> Array:
    """GELU, tanh approximation (transformers ``gelu_new``)."""
    return jax.nn.gelu(x, approximate=True)


def quick_gelu(x: Array) -> Array:
    """``x * sigmoid(1.702 x)`` (transformers ``quick_gelu``, used by OpenAI CLIP)."""
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": gelu_exact,
    "gelu_new": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
    """The activation function for a torch/transformers activation name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Rematerialisation
# --------------------------------------------------------------------------------------------


def call_block(block: nnx.Module, *args, remat: bool = False):
    """``block(*args)``; with ``remat`` its activations are recomputed in the backward pass.

    The block is split into its graph and state and called under ``jax.checkpoint``, so
    ``jax.grad`` keeps only the block's inputs and recomputes what lies inside: less memory
    for one more forward pass of the block. The value and the gradients are the same.
    """
    if not remat:
        return block(*args)
    graphdef, state = nnx.split(block)

    def run(state, *args):
        return nnx.merge(graphdef, state)(*args)

    return jax.checkpoint(run)(state, *args)


# --------------------------------------------------------------------------------------------
# Norms (statistics always in float32, two-pass variance as torch computes it)
# --------------------------------------------------------------------------------------------


def _zeros(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype))


def _ones(shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis; params ``scale`` (torch ``weight``) and ``bias``."""

    def __init__(
        self,
        num_features: int,
        *,
        eps: float = 1e-5,
        use_affine: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        self.eps = eps
        self.dtype = dtype
        self.num_features = num_features
        if use_affine:
            self.scale = _ones((num_features,), param_dtype)
            self.bias = _zeros((num_features,), param_dtype)
        else:
            self.scale = None
            self.bias = None

    def __call__(self, x: Array) -> Array:  # [..., C] -> [..., C]
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def group_norm_affine(
    x: Array,
    num_groups: int,
    eps: float,
    scale: Array | None = None,
    shift: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """``(x - mean) / std * scale + shift`` over the spatial axes and channel groups of
    ``x: [B, ..., C]``, in float32 (returned as float32).

    Groups are contiguous runs of ``C // num_groups`` channels, as in torch. ``scale`` and
    ``shift`` (optional) broadcast against ``[B, 1, ..., 1, C]``: per channel, optionally per
    example. ``mask`` (bool, ``[1 or B, ..., 1]``, the spatial shape of ``x``) restricts the
    statistics to the positions where it is true, as if the others were not there; their
    outputs are meaningless.

    The group statistics are expanded to per-channel vectors and folded with ``scale`` before
    touching the feature map, so the full-size work is one subtract, one multiply and one add
    per element with channel-wise operands: XLA fuses that with the activation that follows
    into a single pass over the map.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f"channels ({c}) must be divisible by num_groups ({num_groups})")
    per = c // num_groups
    x32 = x.astype(jnp.float32)
    grouped = x32.reshape(b, -1, num_groups, per)
    if mask is None:
        mean = jnp.mean(grouped, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(grouped - mean), axis=(1, 3), keepdims=True)
    else:
        m = mask.reshape(mask.shape[0], -1, 1, 1)
        count = jnp.sum(m, axis=1, keepdims=True, dtype=jnp.float32) * per
        mean = jnp.sum(jnp.where(m, grouped, 0.0), axis=(1, 3), keepdims=True) / count
        centred = jnp.where(m, grouped - mean, 0.0)
        var = jnp.sum(jnp.square(centred), axis=(1, 3), keepdims=True) / count
    shape = (b,) + (1,) * (x.ndim - 2) + (c,)

    def per_channel(v: Array) -> Array:  # [B, 1, G, 1] -> [B, 1, ..., 1, C]
        return jnp.broadcast_to(v, (b, 1, num_groups, per)).reshape(shape)

    gain = per_channel(jax.lax.rsqrt(var + eps))
    if scale is not None:
        gain = gain * scale.astype(jnp.float32)
    y = (x32 - per_channel(mean)) * gain
    return y if shift is None else y + shift.astype(jnp.float32)


class GroupNorm(nnx.Module):
    """GroupNorm on channels-last input; params ``scale`` (torch ``weight``) and ``bias``."""

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-6,
        use_affine: bool = True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                f"num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        if use_affine:
            self.scale = _ones((num_channels,), param_dtype)
            self.bias = _zeros((num_channels,), param_dtype)
        else:
            self.scale = None
            self.bias = None

    def __call__(self, x: Array, mask: Array | None = None) -> Array:  # [B, ..., C]
        """``mask``: optional bool ``[1 or B, ..., 1]``, see :func:`group_norm_affine`."""
        scale = None if self.scale is None else self.scale[...]
        shift = None if self.bias is None else self.bias[...]
        y = group_norm_affine(x, self.num_groups, self.eps, scale, shift, mask)
        return y.astype(self.dtype)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("xla", "chunked", "cudnn")


@dataclasses.dataclass
class _AttentionSettings:
    implementation: str | None = None  # None: chosen per call by size, dtype and backend
    query_chunk_size: int = 1024
    # Above this many score-matrix bytes (float32) the automatic choice chunks the queries.
    max_score_bytes: int = 1 << 28


_SETTINGS = _AttentionSettings()


_KEEP: Any = object()  # attention_config's "not given": the enclosing block's choice


@contextlib.contextmanager
def attention_config(
    implementation: str | None = _KEEP,
    *,
    query_chunk_size: int | None = None,
    max_score_bytes: int | None = None,
) -> Iterator[None]:
    """Override how :func:`attention` runs inside the ``with`` block (read at trace time).

    ``implementation``: ``"xla"`` (full score matrix), ``"chunked"`` (queries in chunks of
    ``query_chunk_size``: memory linear in the sequence), ``"cudnn"`` (fused kernel, NVIDIA
    GPUs of compute capability >= 8.0, fp16/bf16, head_dim a multiple of 8 up to
    :func:`cudnn_attention_max_head_dim`) or ``None`` for the automatic choice. What is not
    given keeps the enclosing block's value. The package's compiled functions (the pipeline,
    the VAE) key their caches on these settings (:func:`trace_settings`), so calls inside the
    block compile for them; functions of your own keep what they were traced with.
    """
    if implementation is not _KEEP and (
        implementation is not None and implementation not in IMPLEMENTATIONS
    ):
        raise ValueError(
            f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    for name, value in (
        ("query_chunk_size", query_chunk_size),
        ("max_score_bytes", max_score_bytes),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    old = dataclasses.replace(_SETTINGS)
    if implementation is not _KEEP:
        _SETTINGS.implementation = implementation
    if query_chunk_size is not None:
        _SETTINGS.query_chunk_size = query_chunk_size
    if max_score_bytes is not None:
        _SETTINGS.max_score_bytes = max_score_bytes
    try:
        yield
    finally:
        _SETTINGS.implementation = old.implementation
        _SETTINGS.query_chunk_size = old.query_chunk_size
        _SETTINGS.max_score_bytes = old.max_score_bytes


def nvidia_compute_capability(device: Any) -> tuple[int, int] | None:
    """``(major, minor)`` of an NVIDIA GPU device, ``None`` for anything else (a ROCm device
    names its architecture instead, e.g. "gfx90a"; CPUs and TPUs have none)."""
    capability = getattr(device, "compute_capability", None)
    try:
        major, minor = (int(x) for x in str(capability).split(".")[:2])
    except ValueError:
        return None
    return major, minor


def cudnn_attention_max_head_dim() -> int | None:
    """The largest head dim cuDNN's fused (flash) attention takes on the GPU being compiled for
    (:mod:`flax_latentup.models.target`): 256 on Hopper and later (compute capability >= 9.0),
    128 on Ampere/Ada (>= 8.0), ``None`` where it is not available (not an NVIDIA GPU, or an
    older one such as the T4, 7.5)."""
    from flax_latentup.models.target import target_device, target_platform

    if target_platform() != "gpu":
        return None
    capability = nvidia_compute_capability(target_device())
    if capability is None or capability < (8, 0):
        return None
    return 256 if capability[0] >= 9 else 128


def _cudnn_ok(q: Array, k: Array) -> bool:
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return False
    d = q.shape[-1]
    if d % 8 or k.shape[-1] != d:
        return False
    limit = cudnn_attention_max_head_dim()
    return limit is not None and d <= limit


def _mask_keys(s: Array, key_mask: Array | None) -> Array:
    # s [B, H, Lq, Lk], key_mask [1 or B, Lk]
    if key_mask is None:
        return s
    return jnp.where(key_mask[:, None, None, :], s, -jnp.inf)


def _full_attention(
    q: Array, k: Array, v: Array, scale: float, causal: bool, key_mask: Array | None
) -> Array:
    # q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]; softmax in float32.
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if causal:
        lq, lk = q.shape[1], k.shape[1]
        mask = jnp.arange(lq)[:, None] >= jnp.arange(lk)[None, :]
        s = jnp.where(mask, s, -jnp.inf)
    s = _mask_keys(s, key_mask)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(q.dtype)


def _chunked_attention(
    q: Array,
    k: Array,
    v: Array,
    scale: float,
    causal: bool,
    chunk: int,
    key_mask: Array | None,
) -> Array:
    b, lq, h, d = q.shape
    chunk = min(chunk, lq)
    n = -(-lq // chunk)
    pad = n * chunk - lq
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else q
    qc = qp.reshape(b, n, chunk, h, d).swapaxes(0, 1)  # [n, B, chunk, H, D]
    lk = k.shape[1]

    def one(args):
        qi, start = args
        s = jnp.einsum("bqhd,bkhd->bhqk", qi, k, preferred_element_type=jnp.float32) * scale
        if causal:
            rows = start + jnp.arange(chunk)
            s = jnp.where(rows[:, None] >= jnp.arange(lk)[None, :], s, -jnp.inf)
        s = _mask_keys(s, key_mask)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v, preferred_element_type=jnp.float32).astype(
            q.dtype
        )

    out = jax.lax.map(one, (qc, jnp.arange(n) * chunk))  # [n, B, chunk, H, D]
    out = out.swapaxes(0, 1).reshape(b, n * chunk, h, d)
    return out[:, :lq] if pad else out


def trace_settings() -> tuple:
    """The package's trace-time settings (:func:`attention_settings`, the convolution
    implementation of :func:`flax_latentup.models.conv.conv_config` and the device compiled for,
    :mod:`flax_latentup.models.target`) as one hashable value:
    the compile caches of the VAE and the pipeline key on it, so a call under other settings
    is compiled anew instead of reusing a program traced under the old ones."""
    from flax_latentup.models.conv import current_conv_implementation
    from flax_latentup.models.target import target_key

    return (attention_settings(), current_conv_implementation(), target_key())


def attention_settings() -> tuple[str | None, int, int]:
    """The current settings as a hashable ``(implementation, query_chunk_size, max_score_bytes)``.

    A function jitted by the package passes it as a static argument, so code traced under
    another :func:`attention_config` is compiled anew instead of reusing a stale program.
    """
    return (_SETTINGS.implementation, _SETTINGS.query_chunk_size, _SETTINGS.max_score_bytes)


def choose_attention_implementation(q: Array, k: Array, *, masked: bool = False) -> str:
    """The implementation :func:`attention` uses for these shapes under the current settings.

    ``masked``: a ``key_mask`` is given (the automatic choice then never picks cuDNN).
    """
    if _SETTINGS.implementation is not None:
        return _SETTINGS.implementation
    if not masked and _cudnn_ok(q, k):
        return "cudnn"
    b, lq, h, _ = q.shape
    score_bytes = 4 * b * h * lq * k.shape[1]
    return "chunked" if score_bytes > _SETTINGS.max_score_bytes else "xla"


def attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    scale: float | None = None,
    causal: bool = False,
    implementation: str | None = None,
    query_chunk_size: int | None = None,
    key_mask: Array | None = None,
) -> Array:
    """Multi-head dot-product attention, ``softmax(q k^T * scale) v`` with float32 softmax.

    Shapes: ``q [B, Lq, H, D]``, ``k, v [B, Lk, H, D]`` -> ``[B, Lq, H, D]``.
    ``causal`` masks key positions after the query position; ``key_mask`` (bool
    ``[1 or B, Lk]``, at least one true per row) hides the keys where it is false.
    ``implementation`` overrides the automatic choice (see :func:`attention_config`); the
    cuDNN kernel takes no ``key_mask``.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"attention: {name} must be [B, L, H, D], got shape {jnp.shape(x)}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
        raise ValueError(
            f"attention: k and v must be [{b}, Lk, {h}, {d}] for q of shape {q.shape}, got "
            f"k {k.shape} and v {v.shape}"
        )
    if query_chunk_size is not None and (
        isinstance(query_chunk_size, bool)
        or not isinstance(query_chunk_size, int)
        or query_chunk_size < 1
    ):
        raise ValueError(
            f"attention: query_chunk_size must be an int >= 1, got {query_chunk_size!r}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    masked = key_mask is not None
    impl = implementation or choose_attention_implementation(q, k, masked=masked)
    if impl == "xla":
        return _full_attention(q, k, v, scale, causal, key_mask)
    if impl == "chunked":
        chunk = query_chunk_size or _SETTINGS.query_chunk_size
        return _chunked_attention(q, k, v, scale, causal, chunk, key_mask)
    if impl == "cudnn":
        if masked:
            raise ValueError("the cudnn attention implementation takes no key_mask")
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=causal, implementation="cudnn"
        )
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")


# --------------------------------------------------------------------------------------------
# Timestep-conditioned group norm
# --------------------------------------------------------------------------------------------


class AdaGroupNorm(nnx.Module):
    """Group norm without affine, modulated by the time embedding (diffusers ``AdaGroupNorm``).

    ``scale, shift = split(linear(emb))`` and ``y = norm(x) * (1 + scale) + shift``; the
    statistics and the modulation are computed in float32. Param: ``linear`` (torch
    ``linear``), mapping ``embedding_dim`` to ``2 * num_channels`` (scale first, then shift).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_channels: int,
        num_groups: int,
        *,
        eps: float = 1e-5,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        if num_groups < 1 or num_channels % num_groups:
            raise ValueError(
                f"AdaGroupNorm: num_channels ({num_channels}) must be divisible by "
                f"num_groups ({num_groups})"
            )
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.linear = nnx.Linear(
            embedding_dim, 2 * num_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: Array, emb: Array) -> Array:  # x [B, ..., C], emb [B, E] -> [B, ..., C]
        b, c = x.shape[0], x.shape[-1]
        mod = self.linear(emb).astype(jnp.float32)  # [B, 2C]
        shape = (b,) + (1,) * (x.ndim - 2) + (c,)
        scale, shift = mod[:, :c].reshape(shape), mod[:, c:].reshape(shape)
        y = group_norm_affine(x, self.num_groups, self.eps, 1.0 + scale, shift)
        return y.astype(self.dtype)


# --------------------------------------------------------------------------------------------
# K-diffusion resamplers: fixed [1, 3, 3, 1] / 8 kernels, reflect padding, per channel
# --------------------------------------------------------------------------------------------

_K_TAPS = (1.0, 3.0, 3.0, 1.0)


def _reflect_pad_1(x: Array, name: str) -> Array:
    h, w = x.shape[1], x.shape[2]
    if h < 2 or w < 2:
        raise ValueError(
            f"{name}: reflect padding needs feature maps of at least 2x2 pixels, got {h}x{w}"
        )
    return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


def _taps(values: tuple[float, ...], dtype) -> list[Array]:
    return [jnp.asarray(v, dtype) for v in values]


def _down_1d(xp: Array, axis: int) -> Array:
    """Along ``axis`` of a reflect-padded map (length L): ``y[i] = sum_k t[k] * xp[2i + k]``
    with ``t = [1, 3, 3, 1] / 8``, i.e. the 4-tap filter at stride 2 (a VALID window, as the
    conv has); length ``(L - 4) // 2 + 1``."""
    n = (xp.shape[axis] - 4) // 2 + 1
    t = _taps(tuple(v / 8.0 for v in _K_TAPS), xp.dtype)

    def phase(k: int) -> Array:  # xp[k], xp[k + 2], ..., n values
        return jax.lax.slice_in_dim(xp, k, k + 2 * n - 1, 2, axis)

    return (t[0] * phase(0) + t[1] * phase(1)) + (t[2] * phase(2) + t[3] * phase(3))


def _up_1d(xp: Array, axis: int) -> Array:
    """The stride-2 transposed 4-tap filter ``t = [1, 3, 3, 1] / 4`` along ``axis`` of a
    reflect-padded map (length n + 2), cropped as diffusers' ``padding=3`` does; length 2n.

    Written as its two output phases: ``y[2m] = t3 * xp[m] + t1 * xp[m + 1]`` and
    ``y[2m + 1] = t2 * xp[m + 1] + t0 * xp[m + 2]``, interleaved.
    """
    n = xp.shape[axis] - 2
    t = _taps(tuple(v / 4.0 for v in _K_TAPS), xp.dtype)
    left, mid, right = (jax.lax.slice_in_dim(xp, k, k + n, 1, axis) for k in range(3))
    even = t[3] * left + t[1] * mid
    odd = t[2] * mid + t[0] * right
    y = jnp.stack([even, odd], axis=axis + 1)
    return y.reshape(xp.shape[:axis] + (2 * n,) + xp.shape[axis + 1 :])


def k_downsample_2d(x: Array) -> Array:
    """Halve ``x [B, H, W, C]`` (H, W >= 2) with the K-diffusion ``[1,3,3,1]/8`` filter.

    Reflect-pads by one pixel and applies the separable 4x4 kernel ``outer(t, t)`` with
    stride 2 to each channel on its own. diffusers' ``KDownsample2D`` builds the same operator
    as a dense ``[C, C, 4, 4]`` conv whose off-diagonal entries are zero; here it is two 1-D
    passes of strided slices and adds (elementwise work XLA fuses, no convolution at all).
    Returns ``[B, H//2, W//2, C]``.
    """
    xp = _reflect_pad_1(x, "k_downsample_2d")
    return _down_1d(_down_1d(xp, 1), 2)


def k_upsample_2d(x: Array) -> Array:
    """Double ``x [B, H, W, C]`` (H, W >= 2) with the K-diffusion ``[1,3,3,1]/4`` filter.

    diffusers' ``KUpsample2D`` reflect-pads by one pixel and runs a transposed conv (stride 2,
    padding 3, 4x4 kernel ``outer(t, t)`` with ``t = [1,3,3,1]/4``) with a dense ``[C, C]``
    kernel that is zero off the diagonal. The kernel is separable and per channel, so it is
    applied as two 1-D passes, each a blend of neighbouring pixels in two phases.
    Returns ``[B, 2H, 2W, C]``.
    """
    xp = _reflect_pad_1(x, "k_upsample_2d")
    return _up_1d(_up_1d(xp, 1), 2)

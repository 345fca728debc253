"""The KL autoencoder (diffusers ``AutoencoderKL``) as an NNX module, with tiled encode/decode.

Arrays are channels-last: pictures ``[B, H, W, 3]`` in [-1, 1], latents
``[B, H / f, W / f, latent_channels]`` with ``f = config.downsample_factor`` (8 for the SD VAE).
Scaling latents by ``config.scaling_factor`` is the caller's job, as in diffusers.

Every call runs through one jitted function per (model structure, input shape), so
``vae.decode(z)`` is compiled once per latent shape. Tiled calls (``tiled=True``) follow
diffusers' ``enable_tiling()`` exactly (tile sizes, overlap, linear blending, and the smaller
tiles at the right and bottom edges) but run every tile, edge tiles included, through one
program of the full tile shape: an edge tile is zero-padded to the tile size and the network
is told its valid size, so that its convolutions, group norms and attention see only the valid
part. A new picture size therefore compiles nothing new in the network.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from flax_latentup.configs import AutoencoderKLConfig
from flax_latentup.models.base import (
    PretrainedModel,
    check_array,
    check_construction,
    is_torch_tensor,
)
from flax_latentup.models.conv import (
    Conv,
    upsample2x_conv3x3,
    use_polyphase_upsample,
)
from flax_latentup.models.layers import (
    GroupNorm,
    attention,
    call_block,
    get_activation,
    trace_settings,
)
from flax_latentup.weights import KeyMap

Array = jax.Array

# diffusers' ``AutoencoderKL.tile_overlap_factor``
TILE_OVERLAP_FACTOR = 0.25
# diffusers' VAE blocks all use this GroupNorm epsilon
_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# The posterior
# --------------------------------------------------------------------------------------------


@struct.dataclass
class DiagonalGaussianDistribution:
    """The encoder's posterior ``N(mean, exp(logvar))`` per latent element (a pytree).

    ``mean, logvar: [B, h, w, latent_channels]``; ``logvar`` is clipped to [-30, 20] as in
    diffusers.
    """

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussianDistribution:
        """Split the encoder output ``[B, h, w, 2 * C]`` into mean (first half) and log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        """``exp(logvar / 2)``, ``[B, h, w, C]``."""
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        """``exp(logvar)``, ``[B, h, w, C]``."""
        return jnp.exp(self.logvar)

    def mode(self) -> Array:
        """The most likely latent (the mean), ``[B, h, w, C]``."""
        return self.mean

    def sample(self, key: Array) -> Array:
        """A latent ``mean + std * N(0, 1)``, ``[B, h, w, C]``.

        ``key``: one PRNG key for the whole batch, or ``B`` keys (``jax.random.split``), one
        per image, so that an image's draw does not depend on the batch it is in.
        """
        dtype = getattr(key, "dtype", None)
        typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
        raw = dtype == jnp.uint32 and key.ndim in (1, 2) and key.shape[-1] == 2
        if not (typed and key.ndim <= 1) and not raw:
            raise ValueError(
                "key must be a JAX PRNG key (jax.random.key(seed), or jax.random.PRNGKey) or a "
                f"batch of them (jax.random.split(key, B)), got {type(key).__name__}"
                + (f" of dtype {dtype} and shape {tuple(key.shape)}" if dtype is not None else "")
            )
        if key.ndim == (1 if typed else 2):
            if key.shape[0] != self.mean.shape[0]:
                raise ValueError(
                    f"key holds {key.shape[0]} keys for a batch of {self.mean.shape[0]} images"
                )
            shape = self.mean.shape[1:]
            noise = jax.vmap(lambda k: jax.random.normal(k, shape, self.mean.dtype))(key)
        else:
            noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Array:
        """``KL(self || other)`` per image, ``[B]`` (summed over the latent elements); against
        the standard normal when ``other`` is None. As diffusers' ``kl``: the VAE's
        regularisation term."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))

    def nll(self, sample: Array, axis: Sequence[int] | None = None) -> Array:
        """The negative log-likelihood of ``sample`` ``[B, h, w, C]`` under the posterior,
        summed over ``axis`` (default: all but the batch axis, giving ``[B]``), as diffusers'
        ``nll``."""
        sample = jnp.asarray(sample)
        if sample.shape != self.mean.shape:
            raise ValueError(
                f"sample has shape {sample.shape}, the posterior {self.mean.shape} (NHWC)"
            )
        terms = math.log(2.0 * math.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        axis = tuple(range(1, terms.ndim)) if axis is None else tuple(axis)
        return 0.5 * jnp.sum(terms, axis=axis)


def nonfinite_images(x: Array) -> Array:
    """``bool [B]``: which images of ``x: [B, ...]`` hold a NaN or an infinity.

    Meant for decoded pictures: a pipeline decoding in float16 can decode the flagged images
    again in float32 (the SD VAE overflows float16 at high resolution).
    """
    x = jnp.asarray(x)
    return ~jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))


# --------------------------------------------------------------------------------------------
# Valid region of a zero-padded tile
# --------------------------------------------------------------------------------------------


@struct.dataclass
class _Valid:
    """The top-left ``[:h, :w]`` part of a padded tile that holds data, ``hw: int32 [2]``."""

    hw: Array

    def mask(self, x: Array) -> Array:  # bool [1, H, W, 1] for x: [B, H, W, C]
        rows = jnp.arange(x.shape[1]) < self.hw[0]
        cols = jnp.arange(x.shape[2]) < self.hw[1]
        return (rows[:, None] & cols[None, :])[None, :, :, None]

    def halved(self) -> _Valid:
        # a stride-2 conv after (0, 1) padding maps n rows to n // 2
        return _Valid(self.hw // 2)

    def doubled(self) -> _Valid:
        return _Valid(self.hw * 2)


def _mask(valid: _Valid | None, x: Array) -> Array | None:
    return None if valid is None else valid.mask(x)


def _zero_outside(x: Array, valid: _Valid | None) -> Array:
    """Zero what lies outside the valid part, so a convolution sees torch's zero padding."""
    if valid is None:
        return x
    return jnp.where(valid.mask(x), x, jnp.zeros((), x.dtype))


# --------------------------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------------------------


def _conv(cin: int, cout: int, kernel: int, *, stride: int = 1, padding, rngs, dtype, param_dtype):
    return Conv(
        cin,
        cout,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


_SAME3 = ((1, 1), (1, 1))


class ResnetBlock2D(nnx.Module):
    """norm1 → act → conv1 → norm2 → act → conv2, plus a (1x1-projected) shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        act: Callable[[Array], Array],
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = dict(eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.act = act
        self.norm1 = GroupNorm(groups, in_channels, **norm)
        self.conv1 = _conv(in_channels, out_channels, 3, padding=_SAME3, **kw)
        self.norm2 = GroupNorm(groups, out_channels, **norm)
        self.conv2 = _conv(out_channels, out_channels, 3, padding=_SAME3, **kw)
        self.conv_shortcut = (
            _conv(in_channels, out_channels, 1, padding="VALID", **kw)
            if in_channels != out_channels
            else None
        )

    def __call__(self, x: Array, valid: _Valid | None = None) -> Array:  # [B, H, W, Cin]
        mask = _mask(valid, x)
        h = self.conv1(_zero_outside(self.act(self.norm1(x, mask)), valid))
        h = self.conv2(_zero_outside(self.act(self.norm2(h, mask)), valid))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h  # [B, H, W, Cout]


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all positions, with a group norm and a residual.

    diffusers ``Attention`` as the VAE builds it (``group_norm``, ``residual_connection``,
    ``rescale_output_factor=1``, one head of ``channels`` dims); the score matrix is never
    materialised whole for long sequences (see :func:`~flax_latentup.models.layers.attention`).
    """

    def __init__(self, channels: int, *, groups: int, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(
            groups, channels, eps=_EPS, dtype=dtype, param_dtype=param_dtype
        )
        self.to_q = nnx.Linear(channels, channels, **kw)
        self.to_k = nnx.Linear(channels, channels, **kw)
        self.to_v = nnx.Linear(channels, channels, **kw)
        self.to_out = nnx.List([nnx.Linear(channels, channels, **kw)])

    def __call__(self, x: Array, valid: _Valid | None = None) -> Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        mask = _mask(valid, x)
        hs = self.group_norm(x, mask).reshape(b, h * w, c)
        heads = (b, h * w, 1, c)
        q = self.to_q(hs).reshape(heads)
        k = self.to_k(hs).reshape(heads)
        v = self.to_v(hs).reshape(heads)
        key_mask = None if mask is None else mask.reshape(1, h * w)
        out = attention(q, k, v, key_mask=key_mask).reshape(b, h * w, c)
        return self.to_out[0](out).reshape(b, h, w, c) + x


class UNetMidBlock2D(nnx.Module):
    """resnet → (attention) → resnet at the lowest resolution."""

    def __init__(
        self, channels: int, *, groups: int, act, add_attention: bool, rngs, dtype, param_dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [ResnetBlock2D(channels, channels, groups=groups, act=act, **kw) for _ in range(2)]
        )
        self.attentions = (
            nnx.List([AttentionBlock(channels, groups=groups, **kw)]) if add_attention else None
        )
        self.remat = False  # see PretrainedModel.set_remat

    def __call__(self, x: Array, valid: _Valid | None = None) -> Array:
        x = call_block(self.resnets[0], x, valid, remat=self.remat)
        if self.attentions is not None:
            x = call_block(self.attentions[0], x, valid, remat=self.remat)
        return call_block(self.resnets[1], x, valid, remat=self.remat)


class Downsample2D(nnx.Module):
    """Zero-pad one row/column at the bottom/right, then a 3x3 stride-2 convolution."""

    def __init__(self, channels: int, *, rngs, dtype, param_dtype):
        self.conv = _conv(
            channels,
            channels,
            3,
            stride=2,
            padding=((0, 1), (0, 1)),
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def __call__(self, x: Array, valid: _Valid | None = None) -> Array:  # [B, H, W, C]
        return self.conv(_zero_outside(x, valid))  # [B, H // 2, W // 2, C]


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs, dtype, param_dtype):
        self.conv = _conv(
            channels, channels, 3, padding=_SAME3, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def __call__(self, x: Array, valid: _Valid | None = None) -> Array:  # [B, H, W, C]
        if use_polyphase_upsample(x.dtype):
            # The same operator without the 4x larger repeated map (flax_latentup.models.conv);
            # zeroing outside the valid part commutes with the repeat.
            conv = self.conv
            x = _zero_outside(x, valid).astype(conv.dtype or x.dtype)
            y = upsample2x_conv3x3(x, conv.kernel[...].astype(x.dtype), precision=conv.precision)
            return y + conv.bias[...].astype(y.dtype)
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        x = x.reshape(b, 2 * h, 2 * w, c)
        return self.conv(_zero_outside(x, None if valid is None else valid.doubled()))


class DownEncoderBlock2D(nnx.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        layers: int,
        downsample: bool,
        groups,
        act,
        rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, act=act, **kw)
                for i in range(layers)
            ]
        )
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)]) if downsample else None
        self.remat = False  # see PretrainedModel.set_remat

    def __call__(self, x: Array, valid: _Valid | None) -> tuple[Array, _Valid | None]:
        for resnet in self.resnets:
            x = call_block(resnet, x, valid, remat=self.remat)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x, valid)
            valid = None if valid is None else valid.halved()
        return x, valid


class UpDecoderBlock2D(nnx.Module):
    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        layers: int,
        upsample: bool,
        groups,
        act,
        rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(cin if i == 0 else cout, cout, groups=groups, act=act, **kw)
                for i in range(layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(cout, **kw)]) if upsample else None
        self.remat = False  # see PretrainedModel.set_remat

    def __call__(self, x: Array, valid: _Valid | None) -> tuple[Array, _Valid | None]:
        for resnet in self.resnets:
            x = call_block(resnet, x, valid, remat=self.remat)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, valid)
            valid = None if valid is None else valid.doubled()
        return x, valid


class Encoder(nnx.Module):
    """Pictures ``[B, H, W, in_channels]`` -> moments ``[B, H/f, W/f, 2 * latent_channels]``."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        blocks = dict(groups=cfg.norm_num_groups, act=get_activation(cfg.act_fn), **kw)
        ch = cfg.block_out_channels
        self.act = blocks["act"]
        self.conv_in = _conv(cfg.in_channels, ch[0], 3, padding=_SAME3, **kw)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock2D(
                    ch[max(i - 1, 0)],
                    ch[i],
                    layers=cfg.layers_per_block,
                    downsample=i < len(ch) - 1,
                    **blocks,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = UNetMidBlock2D(ch[-1], add_attention=cfg.mid_block_add_attention, **blocks)
        self.conv_norm_out = GroupNorm(
            cfg.norm_num_groups, ch[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype
        )
        self.conv_out = _conv(ch[-1], 2 * cfg.latent_channels, 3, padding=_SAME3, **kw)

    def __call__(self, x: Array, valid: _Valid | None = None) -> Array:
        x = self.conv_in(_zero_outside(x, valid))
        for block in self.down_blocks:
            x, valid = block(x, valid)
        x = self.mid_block(x, valid)
        x = self.act(self.conv_norm_out(x, _mask(valid, x)))
        return self.conv_out(_zero_outside(x, valid))


class Decoder(nnx.Module):
    """Latents ``[B, h, w, latent_channels]`` -> pictures ``[B, h*f, w*f, out_channels]``."""

    def __init__(self, cfg: AutoencoderKLConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        blocks = dict(groups=cfg.norm_num_groups, act=get_activation(cfg.act_fn), **kw)
        rev = tuple(reversed(cfg.block_out_channels))
        self.act = blocks["act"]
        self.conv_in = _conv(cfg.latent_channels, rev[0], 3, padding=_SAME3, **kw)
        self.mid_block = UNetMidBlock2D(rev[0], add_attention=cfg.mid_block_add_attention, **blocks)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock2D(
                    rev[max(i - 1, 0)],
                    rev[i],
                    layers=cfg.layers_per_block + 1,
                    upsample=i < len(rev) - 1,
                    **blocks,
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = GroupNorm(
            cfg.norm_num_groups, rev[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype
        )
        self.conv_out = _conv(rev[-1], cfg.out_channels, 3, padding=_SAME3, **kw)

    def __call__(self, z: Array, valid: _Valid | None = None) -> Array:
        x = self.conv_in(_zero_outside(z, valid))
        x = self.mid_block(x, valid)
        for block in self.up_blocks:
            x, valid = block(x, valid)
        x = self.act(self.conv_norm_out(x, _mask(valid, x)))
        return self.conv_out(_zero_outside(x, valid))


# --------------------------------------------------------------------------------------------
# Checkpoint key spellings
# --------------------------------------------------------------------------------------------

# diffusers < 0.14 saved the mid-block attention as query/key/value/proj_attn.
_OLD_ATTENTION = re.compile(
    r"^((?:encoder|decoder)\.mid_block\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)$"
)
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTENTION_WEIGHT = re.compile(
    r"^(?:encoder|decoder)\.mid_block\.attentions\.\d+\.(?:to_q|to_k|to_v|to_out\.0)\.weight$"
)


def _vae_rename(key: str) -> str:
    m = _OLD_ATTENTION.match(key)
    if m is None:
        return key
    prefix, name, kind = m.groups()
    return f"{prefix}{_NEW_NAMES[name]}.{kind}"


def _vae_reshape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # Older checkpoints store the attention projections as 1x1 convolutions [C, C, 1, 1]
    # (or conv1d [C, C, 1]); they are the same linear maps.
    if _ATTENTION_WEIGHT.match(key) and len(shape) in (3, 4) and all(s == 1 for s in shape[2:]):
        return tuple(shape[:2])
    return shape


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, static_argnames=("part", "settings"))
def _run(graphdef, state, x: Array, valid_hw: Array | None, *, part: str, settings):
    """Encoder or decoder network on ``x``; ``valid_hw`` marks the valid part of a padded tile.

    ``settings`` (:func:`~flax_latentup.models.layers.trace_settings` at call time) only keys
    the compile cache.
    """
    del settings
    model = nnx.merge(graphdef, state)
    valid = None if valid_hw is None else _Valid(valid_hw)
    if part == "encode":
        return model._encode_moments(x, valid)
    return model._decode_pixels(x, valid)


def _check_input(name: str, x, channels: int, multiple: int = 1) -> None:
    """Python-side checks, before anything is traced: a ValueError naming ``name``."""
    if is_torch_tensor(x):
        check_array(name, x)  # names it as a torch tensor
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{name} must be a 4-D array [batch, height, width, channels] (channels last), "
            f"got shape {shape}"
        )
    if shape[-1] != channels:
        hint = (
            "; it looks channels-first (NCHW): transpose it to NHWC" if shape[1] == channels else ""
        )
        raise ValueError(
            f"{name} must have {channels} channels on its last axis (NHWC), got shape "
            f"{tuple(shape)}{hint}"
        )
    if min(shape) == 0:
        raise ValueError(f"{name} is empty: shape {tuple(shape)}")
    check_array(name, x)
    if shape[1] % multiple or shape[2] % multiple:
        raise ValueError(
            f"{name} height and width must be multiples of {multiple} (the encoder halves them "
            f"{multiple.bit_length() - 1} times), got {shape[1]}x{shape[2]}"
        )
    if isinstance(x, jax.core.Tracer):
        return
    finite = np.isfinite(x).all() if isinstance(x, np.ndarray) else jnp.isfinite(x).all()
    if not bool(finite):
        raise ValueError(f"{name} contains NaN or infinite values")


def _tile_sharding(x, state) -> NamedSharding | None:
    """Where the tiles of ``x`` go: ``None`` (where the weights ``state`` are) unless ``x`` is
    a concrete array whose batch axis is split over several devices that all hold the weights;
    its tiles are then split the same way (the tile program runs on all of them at once)."""
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return None
    sharding = x.sharding
    if not isinstance(sharding, NamedSharding) or len(sharding.device_set) < 2:
        return None
    batch_axes = sharding.spec[0] if len(sharding.spec) else None
    if batch_axes is None:  # each device holds the whole batch: nothing to split
        return None
    devices = sharding.device_set
    for w in jax.tree.leaves(state):
        # weights elsewhere (or not yet placed) would be copied to the devices at every tile
        if not (isinstance(w, jax.Array) and w.committed and w.sharding.device_set == devices):
            return None
    return NamedSharding(sharding.mesh, PartitionSpec(batch_axes))


def _blend(a, b, extent: int, axis: int, xp):
    """``b`` whose first ``extent`` rows (``axis``) fade in linearly from ``a``'s last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    ramp = np.arange(extent) / extent
    shape = [1] * b.ndim
    shape[axis] = extent
    w_b = ramp.astype(b.dtype).reshape(shape)
    w_a = (1.0 - ramp).astype(b.dtype).reshape(shape)

    def rows(start, stop):
        index = [slice(None)] * b.ndim
        index[axis] = slice(start, stop)
        return tuple(index)

    n = a.shape[axis]
    mixed = a[rows(n - extent, n)] * w_a + b[rows(0, extent)] * w_b
    return xp.concatenate([mixed, b[rows(extent, None)]], axis=axis)


def _assemble(rows: list[list], extent: int, keep: int, xp):
    """Blend each tile with the (already blended) tiles above and to its left, crop each to
    ``keep x keep`` and concatenate: diffusers' ``tiled_decode``/``_tiled_encode`` order."""
    out_rows = []
    for i, row in enumerate(rows):
        for j in range(len(row)):
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], extent, 1, xp)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], extent, 2, xp)
        out_rows.append(xp.concatenate([t[:, :keep, :keep] for t in row], axis=2))
    return xp.concatenate(out_rows, axis=1)


class FlaxAutoencoderKL(nnx.Module, PretrainedModel):
    """The KL autoencoder of Stable Diffusion (diffusers ``AutoencoderKL``), channels-last.

    ``encode(x: [B, H, W, 3])`` -> :class:`DiagonalGaussianDistribution` over latents
    ``[B, H/f, W/f, latent_channels]``; ``decode(z: [B, h, w, latent_channels])`` ->
    ``[B, h*f, w*f, 3]``, where ``f = config.downsample_factor``. Both accept
    ``tiled=True`` (diffusers' ``enable_tiling()``): inputs larger than one tile are cut into
    tiles of ``tile_sample_size`` pixels (default ``config.sample_size``; latent tiles of
    ``tile_sample_size / f``) overlapping by a quarter, each run through one compiled
    program of the tile's shape, and blended linearly; an input that fits in one tile is
    processed whole, exactly as without tiling. A tiled call on an input whose batch is split
    over several devices (a ``NamedSharding``), with the weights replicated on those devices
    (``nnx.split`` the model, ``jax.device_put(state, NamedSharding(mesh, P()))``, merge),
    splits every tile the same way, so that all of them work on the tiles at once; otherwise
    the tiles run where the weights are.
    """

    config_class = AutoencoderKLConfig
    torch_weights_names = ("diffusion_pytorch_model.safetensors",)
    key_map = KeyMap(rename=_vae_rename, reshape=_vae_reshape)

    def __init__(
        self,
        config: AutoencoderKLConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        dtype, param_dtype = check_construction(type(self), config, dtype, param_dtype)
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        moments = 2 * config.latent_channels
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        self.quant_conv = (
            _conv(moments, moments, 1, padding="VALID", **kw) if config.use_quant_conv else None
        )
        self.post_quant_conv = (
            _conv(config.latent_channels, config.latent_channels, 1, padding="VALID", **kw)
            if config.use_post_quant_conv
            else None
        )

    # The networks (traced inside ``_run``) -----------------------------------------------

    def _encode_moments(self, x: Array, valid: _Valid | None = None) -> Array:
        h = self.encoder(x, valid)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode_pixels(self, z: Array, valid: _Valid | None = None) -> Array:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, valid)

    # Public calls ---------------------------------------------------------------------------

    def tile_sizes(self, tile_sample_size: int | None = None) -> tuple[int, int]:
        """``(pixel tile size, latent tile size)`` per side used by tiled calls.

        ``tile_sample_size`` defaults to ``config.sample_size`` and must be a multiple of
        ``4 * downsample_factor`` (32 for the SD VAE), so that the quarter overlap is a whole
        number of latents and tiles line up on the latent grid.
        """
        f = self.config.downsample_factor
        size = self.config.sample_size if tile_sample_size is None else tile_sample_size
        if not isinstance(size, int | np.integer) or size <= 0 or size % (4 * f):
            source = "config.sample_size" if tile_sample_size is None else "tile_sample_size"
            raise ValueError(
                f"tile_sample_size ({source} = {size!r}) must be a positive multiple of "
                f"{4 * f} (4 x the downsample factor {f})"
            )
        return int(size), int(size) // f

    def encode(
        self, x: Array, *, tiled: bool = False, tile_sample_size: int | None = None
    ) -> DiagonalGaussianDistribution:
        """Encode pictures ``x: [B, H, W, in_channels]`` (values in [-1, 1]).

        ``H`` and ``W`` must be multiples of ``config.downsample_factor``. Returns the
        posterior over latents ``[B, H/f, W/f, latent_channels]``. ``tiled``: see the class
        docstring.
        """
        f = self.config.downsample_factor
        _check_input("x", x, self.config.in_channels, f)
        if tiled:
            tile, tile_latent = self.tile_sizes(tile_sample_size)
            if x.shape[1] > tile or x.shape[2] > tile:
                moments = self._tiled(x, "encode", tile, tile_latent, lambda n: n // f)
                return DiagonalGaussianDistribution.from_moments(moments)
        return DiagonalGaussianDistribution.from_moments(self._call("encode", x))

    def decode(
        self, z: Array, *, tiled: bool = False, tile_sample_size: int | None = None
    ) -> Array:
        """Decode latents ``z: [B, h, w, latent_channels]`` to pictures ``[B, h*f, w*f, out]``.

        The output has the model's ``dtype``. ``tiled``: see the class docstring.
        """
        f = self.config.downsample_factor
        _check_input("z", z, self.config.latent_channels)
        if tiled:
            tile, tile_latent = self.tile_sizes(tile_sample_size)
            if z.shape[1] > tile_latent or z.shape[2] > tile_latent:
                return self._tiled(z, "decode", tile_latent, tile, lambda n: n * f)
        return self._call("decode", z)

    def _call(self, part: str, x: Array, valid_hw: Array | None = None) -> Array:
        graphdef, state = nnx.split(self)
        return _run(graphdef, state, x, valid_hw, part=part, settings=trace_settings())

    def _tiled(
        self, x: Array, part: str, tile_in: int, tile_out: int, out_size: Callable[[int], int]
    ) -> Array:
        """diffusers' tiling: tiles of ``tile_in`` every ``3/4 tile_in``, outputs of
        ``tile_out`` blended over ``tile_out / 4`` and cropped to ``3/4 tile_out``."""
        step = int(tile_in * (1 - TILE_OVERLAP_FACTOR))
        extent = int(tile_out * TILE_OVERLAP_FACTOR)
        keep = tile_out - extent
        b, height, width, c = x.shape
        # Concrete inputs are cut and blended with numpy on the host, so that a new picture
        # size compiles nothing at all; under an outer trace the same steps run in jnp.
        xp = jnp if isinstance(x, jax.core.Tracer) else np
        # An input whose batch is split over the devices that hold the weights has its tiles
        # split the same way.
        graphdef, state = nnx.split(self)
        placement = _tile_sharding(x, state)
        # Zero padding past the bottom/right edges makes every tile a fixed-shape slice whose
        # part beyond the picture is zero; the network is told the valid size.
        padded = xp.pad(xp.asarray(x), ((0, 0), (0, tile_in), (0, tile_in), (0, 0)))
        key = trace_settings()
        rows = []
        for i in range(0, height, step):
            row = []
            for j in range(0, width, step):
                vh, vw = min(tile_in, height - i), min(tile_in, width - j)
                tile = padded[:, i : i + tile_in, j : j + tile_in]
                if placement is not None:
                    tile = jax.device_put(tile, placement)
                valid = np.asarray([vh, vw], np.int32)
                out = _run(graphdef, state, tile, valid, part=part, settings=key)
                row.append((out, out_size(vh), out_size(vw)))
            rows.append(row)
        # all tiles are dispatched before the first one is waited for
        rows = [[xp.asarray(out)[:, :oh, :ow] for out, oh, ow in row] for row in rows]
        return jnp.asarray(_assemble(rows, extent, keep, xp))

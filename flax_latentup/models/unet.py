"""The K-diffusion UNet of the x2 latent upscaler (diffusers ``UNet2DConditionModel`` with
``KDownBlock2D`` / ``KCrossAttnDownBlock2D`` / ``KCrossAttnUpBlock2D`` / ``KUpBlock2D``) as an
NNX module, channels-last.

Attribute names follow the torch state dict, so the checkpoint maps onto the module by the
rule table of :mod:`flax_latentup.weights` alone. The resamplers have no weights (diffusers
keeps their fixed kernels as non-persistent buffers) and run as depthwise convs.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_latentup.configs import AttentionPlan, BlockPlan, ResnetPlan, UNet2DConditionConfig
from flax_latentup.models.base import PretrainedModel, check_array, check_construction
from flax_latentup.models.conv import Conv
from flax_latentup.models.layers import (
    AdaGroupNorm,
    LayerNorm,
    attention,
    call_block,
    get_activation,
    k_downsample_2d,
    k_upsample_2d,
)
from flax_latentup.weights import FixedParam, KeyMap

Array = jax.Array


def _linear(d_in: int, d_out: int, *, rngs, dtype, param_dtype, use_bias=True) -> nnx.Linear:
    return nnx.Linear(
        d_in, d_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


def _conv(c_in: int, c_out: int, k: int, *, rngs, dtype, param_dtype, use_bias=True) -> Conv:
    p = (k - 1) // 2
    return Conv(
        c_in,
        c_out,
        kernel_size=(k, k),
        padding=((p, p), (p, p)),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


# --------------------------------------------------------------------------------------------
# Time embedding
# --------------------------------------------------------------------------------------------


class GaussianFourierProjection(nnx.Module):
    """``[cos, sin](2π t w)`` (or ``[sin, cos]``) of a fixed random vector ``weight [D]``.

    diffusers' UNet builds it with ``log=False``: the timestep is used as given (the pipeline
    already passes ``log(σ) / 4``). Computed in float32; returns ``[B, 2D]``.
    """

    def __init__(self, size: int, *, flip_sin_to_cos: bool, rngs: nnx.Rngs, param_dtype):
        self.flip_sin_to_cos = flip_sin_to_cos
        # fixed, as in diffusers (requires_grad=False): loaded and saved, never trained
        self.weight = FixedParam(jax.random.normal(rngs.params(), (size,), param_dtype))

    def __call__(self, t: Array) -> Array:  # [B] -> [B, 2D]
        w = self.weight[...].astype(jnp.float32)
        proj = t.astype(jnp.float32)[:, None] * w[None, :] * 2 * math.pi
        parts = (jnp.cos(proj), jnp.sin(proj))
        return jnp.concatenate(parts if self.flip_sin_to_cos else parts[::-1], axis=-1)


class TimestepEmbedding(nnx.Module):
    """``post_act(linear_2(act(linear_1(t_emb + cond_proj(timestep_cond)))))``."""

    def __init__(self, cfg: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.time_embed_dim
        self.linear_1 = _linear(d, d, **kw)
        self.cond_proj = (
            _linear(cfg.time_cond_proj_dim, d, use_bias=False, **kw)
            if cfg.time_cond_proj_dim is not None
            else None
        )
        self.act = get_activation(cfg.act_fn)
        self.linear_2 = _linear(d, d, **kw)
        self.post_act = get_activation(cfg.timestep_post_act) if cfg.timestep_post_act else None

    def __call__(self, t_emb: Array, cond: Array | None) -> Array:  # [B, D], [B, P] -> [B, D]
        if cond is not None:
            t_emb = t_emb + self.cond_proj(cond)
        emb = self.linear_2(self.act(self.linear_1(t_emb)))
        return self.post_act(emb) if self.post_act is not None else emb


# --------------------------------------------------------------------------------------------
# ResNet and attention blocks
# --------------------------------------------------------------------------------------------


class ResnetBlockCondNorm2D(nnx.Module):
    """AdaGroupNorm -> act -> conv3x3 -> AdaGroupNorm -> act -> conv3x3, plus a (bias-free)
    1x1 shortcut where the channel count changes."""

    def __init__(
        self, plan: ResnetPlan, cfg: UNet2DConditionConfig, *, rngs: nnx.Rngs, dtype, param_dtype
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        temb = cfg.time_embed_dim
        self.act = get_activation(cfg.act_fn)
        self.norm1 = AdaGroupNorm(temb, plan.in_channels, plan.groups, eps=cfg.norm_eps, **kw)
        self.conv1 = _conv(plan.in_channels, plan.mid_channels, 3, **kw)
        self.norm2 = AdaGroupNorm(temb, plan.mid_channels, plan.groups_out, eps=cfg.norm_eps, **kw)
        self.conv2 = _conv(plan.mid_channels, plan.out_channels, 3, **kw)
        self.conv_shortcut = (
            _conv(plan.in_channels, plan.out_channels, 1, use_bias=False, **kw)
            if plan.in_channels != plan.out_channels
            else None
        )

    def __call__(self, x: Array, emb: Array) -> Array:  # [B, H, W, Cin], [B, E] -> [B, H, W, Cout]
        h = self.conv1(self.act(self.norm1(x, emb)))
        h = self.conv2(self.act(self.norm2(h, emb)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nnx.Module):
    """Multi-head attention with biased projections (diffusers ``Attention``, ``bias=True``).

    With ``cross_attention_dim`` set, keys and values come from the context after a LayerNorm
    (``norm_cross``, diffusers' ``cross_attention_norm="layer_norm"``). The scale is
    ``head_dim ** -0.5``.
    """

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        *,
        cross_attention_dim: int | None,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        inner = heads * head_dim
        kv_dim = cross_attention_dim or query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.norm_cross = (
            LayerNorm(cross_attention_dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
            if cross_attention_dim is not None
            else None
        )
        self.to_q = _linear(query_dim, inner, **kw)
        self.to_k = _linear(kv_dim, inner, **kw)
        self.to_v = _linear(kv_dim, inner, **kw)
        self.to_out = nnx.List([_linear(inner, query_dim, **kw)])

    def __call__(self, x: Array, context: Array | None = None) -> Array:  # [B, L, C] -> [B, L, C]
        if context is None:
            context = x
        elif self.norm_cross is not None:
            context = self.norm_cross(context)
        b = x.shape[0]
        q = self.to_q(x).reshape(b, x.shape[1], self.heads, self.head_dim)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, self.head_dim)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, self.head_dim)
        out = attention(q, k, v, scale=self.head_dim**-0.5)
        return self.to_out[0](out.reshape(b, x.shape[1], self.heads * self.head_dim))


class KAttentionBlock(nnx.Module):
    """Optional self-attention, then cross-attention to the text, each after an AdaGroupNorm
    and added to the input (no feed-forward)."""

    def __init__(
        self,
        plan: AttentionPlan,
        cfg: UNet2DConditionConfig,
        *,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        shape = (plan.dim, plan.heads, plan.head_dim)
        temb = cfg.time_embed_dim
        # diffusers leaves these AdaGroupNorms at their default eps, whatever norm_eps is
        if plan.self_attention:
            self.norm1 = AdaGroupNorm(temb, plan.dim, plan.groups, **kw)
            self.attn1 = Attention(*shape, cross_attention_dim=None, **kw)
        else:
            self.norm1 = self.attn1 = None
        self.norm2 = AdaGroupNorm(temb, plan.dim, plan.groups, **kw)
        self.attn2 = Attention(*shape, cross_attention_dim=cfg.cross_attention_dim, **kw)

    def __call__(self, x: Array, emb: Array, context: Array) -> Array:  # [B, H, W, C]
        b, h, w, c = x.shape
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x, emb).reshape(b, h * w, c)).reshape(x.shape)
        return x + self.attn2(self.norm2(x, emb).reshape(b, h * w, c), context).reshape(x.shape)


# --------------------------------------------------------------------------------------------
# Down and up blocks
# --------------------------------------------------------------------------------------------


class KBlock(nnx.Module):
    """One down or up block: ResNets (each followed by its attention block where the block has
    them), then the K resampler. ``resnets``/``attentions`` as in the torch state dict."""

    def __init__(
        self,
        plan: BlockPlan,
        cfg: UNet2DConditionConfig,
        *,
        rngs: nnx.Rngs,
        dtype,
        param_dtype,
    ):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.resample = plan.resample
        self.skips = plan.skips
        self.remat = False  # see PretrainedModel.set_remat
        self.resnets = nnx.List([ResnetBlockCondNorm2D(r, cfg, **kw) for r in plan.resnets])
        self.attentions = (
            nnx.List([KAttentionBlock(a, cfg, **kw) for a in plan.attentions])
            if plan.attentions
            else None
        )

    def _layers(self, x: Array, emb: Array, context: Array) -> tuple[Array, list[Array]]:
        outputs = []
        for j, resnet in enumerate(self.resnets):
            x = call_block(resnet, x, emb, remat=self.remat)
            if self.attentions is not None:
                x = call_block(self.attentions[j], x, emb, context, remat=self.remat)
            outputs.append(x)
        return x, outputs

    def down(self, x: Array, emb: Array, context: Array) -> tuple[Array, list[Array | None]]:
        """``x [B, H, W, C]`` -> (output, at half size where the block resamples; the skips)."""
        x, outputs = self._layers(x, emb, context)
        skips = outputs if self.skips else [None] * len(outputs)
        return (k_downsample_2d(x) if self.resample else x), skips

    def up(self, x: Array, skip: Array | None, emb: Array, context: Array) -> Array:
        """Concatenate the skip (if any) on channels, run the layers, double the size."""
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        x, _ = self._layers(x, emb, context)
        return k_upsample_2d(x) if self.resample else x


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------

_RESAMPLER_BUFFER = re.compile(r"^(down|up)_blocks\.\d+\.(down|up)samplers\.0\.kernel$")


class FlaxUNet2DConditionModel(nnx.Module, PretrainedModel):
    """The K-diffusion UNet of the x2 latent upscaler, channels-last.

    Call with ``sample [B, H, W, in_channels]``, ``timestep`` (float ``[B]``, ``[1]`` or a
    scalar; the upscaler passes ``log(σ) / 4``), ``encoder_hidden_states [B, L,
    cross_attention_dim]`` and ``timestep_cond [B, time_cond_proj_dim]`` (optional, as in
    diffusers: without it the condition projection is skipped). Returns ``[B, H, W,
    out_channels]`` in the compute dtype. H and W must be multiples of ``2**num_resamplers``
    (8 for the published config) and at least twice that: the reflect-padded resamplers need
    two pixels at the deepest level (diffusers fails at 8x8 for the same reason).

    Matches diffusers' ``UNet2DConditionModel`` at the K-block configs; see
    :class:`~flax_latentup.configs.UNet2DConditionConfig` for what the config may hold.
    """

    config_class = UNet2DConditionConfig
    torch_weights_names = ("diffusion_pytorch_model.safetensors",)
    # The resampler kernels are buffers (fixed values); some checkpoints may store them.
    key_map = KeyMap(ignore=lambda k: bool(_RESAMPLER_BUFFER.match(k)))

    def __init__(
        self,
        config: UNet2DConditionConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        dtype, param_dtype = check_construction(type(self), config, dtype, param_dtype)
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        boc = config.block_out_channels
        self.conv_in = _conv(config.in_channels, boc[0], config.conv_in_kernel, **kw)
        self.time_proj = GaussianFourierProjection(
            config.time_embed_dim // 2,
            flip_sin_to_cos=config.flip_sin_to_cos,
            rngs=rngs,
            param_dtype=param_dtype,
        )
        self.time_embedding = TimestepEmbedding(config, **kw)
        self.time_embed_act = (
            get_activation(config.time_embedding_act_fn) if config.time_embedding_act_fn else None
        )
        self.down_blocks = nnx.List([KBlock(p, config, **kw) for p in config.down_plans()])
        self.up_blocks = nnx.List([KBlock(p, config, **kw) for p in config.up_plans()])
        self.conv_out = _conv(boc[0], config.out_channels, config.conv_out_kernel, **kw)

    # ---------------------------------------------------------------- input checks

    def check_inputs(
        self,
        sample,
        timestep,
        encoder_hidden_states,
        timestep_cond=None,
    ) -> None:
        """Raise a ValueError naming the argument whose type, dtype or shape does not fit the
        model: arrays of floats (numpy or JAX, channels last), a numeric timestep."""
        cfg = self.config
        for name, x in (
            ("sample", sample),
            ("timestep", timestep),
            ("encoder_hidden_states", encoder_hidden_states),
            ("timestep_cond", timestep_cond),
        ):
            if x is not None:
                check_array(name, x, "number" if name == "timestep" else "floating")
        shape = getattr(sample, "shape", None)
        if shape is None or len(shape) != 4:
            raise ValueError(
                f"sample must be an array [batch, height, width, channels] (NHWC), got shape {shape}"
            )
        b, h, w, c = shape
        if b < 1:
            raise ValueError(f"sample holds no images (a batch of 0, shape {shape})")
        if c != cfg.in_channels:
            raise ValueError(
                f"sample has {c} channels in its last axis, the model takes in_channels="
                f"{cfg.in_channels} (arrays are NHWC: [batch, height, width, channels])"
            )
        step, least = cfg.sample_sides
        if h % step or w % step or h < least or w < least:
            raise ValueError(
                f"sample height and width must be multiples of {step} and at least {least} "
                f"(the K resamplers halve and double {cfg.num_resamplers} times and reflect-pad "
                f"by one pixel), got {h}x{w}"
            )
        t_shape = tuple(np.shape(timestep))
        if t_shape not in ((), (1,), (b,)):
            raise ValueError(
                f"timestep must be a scalar or have shape [batch] = [{b}] (or [1]), got {t_shape}"
            )
        e_shape = getattr(encoder_hidden_states, "shape", None)
        if e_shape is None or len(e_shape) != 3:
            raise ValueError(
                "encoder_hidden_states must be an array [batch, length, cross_attention_dim], "
                f"got shape {e_shape}"
            )
        if e_shape[0] != b:
            raise ValueError(f"encoder_hidden_states has batch size {e_shape[0]}, sample has {b}")
        if e_shape[2] != cfg.cross_attention_dim:
            raise ValueError(
                f"encoder_hidden_states has width {e_shape[2]}, the model takes "
                f"cross_attention_dim={cfg.cross_attention_dim}"
            )
        if timestep_cond is None:
            return
        if cfg.time_cond_proj_dim is None:
            raise ValueError("timestep_cond was given but the model has no time_cond_proj_dim")
        c_shape = getattr(timestep_cond, "shape", None)
        if c_shape is None or len(c_shape) != 2:
            raise ValueError(
                f"timestep_cond must be an array [batch, time_cond_proj_dim], got shape {c_shape}"
            )
        if c_shape[0] != b:
            raise ValueError(f"timestep_cond has batch size {c_shape[0]}, sample has {b}")
        if c_shape[1] != cfg.time_cond_proj_dim:
            raise ValueError(
                f"timestep_cond has width {c_shape[1]}, the model takes "
                f"time_cond_proj_dim={cfg.time_cond_proj_dim}"
            )

    # ---------------------------------------------------------------- forward

    def __call__(
        self,
        sample: Array,  # [B, H, W, in_channels]
        timestep: Array | float,  # [B], [1] or scalar
        encoder_hidden_states: Array,  # [B, L, cross_attention_dim]
        timestep_cond: Array | None = None,  # [B, time_cond_proj_dim]
    ) -> Array:  # [B, H, W, out_channels]
        """Predict the model output for ``sample`` at ``timestep`` given the text context."""
        self.check_inputs(sample, timestep, encoder_hidden_states, timestep_cond)
        b = sample.shape[0]
        x = jnp.asarray(sample).astype(self.dtype)
        if self.config.center_input_sample:
            x = 2 * x - 1.0
        t = jnp.broadcast_to(jnp.reshape(jnp.asarray(timestep, jnp.float32), (-1,)), (b,))
        t_emb = self.time_proj(t).astype(self.dtype)
        cond = None if timestep_cond is None else jnp.asarray(timestep_cond).astype(self.dtype)
        emb = self.time_embedding(t_emb, cond)
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        context = jnp.asarray(encoder_hidden_states)

        x = self.conv_in(x)
        skips: list[Array | None] = [x]
        for block in self.down_blocks:
            x, states = block.down(x, emb, context)
            skips += states
        for block in self.up_blocks:
            # as diffusers: each up block takes as many skips as it has ResNets, uses the last
            taken = skips[-len(block.resnets) :]
            del skips[-len(block.resnets) :]
            x = block.up(x, taken[-1], emb, context)
        return self.conv_out(x)

"""The CLIP text encoder (transformers ``CLIPTextModel``) as an NNX module."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from flax_latentup.configs import CLIPTextConfig
from flax_latentup.models.base import (
    PretrainedModel,
    check_array,
    check_construction,
    is_torch_tensor,
)
from flax_latentup.models.layers import LayerNorm, attention, call_block, get_activation
from flax_latentup.weights import KeyMap

Array = jax.Array


@struct.dataclass
class CLIPTextOutput:
    """Outputs of :class:`FlaxCLIPTextModel` (a pytree, so it can leave ``jax.jit``).

    ``last_hidden_state [B, L, D]``: after the final LayerNorm. ``pooler_output [B, D]``: the
    final-norm state at the pooling position. ``hidden_states``: the embeddings output, then
    each layer's output (``hidden_states[-1]`` is the last layer before the final LayerNorm).
    """

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.token_embedding = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, input_ids: Array) -> Array:  # [B, L] -> [B, L, D]
        length = input_ids.shape[-1]
        positions = self.position_embedding.embedding[...][:length]
        return self.token_embedding(input_ids) + positions.astype(self.token_embedding.dtype)[None]


def _linear(cfg_in: int, cfg_out: int, *, rngs, dtype, param_dtype) -> nnx.Linear:
    return nnx.Linear(cfg_in, cfg_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class CLIPAttention(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.num_heads = cfg.num_attention_heads
        self.k_proj = _linear(d, d, **kw)
        self.v_proj = _linear(d, d, **kw)
        self.q_proj = _linear(d, d, **kw)
        self.out_proj = _linear(d, d, **kw)

    def __call__(self, x: Array) -> Array:  # [B, L, D], causal self-attention
        b, length, d = x.shape
        heads = (b, length, self.num_heads, d // self.num_heads)
        q = self.q_proj(x).reshape(heads)
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        out = attention(q, k, v, causal=True)
        return self.out_proj(out.reshape(b, length, d))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.act = get_activation(cfg.hidden_act)
        self.fc1 = _linear(cfg.hidden_size, cfg.intermediate_size, **kw)
        self.fc2 = _linear(cfg.intermediate_size, cfg.hidden_size, **kw)

    def __call__(self, x: Array) -> Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        norm = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = CLIPAttention(cfg, **kw)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **norm)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **norm)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.remat = False  # see PretrainedModel.set_remat
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                for _ in range(cfg.num_hidden_layers)
            ]
        )


def _clip_rename(key: str) -> str:
    # transformers 4.x checkpoints (the hub's) prefix every key with "text_model."; 5.x do not.
    return key.removeprefix("text_model.")


# Left out of loading: the position ids (a buffer older checkpoints hold) and the projection
# of a CLIPTextModelWithProjection checkpoint, whose text tower this is (transformers'
# CLIPTextModel loads such a checkpoint the same way, leaving text_projection unused).
_CLIP_IGNORED = re.compile(r"^(text_model\.)?embeddings\.position_ids$|^text_projection\.weight$")


class FlaxCLIPTextModel(nnx.Module, PretrainedModel):
    """CLIP text transformer with causal self-attention and no padding mask.

    Call with ``input_ids: int [B, L]`` (``L <= max_position_embeddings``); returns
    :class:`CLIPTextOutput`. Numerically matches transformers' ``CLIPTextModel`` called
    without an attention mask, including its two pooling rules: with ``eos_token_id == 2``
    (the legacy configs, the upscaler's among them) it pools at ``argmax(input_ids)``,
    otherwise at the first ``eos_token_id``.
    """

    config_class = CLIPTextConfig
    torch_weights_names = ("model.safetensors",)
    torch_pickle_names = ("pytorch_model.bin",)
    # Saved with the "text_model." prefix of the published checkpoints, which transformers 4
    # and 5 both load.
    key_map = KeyMap(
        rename=_clip_rename,
        ignore=lambda k: bool(_CLIP_IGNORED.match(k)),
        export=lambda k: "text_model." + k,
    )

    def __init__(
        self,
        config: CLIPTextConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    ):
        dtype, param_dtype = check_construction(type(self), config, dtype, param_dtype)
        self.config = config
        self.dtype = dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.embeddings = CLIPTextEmbeddings(config, **kw)
        self.encoder = CLIPEncoder(config, **kw)
        self.final_layer_norm = LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )

    def check_input_ids(self, input_ids) -> None:
        """Raise a ValueError naming ``input_ids`` when its type, rank, dtype or length is
        wrong."""
        if is_torch_tensor(input_ids):
            check_array("input_ids", input_ids, "integer")  # names it as a torch tensor
        shape = getattr(input_ids, "shape", None)
        if shape is None or len(shape) != 2:
            raise ValueError(
                f"input_ids must be an integer array [batch, length], got shape {shape}"
            )
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
        if not 1 <= shape[1] <= self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids length {shape[1]} must be between 1 and "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        if not isinstance(input_ids, jax.core.Tracer) and np.size(input_ids):
            # concrete ids (an eager call) are checked; under a trace they cannot be, and an id
            # out of range would silently gather NaN or wrap around
            ids = np.asarray(input_ids)  # host values (jnp.min would stage under a trace)
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(
                    f"input_ids must be in [0, {self.config.vocab_size}) (vocab_size), got "
                    f"values in [{lo}, {hi}]"
                )

    def pooling_positions(self, input_ids: Array) -> Array:
        """Index of the token each row is pooled at (transformers' two rules)."""
        if self.config.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax(input_ids == self.config.eos_token_id, axis=-1)

    def __call__(self, input_ids: Array) -> CLIPTextOutput:  # [B, L] int
        self.check_input_ids(input_ids)
        x = self.embeddings(input_ids)
        hidden = [x]
        for layer in self.encoder.layers:
            x = call_block(layer, x, remat=self.encoder.remat)
            hidden.append(x)
        last = self.final_layer_norm(x)
        pos = self.pooling_positions(input_ids)
        pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(
            last_hidden_state=last, pooler_output=pooled, hidden_states=tuple(hidden)
        )

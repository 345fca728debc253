"""Frozen configuration dataclasses, one per component, built from Hugging Face config.json.

Each config has ``from_dict(hf_config)`` that reads the fields the Flax module implements and
rejects, by name, any value the module does not implement (so a checkpoint the port cannot
reproduce fails loudly instead of running with silently different arithmetic), and
``to_dict()`` that writes a config.json the torch libraries can read back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """A config.json value that this port does not implement (or cannot parse)."""


def _get(d: Mapping[str, Any], key: str, default: Any) -> Any:
    value = d.get(key, default)
    return default if value is None else value


def _require(component: str, field: str, value: Any, allowed: Any, why: str = "") -> None:
    if value not in allowed:
        raise ConfigError(
            f"{component} config: `{field}` = {value!r} is not supported "
            f"(supported: {', '.join(repr(a) for a in allowed)}){'; ' + why if why else ''}"
        )


# --------------------------------------------------------------------------------------------
# CLIP text encoder
# --------------------------------------------------------------------------------------------

CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Config of the CLIP text tower (transformers ``CLIPTextConfig``)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        _require("CLIPTextModel", "hidden_act", self.hidden_act, CLIP_ACTIVATIONS)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPTextModel config: `hidden_size` ({self.hidden_size}) must be divisible by "
                f"`num_attention_heads` ({self.num_attention_heads})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """Build from a transformers config.json dict (a ``CLIPConfig`` is unwrapped)."""
        if "text_config" in d and isinstance(d["text_config"], Mapping):
            d = d["text_config"]
        model_type = d.get("model_type", "clip_text_model")
        _require(
            "CLIPTextModel",
            "model_type",
            model_type,
            ("clip_text_model", "clip"),
            "this is the CLIP text encoder",
        )
        for arch in d.get("architectures") or ():
            _require(
                "CLIPTextModel",
                "architectures",
                arch,
                ("CLIPTextModel", "CLIPTextModelWithProjection"),
            )
        if d.get("position_embedding_type", "absolute") != "absolute":
            _require(
                "CLIPTextModel", "position_embedding_type", d["position_embedding_type"], ("absolute",)
            )
        f = cls()
        return cls(
            vocab_size=int(_get(d, "vocab_size", f.vocab_size)),
            hidden_size=int(_get(d, "hidden_size", f.hidden_size)),
            intermediate_size=int(_get(d, "intermediate_size", f.intermediate_size)),
            num_hidden_layers=int(_get(d, "num_hidden_layers", f.num_hidden_layers)),
            num_attention_heads=int(_get(d, "num_attention_heads", f.num_attention_heads)),
            max_position_embeddings=int(
                _get(d, "max_position_embeddings", f.max_position_embeddings)
            ),
            hidden_act=str(_get(d, "hidden_act", f.hidden_act)),
            layer_norm_eps=float(_get(d, "layer_norm_eps", f.layer_norm_eps)),
            bos_token_id=int(_get(d, "bos_token_id", f.bos_token_id)),
            eos_token_id=int(_get(d, "eos_token_id", f.eos_token_id)),
            pad_token_id=int(_get(d, "pad_token_id", f.pad_token_id)),
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' ``CLIPTextConfig`` reads back."""
        d = dataclasses.asdict(self)
        d.update(model_type="clip_text_model", architectures=["CLIPTextModel"])
        return d

    @classmethod
    def vit_l14(cls) -> CLIPTextConfig:
        """The published text tower of openai/clip-vit-large-patch14 (the upscaler's encoder)."""
        return cls()

    @classmethod
    def tiny(cls) -> CLIPTextConfig:
        """A small config for tests."""
        return cls(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        )


# --------------------------------------------------------------------------------------------
# VAE (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

VAE_ACTIVATIONS = ("silu", "swish")


def _float_tuple(value: Any) -> tuple[float, ...] | None:
    return None if value is None else tuple(float(v) for v in value)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Config of the KL autoencoder (diffusers ``AutoencoderKL``); defaults are diffusers'.

    The encoder halves the picture ``len(block_out_channels) - 1`` times
    (:attr:`downsample_factor`, 8 for the published SD VAE) and the decoder doubles it back.
    ``sample_size`` is also the default tile size, in pixels, of tiled encode/decode (as in
    diffusers' ``enable_tiling``). ``scaling_factor``, ``shift_factor``, ``latents_mean``,
    ``latents_std`` and ``force_upcast`` are carried for the caller; the model does not
    apply them.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        name = "AutoencoderKL"
        for t in self.down_block_types:
            _require(name, "down_block_types", t, ("DownEncoderBlock2D",))
        for t in self.up_block_types:
            _require(name, "up_block_types", t, ("UpDecoderBlock2D",))
        _require(name, "act_fn", self.act_fn, VAE_ACTIVATIONS)
        n = len(self.block_out_channels)
        if n == 0 or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"{name} config: `down_block_types` ({len(self.down_block_types)}), "
                f"`up_block_types` ({len(self.up_block_types)}) and `block_out_channels` ({n}) "
                "must have the same, non-zero length"
            )
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"{name} config: `block_out_channels` entry {c} is not divisible by "
                    f"`norm_num_groups` ({self.norm_num_groups})"
                )
        if self.layers_per_block < 1:
            raise ConfigError(
                f"{name} config: `layers_per_block` must be >= 1, got {self.layers_per_block}"
            )
        for field in ("latents_mean", "latents_std"):
            stats = getattr(self, field)
            if stats is not None and len(stats) != self.latent_channels:
                raise ConfigError(
                    f"{name} config: `{field}` has {len(stats)} entries, expected "
                    f"latent_channels={self.latent_channels}"
                )

    @property
    def downsample_factor(self) -> int:
        """How many pixels one latent spans per side: ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AutoencoderKLConfig:
        """Build from a diffusers ``vae/config.json`` dict (missing keys take diffusers' defaults)."""
        _require(
            "AutoencoderKL",
            "_class_name",
            d.get("_class_name", "AutoencoderKL"),
            ("AutoencoderKL",),
            "this is the KL autoencoder",
        )
        f = cls()
        sample_size = _get(d, "sample_size", f.sample_size)
        if isinstance(sample_size, list | tuple):
            # diffusers derives its latent tile size from the first entry
            sample_size = sample_size[0]
        shift = d.get("shift_factor")
        return cls(
            in_channels=int(_get(d, "in_channels", f.in_channels)),
            out_channels=int(_get(d, "out_channels", f.out_channels)),
            down_block_types=tuple(_get(d, "down_block_types", f.down_block_types)),
            up_block_types=tuple(_get(d, "up_block_types", f.up_block_types)),
            block_out_channels=tuple(
                int(c) for c in _get(d, "block_out_channels", f.block_out_channels)
            ),
            layers_per_block=int(_get(d, "layers_per_block", f.layers_per_block)),
            act_fn=str(_get(d, "act_fn", f.act_fn)),
            latent_channels=int(_get(d, "latent_channels", f.latent_channels)),
            norm_num_groups=int(_get(d, "norm_num_groups", f.norm_num_groups)),
            sample_size=int(sample_size),
            scaling_factor=float(_get(d, "scaling_factor", f.scaling_factor)),
            shift_factor=None if shift is None else float(shift),
            latents_mean=_float_tuple(d.get("latents_mean")),
            latents_std=_float_tuple(d.get("latents_std")),
            force_upcast=bool(_get(d, "force_upcast", f.force_upcast)),
            use_quant_conv=bool(_get(d, "use_quant_conv", f.use_quant_conv)),
            use_post_quant_conv=bool(_get(d, "use_post_quant_conv", f.use_post_quant_conv)),
            mid_block_add_attention=bool(
                _get(d, "mid_block_add_attention", f.mid_block_add_attention)
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that diffusers' ``AutoencoderKL`` reads back."""
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        d["_class_name"] = "AutoencoderKL"
        return d

    @classmethod
    def sd_kl_f8(cls) -> AutoencoderKLConfig:
        """The published SD 1.x kl-f8 VAE, as in stabilityai/sd-x2-latent-upscaler's ``vae/``."""
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            sample_size=256,
        )

    @classmethod
    def tiny(cls) -> AutoencoderKLConfig:
        """A small config for tests (downsample factor 2)."""
        return cls(
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64),
            norm_num_groups=8,
            sample_size=32,
        )

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
                "CLIPTextModel",
                "position_embedding_type",
                d["position_embedding_type"],
                ("absolute",),
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

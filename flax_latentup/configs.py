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


_KINDS = {  # kind: (one, several, conversion)
    "int": ("an integer", "integers", int),
    "float": ("a number", "numbers", float),
    "bool": ("true or false", "true/false values", bool),
    "str": ("a string", "strings", str),
}


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "int":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool) or (type(value) is int and value in (0, 1))
    return isinstance(value, str)


def _typed(component: str, key: str, value: Any, kind: str, minimum: int | None = None) -> Any:
    """``value`` of the config field ``key`` as ``kind`` ("int", "float", "bool" or "str");
    a ConfigError naming the field for a value of another type (``null``, ``"eight"``, ...)
    or, with ``minimum``, a smaller number."""
    what, _, convert = _KINDS[kind]
    if not _is_kind(value, kind):
        raise ConfigError(f"{component} config: `{key}` = {value!r} is not {what}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{component} config: `{key}` = {value!r} must be at least {minimum}")
    return convert(value)


def _typed_list(
    component: str, key: str, value: Any, kind: str, minimum: int | None = None
) -> tuple:
    """``value`` of the config field ``key`` as a tuple of ``kind`` (see :func:`_typed`)."""
    what = _KINDS[kind][1]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{component} config: `{key}` = {value!r} is not a list of {what}")
    return tuple(_typed(component, f"{key}[{i}]", v, kind, minimum) for i, v in enumerate(value))


def _extra_field() -> Any:
    """The source config.json's other entries (``_diffusers_version``, ``sample_size``, ...):
    not used here, written back by ``to_dict`` so that a saved config loses nothing; not part
    of equality or hashing."""
    return dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)


def _with_extra(config: Any, d: Mapping[str, Any]) -> Any:
    own = {f.name for f in dataclasses.fields(config)}
    extra = {k: v for k, v in d.items() if k not in own}
    return dataclasses.replace(config, extra=extra)


def _to_dict(config: Any) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    out = dict(d.pop("extra"))
    for key, value in d.items():
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


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


# transformers' CLIPTextConfig defaults, used where config.json leaves a key out (they are
# not the dataclass's: those are ViT-L/14's, the upscaler's text encoder)
_CLIP_DEFAULTS: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}


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
    extra: Mapping[str, Any] = _extra_field()

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
        """Build from a transformers config.json dict (a ``CLIPConfig`` is unwrapped); keys it
        leaves out take transformers' ``CLIPTextConfig`` defaults, as transformers reads it."""
        if "text_config" in d and isinstance(d["text_config"], Mapping):
            d = d["text_config"]
        if "_class_name" in d and "model_type" not in d:  # a diffusers model's config.json
            raise ConfigError(
                f"CLIPTextModel config: this is the config of a diffusers {d['_class_name']!r} "
                "(`_class_name`), not of a CLIP text encoder (transformers' `model_type` "
                "'clip_text_model')"
            )
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

        def get(key: str, kind: str, minimum: int | None = None) -> Any:
            return _typed("CLIPTextModel", key, _get(d, key, _CLIP_DEFAULTS[key]), kind, minimum)

        return _with_extra(
            cls(
                vocab_size=get("vocab_size", "int", 1),
                hidden_size=get("hidden_size", "int", 1),
                intermediate_size=get("intermediate_size", "int", 1),
                num_hidden_layers=get("num_hidden_layers", "int", 0),
                num_attention_heads=get("num_attention_heads", "int", 1),
                max_position_embeddings=get("max_position_embeddings", "int", 1),
                hidden_act=get("hidden_act", "str"),
                layer_norm_eps=get("layer_norm_eps", "float"),
                bos_token_id=get("bos_token_id", "int"),
                eos_token_id=get("eos_token_id", "int"),
                pad_token_id=get("pad_token_id", "int"),
            ),
            d,
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' ``CLIPTextConfig`` reads back."""
        d = _to_dict(self)
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
# K-diffusion UNet (diffusers UNet2DConditionModel with K blocks)
# --------------------------------------------------------------------------------------------

UNET_CLASS_NAME = "UNet2DConditionModel"
K_DOWN_BLOCKS = ("KDownBlock2D", "KCrossAttnDownBlock2D")
K_UP_BLOCKS = ("KCrossAttnUpBlock2D", "KUpBlock2D")
UNET_ACTIVATIONS = ("gelu", "silu", "swish", "mish", "relu")
# diffusers builds its K blocks with a fixed group size: groups = channels // 32.
K_GROUP_SIZE = 32

# diffusers' defaults for the keys this port reads, used where config.json leaves one out.
_UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "time_embedding_type": "positional",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
}

# Keys whose only accepted value is diffusers' default: anything else adds modules or
# arithmetic this port does not implement.
_UNET_FIXED: dict[str, tuple[Any, str]] = {
    "mid_block_type": (None, "the K-diffusion UNet has no mid block"),
    "norm_num_groups": (None, "the K-diffusion UNet has no output norm (conv_norm_out)"),
    "time_embedding_type": ("fourier", "only the Gaussian Fourier time projection is implemented"),
    "class_embed_type": (None, "class embeddings are not implemented"),
    "num_class_embeds": (None, "class embeddings are not implemented"),
    "class_embeddings_concat": (False, "class embeddings are not implemented"),
    "addition_embed_type": (None, "additional embeddings are not implemented"),
    "encoder_hid_dim": (None, "an encoder_hidden_states projection is not implemented"),
    "encoder_hid_dim_type": (None, "an encoder_hidden_states projection is not implemented"),
    "attention_type": ("default", "gated (GLIGEN) attention is not implemented"),
    "num_attention_heads": (None, "diffusers itself rejects it; use attention_head_dim"),
}


@dataclasses.dataclass(frozen=True)
class ResnetPlan:
    """Channels of one ``ResnetBlockCondNorm2D``: ``conv1`` maps ``in_channels`` to
    ``mid_channels``, ``conv2`` maps ``mid_channels`` to ``out_channels``; ``norm1``/``norm2``
    have ``groups``/``groups_out`` groups."""

    in_channels: int
    mid_channels: int
    out_channels: int
    groups: int
    groups_out: int


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """One ``KAttentionBlock``: ``dim`` channels, ``heads`` heads of ``head_dim`` channels,
    optional self-attention before the cross-attention."""

    dim: int
    heads: int
    head_dim: int
    self_attention: bool

    @property
    def groups(self) -> int:
        return max(1, self.dim // K_GROUP_SIZE)


@dataclasses.dataclass(frozen=True)
class BlockPlan:
    """The modules of one down or up block, as diffusers builds them from the config.

    ``resample``: the block ends with a K down/up sampler. ``skips`` (down blocks): each layer
    output is handed to the up path; a ``KCrossAttnDownBlock2D`` that does not downsample
    hands ``None`` instead (diffusers' behaviour), so its up partner concatenates nothing.
    """

    block_type: str
    resnets: tuple[ResnetPlan, ...]
    attentions: tuple[AttentionPlan, ...]
    resample: bool
    skips: bool = True


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """Config of the K-diffusion UNet (diffusers ``UNet2DConditionModel`` with K blocks).

    Defaults are the published ``stabilityai/sd-x2-latent-upscaler`` UNet. ``attention_head_dim``
    is the channels per head (an int, or one per block: up block ``i`` uses entry ``i``, not
    reversed, as diffusers does). ``from_dict`` ignores keys that diffusers does not pass to
    the K blocks (``only_cross_attention``, ``upcast_attention``, ``use_linear_projection``,
    ``dual_cross_attention``, ``transformer_layers_per_block``, ``resnet_time_scale_shift``,
    ``resnet_skip_time_act``, ``resnet_out_scale_factor``, ``cross_attention_norm``,
    ``downsample_padding``, ``mid_block_scale_factor``, ``freq_shift``, ``sample_size``) and
    ``dropout``, which the K blocks apply in training only (this port has no dropout: the
    :class:`~flax_latentup.training.Trainer` warns of a non-zero one), and rejects by name every
    value that would change the architecture.
    """

    in_channels: int = 8
    out_channels: int = 5
    down_block_types: tuple[str, ...] = (
        "KDownBlock2D",
        "KCrossAttnDownBlock2D",
        "KCrossAttnDownBlock2D",
        "KCrossAttnDownBlock2D",
    )
    up_block_types: tuple[str, ...] = (
        "KCrossAttnUpBlock2D",
        "KCrossAttnUpBlock2D",
        "KCrossAttnUpBlock2D",
        "KUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (384, 384, 768, 768)
    layers_per_block: int = 4
    attention_head_dim: int | tuple[int, ...] = 64
    cross_attention_dim: int = 768
    act_fn: str = "gelu"
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    center_input_sample: bool = False
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = "gelu"
    time_cond_proj_dim: int | None = 896
    conv_in_kernel: int = 1
    conv_out_kernel: int = 1
    extra: Mapping[str, Any] = _extra_field()

    def __post_init__(self) -> None:
        name = UNET_CLASS_NAME
        for t in self.down_block_types:
            _require(name, "down_block_types", t, K_DOWN_BLOCKS)
        for t in self.up_block_types:
            _require(name, "up_block_types", t, K_UP_BLOCKS)
        n = len(self.block_out_channels)
        if not n or len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ConfigError(
                f"{name} config: `down_block_types`, `up_block_types` and `block_out_channels` "
                f"must have the same (non-zero) length, got {len(self.down_block_types)}, "
                f"{len(self.up_block_types)} and {n}"
            )
        if len(self.head_dims) != n:
            raise ConfigError(
                f"{name} config: `attention_head_dim` must be an int or have one entry per block "
                f"({n}), got {self.attention_head_dim!r}"
            )
        for field in ("act_fn", "time_embedding_act_fn", "timestep_post_act"):
            value = getattr(self, field)
            if value is not None:
                _require(name, field, value, UNET_ACTIVATIONS)
        for field in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, field)
            if k < 1 or k % 2 == 0:
                raise ConfigError(f"{name} config: `{field}` = {k} must be a positive odd number")
        if self.layers_per_block < 1:
            raise ConfigError(f"{name} config: `layers_per_block` must be >= 1")
        if self.time_embed_dim % 2:
            raise ConfigError(
                f"{name} config: the time embedding width ({self.time_embed_dim}) must be even"
            )
        self._check_plans()

    # ---------------------------------------------------------------- derived sizes

    @property
    def head_dims(self) -> tuple[int, ...]:
        """Channels per attention head, one entry per block index."""
        h = self.attention_head_dim
        return (h,) * len(self.block_out_channels) if isinstance(h, int) else tuple(h)

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding ``emb`` (and of the Fourier features)."""
        return self.time_embedding_dim or 2 * self.block_out_channels[0]

    @property
    def num_resamplers(self) -> int:
        """Down samplers (= up samplers): every block but the last resamples."""
        return len(self.block_out_channels) - 1

    @property
    def sample_sides(self) -> tuple[int, int]:
        """``(multiple, least)``: a sample's height and width must be multiples of
        ``multiple`` and at least ``least`` (the K resamplers halve and double
        ``num_resamplers`` times and reflect-pad by one pixel)."""
        step = 2**self.num_resamplers
        return step, (2 * step if self.num_resamplers else 1)

    def _resnet(self, cin: int, mid: int, cout: int, group_ch: int) -> ResnetPlan:
        return ResnetPlan(cin, mid, cout, cin // K_GROUP_SIZE, group_ch // K_GROUP_SIZE)

    def down_plans(self) -> tuple[BlockPlan, ...]:
        """The down blocks as diffusers' ``get_down_block`` builds them."""
        plans = []
        boc, layers = self.block_out_channels, self.layers_per_block
        for i, block_type in enumerate(self.down_block_types):
            cin, cout = boc[max(i - 1, 0)], boc[i]
            final = i == len(boc) - 1
            resnets = tuple(
                self._resnet(cin if j == 0 else cout, cout, cout, cout) for j in range(layers)
            )
            attentions: tuple[AttentionPlan, ...] = ()
            if block_type == "KCrossAttnDownBlock2D":
                # self-attention only where the block does not downsample (the deepest one)
                hd = self.head_dims[i]
                attentions = (AttentionPlan(cout, cout // hd, hd, final),) * layers
            skips = block_type == "KDownBlock2D" or not final
            plans.append(BlockPlan(block_type, resnets, attentions, not final, skips))
        return tuple(plans)

    def up_plans(self) -> tuple[BlockPlan, ...]:
        """The up blocks as diffusers' ``get_up_block`` builds them (K-UNet channel rules)."""
        plans = []
        rev, layers, temb = (
            self.block_out_channels[::-1],
            self.layers_per_block,
            self.time_embed_dim,
        )
        for i, block_type in enumerate(self.up_block_types):
            out = rev[i]
            k_out = rev[min(i + 1, len(rev) - 1)]
            final = i == len(rev) - 1
            hd = self.head_dims[i]
            if block_type == "KUpBlock2D":
                resnets = tuple(
                    self._resnet(
                        2 * out if j == 0 else out,
                        k_out if j == layers - 1 else out,
                        k_out if j == layers - 1 else out,
                        out,
                    )
                    for j in range(layers)
                )
                plans.append(BlockPlan(block_type, resnets, (), not final))
                continue
            # diffusers takes "first block" to mean in == out == time-embedding width
            first = k_out == out == temb
            middle = k_out != out
            k_in = out if first else 2 * out
            resnets = tuple(
                self._resnet(
                    k_in if j == 0 else out,
                    out,
                    k_out if (middle and j == layers - 1) else out,
                    out,
                )
                for j in range(layers)
            )
            dims = [k_out if j == layers - 1 else out for j in range(layers)]
            attentions = tuple(AttentionPlan(d, d // hd, hd, first) for d in dims)
            plans.append(BlockPlan(block_type, resnets, attentions, not final))
        return tuple(plans)

    def _check_plans(self) -> None:
        """Reject configs whose modules diffusers would build but could not run."""
        name = UNET_CLASS_NAME
        down, up = self.down_plans(), self.up_plans()
        for kind, plans in (("down", down), ("up", up)):
            for i, plan in enumerate(plans):
                for r in plan.resnets:
                    for ch, g in ((r.in_channels, r.groups), (r.mid_channels, r.groups_out)):
                        if g < 1 or ch % g:
                            raise ConfigError(
                                f"{name} config: {kind} block {i} ({plan.block_type}) has a norm "
                                f"of {ch} channels in {g} groups (groups = channels // "
                                f"{K_GROUP_SIZE}); `block_out_channels` must be >= "
                                f"{K_GROUP_SIZE} and give whole groups"
                            )
                for a in plan.attentions:
                    if a.heads < 1 or a.dim % a.groups:
                        raise ConfigError(
                            f"{name} config: {kind} block {i} ({plan.block_type}) has attention "
                            f"over {a.dim} channels with `attention_head_dim` {a.head_dim}"
                        )
        # Follow the channels through the skip connections as diffusers' forward does.
        skips: list[int | None] = [self.block_out_channels[0]]
        for plan in down:
            skips += [r.out_channels if plan.skips else None for r in plan.resnets]
        channels = self.block_out_channels[-1]
        for i, plan in enumerate(up):
            taken = skips[-len(plan.resnets) :]
            del skips[-len(plan.resnets) :]
            got = channels + (taken[-1] or 0)
            want = plan.resnets[0].in_channels
            if got != want:
                raise ConfigError(
                    f"{name} config: up block {i} ({plan.block_type}) is built for {want} input "
                    f"channels but receives {got} (`block_out_channels` "
                    f"{list(self.block_out_channels)} with time embedding width "
                    f"{self.time_embed_dim}); diffusers builds this model but cannot run it"
                )
            channels = plan.resnets[-1].out_channels

    # ---------------------------------------------------------------- (de)serialisation

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UNet2DConditionConfig:
        """Build from a diffusers ``unet/config.json`` dict (missing keys take diffusers'
        defaults; the older key ``timestep_act_2`` is read as ``timestep_post_act``, which it
        was renamed to: the published model's first revision spells it so. Current diffusers
        no longer reads the old key and builds such a config without the activation after
        the time embedding; :meth:`to_dict` writes the new key, which both read alike)."""
        name = UNET_CLASS_NAME
        _require(name, "_class_name", d.get("_class_name", name), (name,))

        def get(key: str) -> Any:
            return d.get(key, _UNET_DEFAULTS.get(key))

        for key, (allowed, why) in _UNET_FIXED.items():
            # where diffusers' default is the one accepted value, _UNET_DEFAULTS omits it
            _require(name, key, d.get(key, _UNET_DEFAULTS.get(key, allowed)), (allowed,), why)

        post_act = d.get("timestep_post_act")
        old = d.get("timestep_act_2")
        if old is not None and post_act is not None and old != post_act:
            raise ConfigError(
                f"{name} config: `timestep_post_act` = {post_act!r} and its older spelling "
                f"`timestep_act_2` = {old!r} disagree"
            )
        post_act = post_act if post_act is not None else old

        def typed(key: str, kind: str, minimum: int | None = None) -> Any:
            return _typed(name, key, get(key), kind, minimum)

        def optional(key: str) -> int | None:
            return None if d.get(key) is None else _typed(name, key, d[key], "int", 1)

        def uniform(key: str) -> int:
            values = _typed_list(name, key, _as_tuple(get(key)), "int", 1)
            if len(set(values)) != 1:
                raise ConfigError(
                    f"{name} config: `{key}` = {get(key)!r} is not supported "
                    "(only one value for all blocks)"
                )
            return values[0]

        def lower(value: Any) -> Any:
            return value.lower() if isinstance(value, str) else value

        head = get("attention_head_dim")
        return _with_extra(
            cls(
                in_channels=typed("in_channels", "int", 1),
                out_channels=typed("out_channels", "int", 1),
                down_block_types=_typed_list(
                    name, "down_block_types", get("down_block_types"), "str"
                ),
                up_block_types=_typed_list(name, "up_block_types", get("up_block_types"), "str"),
                block_out_channels=_typed_list(
                    name, "block_out_channels", get("block_out_channels"), "int", 1
                ),
                layers_per_block=uniform("layers_per_block"),
                attention_head_dim=_typed_list(name, "attention_head_dim", head, "int", 1)
                if isinstance(head, list | tuple)
                else typed("attention_head_dim", "int", 1),
                cross_attention_dim=uniform("cross_attention_dim"),
                act_fn=lower(typed("act_fn", "str")),
                norm_eps=typed("norm_eps", "float"),
                flip_sin_to_cos=typed("flip_sin_to_cos", "bool"),
                center_input_sample=typed("center_input_sample", "bool"),
                time_embedding_dim=optional("time_embedding_dim"),
                time_embedding_act_fn=lower(d.get("time_embedding_act_fn")),
                timestep_post_act=lower(post_act),
                time_cond_proj_dim=optional("time_cond_proj_dim"),
                conv_in_kernel=typed("conv_in_kernel", "int", 1),
                conv_out_kernel=typed("conv_out_kernel", "int", 1),
            ),
            d,
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that diffusers' ``UNet2DConditionModel`` reads back."""
        d = _to_dict(self)
        d.update(
            {key: allowed for key, (allowed, _) in _UNET_FIXED.items()},
            _class_name=UNET_CLASS_NAME,
        )
        return d

    @classmethod
    def sd_x2_latent_upscaler(cls) -> UNet2DConditionConfig:
        """The published UNet of stabilityai/sd-x2-latent-upscaler (372.6 M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> UNet2DConditionConfig:
        """diffusers' fast-test UNet of the latent upscale pipeline."""
        return cls(
            block_out_channels=(32, 32, 64, 64),
            layers_per_block=2,
            attention_head_dim=8,
            cross_attention_dim=32,
            time_cond_proj_dim=160,
        )


# --------------------------------------------------------------------------------------------
# VAE (diffusers AutoencoderKL)
# --------------------------------------------------------------------------------------------

VAE_ACTIVATIONS = ("silu", "swish")


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
    extra: Mapping[str, Any] = _extra_field()

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
        name = "AutoencoderKL"

        def get(key: str, kind: str, minimum: int | None = None) -> Any:
            return _typed(name, key, _get(d, key, getattr(f, key)), kind, minimum)

        def get_list(key: str, kind: str, minimum: int | None = None) -> tuple:
            return _typed_list(name, key, _get(d, key, getattr(f, key)), kind, minimum)

        def get_floats(key: str) -> tuple[float, ...] | None:
            return None if d.get(key) is None else _typed_list(name, key, d[key], "float")

        sample_size = _get(d, "sample_size", f.sample_size)
        if isinstance(sample_size, list | tuple):
            # diffusers derives its latent tile size from the first entry
            sample_size = sample_size[0]
        shift = d.get("shift_factor")
        return _with_extra(
            cls(
                in_channels=get("in_channels", "int", 1),
                out_channels=get("out_channels", "int", 1),
                down_block_types=get_list("down_block_types", "str"),
                up_block_types=get_list("up_block_types", "str"),
                block_out_channels=get_list("block_out_channels", "int", 1),
                layers_per_block=get("layers_per_block", "int", 1),
                act_fn=get("act_fn", "str"),
                latent_channels=get("latent_channels", "int", 1),
                norm_num_groups=get("norm_num_groups", "int", 1),
                sample_size=_typed(name, "sample_size", sample_size, "int", 1),
                scaling_factor=get("scaling_factor", "float"),
                shift_factor=None
                if shift is None
                else _typed(name, "shift_factor", shift, "float"),
                latents_mean=get_floats("latents_mean"),
                latents_std=get_floats("latents_std"),
                force_upcast=get("force_upcast", "bool"),
                use_quant_conv=get("use_quant_conv", "bool"),
                use_post_quant_conv=get("use_post_quant_conv", "bool"),
                mid_block_add_attention=get("mid_block_add_attention", "bool"),
            ),
            d,
        )

    def to_dict(self) -> dict[str, Any]:
        """A config.json dict that diffusers' ``AutoencoderKL`` reads back."""
        d = _to_dict(self)
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


def check_components(text_encoder_config: Any, vae_config: Any, unet_config: Any) -> None:
    """ValueError unless the three models' configs fit together as the upscaler: the UNet
    takes the noisy latents and the upsampled image condition on channels, cross-attends to
    the text encoder's hidden states and is conditioned on its pooled output."""
    latent = vae_config.latent_channels
    width = text_encoder_config.hidden_size
    if unet_config.in_channels != 2 * latent:
        raise ValueError(
            f"unet.config.in_channels ({unet_config.in_channels}) must be twice the VAE's "
            f"latent_channels ({latent}): noisy latents and the upsampled image condition"
        )
    if unet_config.cross_attention_dim != width:
        raise ValueError(
            f"unet.config.cross_attention_dim ({unet_config.cross_attention_dim}) must equal "
            f"the text encoder's hidden_size ({width})"
        )
    if unet_config.time_cond_proj_dim != 128 + width:
        raise ValueError(
            f"unet.config.time_cond_proj_dim ({unet_config.time_cond_proj_dim}) must be 128 + "
            f"the text encoder's hidden_size ({width})"
        )

"""``FlaxStableDiffusionLatentUpscalePipeline``: the diffusers-shaped API over one jitted program.

One call runs text encoding, the optional VAE encode of pictures, the whole Euler loop
(``lax.scan``) and the VAE decode as a single compiled program per input shape. Values that
change between calls (prompts, guidance scale, seeds, the schedule) are arrays, so they do
not recompile; a new step count compiles once for that count, and guidance on (scale > 1) or
off are two programs.

The pure core, :func:`upscale_core`, maps ``(params, batch)`` to outputs and is what
:mod:`flax_latentup.parallel` shards across devices.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import math
import numbers
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flax_latentup import hub
from flax_latentup.configs import check_components
from flax_latentup.models.base import (
    VARIANT_BESIDE,
    check_no_flax_weights,
    check_same_config,
    is_torch_tensor,
    read_config,
    read_json,
    refuse_keywords,
    write_json_atomic,
)
from flax_latentup.models.clip import FlaxCLIPTextModel
from flax_latentup.models.conv import (
    using_winograd_kernels,
    winograd_kernels,
)
from flax_latentup.models.layers import trace_settings
from flax_latentup.models.target import compiling_for, outside_context_mesh
from flax_latentup.models.unet import FlaxUNet2DConditionModel
from flax_latentup.models.vae import DiagonalGaussianDistribution, FlaxAutoencoderKL
from flax_latentup.sampling import (
    EulerSchedulerConfig,
    denoise,
    euler_sample,
    make_schedule,
    noise_level_embedding,
)

Array = jax.Array

PIPELINE_CLASS_NAMES = (
    "StableDiffusionLatentUpscalePipeline",
    "FlaxStableDiffusionLatentUpscalePipeline",
)
OUTPUT_TYPES = ("pil", "np", "latent")
# Float pictures are taken as diffusers takes them, a little beyond [0, 1] or [-1, 1] too (an
# unclamped VAE decode, a bicubic resize's overshoot); values beyond this are refused, as they
# mean another scale (0..255 held as floats).
FLOAT_PICTURE_LIMIT = 1.5
VAE_SAMPLE_MODES = ("sample", "argmax")
DEFAULT_REPO = "stabilityai/sd-x2-latent-upscaler"


@dataclasses.dataclass
class UpscalePipelineOutput:
    """``images``: a list of PIL images, a float32 array ``[B, H, W, 3]`` in [0, 1], or the
    latents ``[B, 2h, 2w, 4]``, by ``output_type``. Read as diffusers' outputs are, too:
    ``out[0]`` and ``out["images"]`` are ``out.images``, ``out.to_tuple()`` is
    ``(out.images,)``."""

    images: Any

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)]

    def values(self) -> list[Any]:
        return list(self.to_tuple())

    def items(self) -> list[tuple[str, Any]]:
        return list(zip(self.keys(), self.to_tuple(), strict=True))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(f"{key!r}: an upscale output holds {self.keys()}")
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):  # its keys, as a dict's (and diffusers' outputs')
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


# --------------------------------------------------------------------------------------------
# The pure core
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CoreOptions:
    """Static choices that select a compiled program (everything else is an array input).

    ``cfg``: classifier-free guidance on. ``text``: "ids" (token ids, encoded in the program) or
    "embeds" (precomputed). ``image``: "latents", "pixels" (VAE-encoded in the program) or
    "posterior" (the VAE posterior's moments, encoded outside it, e.g. in tiles).
    ``noise``: "given" (``batch["noise"]``) or "keys" (drawn per image from ``batch["keys"]``).
    ``decode``: VAE-decode the result to pictures in [0, 1]. ``vae_sample_mode``: "sample" or
    "argmax" for the encode. ``progress``/``callback``: host callbacks from inside the loop.
    ``settings``: :func:`~flax_latentup.models.layers.trace_settings` when the call was made
    (attention and convolution choices are read while tracing, so they key the programs too).
    """

    cfg: bool
    text: str = "ids"
    image: str = "latents"
    noise: str = "keys"
    decode: bool = True
    vae_sample_mode: str = "sample"
    progress: bool = False
    callback: bool = False
    settings: tuple = ()


@dataclasses.dataclass(frozen=True)
class GraphDefs:
    text_encoder: Any
    vae: Any
    unet: Any


def preferred_dtype(device: Any = None) -> jnp.dtype:
    """The compute dtype that runs this model fastest on ``device`` (default: the first local
    device) without hurting its pictures: bfloat16 on TPUs and on GPUs with bfloat16 matrix
    units (NVIDIA compute capability >= 8.0, AMD Instinct), float16 on older NVIDIA GPUs (a T4
    has no bfloat16 units; a VAE decode that overflows in float16 is redone in float32),
    float32 on CPUs."""
    from flax_latentup.models.layers import nvidia_compute_capability

    device = device if device is not None else jax.local_devices()[0]
    platform = getattr(device, "platform", "cpu")
    if platform == "cpu":
        return jnp.dtype(jnp.float32)
    if platform in ("gpu", "cuda"):
        capability = nvidia_compute_capability(device)
        if capability is not None and capability < (8, 0):
            return jnp.dtype(jnp.float16)
    return jnp.dtype(jnp.bfloat16)


PIPELINE_PARTS = ("text_encoder", "vae", "unet", "tokenizer", "scheduler")
# The models among the parts: their classes, whose ``config_class`` reads ``config.json``.
MODEL_CLASSES = {
    "text_encoder": FlaxCLIPTextModel,
    "vae": FlaxAutoencoderKL,
    "unet": FlaxUNet2DConditionModel,
}


def _check_component_types(**components: Any) -> None:
    """TypeError naming the first component that is not what the pipeline runs (a torch model
    given for a Flax one, say); ``None`` values are skipped."""
    for name, value in components.items():
        if value is None:
            continue
        if name in MODEL_CLASSES:
            cls = MODEL_CLASSES[name]
            if not isinstance(value, cls):
                raise TypeError(
                    f"{name} must be a {cls.__name__} (e.g. {cls.__name__}.from_pretrained(...)), "
                    f"got {type(value).__module__}.{type(value).__name__}"
                )
        elif name == "tokenizer":
            if not callable(value) or not isinstance(getattr(value, "model_max_length", None), int):
                raise TypeError(
                    "tokenizer must be a CLIP tokenizer from transformers (callable, with an int "
                    f"model_max_length), got {type(value).__module__}.{type(value).__name__}"
                )


def _check_tokenizer_vocab(tokenizer: Any, text_config: Any) -> None:
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if size > text_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {size} tokens but the text encoder's vocab_size is "
            f"{text_config.vocab_size}: they do not belong together"
        )


def _scheduler_config(scheduler: Any) -> tuple[EulerSchedulerConfig, dict[str, Any]]:
    """``(config, the dict saved as scheduler_config.json)`` from an
    :class:`~flax_latentup.sampling.EulerSchedulerConfig`, a config dict, or a diffusers
    ``EulerDiscreteScheduler`` (its ``config``); unsupported options raise by name."""
    if isinstance(scheduler, EulerSchedulerConfig):
        return scheduler, scheduler.to_dict()
    config = getattr(scheduler, "config", scheduler)
    euler = any(c.__name__ == "EulerDiscreteScheduler" for c in type(scheduler).__mro__)
    if config is not scheduler and not euler:
        # another diffusers scheduler's config need not name its class: refused by its type
        raise TypeError(
            "scheduler must be an EulerDiscreteScheduler (the Euler sampler is what this "
            f"pipeline runs), got a {type(scheduler).__name__}; "
            "EulerDiscreteScheduler.from_config(its .config) keeps the schedule's settings"
        )
    if not isinstance(config, Mapping):
        raise TypeError(
            "scheduler must be an EulerSchedulerConfig, a scheduler config dict or a diffusers "
            f"EulerDiscreteScheduler, got {type(scheduler).__module__}.{type(scheduler).__name__}"
        )
    config = dict(config)
    return EulerSchedulerConfig.from_dict(config), config


def save_tokenizer(tokenizer: Any, folder: str) -> None:
    """``tokenizer.save_pretrained(folder)``, plus the BPE's ``vocab.json`` and ``merges.txt``
    where that wrote ``tokenizer.json`` alone (transformers 5 does): the hub repo's files, which
    transformers 4's ``CLIPTokenizer`` needs to load the folder."""
    tokenizer.save_pretrained(folder)
    if {"vocab.json", "merges.txt"} <= set(os.listdir(folder)):
        return
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if type(model).__name__ == "BPE":
        model.save(folder)


def load_tokenizer(folder: str) -> Any:
    """The CLIP tokenizer saved in ``folder``: transformers' ``CLIPTokenizer``, from the hub
    repo's ``vocab.json`` and ``merges.txt``; from ``tokenizer.json`` alone (what transformers
    5 saves) ``CLIPTokenizerFast``, which transformers 4 needs for it (in 5 the same class)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    fast = "tokenizer.json" in names and not {"vocab.json", "merges.txt"} <= names
    try:
        return (CLIPTokenizerFast if fast else CLIPTokenizer).from_pretrained(folder)
    except Exception as e:  # transformers' errors for damaged files are of many kinds
        raise ValueError(
            f"{folder}: the tokenizer's files do not load ({type(e).__name__}: {e}); is one of "
            f"them ({', '.join(sorted(names)) or 'none here'}) damaged or cut short?"
        ) from e


def read_pipeline_index(folder: str) -> dict[str, Any]:
    """``folder``'s ``model_index.json``; a ValueError unless it names this pipeline (either
    layout)."""
    path = os.path.join(folder, "model_index.json")
    index = read_json(path)
    name = index.get("_class_name") if isinstance(index, dict) else None
    if name not in PIPELINE_CLASS_NAMES:
        raise ValueError(
            f"{path}: `_class_name` is {name!r}, expected one of {PIPELINE_CLASS_NAMES}"
        )
    return index


def check_pipeline_folder(folder: str, skip: Sequence[str] = ()) -> None:
    """FileNotFoundError unless ``folder`` has the pipeline's subfolders (those in ``skip``
    aside: components given otherwise) and a tokenizer's files (an empty ``tokenizer/`` would
    load as a tokenizer without a vocabulary)."""
    for part in PIPELINE_PARTS:
        if part not in skip and not os.path.isdir(os.path.join(folder, part)):
            raise FileNotFoundError(f"pipeline folder {folder} has no `{part}/` subfolder")
    if "tokenizer" in skip:
        return
    tok = os.path.join(folder, "tokenizer")
    has = set(os.listdir(tok))
    if not ({"vocab.json", "merges.txt"} <= has or "tokenizer.json" in has):
        raise FileNotFoundError(
            f"{tok} holds no tokenizer: expected vocab.json and merges.txt (or tokenizer.json), "
            f"found {sorted(has)}"
        )


def _has_variant(folder: str, part: str, variant: str) -> bool:
    """Whether the pipeline folder's model ``part`` holds weights of ``variant``."""
    from flax_latentup.weights import has_weights

    return has_weights(os.path.join(folder, part), MODEL_CLASSES[part].weights_names(), variant)


def model_variants(
    folder: str, variant: str | None, skip: Sequence[str] = (), *, warn: bool = True
) -> dict[str, str | None]:
    """The weights variant each model of the pipeline folder ``folder`` loads (but those in
    ``skip``), as diffusers picks them: ``variant`` where the model's subfolder holds weights
    of it, else its plain weights (a UserWarning names those, unless ``warn`` is false). A
    WeightsError when none of them holds ``variant``. Reads file names only."""
    from flax_latentup.weights import WeightsError, missing_weights_error

    parts = [part for part in MODEL_CLASSES if part not in skip]
    if variant is None:
        return dict.fromkeys(parts)
    have = {part: _has_variant(folder, part, variant) for part in parts}
    if parts and not any(have.values()):
        first = MODEL_CLASSES[parts[0]]
        e = missing_weights_error(os.path.join(folder, parts[0]), first.weights_names(), variant)
        raise WeightsError(f"none of {', '.join(parts)} has weights of variant {variant!r}: {e}")
    plain = [part for part in parts if not have[part]]
    if plain and warn:
        warnings.warn(
            f"variant {variant!r}: {', '.join(plain)} in {folder} "
            f"{'has' if len(plain) == 1 else 'have'} no weights of it, so the plain weights "
            f"load there (cast to the dtype asked for) and {variant!r} for the others",
            stacklevel=2,
        )
    return {part: variant if have[part] else None for part in parts}


def fetch_pipeline_weights(
    path_or_repo_id: str | os.PathLike,
    variant: str | None,
    skip: Sequence[str] = (),
    **fetch: Any,
) -> str:
    """The local folder of a pipeline with the weights its models load (but those in
    ``skip``): a folder as it is, a hub repo fetched (``fetch``: revision, cache, token) with
    the weights of ``variant`` where the repo has them and the plain ones of the models that
    have none (as diffusers loads a variant, see :func:`model_variants`); other weights are
    never fetched."""
    allow, ignore = hub.pipeline_patterns(variant, skip=tuple(skip))
    folder = hub.resolve(path_or_repo_id, allow_patterns=allow, ignore_patterns=ignore, **fetch)
    if variant is None:
        return folder
    parts = [part for part in MODEL_CLASSES if part not in skip]
    have = [part for part in parts if _has_variant(folder, part, variant)]
    if have and len(have) < len(parts):  # a mixture: the others' plain weights, same commit
        commit = hub.snapshot_commit(folder)
        if commit is not None:
            fetch = {**fetch, "revision": commit}
        allow, ignore = hub.pipeline_patterns(None, skip=(*skip, *have))
        folder = hub.resolve(path_or_repo_id, allow_patterns=allow, ignore_patterns=ignore, **fetch)
    return folder


def check_variant_folder(
    path: str | os.PathLike,
    configs: Mapping[str, Any],
    torch_layout: bool,
    variant: str,
    *,
    scheduler: EulerSchedulerConfig | None = None,
    tokenizer: Any = None,
) -> list[str]:
    """The pipeline entries of ``path`` that a save of the weights ``variant`` of models with
    ``configs`` (by part) keeps; a ValueError (FileExistsError for a Flax file in the way of a
    torch one) if ``path`` holds a pipeline of another layout or other models, or (where they
    are given) another ``scheduler`` config or a ``tokenizer`` of another vocabulary: the kept
    ones would load with the variant. Reads only the folder's ``model_index.json``, configs
    and tokenizer."""
    from flax_latentup.files import check_save_folder

    real = check_save_folder(path)
    kept = [e for e in (*PIPELINE_PARTS, "model_index.json") if os.path.exists(f"{real}/{e}")]
    layout, name = (
        ("torch", PIPELINE_CLASS_NAMES[0]) if torch_layout else ("Flax", PIPELINE_CLASS_NAMES[1])
    )
    if "model_index.json" in kept:
        there = read_json(os.path.join(real, "model_index.json")).get("_class_name")
        if there != name:
            raise ValueError(
                f"{path} holds a pipeline {there!r}, not {name!r}: the {layout}-layout variant "
                f"{variant!r} belongs beside a {layout}-layout pipeline; choose another folder"
            )
    for part in MODEL_CLASSES:
        folder = os.path.join(real, part)
        if torch_layout:
            check_no_flax_weights(folder, variant)
        if os.path.isfile(os.path.join(folder, "config.json")):
            check_same_config(folder, configs[part])
    folder = os.path.join(real, "scheduler")
    if scheduler is not None and os.path.isfile(os.path.join(folder, "scheduler_config.json")):
        check_same_config(folder, scheduler, "scheduler_config.json", "scheduler")
    folder = os.path.join(real, "tokenizer")
    if hasattr(tokenizer, "get_vocab") and "tokenizer" in kept:
        check_pipeline_folder(real, skip=[p for p in PIPELINE_PARTS if p != "tokenizer"])
        theirs = load_tokenizer(folder)
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"{folder} holds another tokenizer: its vocabulary differs from this "
                f"pipeline's. {VARIANT_BESIDE}"
            )
    return kept


@functools.lru_cache(maxsize=8)
def _winograd_program(graphdef: Any) -> Callable:
    """The jitted transform of a UNet's kernels (:func:`winograd_kernels`), one per graph:
    new weights of the same UNet reuse its compiled program. ``settings`` (static) keys it by
    the convolution settings it is traced under."""

    @functools.partial(jax.jit, static_argnames="settings")
    def fn(state, settings):
        del settings
        return winograd_kernels(nnx.merge(graphdef, state))

    return fn


def _weak_hooks(pipe: Any) -> tuple[Callable[..., None], Callable[..., None]]:
    """``(on_progress, on_callback)`` that reach ``pipe``'s hooks without keeping it alive
    (the programs that call them may be cached by the module, past the pipeline's lifetime)."""
    ref = weakref.ref(pipe)

    def on_progress(i) -> None:
        p = ref()
        if p is not None:
            p._on_progress(i)

    def on_callback(i, t, x) -> None:
        p = ref()
        if p is not None:
            p._on_callback(i, t, x)

    return on_progress, on_callback


def _encode_text(text_encoder: FlaxCLIPTextModel, ids: Array) -> tuple[Array, Array]:
    out = text_encoder(ids)
    return out.hidden_states[-1], out.pooler_output


def _call_host(spmd: Any, fn: Callable[..., None], *args: Array) -> None:
    """Call ``fn(*args)`` on the host once, from a program that runs as ``spmd`` says."""
    if spmd is None:  # one device: in program order
        jax.debug.callback(fn, *args, ordered=True)
    elif isinstance(spmd, str):  # pmap: every device runs this; the first one calls
        jax.lax.cond(
            jax.lax.axis_index(spmd) == 0,
            lambda: jax.debug.callback(fn, *args),
            lambda: None,
        )
    else:  # jit over a mesh: one call with whole arrays (ordered effects need one device)
        jax.debug.callback(fn, *args)


def _whole(spmd: Any, x: Array) -> Array:
    """``x`` with its whole batch where the host is called from (see :func:`_call_host`)."""
    if spmd is None:
        return x
    if isinstance(spmd, str):
        return jax.lax.all_gather(x, spmd, tiled=True)
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.lax.with_sharding_constraint(x, NamedSharding(spmd, PartitionSpec()))


def upscale_core(
    graphdefs: GraphDefs,
    params: dict[str, Any],
    batch: dict[str, Array],
    *,
    options: CoreOptions,
    hooks: tuple[Callable[..., None], Callable[..., None]] | None = None,
    spmd: Any = None,
) -> dict[str, Array]:
    """Upscale one batch; a pure function of ``(params, batch)`` given the static options.

    ``params``: ``{"text_encoder", "vae", "unet"}`` NNX states, and optionally
    ``"unet_winograd"``: :func:`~flax_latentup.models.conv.winograd_kernels` of the UNet
    (computed here when absent). ``batch`` (leading axis B on
    every per-image entry):

    - text: ``ids [B, L]`` (+ ``negative_ids [B, L]`` under CFG), or ``prompt_embeds [B, L, D]``
      and ``pooled [B, D]`` (+ ``negative_prompt_embeds``, ``negative_pooled``);
    - ``image``: low-res latents ``[B, h, w, 4]``, pictures ``[B, 8h, 8w, 3]`` in [-1, 1], or
      the VAE posterior's moments ``[B, h, w, 8]`` (mean, then log-variance);
    - ``keys [B, 2]`` (uint32 key data, one key per image) and/or ``noise [B, 2h, 2w, 4]``;
    - shared: ``sigmas [N + 1]`` float32, ``timesteps [N]``, ``init_noise_sigma []``,
      ``guidance_scale []``, ``callback_steps []`` int32.

    ``hooks``: host functions ``(on_progress(step), on_callback(step, timestep, latents))``
    called from inside the loop when ``options.progress``/``options.callback`` are set.
    ``spmd`` says how the program runs, for those calls: ``None`` on one device (ordered
    calls); a ``Mesh`` for a ``jit`` whose batch is split over it (the host is called once per
    step, with the whole batch's latents); a ``pmap`` axis name (the first device calls the
    host, with the latents gathered from all).

    Returns ``{"latents": [B, 2h, 2w, 4]}`` and, when decoding, ``"images": [B, 16h, 16w, 3]``
    float32 in [0, 1].
    """
    text_encoder = nnx.merge(graphdefs.text_encoder, params["text_encoder"])
    vae = nnx.merge(graphdefs.vae, params["vae"])
    unet = nnx.merge(graphdefs.unet, params["unet"])
    keys = batch.get("keys")
    if keys is not None:
        keys = jax.vmap(jax.random.wrap_key_data)(keys)

    # Text conditioning: unconditional rows first under CFG.
    if options.text == "ids":
        context, pooled = _encode_text(text_encoder, batch["ids"])
        if options.cfg:
            neg_context, neg_pooled = _encode_text(text_encoder, batch["negative_ids"])
    else:
        context, pooled = batch["prompt_embeds"], batch["pooled"]
        if options.cfg:
            neg_context, neg_pooled = batch["negative_prompt_embeds"], batch["negative_pooled"]
    if options.cfg:
        context = jnp.concatenate([neg_context, context])
        pooled = jnp.concatenate([neg_pooled, pooled])
    rows = pooled.shape[0]
    timestep_cond = jnp.concatenate(
        [noise_level_embedding(rows, jnp.float32), pooled.astype(jnp.float32)], axis=1
    )
    unet_dtype = unet.dtype
    context = context.astype(unet_dtype)
    timestep_cond = timestep_cond.astype(unet_dtype)

    # Low-res latents.
    image = batch["image"]
    if options.image in ("pixels", "posterior"):
        posterior = (
            vae.encode(image)
            if options.image == "pixels"
            else DiagonalGaussianDistribution.from_moments(image)
        )
        if options.vae_sample_mode == "argmax":
            low = posterior.mode()
        else:
            eps = jax.vmap(
                lambda k, m: jax.random.normal(jax.random.fold_in(k, 1), m.shape, jnp.float32)
            )(keys, posterior.mean)
            low = posterior.mean.astype(jnp.float32) + posterior.std.astype(jnp.float32) * eps
        low = low.astype(jnp.float32) * vae.config.scaling_factor
    else:
        low = image.astype(jnp.float32)
    b, h, w, c = low.shape
    image_cond = jnp.repeat(jnp.repeat(low, 2, axis=1), 2, axis=2)  # nearest 2x; noise level 0

    if options.noise == "given":
        noise = batch["noise"].astype(jnp.float32)
    else:
        noise = jax.vmap(
            lambda k: jax.random.normal(jax.random.fold_in(k, 0), (2 * h, 2 * w, c), jnp.float32)
        )(keys)
    x = noise * batch["init_noise_sigma"].astype(jnp.float32)

    guidance = batch["guidance_scale"].astype(jnp.float32) if options.cfg else None

    def unet_fn(sample, t, ctx, tcond):
        return unet(sample, t.astype(unet_dtype), ctx, tcond)

    def denoiser(x, sigma):
        return denoise(
            unet_fn, x, sigma, image_cond, context, timestep_cond, guidance, model_dtype=unet_dtype
        )

    on_step = None
    if hooks is not None and (options.progress or options.callback):
        timesteps = batch["timesteps"]
        every = batch["callback_steps"]
        on_progress, on_callback = hooks

        def on_step(i, x):
            if options.progress:
                _call_host(spmd, on_progress, i)
            if options.callback:
                jax.lax.cond(
                    i % every == 0,
                    lambda: _call_host(spmd, on_callback, i, timesteps[i], _whole(spmd, x)),
                    lambda: None,
                )

    # Convolutions that run as Winograd get their transformed kernels once, ahead of the loop,
    # rather than at every step (flax_latentup.models.conv); the pipeline passes them in,
    # computed once for its weights.
    kernels = params.get("unet_winograd")
    if kernels is None:
        kernels = winograd_kernels(unet)
    with using_winograd_kernels(unet, kernels):
        latents = euler_sample(denoiser, x, batch["sigmas"], on_step=on_step)
    out = {"latents": latents}
    if options.decode:
        decoded = vae.decode((latents / vae.config.scaling_factor).astype(vae.dtype))
        out["images"] = jnp.clip(decoded.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------
# Input normalisation (host side, before anything compiles)
# --------------------------------------------------------------------------------------------


def _torch_to_numpy(x: Any) -> np.ndarray:
    """A torch tensor's values on the host: floating point ones (bfloat16 and float16 too) as
    float32, others in their own dtype (uint8 pictures stay 0..255)."""
    x = x.detach().to("cpu")
    return x.float().numpy() if x.is_floating_point() else x.numpy()


def _is_float(dtype: Any) -> bool:
    """Whether ``dtype`` is floating point, JAX's bfloat16 (which numpy does not count) too."""
    return jnp.issubdtype(dtype, jnp.floating)


def check_picture_mode(img, name: str | None = None) -> None:
    """ValueError (naming the argument ``name`` if given) for a PIL picture whose pixels
    :func:`pil_to_rgb` cannot read as colours: floating-point ones (mode ``F``), which hold no
    agreed range (Pillow would clip them)."""
    if img.mode == "F":
        raise ValueError(
            f"{name + ': ' if name else ''}32-bit floating-point pictures (PIL mode F) are not "
            "supported, as their range is unknown: give 8- or 16-bit pictures, or arrays in [0, 1]"
        )


def pil_to_rgb(img, name: str | None = None):
    """``img`` as an 8-bit RGB PIL image. 16-bit grey pictures (modes ``I;16``/``I``) are
    scaled to 8 bits: Pillow's own conversion clips them at 255, turning most of them white.
    Alpha is dropped, as diffusers' ``load_image`` drops it. Floating-point pictures (mode
    ``F``) raise a ValueError naming ``name`` (:func:`check_picture_mode`)."""
    import PIL.Image

    check_picture_mode(img, name)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # the same colours; Pillow warns on a direct RGB conversion
    if img.mode.startswith("I"):
        grey = np.asarray(img, dtype=np.float64) / 257.0
        img = PIL.Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8))
    return img.convert("RGB")


def _pil_to_array(img, size: tuple[int, int] | None = None) -> np.ndarray:
    """``img`` as an RGB uint8 ``[H, W, 3]`` array, resized bicubic to ``size`` (W, H) if given
    (PIL's resize, as diffusers' image processor)."""
    import PIL.Image

    img = pil_to_rgb(img, "image")
    if size is not None and img.size != size:
        img = img.resize(size, PIL.Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def fitted_picture_size(height: int, width: int, factor: int = 8) -> tuple[int, int] | None:
    """The size (H, W) a picture of ``height`` x ``width`` is brought to, as diffusers' image
    processor does: each side down to a multiple of the VAE's ``factor``. ``None`` where that
    size cannot be upscaled (sides must then be multiples of ``4 * factor``, at least ``8 *
    factor``), so the pictures diffusers takes are exactly the ones taken here."""
    fitted = (height - height % factor, width - width % factor)
    if any(s % (4 * factor) or s < 8 * factor for s in fitted):
        return None
    return fitted


def _nearest_rows(size_in: int, size_out: int) -> np.ndarray:
    """The source index of each of ``size_out`` rows in torch's nearest interpolation from
    ``size_in`` rows (``F.interpolate``'s default mode, which diffusers resizes arrays and
    tensors with): ``floor(i * size_in / size_out)``, the ratio and product in float32."""
    scale = np.float32(size_in) / np.float32(size_out)
    rows = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(rows, size_in - 1)


def prepare_image(
    image: Any, latent_channels: int = 4, downsample_factor: int = 8
) -> tuple[np.ndarray, str]:
    """Normalise ``image`` to an NHWC float32 array and say whether it is "latents" or "pixels".

    PIL images and uint8 arrays are mapped to [-1, 1]. Float pictures (numpy, JAX or torch) follow
    diffusers: values in [0, 1] are mapped to [-1, 1]; pictures holding negative values are taken
    as already in [-1, 1]. Values a little outside (an unclamped decode) are kept as they are
    (within :data:`FLOAT_PICTURE_LIMIT`; beyond, a ValueError). Torch tensors are NCHW.

    Picture sides are brought down to multiples of ``downsample_factor`` as diffusers' image
    processor does (:func:`fitted_picture_size`): PIL pictures resized bicubic, arrays and
    tensors by nearest rows and columns; a list of PIL pictures of several sizes is resized
    (bicubic) to the size its first one is brought to.
    """
    import PIL.Image

    if image is None:
        raise ValueError("image is required: a PIL image, a list of them, or an array")
    torch_input = False
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if (
        isinstance(image, list | tuple)
        and image
        and all(isinstance(i, PIL.Image.Image) for i in image)
    ):
        # as diffusers: every picture resized (bicubic) to the size the first is brought to
        w, h = image[0].size
        fitted = fitted_picture_size(h, w, downsample_factor)
        size = (w, h) if fitted is None else fitted[::-1]  # None: refused below, by its size
        arr = np.stack([_pil_to_array(i, size) for i in image])
    elif isinstance(image, list | tuple):
        if not image:
            raise ValueError("image is an empty list")
        parts = [
            _pil_to_array(i)
            if isinstance(i, PIL.Image.Image)
            else _torch_to_numpy(i)
            if is_torch_tensor(i)
            else np.asarray(i)
            for i in image
        ]
        torch_input = is_torch_tensor(image[0])
        shapes = {p.shape for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"image: all list entries must have one shape, got {sorted(shapes)}")
        arr = np.stack(parts) if parts[0].ndim == 3 else np.concatenate(parts)
    elif is_torch_tensor(image):
        torch_input = True
        arr = _torch_to_numpy(image)
    elif isinstance(image, np.ndarray | jax.Array):
        arr = np.asarray(image)
    else:
        raise ValueError(
            f"image must be a PIL image, a list of them, a numpy/JAX array or a torch tensor, "
            f"got {type(image).__name__}"
        )
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"image must have 3 or 4 dimensions, got shape {arr.shape}")
    if torch_input:
        arr = arr.transpose(0, 2, 3, 1)
    if arr.shape[0] == 0:
        raise ValueError(f"image holds no images (a batch of 0, shape {arr.shape})")
    if arr.dtype == object or not (
        _is_float(arr.dtype)
        or np.issubdtype(arr.dtype, np.number)
        or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise ValueError(f"image must hold numbers, got dtype {arr.dtype}")
    channels = arr.shape[-1]
    floating = _is_float(arr.dtype)
    if channels == latent_channels:
        kind = "latents"
        if not floating:
            raise ValueError(
                f"image with {latent_channels} channels is taken as low-res latents, which must "
                f"be floating point; got {arr.dtype} (an RGBA picture? convert it to RGB)"
            )
        with np.errstate(over="ignore"):  # beyond float32's range: caught below
            arr = arr.astype(np.float32)
    elif channels == 3:
        kind = "pixels"
        if not floating and arr.dtype != np.uint8:
            raise ValueError(
                f"image: pictures must be uint8 (0..255) or floating point in [0, 1], "
                f"got {arr.dtype}"
            )
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 127.5 - 1.0
        else:
            with np.errstate(over="ignore"):  # beyond float32's range: caught below
                arr = arr.astype(np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            if np.isfinite(lo) and np.isfinite(hi):
                if lo < -FLOAT_PICTURE_LIMIT or hi > FLOAT_PICTURE_LIMIT:
                    raise ValueError(
                        f"image: float pictures must be in [0, 1] (or [-1, 1]), got values in "
                        f"[{lo:.3g}, {hi:.3g}] (pass uint8 for 0..255 pictures)"
                    )
                if lo >= 0.0:  # [0, 1], as diffusers expects of float arrays and tensors
                    arr = arr * 2.0 - 1.0
    else:
        raise ValueError(
            f"image must have 3 channels (pictures) or {latent_channels} (low-res latents) in "
            f"the last axis (NHWC; torch tensors NCHW), got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise ValueError("image contains NaN or infinite values (in float32)")
    f = downsample_factor
    h, w = arr.shape[1:3]
    if kind == "latents":
        if h % 4 or w % 4 or h < 8 or w < 8:
            raise ValueError(
                "image: low-res latents must have sides that are multiples of 4 and at least 8 "
                f"(the 2x latents must be multiples of 8, at least 16), got {h}x{w}"
            )
        return arr, kind
    fitted = fitted_picture_size(h, w, f)
    if fitted is None:
        raise ValueError(
            f"image: pictures must have sides that are multiples of {4 * f} and at least "
            f"{8 * f} (the 2x latents must be multiples of 8, at least 16), or up to {f - 1} "
            f"more, which are cut back by resizing as diffusers does; got {h}x{w}"
        )
    if fitted != (h, w):  # arrays and tensors: nearest rows and columns, as diffusers
        arr = arr[:, _nearest_rows(h, fitted[0])][:, :, _nearest_rows(w, fitted[1])]
    return arr, kind


def _prompt_list(name: str, prompt: str | Sequence[str] | None, batch: int) -> list[str] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt] * batch
    if isinstance(prompt, list | tuple) and all(isinstance(p, str) for p in prompt):
        if len(prompt) != batch:
            raise ValueError(f"{name} has {len(prompt)} entries but the image batch has {batch}")
        return list(prompt)
    if isinstance(prompt, list | tuple):
        bad = next(p for p in prompt if not isinstance(p, str))
        raise ValueError(
            f"{name} must hold strings only, got an entry of type {type(bad).__name__}"
        )
    raise ValueError(f"{name} must be a string or a list of strings, got {type(prompt).__name__}")


def _embeds(name: str, x: Any, ndim: int) -> np.ndarray:
    arr = _torch_to_numpy(x) if is_torch_tensor(x) else np.asarray(x)
    if arr.ndim != ndim or not _is_float(arr.dtype):
        raise ValueError(
            f"{name} must be a float array with {ndim} dimensions, got {arr.dtype} {arr.shape}"
        )
    with np.errstate(over="ignore"):  # beyond float32's range: caught just below
        arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values (in float32)")
    return arr


def _one_key(rng: Any) -> Array:
    if isinstance(rng, bool):
        raise ValueError("rng must be an int seed or a JAX PRNG key, got a bool")
    if isinstance(rng, int | np.integer):
        if not 0 <= int(rng) < 2**63:
            raise ValueError(f"rng seed must be in [0, 2**63), got {rng}")
        return jax.random.key(int(rng))
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"rng must be a single PRNG key, got shape {rng.shape}")
        return rng
    if isinstance(rng, jax.Array | np.ndarray):
        arr = np.asarray(rng)
        if arr.shape == (2,) and arr.dtype == np.uint32:
            return jax.random.wrap_key_data(jnp.asarray(arr))
        raise ValueError(
            f"rng must be an int seed or a JAX PRNG key, got an array {arr.dtype} {arr.shape}"
        )
    raise ValueError(f"rng must be an int seed or a JAX PRNG key, got {type(rng).__name__}")


def image_keys(rng: Any, batch: int) -> np.ndarray:
    """One PRNG key per image, as raw uint32 key data ``[B, 2]``.

    ``rng`` is a seed or key for the whole call (image i gets ``fold_in(key, i)``, so it does
    not change with the batch size), or ``B`` seeds/keys, one per image, used as they are (so
    an image's noise does not depend on its position either): a list, or an array of ``B``
    keys (``jax.random.split(key, B)``, or raw ``uint32`` key data ``[B, 2]``). ``None``
    means seed 0.
    """
    if rng is None:
        rng = 0
    per_image = None  # [B, 2] key data, one key per image
    if isinstance(rng, jax.Array | np.ndarray):
        typed = isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
        if typed and rng.ndim == 1:
            per_image = np.asarray(jax.random.key_data(rng))
        elif not typed and rng.ndim == 2 and rng.shape[1:] == (2,) and rng.dtype == np.uint32:
            per_image = np.asarray(rng)
    elif isinstance(rng, list | tuple):  # the keys may lie on different devices
        per_image = [np.asarray(jax.random.key_data(_one_key(r))) for r in rng]
    if per_image is None:
        key = _one_key(rng)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))
        return np.asarray(jax.random.key_data(keys))
    if len(per_image) != batch:
        raise ValueError(
            f"rng has {len(per_image)} per-image seeds/keys but the image batch has {batch}"
        )
    return np.stack(per_image).astype(np.uint32)


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


class _ModelPart:
    """A pipeline attribute holding one of its models (``pipe.vae``): setting it replaces that
    model, checked as the constructor checks it (see ``_set_model``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, pipe: Any, owner: type | None = None) -> Any:
        return self if pipe is None else pipe._models[self.name]

    def __set__(self, pipe: Any, model: Any) -> None:
        pipe._set_model(self.name, model)


_OFFLOAD = (
    "the whole program runs on the accelerator; for less memory, upscale fewer pictures per "
    "call or call enable_vae_tiling()"
)
# What stands here for the diffusers pipeline methods this one lacks
DIFFUSERS_METHODS = {
    "to": (
        "JAX places the work itself. The models load onto the default device "
        "(jax.default_backend(): TPU, GPU or CPU, chosen by the jax install or JAX_PLATFORMS), "
        "and a call runs on devices=[...] or mesh= when given; the compute dtype is chosen "
        "when loading: from_pretrained(..., dtype=jnp.bfloat16)"
    ),
    "enable_model_cpu_offload": _OFFLOAD,
    "enable_sequential_cpu_offload": _OFFLOAD,
    "enable_attention_slicing": (
        "attention already runs over query chunks wherever its score matrix would be large; "
        "flax_latentup.attention_config(query_chunk_size=...) sets the chunks"
    ),
    "enable_xformers_memory_efficient_attention": (
        "memory-efficient attention is chosen by itself: cuDNN's fused kernel on GPUs where it "
        "applies, query chunks elsewhere; flax_latentup.attention_config(...) overrides it"
    ),
    "enable_vae_slicing": (
        "a batch decodes as one program; enable_vae_tiling() bounds the VAE's memory"
    ),
    "progress_bar": "the step bar is shown by the call itself; set_progress_bar_config(...) sets it",
    "device": (
        "JAX places the work itself: the weights are on jax.devices() of the default backend "
        "(see .params), and a call runs on devices=[...] or mesh= when given"
    ),
}
# the entries of DIFFUSERS_METHODS that are attributes in diffusers, not methods
_DIFFUSERS_ATTRIBUTES = ("device",)


class FlaxStableDiffusionLatentUpscalePipeline(hub.PushToHubMixin):
    """The x2 latent upscaler: text encoder, VAE, K-UNet, CLIP tokenizer and Euler schedule.

    Load with :meth:`from_pretrained` (a diffusers-layout folder or hub repo, torch or Flax
    weights), call like diffusers' ``StableDiffusionLatentUpscalePipeline``.
    """

    def __init__(
        self,
        text_encoder: FlaxCLIPTextModel,
        vae: FlaxAutoencoderKL,
        unet: FlaxUNet2DConditionModel,
        tokenizer: Any,
        scheduler_config: EulerSchedulerConfig | Mapping[str, Any] | Any = None,
        *,
        scheduler: Any = None,
    ):
        """Assemble a pipeline from loaded parts (see :attr:`components`). ``scheduler_config``
        (or ``scheduler``, diffusers' name for it) is an
        :class:`~flax_latentup.sampling.EulerSchedulerConfig`, a ``scheduler_config.json``
        dict or a diffusers ``EulerDiscreteScheduler``. Parts that do not fit together (the
        UNet's channels and text widths against the VAE's and text encoder's configs, the
        tokenizer's size against the vocabulary) raise a ValueError."""
        if (scheduler_config is None) == (scheduler is None):
            raise TypeError(
                "give the pipeline's scheduler once: scheduler_config= (or scheduler=, as "
                f"diffusers names it), got {'both' if scheduler is not None else 'neither'}"
            )
        _check_component_types(text_encoder=text_encoder, vae=vae, unet=unet, tokenizer=tokenizer)
        self.scheduler_config = scheduler_config if scheduler is None else scheduler
        check_components(text_encoder.config, vae.config, unet.config)
        _check_tokenizer_vocab(tokenizer, text_encoder.config)
        self._models = {"text_encoder": text_encoder, "vae": vae, "unet": unet}
        self.tokenizer = tokenizer
        self._progress_bar_config: dict[str, Any] = {}
        self._programs: dict[CoreOptions, Callable] = {}
        self._encode_prompt_fn: Callable | None = None
        self._hooks: dict[str, Any] = {}
        self._host_hooks = _weak_hooks(self)
        self._vae_tiling: dict[str, Any] | None = None
        self._vae_fp32: FlaxAutoencoderKL | None = None
        self._refresh_params()

    def __getattr__(self, name: str) -> Any:
        # Called only for names the pipeline lacks: diffusers' placement and memory methods
        # get an AttributeError that says what stands for them here.
        instead = DIFFUSERS_METHODS.get(name)
        if instead is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        kind = "attribute" if name in _DIFFUSERS_ATTRIBUTES else "method"
        shown = name if name in _DIFFUSERS_ATTRIBUTES else f"{name}()"
        raise AttributeError(
            f"{type(self).__name__} has no {shown} (a diffusers pipeline {kind}): {instead}"
        )

    @staticmethod
    def numpy_to_pil(images: Any) -> list[Any]:
        """Pictures ``[B, H, W, 3]`` (or one ``[H, W, 3]``) of floats in [0, 1] as PIL images,
        as diffusers' ``numpy_to_pil`` (what ``output_type="np"`` gives, to PIL)."""
        import PIL.Image

        arr = np.asarray(images)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must be [B, H, W, 3] (or [H, W, 3]) in [0, 1], got shape {arr.shape}"
            )
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
        return [PIL.Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in arr]

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (the VAE's downsampling factor: 8 for the
        published model), as diffusers' attribute of that name."""
        return self.vae.config.downsample_factor

    # ---- state -----------------------------------------------------------------------------
    #
    # The compiled programs take the models' weights as arrays (``params``, split off the
    # models) and keep copies of them on devices. A model replaced (``pipe.vae = other``) is
    # checked against the others and split anew; weights changed in place (``nnx.update(
    # pipe.unet, trained)``, an optimizer step on the pipeline's own UNet) are noticed at the
    # next call (each variable's array is compared by identity, ~1 ms) and split anew too. A
    # variable or module replaced by a new object is not seen until the model is set again.

    text_encoder = _ModelPart()
    vae = _ModelPart()
    unet = _ModelPart()

    def _set_model(self, part: str, model: Any) -> None:
        """Replace one model (TypeError/ValueError, nothing changed, unless it is the kind of
        model that part runs and fits the others)."""
        _check_component_types(**{part: model})
        configs = {p: m.config for p, m in self._models.items()}
        configs[part] = model.config
        check_components(configs["text_encoder"], configs["vae"], configs["unet"])
        if part == "text_encoder":
            _check_tokenizer_vocab(self.tokenizer, model.config)
        self._models = {**self._models, part: model}  # a copy of the pipeline keeps its own
        self._refresh_params()

    def _sync_weights(self) -> None:
        """Split the models anew if any of their weights changed since the last split."""
        if any(var.get_raw_value() is not value for var, value in self._weights_seen):
            self._refresh_params()

    def _refresh_params(self) -> None:
        split = {part: nnx.split(model) for part, model in self._models.items()}
        graphdefs = GraphDefs(**{part: g for part, (g, _) in split.items()})
        if graphdefs != getattr(self, "graphdefs", None):  # new programs; else the same serve
            self._programs.clear()
            self._encode_prompt_fn = None
        self.graphdefs = graphdefs
        self.params = {part: state for part, (_, state) in split.items()}
        self._weights_seen = [
            (node, node.get_raw_value())
            for model in self._models.values()
            for _, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Variable)
        ]
        self._vae_fp32 = None
        self._replicated: dict[Any, Any] = {}
        self._winograd: dict[Any, Any] = {}
        self._winograd_on_mesh: dict[Any, Any] = {}
        self._on_device: dict[Any, Any] = {}
        self._vae_placed: dict[Any, Any] = {}

    def _unet_winograd_kernels(self) -> dict:
        """The UNet's Winograd-transformed kernels under the current convolution settings,
        computed on the first call and kept (a pure function of the weights, ~16/9 of the
        wide 3x3 kernels' size): every later call skips the transform."""
        key = trace_settings()[1:]  # the convolution setting and the device compiled for
        kernels = self._winograd.get(key)
        if kernels is None:
            fn = _winograd_program(self.graphdefs.unet)
            kernels = self._winograd[key] = fn(self.params["unet"], settings=key)
        return kernels

    @property
    def scheduler_config(self) -> EulerSchedulerConfig:
        """The Euler schedule the pipeline samples with and saves. Setting it takes what the
        constructor takes (an :class:`~flax_latentup.sampling.EulerSchedulerConfig`, a
        ``scheduler_config.json`` dict, a diffusers ``EulerDiscreteScheduler``), checked as
        there; a dict's or scheduler's own keys are what :meth:`save_pretrained` writes."""
        return self._scheduler

    @scheduler_config.setter
    def scheduler_config(self, scheduler: Any) -> None:
        self._scheduler, self._scheduler_dict = _scheduler_config(scheduler)

    @property
    def scheduler(self) -> EulerSchedulerConfig:
        """:attr:`scheduler_config` by diffusers' name: ``pipe.scheduler =
        EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")``
        changes the schedule as it does in diffusers."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        self.scheduler_config = scheduler

    @property
    def dtype(self):
        return self.unet.dtype

    def enable_vae_tiling(self, tile_sample_size: int | None = None) -> None:
        """Run the VAE in overlapping tiles, as diffusers' ``vae.enable_tiling()`` does: the
        upscaled pictures are decoded, and picture inputs larger than one tile encoded, tile by
        tile, so memory stays bounded by the tile size (``tile_sample_size`` pixels, default
        ``vae.config.sample_size``) and every picture size reuses one compiled tile program
        per direction. Results differ slightly from untiled ones where tiles are blended. With
        several devices, each tile is split over them along the batch."""
        self.vae.tile_sizes(tile_sample_size)  # validates the size
        self._vae_tiling = {"tile_sample_size": tile_sample_size}

    def disable_vae_tiling(self) -> None:
        """Decode whole pictures again (the default)."""
        self._vae_tiling = None

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Options for the tqdm bar over steps (``disable=True`` turns it off), as in diffusers."""
        self._progress_bar_config = dict(kwargs)

    # ---- loading and saving ----------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike = DEFAULT_REPO,
        dtype=jnp.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        *,
        param_dtype=jnp.float32,
        token: str | bool | None = None,
        variant: str | None = None,
        text_encoder: FlaxCLIPTextModel | None = None,
        vae: FlaxAutoencoderKL | None = None,
        unet: FlaxUNet2DConditionModel | None = None,
        tokenizer: Any = None,
        scheduler: Any = None,
        **unknown: Any,
    ) -> FlaxStableDiffusionLatentUpscalePipeline:
        """Load a diffusers-layout pipeline folder or hub repo (torch safetensors or Flax weights).

        ``dtype`` is the computation dtype of the three models (``jnp.bfloat16`` on TPU/GPU);
        sigmas and the Euler update stay float32. Only the needed files are fetched from the
        hub (safetensors, configs, tokenizer); ``HF_HUB_OFFLINE=1`` uses the cache only.
        ``variant`` (e.g. ``"fp16"``) loads each model's ``NAME.fp16.safetensors`` (and fetches
        only those) instead of the plain weights, as in diffusers; they are cast to
        ``param_dtype`` on loading. As in diffusers, a model that has no weights of
        ``variant`` loads its plain ones (with a UserWarning naming it), and only a pipeline
        none of whose models has it is refused.

        ``text_encoder``, ``vae``, ``unet``, ``tokenizer`` and ``scheduler`` replace the
        repo's component of that name, as in diffusers (a fine-tuned UNet, another VAE): it is
        neither fetched nor loaded, and is used as given (its own dtype). ``scheduler`` is an
        :class:`~flax_latentup.sampling.EulerSchedulerConfig`, a config dict or a diffusers
        ``EulerDiscreteScheduler``. Every component is checked against the others' configs
        before any weights are read.
        """
        refuse_keywords("from_pretrained", unknown)
        given = {
            "text_encoder": text_encoder,
            "vae": vae,
            "unet": unet,
            "tokenizer": tokenizer,
            "scheduler": scheduler,
        }
        given = {k: v for k, v in given.items() if v is not None}
        _check_component_types(**given)
        if scheduler is not None:
            _scheduler_config(scheduler)  # unsupported options raise here, before any loading
        hub.check_variant(variant)
        fetch = dict(
            revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        # from a hub repo, what describes the pipeline first: every check below is made before
        # any weights are fetched
        folder = hub.resolve(
            path_or_repo_id,
            allow_patterns=list(hub.PIPELINE_CONFIG_PATTERNS),
            ignore_patterns=[f"{part}/*" for part in given] or None,
            **fetch,
        )
        read_pipeline_index(folder)
        check_pipeline_folder(folder, skip=tuple(given))
        configs = {
            part: given[part].config
            if part in given
            else read_config(model.config_class, os.path.join(folder, part, "config.json"))
            for part, model in MODEL_CLASSES.items()
        }
        check_components(configs["text_encoder"], configs["vae"], configs["unet"])
        if tokenizer is None:
            tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
        _check_tokenizer_vocab(tokenizer, configs["text_encoder"])
        if scheduler is None:  # read and checked before any weights
            scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
            scheduler = read_json(scheduler_path)
            read_config(EulerSchedulerConfig, scheduler_path)  # a bad value: named with its file
        commit = hub.snapshot_commit(folder)  # the weights of the commit just checked
        if commit is not None:
            fetch["revision"] = commit
        folder = fetch_pipeline_weights(path_or_repo_id, variant, skip=tuple(given), **fetch)
        variants = model_variants(folder, variant, skip=tuple(given))
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        models = {
            part: given[part]
            if part in given
            else model.from_pretrained(folder, part, variant=variants[part], **kw)
            for part, model in MODEL_CLASSES.items()
        }
        return cls(models["text_encoder"], models["vae"], models["unet"], tokenizer, scheduler)

    @property
    def components(self) -> dict[str, Any]:
        """The pipeline's parts by the names the constructor takes, as in diffusers:
        ``FlaxStableDiffusionLatentUpscalePipeline(**{**pipe.components, "unet": my_unet})``
        builds a pipeline that shares the others."""
        return {
            "text_encoder": self.text_encoder,
            "vae": self.vae,
            "unet": self.unet,
            "tokenizer": self.tokenizer,
            "scheduler_config": self.scheduler_config,
        }

    def save_pretrained(
        self,
        path: str | os.PathLike,
        *,
        torch_layout: bool = False,
        variant: str | None = None,
        **unknown: Any,
    ) -> None:
        """Write the pipeline in the diffusers layout with Flax weights into the folder
        ``path`` (created if needed; a link to a folder is followed).

        ``torch_layout=True`` writes torch checkpoints instead (state-dict keys and layouts, as
        the hub's repo), which diffusers' ``StableDiffusionLatentUpscalePipeline.from_pretrained``
        loads (and this package too): a UNet fine-tuned here, say, goes back to torch.

        ``variant`` (e.g. ``"bf16"``) names each model's weights file as diffusers does
        (``unet/flax_model.bf16.safetensors``), loaded by ``from_pretrained(path,
        variant="bf16")``. A variant is another copy of the same pipeline, saved beside it:
        what ``path`` already holds (the plain weights, other variants, configs, tokenizer,
        scheduler, ``model_index.json``) is kept, and must be a pipeline of the same layout
        whose configs describe these models, with this pipeline's scheduler config and
        tokenizer vocabulary, which load with the variant (else ValueError, nothing written).

        Its five subfolders and ``model_index.json`` are written beside ``path`` first and put
        in place at the end, each replacing the entry of that name; other content of ``path``
        is left alone, and an interrupted save leaves ``path`` as it was.
        """
        from flax_latentup import __version__
        from flax_latentup.files import link_copy, staged_entries

        refuse_keywords("save_pretrained", unknown)
        path = os.path.expanduser(os.fspath(path))
        variant = hub.check_variant(variant)
        if torch_layout:
            index = {
                "_class_name": PIPELINE_CLASS_NAMES[0],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "unet": ["diffusers", "UNet2DConditionModel"],
            }
        else:
            index = {
                "_class_name": PIPELINE_CLASS_NAMES[1],
                "text_encoder": ["flax_latentup", "FlaxCLIPTextModel"],
                "vae": ["flax_latentup", "FlaxAutoencoderKL"],
                "unet": ["flax_latentup", "FlaxUNet2DConditionModel"],
            }
        index |= {
            "_flax_latentup_version": __version__,
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        }
        entries = (*PIPELINE_PARTS, "model_index.json")
        configs = {part: getattr(self, part).config for part in MODEL_CLASSES}
        kept = ()
        if variant:
            kept = check_variant_folder(
                path,
                configs,
                torch_layout,
                variant,
                scheduler=self.scheduler_config,
                tokenizer=self.tokenizer,
            )
        with staged_entries(path, entries) as tmp:
            for entry in kept:  # carried over as they are, less this variant's weights
                model = MODEL_CLASSES.get(entry)
                exclude = model.weights_patterns(variant) if model else ()
                link_copy(os.path.join(path, entry), os.path.join(tmp, entry), exclude)
            for part in MODEL_CLASSES:
                getattr(self, part).save_pretrained(
                    os.path.join(tmp, part), torch_layout=torch_layout, variant=variant
                )
            tokenizer = os.path.join(tmp, "tokenizer")
            if not (os.path.isdir(tokenizer) and os.listdir(tokenizer)):
                save_tokenizer(self.tokenizer, tokenizer)
            scheduler = os.path.join(tmp, "scheduler", "scheduler_config.json")
            if not os.path.isfile(scheduler):
                os.makedirs(os.path.dirname(scheduler), exist_ok=True)
                write_json_atomic(self._scheduler_dict, scheduler)
            if "model_index.json" not in kept:
                write_json_atomic(index, os.path.join(tmp, "model_index.json"))

    def _hub_replace_patterns(self, variant: str | None) -> list[str]:
        if variant is not None:  # that variant's weights files of each model
            return [
                f"{part}/{pattern}"
                for part, model in MODEL_CLASSES.items()
                for pattern in model.weights_patterns(variant)
            ]
        # the pipeline's own entries, as save_pretrained replaces them in a folder
        return [*(f"{part}/*" for part in PIPELINE_PARTS), "model_index.json"]

    def _hub_kept_patterns(self) -> list[str]:
        return ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*"]

    # ---- text --------------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids ``[B, 77]`` int32: padded to max length and truncated, as diffusers does
        (with a warning naming the text left out)."""
        prompts = list(prompts)
        length = self.tokenizer.model_max_length
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=length, truncation=True, return_tensors="np"
        ).input_ids
        # only a row whose tokens fill it (no end or padding token before its last) may have
        # been cut: those alone are tokenized again, whole
        ends = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        filled = [i for i, row in enumerate(ids) if int(row[length - 2]) not in ends]
        whole_rows = (
            self.tokenizer([prompts[i] for i in filled], truncation=False, verbose=False).input_ids
            if filled
            else []
        )
        for i, whole in zip(filled, whole_rows, strict=True):
            if len(whole) > length:  # the text between the kept tokens and the end token
                cut = self.tokenizer.decode(whole[length - 1 : -1])
                warnings.warn(
                    f"prompt {i} is longer than the text encoder's {length} tokens; this part "
                    f"of it is left out: {cut!r}",
                    stacklevel=3,
                )
        return ids.astype(np.int32)

    def encode_prompt(
        self, prompt: str | Sequence[str], *diffusers_args: Any, **unknown: Any
    ) -> tuple[Array, Array]:
        """``(prompt_embeds [B, 77, D], pooled_prompt_embeds [B, D])`` as the pipeline uses them:
        the last layer's output before the final LayerNorm, and the pooled output. (diffusers'
        ``encode_prompt(prompt, device, do_cfg, negative_prompt)`` returns the negative
        prompt's too: here, encode it in a second call.)"""
        if diffusers_args or unknown:
            raise TypeError(
                "encode_prompt() takes the prompt alone and returns (prompt_embeds, "
                "pooled_prompt_embeds); diffusers' encode_prompt(prompt, device, "
                "do_classifier_free_guidance, negative_prompt) also returns the negative "
                "prompt's: here, call encode_prompt(negative_prompt) for those (JAX places the "
                "work itself: there is no device to give)"
            )
        if not isinstance(prompt, str | list | tuple):
            raise ValueError(
                f"prompt must be a string or a list of strings, got {type(prompt).__name__}"
            )
        if not prompt and not isinstance(prompt, str):
            raise ValueError("prompt is an empty list")
        prompts = _prompt_list("prompt", prompt, 1 if isinstance(prompt, str) else len(prompt))
        return self.encode_ids(self.tokenize(prompts))

    def encode_ids(self, input_ids: Any) -> tuple[Array, Array]:
        """``(prompt_embeds [B, L, D], pooled_prompt_embeds [B, D])`` of token ids ``[B, L]``
        (integers, as :meth:`tokenize` makes them): :meth:`encode_prompt` for prompts tokenized
        beforehand, e.g. a dataset's captions tokenized once and embedded batch by batch. The ids
        are checked (rank, dtype, length, the vocabulary's range) before anything runs; one
        program is compiled per shape."""
        self.text_encoder.check_input_ids(input_ids)
        self._sync_weights()
        if self._encode_prompt_fn is None:
            graphdef = self.graphdefs.text_encoder

            @functools.partial(jax.jit, static_argnames="settings")
            def fn(state, ids, settings):
                del settings  # keys the compile cache (see CoreOptions.settings)
                return _encode_text(nnx.merge(graphdef, state), ids)

            self._encode_prompt_fn = fn
        return self._encode_prompt_fn(
            self.params["text_encoder"],
            jnp.asarray(input_ids, jnp.int32),
            settings=trace_settings(),
        )

    # ---- compiled programs -------------------------------------------------------------------

    # An exception in the step bar or in ``callback`` is kept (the first one) and raised by
    # _host_calls in place of what the program then gives. On one device it also stops the
    # program: the host call fails, and JAX's opaque runtime error is replaced by the kept
    # exception. On several devices it must not escape into the program, where the device
    # whose host call failed would stop while the others wait for it at the next step: nothing
    # more is delivered, and it is raised once the program has run its steps.

    def _on_progress(self, i) -> None:
        hooks = self._hooks
        bar = hooks.get("bar")
        if bar is not None and "error" not in hooks:
            try:
                bar.update(1)
            except BaseException as e:
                hooks.setdefault("error", e)
                if hooks["abort"]:
                    raise

    def _on_callback(self, i, t, x) -> None:
        hooks = self._hooks
        if hooks.get("callback") is None:
            return
        # On several devices the host calls are unordered effects: JAX may deliver them out of
        # step order or from several threads. They are held until their turn, so ``callback``
        # sees the steps in order and one at a time. The rows of padding are cut.
        with hooks["lock"]:
            if "error" in hooks:
                return
            hooks["pending"][int(i)] = (float(t), np.asarray(x)[: hooks["rows"]])
            try:
                self._deliver(hooks, every=False)
            except BaseException as e:
                hooks.setdefault("error", e)
                if hooks["abort"]:
                    raise

    @staticmethod
    def _deliver(hooks: dict[str, Any], every: bool) -> None:
        """Pass the held callback steps that are due (``every``: all held, in order)."""
        pending, due = hooks["pending"], hooks["due"]
        while due and (due[0] in pending or (every and pending)):
            step = due.popleft()
            if step in pending:
                t, x = pending.pop(step)
                hooks["callback"](step, t, x)

    @contextlib.contextmanager
    def _host_calls(
        self,
        steps: int,
        rows: int,
        callback: Callable | None,
        every: int,
        show_bar: bool,
        one_device: bool,
    ):
        """The step bar and ``callback`` (every ``every`` steps) that the running program's
        host calls reach (``one_device``: the program runs on one, see above)."""
        from tqdm.auto import tqdm

        bar = None
        if show_bar:
            cfg = {k: v for k, v in self._progress_bar_config.items() if k != "disable"}
            bar = tqdm(total=steps, **cfg)
        self._hooks = {
            "bar": bar,
            "callback": callback,
            "rows": rows,
            "lock": threading.Lock(),
            "pending": {},
            "due": collections.deque(range(0, steps, every)),
            "abort": one_device,
        }
        try:
            try:
                yield
                jax.effects_barrier()  # every host call of the program has returned
            except Exception:
                error = self._hooks.get("error")
                if error is None:
                    raise
                raise error from None  # what the failed host call raised, not JAX's error
            error = self._hooks.get("error")
            if error is not None:
                raise error
            if callback is not None:
                with self._hooks["lock"]:
                    self._deliver(self._hooks, every=True)
        finally:
            self._hooks = {}
            if bar is not None:
                bar.close()

    def _program(self, options: CoreOptions) -> Callable:
        fn = self._programs.get(options)
        if fn is None:
            fn = jax.jit(
                functools.partial(
                    upscale_core,
                    self.graphdefs,
                    options=options,
                    hooks=self._host_hooks,
                )
            )
            self._programs[options] = fn
        return fn

    # ---- the call ----------------------------------------------------------------------------

    @outside_context_mesh()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        image: Any = None,
        num_inference_steps: int = 75,
        guidance_scale: float = 9.0,
        negative_prompt: str | Sequence[str] | None = None,
        rng: int | Array | None = None,
        latents: Any = None,
        prompt_embeds: Any = None,
        negative_prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback: Callable[[int, float, np.ndarray], None] | None = None,
        callback_steps: int = 1,
        vae_sample_mode: str = "sample",
        devices: Sequence[Any] | None = None,
        mesh: Any = None,
        use_pmap: bool = False,
        **unknown: Any,
    ) -> UpscalePipelineOutput | tuple:
        """Upscale ``image`` 2x, guided by ``prompt``.

        ``image``: low-res latents (``[B, h, w, 4]`` NHWC array, or NCHW torch tensor), or
        pictures (PIL image(s), ``[B, H, W, 3]`` uint8 or float in [0, 1]; NCHW torch) that
        are VAE-encoded (``vae_sample_mode`` "sample" as diffusers, or "argmax" for the
        posterior mode). Pictures need sides that are multiples of 32 (latents: 4), at least
        64 (latents: 8); as in diffusers, sides up to 7 beyond are resized down to them (PIL
        pictures bicubic, arrays and tensors nearest). ``prompt``: a string (used for every image) or one per image; ``None``
        means "". ``guidance_scale``: 0 replaces the prompt by "" (the diffusers default use);
        classifier-free guidance runs when it is > 1. ``rng``: an int seed or a JAX key (image i
        draws its noise from ``fold_in(key, i)``, so it does not depend on the batch size), or
        one seed/key per image (a list, or an array of keys such as
        ``jax.random.split(key, B)``); ``None`` is seed 0, so a call without ``rng`` gives
        the same result each time (diffusers draws new noise without a generator).
        ``latents``: the initial noise ``[B, 2h, 2w, 4]`` (NHWC; NCHW for torch), scaled by the
        initial sigma inside. ``callback(step, timestep, latents)`` runs every
        ``callback_steps`` steps with the NHWC latents as a numpy array.
        ``output_type``: "pil", "np" (float32 ``[B, H, W, 3]`` in [0, 1]) or "latent"
        (``None`` is read as "np", as diffusers reads it).

        Devices: with several local devices (or ``devices``/``mesh`` given) the batch is split
        over a ``("data",)`` mesh with one sharded ``jit``; ``use_pmap=True`` takes the
        ``jax.pmap`` path instead. ``callback`` and the step bar work on every path; with
        several devices the callback's latents are gathered from them at the steps it runs.
        """
        # ---- checks, before anything compiles ----
        refuse_keywords("__call__", unknown)
        if output_type is None:
            output_type = "np"
        if output_type == "pt":  # diffusers' torch output: this package does not use torch
            raise ValueError(
                f"output_type must be one of {OUTPUT_TYPES}, got 'pt': for diffusers' NCHW "
                "tensor, take output_type='np' and torch.from_numpy(images.transpose(0, 3, 1, 2))"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if vae_sample_mode not in VAE_SAMPLE_MODES:
            raise ValueError(
                f"vae_sample_mode must be one of {VAE_SAMPLE_MODES}, got {vae_sample_mode!r}"
            )
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int | np.integer)
            or num_inference_steps < 1
        ):
            raise ValueError(
                f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}"
            )
        number = isinstance(guidance_scale, numbers.Real) or (
            (isinstance(guidance_scale, np.ndarray | jax.Array) or is_torch_tensor(guidance_scale))
            and guidance_scale.ndim == 0
        )
        if not number or isinstance(guidance_scale, bool):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}")
        try:
            guidance = float(guidance_scale)
        except (TypeError, ValueError):
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}") from None
        if not math.isfinite(guidance):
            raise ValueError(f"guidance_scale must be finite, got {guidance_scale!r}")
        if (
            isinstance(callback_steps, bool)
            or not isinstance(callback_steps, int | np.integer)
            or callback_steps < 1
        ):
            raise ValueError(f"callback_steps must be a positive integer, got {callback_steps!r}")
        if mesh is not None and devices is not None:
            raise ValueError("pass either devices or mesh, not both")
        if not isinstance(use_pmap, bool | np.bool_):
            raise ValueError(f"use_pmap must be True or False, got {use_pmap!r}")
        if devices is not None or mesh is not None:
            from flax_latentup import parallel

            if devices is not None:
                devices = parallel.check_devices(devices, local=True)
            else:
                mesh = parallel.check_mesh(mesh, local=True)
        if callback is not None and not callable(callback):
            raise ValueError(f"callback must be callable, got {type(callback).__name__}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either prompt or prompt_embeds, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("pooled_prompt_embeds is required with prompt_embeds")
        if negative_prompt_embeds is not None and negative_pooled_prompt_embeds is None:
            raise ValueError(
                "negative_pooled_prompt_embeds is required with negative_prompt_embeds"
            )
        if prompt_embeds is None and pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds was given without prompt_embeds")
        if negative_prompt_embeds is None and negative_pooled_prompt_embeds is not None:
            raise ValueError(
                "negative_pooled_prompt_embeds was given without negative_prompt_embeds"
            )

        latent_channels = self.vae.config.latent_channels
        factor = self.vae.config.downsample_factor
        arr, kind = prepare_image(image, latent_channels, factor)
        batch_size = arr.shape[0]
        h, w = (
            (arr.shape[1], arr.shape[2])
            if kind == "latents"
            else (arr.shape[1] // factor, arr.shape[2] // factor)
        )
        cfg = guidance > 1.0
        width = self.text_encoder.config.hidden_size
        seq = self.tokenizer.model_max_length

        batch: dict[str, Any] = {"image": arr}
        if prompt_embeds is not None:
            pe = _embeds("prompt_embeds", prompt_embeds, 3)
            pp = _embeds("pooled_prompt_embeds", pooled_prompt_embeds, 2)
            if pe.shape[0] != batch_size or pe.shape[2] != width:
                raise ValueError(
                    f"prompt_embeds must have shape [{batch_size}, L, {width}], got {pe.shape}"
                )
            if pp.shape != (batch_size, width):
                raise ValueError(
                    f"pooled_prompt_embeds must have shape [{batch_size}, {width}], got {pp.shape}"
                )
            batch.update(prompt_embeds=pe, pooled=pp)
            text_mode = "embeds"
        else:
            prompts = _prompt_list("prompt", "" if prompt is None else prompt, batch_size)
            if guidance == 0:
                prompts = [""] * batch_size
            text_mode = "ids"
        # the negative prompt or its embeddings are checked whether or not guidance uses them
        if negative_prompt is not None:
            _prompt_list("negative_prompt", negative_prompt, batch_size)
        if negative_prompt_embeds is not None:
            ne = _embeds("negative_prompt_embeds", negative_prompt_embeds, 3)
            npool = _embeds("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds, 2)
            want = (
                batch["prompt_embeds"].shape if text_mode == "embeds" else (batch_size, seq, width)
            )
            if ne.shape != want:
                raise ValueError(
                    f"negative_prompt_embeds must have shape {list(want)}, got {ne.shape}"
                )
            if npool.shape != (batch_size, width):
                raise ValueError(
                    f"negative_pooled_prompt_embeds must have shape [{batch_size}, {width}], got "
                    f"{npool.shape}"
                )
        if cfg:
            if negative_prompt_embeds is None:
                negatives = _prompt_list("negative_prompt", negative_prompt or "", batch_size)
                if text_mode == "embeds" and batch["prompt_embeds"].shape[1] != seq:
                    raise ValueError(
                        f"prompt_embeds of length {batch['prompt_embeds'].shape[1]} with guidance "
                        f"need negative_prompt_embeds of that length: the negative prompt is "
                        f"encoded at the tokenizer's {seq} tokens (encode_prompt makes both)"
                    )
        noise_mode = "keys"
        if latents is not None:
            want = (batch_size, 2 * h, 2 * w, latent_channels)
            if is_torch_tensor(latents):
                lat = _torch_to_numpy(latents)
                nchw = (batch_size, latent_channels, 2 * h, 2 * w)
                if lat.shape != nchw:
                    raise ValueError(
                        f"latents must have shape {list(nchw)} (NCHW, as a torch tensor), got "
                        f"{tuple(lat.shape)}"
                    )
                lat = lat.transpose(0, 2, 3, 1)
            else:
                lat = np.asarray(latents)
            if lat.shape != want:
                raise ValueError(f"latents must have shape {list(want)} (NHWC), got {lat.shape}")
            if not _is_float(lat.dtype):
                raise ValueError(f"latents must be floating point, got dtype {lat.dtype}")
            with np.errstate(over="ignore"):  # beyond float32's range: caught just below
                lat = lat.astype(np.float32)
            if not np.isfinite(lat).all():
                raise ValueError("latents contains NaN or infinite values (in float32)")
            batch["noise"] = lat
            noise_mode = "given"
        keys = image_keys(rng, batch_size)
        if noise_mode == "keys" or (kind == "pixels" and vae_sample_mode == "sample"):
            batch["keys"] = keys

        self._sync_weights()  # the models' weights as they are now

        # ---- text: mixed cases are resolved on the host ----
        if text_mode == "ids":
            batch["ids"] = self.tokenize(prompts)
            if cfg:
                if negative_prompt_embeds is not None:
                    batch["prompt_embeds"], batch["pooled"] = self.encode_prompt(prompts)
                    text_mode = "embeds"
                else:
                    batch["negative_ids"] = self.tokenize(negatives)
        if cfg and text_mode == "embeds":
            batch.pop("ids", None)
            if negative_prompt_embeds is not None:
                batch.update(negative_prompt_embeds=ne, negative_pooled=npool)
            else:
                neg_e, neg_p = self.encode_prompt(negatives)
                batch.update(negative_prompt_embeds=neg_e, negative_pooled=neg_p)

        schedule = make_schedule(self.scheduler_config, int(num_inference_steps))
        batch.update(
            sigmas=schedule.step_sigmas,
            timesteps=schedule.timesteps[: schedule.num_inference_steps],
            init_noise_sigma=np.float32(schedule.init_noise_sigma),
            guidance_scale=np.float32(guidance),
            callback_steps=np.int32(callback_steps),
        )
        show_bar = not self._progress_bar_config.get("disable", False)
        device_list = (
            list(mesh.devices.flat)
            if mesh is not None
            else (list(devices) if devices is not None else jax.local_devices())
        )
        steps = schedule.num_inference_steps
        # host-side VAE work (tiled encode and decode, a float16 retry) runs where the program
        # runs: on its device, or split over its devices
        where = self._vae_placement(device_list, devices, mesh)
        # automatic choices (cuDNN attention, the CPU convolutions) follow the devices run on
        with compiling_for(device_list[0]):
            if kind == "pixels" and self._tiles(arr.shape[1:3]):
                batch["image"] = self._encode_tiled(arr, where)
                kind = "posterior"
            options = CoreOptions(
                cfg=cfg,
                text=text_mode,
                image=kind,
                noise=noise_mode,
                decode=output_type != "latent" and self._vae_tiling is None,
                vae_sample_mode=vae_sample_mode,
                progress=show_bar,
                callback=callback is not None,
                settings=trace_settings(),
            )
            one_device = len(device_list) == 1
            with self._host_calls(
                steps, batch_size, callback, callback_steps, show_bar, one_device
            ):
                out = self._dispatch(options, batch, device_list, devices, mesh, use_pmap)

        if output_type == "latent":
            images: Any = np.array(out["latents"])
        else:
            with compiling_for(device_list[0]):
                images = self._finish_images(out, where)
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        return UpscalePipelineOutput(images=images) if return_dict else (images,)

    # ---- host-side VAE work ------------------------------------------------------------------

    @staticmethod
    def _vae_placement(device_list: list[Any], devices: Any, mesh: Any) -> Any:
        """Where host-side VAE calls run, as the program: ``None`` (JAX's default device), the
        one device asked for, or a mesh whose ``"data"`` axis splits their batch."""
        if len(device_list) > 1:
            from flax_latentup import parallel

            return mesh if mesh is not None else parallel.make_mesh(device_list)
        return device_list[0] if (devices is not None or mesh is not None) else None

    def _tiles(self, pixel_hw: tuple[int, int]) -> bool:
        """Whether tiling is on and a picture of ``pixel_hw`` is larger than one tile."""
        if self._vae_tiling is None:
            return False
        tile, _ = self.vae.tile_sizes(**self._vae_tiling)
        return max(pixel_hw) > tile

    def _placed_vae(self, vae: FlaxAutoencoderKL, where: Any) -> FlaxAutoencoderKL:
        """``vae`` with its weights on ``where`` (copied once, then reused)."""
        if where is None:
            return vae
        key = (id(vae), where)
        placed = self._vae_placed.get(key)
        if placed is None:
            graphdef, state = nnx.split(vae)
            if isinstance(where, Mesh):
                from flax_latentup import parallel

                shared = self._replicated.get(where) if vae is self.vae else None
                state = shared["vae"] if shared else parallel.replicate_on_mesh(state, where)
            else:
                shared = [p for (d, _), p in self._on_device.items() if d == where]
                state = (
                    shared[0]["vae"] if shared and vae is self.vae else jax.device_put(state, where)
                )
            placed = nnx.merge(graphdef, state)
            # copies for one placement are kept (the VAE, and its float32 twin if used)
            kept = {k: v for k, v in self._vae_placed.items() if k[1] == where}
            self._vae_placed = {**kept, key: placed}
        return placed

    @staticmethod
    def _vae_input(x: np.ndarray, where: Any) -> Array:
        """``x`` on ``where``; over a mesh, padded to the ``"data"`` axis and split along it."""
        if isinstance(where, Mesh):
            pad = (-x.shape[0]) % where.shape["data"]
            if pad:
                x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
            return jax.device_put(x, NamedSharding(where, PartitionSpec("data")))
        return jnp.asarray(x) if where is None else jax.device_put(x, where)

    def _encode_tiled(self, pixels: np.ndarray, where: Any) -> np.ndarray:
        """The VAE posterior's moments ``[B, h, w, 2 * C]`` float32 of ``pixels`` (in [-1, 1]),
        encoded in tiles (diffusers' tiled encode) on ``where``."""
        vae = self._placed_vae(self.vae, where)
        x = self._vae_input(pixels, where)
        posterior = vae.encode(x, tiled=True, **self._vae_tiling)
        moments = np.concatenate([np.asarray(posterior.mean), np.asarray(posterior.logvar)], -1)
        return moments[: pixels.shape[0]].astype(np.float32)

    def _decode(self, vae: FlaxAutoencoderKL, latents: np.ndarray, where: Any = None) -> np.ndarray:
        """Host-side decode of final latents to pictures in [0, 1] (tiled when enabled), on
        ``where`` (see :meth:`_vae_placement`)."""
        vae = self._placed_vae(vae, where)
        z = self._vae_input((latents / vae.config.scaling_factor).astype(np.float32), where)
        tiling = self._vae_tiling or {}
        decoded = vae.decode(z, tiled=bool(self._vae_tiling), **tiling)
        decoded = np.asarray(decoded, np.float32)[: latents.shape[0]]
        return np.clip(decoded / 2 + 0.5, 0.0, 1.0)

    def _finish_images(self, out: dict[str, Any], where: Any = None) -> np.ndarray:
        """Pictures from the program's outputs; float16 decodes that overflowed (non-finite)
        are decoded again in float32, as the SD VAE is known to overflow in float16."""
        from flax_latentup.models.vae import nonfinite_images

        latents = np.asarray(out["latents"])
        images = (
            np.asarray(out["images"]) if "images" in out else self._decode(self.vae, latents, where)
        )
        if self.vae.dtype == jnp.float16:
            bad = np.asarray(nonfinite_images(jnp.asarray(images)))
            if bad.any():
                if self._vae_fp32 is None:
                    fp32 = FlaxAutoencoderKL.abstract(
                        self.vae.config, dtype=jnp.float32, param_dtype=jnp.float32
                    )
                    graphdef, _ = nnx.split(fp32)
                    state = jax.tree.map(lambda x: x.astype(jnp.float32), self.params["vae"])
                    self._vae_fp32 = nnx.merge(graphdef, state)
                images = images.copy()
                images[bad] = self._decode(self._vae_fp32, latents[bad], where)
        return images

    def _params_on_mesh(self, mesh: Mesh) -> dict[str, Any]:
        """The parameters replicated over ``mesh``: copied once per mesh, then reused (the
        VAE's copy made for host-side VAE work on that mesh, if any, is taken as it is)."""
        params = self._replicated.get(mesh)
        if params is None:
            from flax_latentup import parallel

            params = dict(self.params)
            vae = self._vae_placed.get((id(self.vae), mesh))
            if vae is not None:
                params["vae"] = nnx.split(vae)[1]
            params = parallel.replicate_on_mesh(params, mesh)
            self._replicated = {mesh: params}  # one copy of the weights on the devices
        return params

    def _mesh_winograd_kernels(self, mesh: Mesh) -> dict:
        """:meth:`_unet_winograd_kernels` replicated over ``mesh`` for the current settings,
        copied once and kept (one entry), so calls over several devices skip the transform
        too. Empty where no convolution runs as Winograd (off the CPU)."""
        key = (mesh, trace_settings()[1:])
        kernels = self._winograd_on_mesh.get(key)
        if kernels is None:
            from flax_latentup import parallel

            kernels = parallel.replicate_on_mesh(self._unet_winograd_kernels(), mesh)
            self._winograd_on_mesh = {key: kernels}
        return kernels

    def _dispatch(
        self,
        options: CoreOptions,
        batch: dict[str, Any],
        device_list: list[Any],
        devices: Any,
        mesh: Any,
        use_pmap: bool,
    ) -> dict[str, Any]:
        """Run the program on one device, or over several with pmap or a sharded jit."""
        if use_pmap or len(device_list) > 1:
            from flax_latentup import parallel

            # both paths take the one copy of the weights replicated over the devices (the
            # copy that host-side VAE work on them uses too): pmap broadcasts it unchanged
            mesh = mesh if mesh is not None else parallel.make_mesh(device_list)
            params = dict(
                self._params_on_mesh(mesh), unet_winograd=self._mesh_winograd_kernels(mesh)
            )
            if use_pmap:
                return parallel.pmap_upscale(
                    self.graphdefs,
                    params,
                    batch,
                    options,
                    device_list,
                    hooks=self._host_hooks,
                    replicated=True,
                )
            return parallel.sharded_upscale(
                self.graphdefs, params, batch, options, mesh, hooks=self._host_hooks
            )
        # one device: the one asked for (by `devices` or `mesh`), else JAX's default
        device = device_list[0] if (devices is not None or mesh is not None) else None
        return self._run(options, batch, device)

    def _run(self, options: CoreOptions, batch: dict[str, Any], device: Any = None):
        program = self._program(options)
        params = dict(self.params, unet_winograd=self._unet_winograd_kernels())
        inputs = jax.tree.map(jnp.asarray, batch)
        if device is not None:  # the program runs where its inputs are
            key = (device, trace_settings())  # the kernels follow the settings
            placed = self._on_device.get(key)
            if placed is None:  # copied once per device, then reused
                vae = self._vae_placed.get((id(self.vae), device))  # from host-side VAE work
                if vae is not None:
                    params["vae"] = nnx.split(vae)[1]
                placed = jax.device_put(params, device)
                self._on_device = {key: placed}
            params, inputs = placed, jax.device_put(inputs, device)
        return jax.block_until_ready(program(params, inputs))

"""``from_pretrained`` / ``save_pretrained`` shared by the three models.

A model class names its config class, the torch weights file names it accepts and its
:class:`~flax_latentup.weights.KeyMap`; loading builds the module abstractly
(``nnx.eval_shape``: no random init of the real weights) and fills it with the strict loader.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_latentup import hub
from flax_latentup.files import atomic_write, check_save_folder, remove_stale_temporaries
from flax_latentup.weights import (
    FLAX_WEIGHTS_NAME,
    WEIGHTS,
    KeyMap,
    load_state,
    open_weights,
    save_flax_weights,
    variant_name,
)

M = TypeVar("M", bound="PretrainedModel")

CONFIG_NAME = "config.json"
# How to replace a model rather than save a variant beside it (a command names its own flags)
REPLACE_WITHOUT_VARIANT = "save without variant= to replace that model"
VARIANT_BESIDE = (
    "A weights variant is saved beside the same model: choose another folder, or "
    f"{REPLACE_WITHOUT_VARIANT}"
)


def read_json(path: str) -> dict[str, Any]:
    """Read a JSON object, with an error that names the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{os.path.basename(path)} not found in {os.path.dirname(path)}"
        ) from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def is_torch_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, told without importing torch."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach")


def check_array(name: str, x: Any, kind: str = "floating") -> None:
    """A ValueError naming the argument ``name`` unless ``x`` is a numpy or JAX array (or a
    tracer) whose dtype is ``kind``: "floating", "integer" or "number" (integer or floating).
    Torch tensors are named as such: the modules take channels-last numpy or JAX arrays."""
    if is_torch_tensor(x):
        nchw = len(getattr(x, "shape", ())) == 4
        raise ValueError(
            f"{name} is a torch tensor: the Flax modules take numpy or JAX arrays"
            + (", channels last" if nchw else "")
            + f" (e.g. {name}.cpu().numpy()"
            + (", transposed from NCHW to NHWC)" if nchw else ")")
        )
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError):  # ragged nesting and the like
            dtype = np.dtype(object)
    wanted = {"floating": (jnp.floating,), "integer": (jnp.integer,)}.get(
        kind, (jnp.floating, jnp.integer)
    )
    if jnp.issubdtype(dtype, jnp.bool_) or not any(jnp.issubdtype(dtype, t) for t in wanted):
        what = {"floating": "floating-point", "integer": "integer"}.get(kind, "numeric")
        raise ValueError(f"{name} must have a {what} dtype, got {dtype}")


def read_config(config_class: Any, path: str) -> Any:
    """``config_class.from_dict`` of the JSON object in the file ``path``; a ConfigError
    (a value the port cannot use) names the file."""
    from flax_latentup.configs import ConfigError

    data = read_json(path)
    try:
        return config_class.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def write_json_atomic(
    data: dict[str, Any], path: str, *, before_rename: Callable[[], None] | None = None
) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (``before_rename``: see
    :func:`~flax_latentup.files.atomic_write`)."""

    def write(f) -> None:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")

    atomic_write(path, write, text=True, before_rename=before_rename)


def missing_config_message(folder: str, how: str = "") -> str:
    """Why ``folder`` cannot be loaded as a model: no ``config.json``; names its subfolders
    that have one (a pipeline's ``unet/``, a fine-tuning checkpoint's ``unet_ema/``)."""
    try:
        inner = sorted(
            d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME))
        )
    except OSError:
        inner = []
    hint = f"; its subfolders {', '.join(inner)} have one: pass one of them{how}" if inner else ""
    return f"{CONFIG_NAME} not found in {folder}{hint}"


def check_no_flax_weights(folder: str, variant: str | None) -> None:
    """FileExistsError if ``folder`` holds this package's weights of ``variant``, which
    ``from_pretrained`` would load before torch weights saved there."""
    flax_name = variant_name(FLAX_WEIGHTS_NAME, variant)
    if os.path.isfile(os.path.join(folder, flax_name)):
        raise FileExistsError(
            f"{folder} holds {flax_name}, which from_pretrained loads before the torch "
            f"weights: remove it, or save the torch layout into another folder"
        )


def weights_file_patterns(names: tuple[str, ...], variant: str | None) -> list[str]:
    """File name patterns (fnmatch) of the weights files ``names`` (``NAME.safetensors``,
    ``NAME.bin``) of ``variant`` (``None``: the plain ones): the single file, the shards and
    their index, as diffusers and transformers name them."""
    v = f".{variant}" if variant else ""
    out = []
    for name in names:
        stem, ext = os.path.splitext(name)
        out += [f"{stem}{v}{ext}", f"{stem}{v}-*-of-*{ext}", f"{stem}{ext}.index{v}.json"]
    return out


def check_no_torch_weights(folder: str, names: tuple[str, ...], variant: str | None) -> None:
    """FileExistsError if ``folder`` holds torch weights of ``variant`` under one of the
    model's torch file ``names`` (``NAME.safetensors`` or ``NAME.bin``; whole or sharded):
    diffusers and transformers would go on loading those, not this package's weights saved
    beside them."""
    for base in names:
        patterns = weights_file_patterns((base,), variant)
        found = sorted(
            e for e in os.listdir(folder) if any(fnmatch.fnmatchcase(e, p) for p in patterns)
        )
        if found:
            raise FileExistsError(
                f"{folder} holds {found[0]}, torch weights that diffusers and transformers "
                f"would go on loading in place of the {variant_name(FLAX_WEIGHTS_NAME, variant)} "
                "saved beside it: save with torch_layout=True to replace them (both libraries "
                "and this package load that), or into another folder"
            )


def check_same_config(
    folder: str, config: Any, filename: str = CONFIG_NAME, what: str = "model"
) -> None:
    """ValueError unless ``folder``'s ``filename`` describes the ``what`` of ``config`` (a
    config dataclass with ``from_dict``): a weights variant is saved beside the same model
    only."""
    path = os.path.join(folder, filename)
    try:
        theirs = type(config).from_dict(read_json(path))
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(
            f"{folder} holds another {what}: its {filename} is not this {what}'s ({e}). "
            f"{VARIANT_BESIDE}"
        ) from None
    if theirs != config:
        fields = [
            f.name
            for f in dataclasses.fields(config)
            if getattr(theirs, f.name) != getattr(config, f.name)
        ]
        raise ValueError(
            f"{folder} holds another {what}: its {filename} differs from this {what}'s in "
            f"{', '.join(fields)}. {VARIANT_BESIDE}"
        )


# Keywords of diffusers' loading and calling that are said otherwise here: what to pass instead.
DIFFUSERS_KEYWORDS = {
    "generator": "rng= (an int seed or a jax.random key): the noise is drawn with JAX",
    "torch_dtype": "dtype= (jnp.float32, jnp.bfloat16 or jnp.float16)",
    "device_map": "nothing: models load onto JAX's default device; calls take devices= or mesh=",
    "low_cpu_mem_usage": "nothing: models are built without weights and filled once",
    "use_safetensors": "nothing: weights are always read from safetensors",
    "safe_serialization": "nothing: weights are always written as safetensors",
    "push_to_hub": "nothing here: push_to_hub(repo_id, ...) saves and uploads in one call",
    "max_shard_size": "nothing: each model's weights are written as one file",
}


def refuse_keywords(where: str, kwargs: Mapping[str, Any]) -> None:
    """The TypeError for the keyword arguments ``kwargs`` that ``where`` (e.g.
    ``"from_pretrained"``) does not take, saying what to pass instead of diffusers' own."""
    for name in kwargs:
        instead = DIFFUSERS_KEYWORDS.get(name)
        if instead is not None:
            raise TypeError(f"{where}() takes no {name}= (a diffusers argument); pass {instead}")
        raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")


def _check_dtype(name: str, dtype) -> jnp.dtype:
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a floating dtype, got {dtype!r}") from None
    if dt not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {dt}")
    return dt


def check_construction(cls: type, config: Any, dtype: Any, param_dtype: Any) -> tuple:
    """``(dtype, param_dtype)`` as jnp dtypes for a model built directly (``cls(config,
    rngs=..., dtype=..., param_dtype=...)``), after a TypeError naming the argument for a
    config of another class or a dtype that is not float32, bfloat16 or float16."""
    if not isinstance(config, cls.config_class):
        hint = (
            " (build one with from_dict(...) from a config.json dict)"
            if isinstance(config, dict)
            else ""
        )
        raise TypeError(
            f"config must be of type {cls.config_class.__name__}{hint}, got {type(config).__name__}"
        )
    return _check_dtype("dtype", dtype), _check_dtype("param_dtype", param_dtype)


class _ShapeOnlyRngs:
    """Stands in for ``nnx.Rngs`` while a model is traced for its shapes only: every stream
    gives the same key, since no value is ever computed.

    A real ``nnx.Rngs`` counts its draws in a variable, and under the trace each count update
    makes JAX describe where a tracer came from (a walk over everything traced so far): building
    the published UNet that way took 10-15 s of Python, against well under a second here.
    """

    def __init__(self):
        self._key = jax.random.key(0)

    def __call__(self) -> jax.Array:
        return self._key

    def __getattr__(self, stream: str):
        if stream.startswith("__"):
            raise AttributeError(stream)
        return self.__call__

    __getitem__ = __getattr__


class PretrainedModel(hub.PushToHubMixin):
    """Mixin for NNX models loadable from Hugging Face folders or hub repos."""

    config_class: ClassVar[type]
    torch_weights_names: ClassVar[tuple[str, ...]]
    # the torch pickles of the same weights that diffusers / transformers also load
    torch_pickle_names: ClassVar[tuple[str, ...]] = ("diffusion_pytorch_model.bin",)
    key_map: ClassVar[KeyMap] = KeyMap()
    # "model_type"/"_class_name" written into config.json for the torch libraries.
    config: Any

    @classmethod
    def abstract(cls: type[M], config: Any, *, dtype=jnp.float32, param_dtype=jnp.float32) -> M:
        """The model with shapes only (``jax.ShapeDtypeStruct`` leaves), nothing allocated."""
        return nnx.eval_shape(
            lambda: cls(config, rngs=_ShapeOnlyRngs(), dtype=dtype, param_dtype=param_dtype)
        )

    @classmethod
    def from_pretrained(
        cls: type[M],
        path_or_repo_id: str | os.PathLike,
        subfolder: str | None = None,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        variant: str | None = None,
        **unknown: Any,
    ) -> M:
        """Load from a local folder or a hub repo id (``config.json`` + safetensors weights).

        ``dtype`` is the computation dtype, ``param_dtype`` the dtype the weights are stored in
        on the device. Folders written by :meth:`save_pretrained` (``flax_model.safetensors``)
        load without conversion; torch safetensors are mapped through the strict loader.
        ``variant`` (e.g. ``"fp16"``) loads ``NAME.fp16.safetensors`` (and fetches only it)
        instead of the plain weights, as in diffusers.
        """
        refuse_keywords("from_pretrained", unknown)
        dtype = _check_dtype("dtype", dtype)
        param_dtype = _check_dtype("param_dtype", param_dtype)
        allow, ignore = hub.with_variant(hub.MODEL_PATTERNS, hub.check_variant(variant))
        folder = hub.resolve(
            path_or_repo_id,
            subfolder=subfolder,
            allow_patterns=allow,
            ignore_patterns=ignore,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        config_path = os.path.join(folder, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(missing_config_message(folder, " as subfolder="))
        config = read_config(cls.config_class, config_path)
        tensors = open_weights(folder, cls.weights_names(), variant)
        # whole or sharded (then named by its index)
        source = (
            tensors.paths[0]
            if len(tensors.paths) == 1
            else os.path.join(folder, variant_name(f"{tensors.name}.index.json", variant))
        )
        return cls.from_tensors(
            config,
            tensors,
            torch_layout=tensors.name != FLAX_WEIGHTS_NAME,
            dtype=dtype,
            param_dtype=param_dtype,
            source=source,
        )

    @classmethod
    def from_tensors(
        cls: type[M],
        config: Any,
        tensors,
        *,
        torch_layout: bool,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        source: str = "checkpoint",
    ) -> M:
        """Build the model from a mapping of arrays (torch state-dict keys or NNX paths)."""
        abstract = cls.abstract(config, dtype=dtype, param_dtype=param_dtype)
        graphdef, abstract_state = nnx.split(abstract)
        state = load_state(
            abstract_state, tensors, torch_layout=torch_layout, key_map=cls.key_map, source=source
        )
        return nnx.merge(graphdef, state)

    def set_remat(self, enabled: bool = True) -> None:
        """Rematerialise each ResNet/attention/transformer block in the backward pass.

        Trades compute for memory under ``jax.grad`` (activations inside a block are
        recomputed instead of stored); outputs and gradients are unchanged. Takes effect the
        next time a function calling the model is traced.
        """
        for _, module in nnx.iter_modules(self):  # type: ignore[arg-type]
            if hasattr(module, "remat"):
                module.remat = bool(enabled)

    def save_pretrained(
        self, path: str | os.PathLike, *, torch_layout: bool = False, variant: str | None = None
    ) -> None:
        """Write ``config.json`` and ``flax_model.safetensors`` to the folder ``path``.

        ``torch_layout=True`` writes the torch checkpoint instead (``model.safetensors`` /
        ``diffusion_pytorch_model.safetensors``: torch state-dict keys and layouts), which
        diffusers and transformers load (``UNet2DConditionModel.from_pretrained(path)``) and
        this package too. A folder already holding ``flax_model.safetensors`` is refused for
        it, since that file would load first here.

        ``variant`` (e.g. ``"bf16"``) names the weights file as diffusers does
        (``flax_model.bf16.safetensors``), loaded by ``from_pretrained(path, variant="bf16")``:
        a variant is another copy of the same model, saved beside it. A ``config.json``
        already in ``path`` is kept, and must describe this model (else ValueError, nothing
        written); the folder's other weights files stay.

        A folder holding this model's torch weights of the same variant is refused for the
        Flax layout (FileExistsError, nothing written): diffusers and transformers would go on
        loading those. ``torch_layout=True`` replaces them.

        Each file is written to a temporary name and renamed, the config right after the
        weights, so an interrupted or failed save never leaves a half-written file under the
        final name nor new weights under the old config. A sharded checkpoint of the same
        name in ``path`` (shards and index, which loaders read before a single file) is
        removed once the new file is in place.
        """
        variant = hub.check_variant(variant)
        path = check_save_folder(path)
        base = self.torch_weights_names[0] if torch_layout else FLAX_WEIGHTS_NAME
        name = variant_name(base, variant)
        if torch_layout:
            check_no_flax_weights(path, variant)
        elif os.path.isdir(path):
            check_no_torch_weights(
                path, (*self.torch_weights_names, *self.torch_pickle_names), variant
            )
        config_path = os.path.join(path, CONFIG_NAME)
        keep_config = variant is not None and os.path.isfile(config_path)
        if keep_config:
            check_same_config(path, self.config)
        os.makedirs(path, exist_ok=True)
        remove_stale_temporaries(path, recursive=False, own=False)  # of a killed save

        def save_weights() -> None:
            save_flax_weights(
                self,  # type: ignore[arg-type]
                os.path.join(path, name),
                torch_layout=torch_layout,
                key_map=self.key_map,
            )

        if keep_config:
            save_weights()
        else:  # the config is written first and renamed right after the weights
            write_json_atomic(self._config_to_save(), config_path, before_rename=save_weights)
        stem = name[: -len(".safetensors")]
        index = variant_name(base + ".index.json", variant)
        for entry in sorted(os.listdir(path)):  # the index first: it names the shards
            if entry == index or fnmatch.fnmatchcase(entry, f"{stem}-*-of-*.safetensors"):
                os.remove(os.path.join(path, entry))

    def _config_to_save(self) -> dict[str, Any]:
        """The config.json dict to write beside the weights: a ``dtype`` (or the older
        ``torch_dtype``) that the source config carried, which transformers loads the weights
        in, is brought to the dtype the weights are saved in."""
        d = self.config.to_dict()
        dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(self, WEIGHTS))}
        if len(dtypes) == 1:
            for key in ("dtype", "torch_dtype"):
                if key in d:
                    d[key] = jnp.dtype(next(iter(dtypes))).name
        return d

    @classmethod
    def weights_names(cls) -> tuple[str, ...]:
        """The weights file names this model loads, in order of preference: this package's,
        then the torch ones (each also as a variant, sharded, see :func:`open_weights`)."""
        return (FLAX_WEIGHTS_NAME, *cls.torch_weights_names)

    @classmethod
    def _weights_stems(cls) -> tuple[str, ...]:
        # the weights file names less ".safetensors"
        return tuple(n[: -len(".safetensors")] for n in cls.weights_names())

    @classmethod
    def weights_patterns(cls, variant: str | None = None) -> list[str]:
        """File name patterns (fnmatch) of this model's weights of ``variant`` (``None``: the
        plain ones), in each layout: the single file, the shards and their index."""
        return weights_file_patterns(cls.weights_names(), variant)

    def _hub_replace_patterns(self, variant: str | None) -> list[str]:
        if variant is not None:
            return self.weights_patterns(variant)
        # this model's weights files in every layout, variant and sharding
        exts = ("*.safetensors", "*.index*.json")
        return [f"{stem}{ext}" for stem in self._weights_stems() for ext in exts]

    def _hub_kept_patterns(self) -> list[str]:
        return [CONFIG_NAME]

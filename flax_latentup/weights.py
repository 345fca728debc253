"""Strict loading of safetensors checkpoints into abstract NNX models, and Flax-format saving.

Torch checkpoints are mapped by one explicit rule table (:data:`TORCH_RULES`): because the
Flax modules name their attributes after the torch state dict, an NNX parameter path such as
``("encoder", "layers", 0, "mlp", "fc1", "kernel")`` corresponds to the torch key
``encoder.layers.0.mlp.fc1.weight`` with a transpose. A model may add key renames (old
spellings, prefixes) and keys to drop (buffers that carry no learned value).

Everything that does not fit is reported at once, in one :class:`WeightsError`: checkpoint keys
nothing consumes, parameters nothing fills, shape mismatches and dtypes that cannot be taken.
Arrays are read one at a time, so peak host memory stays near one copy of the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FLAX_WEIGHTS_NAME = "flax_model.safetensors"
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


class WeightsError(ValueError):
    """A checkpoint that does not fit the model, or that cannot be read."""


class Float16RangeError(WeightsError):
    """Weights beyond float16's range (65504), which a float16 load would turn into inf;
    ``keys``: their checkpoint keys."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


# --------------------------------------------------------------------------------------------
# Reading safetensors
# --------------------------------------------------------------------------------------------


class TensorFile(Mapping[str, np.ndarray]):
    """Read-only view over one or several safetensors files; tensors are read on access."""

    def __init__(self, paths: str | os.PathLike | Iterable[str | os.PathLike]):
        from safetensors import safe_open

        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        self._handles: dict[str, Any] = {}
        self._where: dict[str, Any] = {}
        self.paths = [os.fspath(p) for p in paths]
        self.name: str | None = None  # the weights file name it was opened as, if known
        for path in self.paths:
            if not os.path.isfile(path):
                raise WeightsError(f"weights file not found: {path}")
            try:
                handle = safe_open(path, framework="np")
                keys = list(handle.keys())
            except Exception as e:  # the rust reader raises its own error types
                raise WeightsError(
                    f"cannot read safetensors file {path}: {e} "
                    "(the file is truncated or is not a safetensors file)"
                ) from None
            self._handles[path] = handle
            for k in keys:
                if k in self._where:
                    raise WeightsError(f"tensor {k!r} is stored twice (in {path})")
                self._where[k] = handle
        self._metadata = {}
        for handle in self._handles.values():
            self._metadata.update(handle.metadata() or {})

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return str(self._where[key].get_slice(key).get_dtype()).lower()

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._where[key].get_tensor(key)
        except KeyError:
            raise
        except Exception as e:
            raise WeightsError(f"cannot read tensor {key!r}: {e}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _dtype_name(name: str) -> str:
    """safetensors' short dtype names ("f32", "bf16", "i64", ...) as numpy spells them."""
    name = name.lower()
    if name in ("bf16", "bfloat16"):
        return "bfloat16"
    kinds = {"f": "float", "i": "int", "u": "uint"}
    if name[:1] in kinds and name[1:].isdigit():
        return kinds[name[0]] + name[1:]
    return name


def variant_name(name: str, variant: str | None) -> str:
    """``name`` of a weights file with ``variant`` before its last extension, as diffusers and
    transformers name them: ``model.safetensors`` -> ``model.fp16.safetensors``,
    ``model.safetensors.index.json`` -> ``model.safetensors.index.fp16.json``."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def shard_index(folder: str, name: str, variant: str | None = None) -> dict[str, str] | None:
    """The ``weight_map`` (tensor name -> shard file name) of the index of a sharded ``name``
    (``NAME.index.json``, of ``variant``) in ``folder``; ``None`` when there is no index."""
    index = os.path.join(folder, variant_name(name + ".index.json", variant))
    if not os.path.isfile(index):
        return None
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"cannot read shard index {index}: {e!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(
            f"shard index {index}: `weight_map` must map tensor names to shard file "
            f"names, got {type(weight_map).__name__}"
        )
    return weight_map


def has_weights(folder: str, candidates: Iterable[str], variant: str | None = None) -> bool:
    """Whether ``folder`` holds one of ``candidates`` of ``variant``, whole or sharded: what
    :func:`open_weights` would open (read from file names alone)."""
    return any(
        os.path.isfile(os.path.join(folder, variant_name(name, variant)))
        or os.path.isfile(os.path.join(folder, variant_name(name + ".index.json", variant)))
        for name in candidates
    )


def open_weights(folder: str, candidates: Iterable[str], variant: str | None = None) -> TensorFile:
    """Open the first weights file of ``candidates`` present in ``folder`` (their ``variant``,
    e.g. ``"fp16"``, when given: ``NAME.fp16.safetensors``).

    A sharded checkpoint (``NAME.index.json`` next to the shards) is read through its index.
    """
    names = list(candidates)
    candidates = [variant_name(name, variant) for name in names]
    for base, name in zip(names, candidates, strict=True):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found = TensorFile(path)
        else:
            weight_map = shard_index(folder, base, variant)
            if weight_map is None:
                continue
            found = TensorFile(os.path.join(folder, s) for s in sorted(set(weight_map.values())))
        found.name = base  # which of the candidates, whole or sharded
        return found
    raise missing_weights_error(folder, names, variant)


def missing_weights_error(
    folder: str, candidates: Iterable[str], variant: str | None = None
) -> WeightsError:
    """The error for a ``folder`` that holds none of ``candidates`` of ``variant``: what it
    holds instead, and how to load that (another variant, the plain weights, a conversion)."""
    candidates = [variant_name(name, variant) for name in candidates]
    present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    hint = ""
    cached = f"{os.sep}snapshots{os.sep}" in os.path.abspath(folder)
    if cached and variant is not None:
        hint = (
            f"; variant {variant!r} is not in this Hugging Face cache snapshot: the repo has "
            "none, or (offline) it was never fetched, which a run connected to the internet "
            "does; without variant=, the plain files load"
        )
    elif cached and not any(p.endswith((".safetensors", ".bin")) for p in present):
        repo = re.search(r"models--([^/\\]+)[/\\]snapshots", os.path.abspath(folder))
        repo_id = repo[1].replace("--", "/") if repo else "REPO"
        hint = (
            "; this Hugging Face cache snapshot has no safetensors weights here: either the "
            "download was cut short (connect to the internet to complete it, or remove it "
            "from the cache), or the repo holds its weights as torch pickles only (.bin, "
            f"which are not fetched): `flax-latentup convert {repo_id} FOLDER` (needs the "
            "[torch] extra) turns them into a folder that loads"
        )
    elif variant is not None:
        hint = f"; variant {variant!r} not found here (without variant=, the plain files load)"
    elif variants := sorted(
        {
            m[1]
            for p in present
            if (m := re.fullmatch(r"[^.]+\.(\w+)(-\d+-of-\d+)?\.safetensors", p))
        }
    ):
        hint = f"; this folder holds the weights variants {variants}: pass variant= one of them"
    elif any(p.endswith((".bin", ".ckpt", ".pt", ".pth")) for p in present):
        hint = (
            "; this folder holds torch pickles: turn them into safetensors with "
            "`flax-latentup convert` (needs the [torch] extra)"
        )
    return WeightsError(
        f"no weights in {folder}: expected one of {candidates} (found {present}){hint}"
    )


# --------------------------------------------------------------------------------------------
# The rule table
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
    """How one kind of NNX parameter is stored in a torch state dict.

    ``nnx_name``/``ndim`` select the NNX leaf; ``torch_name`` replaces the last path element;
    ``to_flax`` turns the torch array into the NNX layout and ``torch_shape`` maps an NNX
    shape to the torch one (for checking shapes before reading anything).
    """

    nnx_name: str
    ndim: int | None
    torch_name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    torch_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


TORCH_RULES: tuple[Rule, ...] = (
    # nn.Linear: weight [out, in] -> kernel [in, out]
    Rule("kernel", 2, "weight", lambda w: w.T, lambda s: s[::-1], lambda k: k.T),
    # nn.Conv2d: weight [out, in, kh, kw] -> kernel [kh, kw, in, out]
    Rule(
        "kernel",
        4,
        "weight",
        lambda w: w.transpose(2, 3, 1, 0),
        lambda s: (s[3], s[2], s[0], s[1]),
        lambda k: k.transpose(3, 2, 0, 1),
    ),
    # nn.LayerNorm / nn.GroupNorm: weight -> scale
    Rule("scale", None, "weight", _same, _same, _same),
    # nn.Embedding: weight -> embedding
    Rule("embedding", None, "weight", _same, _same, _same),
    Rule("bias", None, "bias", _same, _same, _same),
)


def _rule_for(name: str, ndim: int) -> Rule | None:
    for rule in TORCH_RULES:
        if rule.nnx_name == name and (rule.ndim is None or rule.ndim == ndim):
            return rule
    return None


def path_to_key(path: tuple) -> str:
    """``("a", 0, "b")`` -> ``"a.0.b"``."""
    return ".".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """Per-model adjustments of torch keys before the rule table applies.

    ``rename(key)`` returns the canonical key (or the key unchanged); ``ignore(key)`` is true
    for keys that carry no learned value (buffers) and are dropped without complaint;
    ``reshape(canonical_key, stored_shape)`` returns the shape the stored array is reshaped
    to (same number of elements) before the rule table applies, e.g. a 1x1 convolution
    weight ``[out, in, 1, 1]`` stored for a linear layer. ``export(canonical_key)`` is the
    key a torch-layout save writes (``rename`` must map it back).
    """

    rename: Callable[[str], str] = _same
    ignore: Callable[[str], bool] = lambda key: False
    reshape: Callable[[str, tuple[int, ...]], tuple[int, ...]] = lambda key, shape: shape
    # canonical key -> the key written by a torch-layout save (the published spelling)
    export: Callable[[str], str] = _same


# --------------------------------------------------------------------------------------------
# Loading into an abstract state
# --------------------------------------------------------------------------------------------


def torch_key(path: tuple, ndim: int) -> tuple[str, Rule | None]:
    """The canonical torch state-dict key of the NNX parameter at ``path`` (``ndim`` dims),
    and the :class:`Rule` that turns the torch array into the NNX layout (``None``: as is)."""
    rule = _rule_for(str(path[-1]), ndim)
    key = path_to_key(path[:-1] + (rule.torch_name,)) if rule else path_to_key(path)
    return key, rule


def _expected(abstract_state: nnx.State, torch_layout: bool) -> dict[str, tuple]:
    """canonical checkpoint key -> (nnx path, variable, rule or None)."""
    out: dict[str, tuple] = {}
    for path, var in nnx.to_flat_state(abstract_state):
        if torch_layout:
            key, rule = torch_key(path, len(var.shape))
        else:
            rule, key = None, path_to_key(path)
        out[key] = (path, var, rule)
    return out


def load_state(
    abstract_state: nnx.State,
    tensors: Mapping[str, np.ndarray],
    *,
    torch_layout: bool,
    key_map: KeyMap | None = None,
    source: str = "checkpoint",
) -> nnx.State:
    """Fill ``abstract_state`` (from ``nnx.eval_shape`` + ``nnx.split``) from ``tensors``.

    ``torch_layout``: the keys/layouts are those of the torch state dict (rule table applied);
    otherwise they are this package's own NNX paths (``flax_model.safetensors``). Each array
    is cast to the dtype of the abstract parameter. Raises one :class:`WeightsError` that
    lists every problem.
    """
    key_map = key_map or KeyMap()
    expected = _expected(abstract_state, torch_layout)
    shape_of = getattr(tensors, "shape", lambda k: tuple(tensors[k].shape))
    dtype_of = getattr(tensors, "dtype", lambda k: str(tensors[k].dtype))

    found: dict[str, str] = {}  # canonical key -> key in the file
    unexpected: list[str] = []
    problems: list[str] = []
    for key in tensors:
        canon = key_map.rename(key) if torch_layout else key
        if canon in expected:
            if canon in found:
                problems.append(f"keys {found[canon]!r} and {key!r} both give {canon!r}")
            found[canon] = key
        elif not (torch_layout and key_map.ignore(key)):
            unexpected.append(key)
    missing = [k for k in expected if k not in found]

    for canon, key in found.items():
        path, var, rule = expected[canon]
        want = tuple(var.shape)
        want_file = rule.torch_shape(want) if rule else want
        got = tuple(shape_of(key))
        if torch_layout:
            stored, got = got, tuple(key_map.reshape(canon, got))
            if np.prod(stored, dtype=np.int64) != np.prod(got, dtype=np.int64):
                raise WeightsError(f"KeyMap.reshape changed the size of {key!r}: {stored} -> {got}")
        if got != want_file:
            problems.append(
                f"shape mismatch for {key!r}: checkpoint {got}, model expects {want_file}"
            )
        dt = _dtype_name(dtype_of(key))
        if dt not in _FLOAT_DTYPES:
            problems.append(f"dtype of {key!r} is {dt}, expected a float type {_FLOAT_DTYPES}")

    if missing or unexpected or problems:
        lines = [f"{source} does not fit the model:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(missing[:40]))
        if unexpected:
            lines.append(
                f"  {len(unexpected)} unexpected key(s): " + ", ".join(sorted(unexpected)[:40])
            )
        lines += ["  " + p for p in problems[:40]]
        raise WeightsError("\n".join(lines))

    new_flat = []
    beyond_float16 = []  # weights that a cast to float16 would turn into inf
    half = np.finfo(np.float16).max
    for canon, (path, var, rule) in expected.items():
        arr = np.asarray(tensors[found[canon]])
        if torch_layout:
            arr = arr.reshape(key_map.reshape(canon, arr.shape))
        if rule is not None:
            arr = rule.to_flax(arr)
        if var.dtype == jnp.float16 and arr.dtype != np.float16:
            wide = np.abs(arr.astype(np.float32))
            if (np.isfinite(wide) & (wide > half)).any():
                beyond_float16.append(found[canon])
            del wide
        value = jnp.asarray(arr, dtype=var.dtype)
        del arr
        new_flat.append((path, var.replace(value)))
    if beyond_float16:
        raise Float16RangeError(
            f"{source}: {len(beyond_float16)} weight(s) hold values beyond float16's range "
            f"(65504), which would load as inf: {', '.join(beyond_float16[:10])}; load with "
            "param_dtype=jnp.bfloat16 or jnp.float32",
            beyond_float16,
        )
    return nnx.from_flat_state(new_flat)


class FixedParam(nnx.Variable):
    """A weight that is loaded and saved with the parameters but is not one to train (torch's
    ``requires_grad=False``: the UNet's random Fourier vector). Not an ``nnx.Param``, so
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` and ``nnx.grad`` leave it alone."""


# The variables that make up a checkpoint: what is loaded and saved.
WEIGHTS = nnx.Any(nnx.Param, FixedParam)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters as ``{"a.0.b": array}`` in this package's own layout."""
    return {path_to_key(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def torch_state_dict(model: nnx.Module, key_map: KeyMap | None = None) -> dict[str, np.ndarray]:
    """The model's parameters as its torch counterpart's state dict (numpy arrays): the rule
    table run backwards, keys spelled by ``key_map.export``. Loading it back with
    ``torch_layout=True`` gives the same parameters bit for bit."""
    key_map = key_map or KeyMap()
    out: dict[str, np.ndarray] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, WEIGHTS)):
        arr = np.asarray(jax.device_get(var[...]))
        key, rule = torch_key(path, arr.ndim)
        out[key_map.export(key)] = np.ascontiguousarray(rule.to_torch(arr) if rule else arr)
    return out


def save_flax_weights(
    model: nnx.Module,
    path: str,
    metadata: dict[str, str] | None = None,
    *,
    torch_layout: bool = False,
    key_map: KeyMap | None = None,
) -> None:
    """Write the model's parameters to ``path`` (safetensors), atomically: NNX paths as keys,
    or with ``torch_layout`` the torch state dict (:func:`torch_state_dict`) that diffusers and
    transformers load."""
    from safetensors.numpy import save_file

    from flax_latentup.files import fsync_file, new_file_mode, temporary_prefix

    if torch_layout:
        arrays = torch_state_dict(model, key_map)
        meta = {"format": "pt"}  # what transformers requires of a safetensors checkpoint
    else:
        arrays = {k: np.asarray(jax.device_get(v)) for k, v in flat_params(model).items()}
        meta = {"format": "flax", "library": "flax_latentup"}
    meta.update(metadata or {})
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, temporary_prefix() + name)
    try:
        save_file(arrays, tmp, metadata=meta)
        os.chmod(tmp, new_file_mode())
        fsync_file(tmp)  # on disk before it takes the name
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

"""Turn a latent-upscaler pipeline (folder or hub id) into a Flax or torch pipeline folder.

Usage::

    python -m flax_latentup_convert SRC DST [--dtype float32|bfloat16|float16] [--layout flax|torch]
                              [--variant NAME] [--source-variant NAME] [--verify] [--overwrite]

SRC is a diffusers-layout folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) holding safetensors or ``.bin`` torch pickles (read with
``torch.load(weights_only=True)``; either may be sharded, with its ``.index.json``), a folder
this package saved (Flax weights), or a hub repo id. DST receives the same layout with
``flax_model.safetensors`` weights, loadable by
``FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(DST)`` without torch, or with
``--layout torch`` the torch checkpoints diffusers loads (``.bin`` to safetensors, Flax back
to torch). ``--variant`` writes the weights as that variant (``NAME.fp16.safetensors``) beside
the pipeline DST holds; ``--source-variant`` reads SRC's. ``--verify`` runs each torch
component (DST's in the torch layout, else SRC's) and its Flax counterpart (read back from DST
in the Flax layout) on one random input (the VAE both ways, encode and decode) and prints the
largest difference.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
import time
from collections.abc import Mapping

import numpy as np

COMPONENTS = ("text_encoder", "vae", "unet")


def torch_files(part: str) -> tuple[str, ...]:
    """The torch weights file names of a pipeline part: its model's safetensors and pickles."""
    from flax_latentup.pipeline import MODEL_CLASSES

    cls = MODEL_CLASSES[part]
    return (*cls.torch_weights_names, *cls.torch_pickle_names)


DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("flax", "torch")
# Relative error above which --verify reports a failure, by stored dtype.
VERIFY_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2, "float16": 1e-2}


class ConversionError(RuntimeError):
    """A source that cannot be converted."""


def _flax_classes():
    from flax_latentup import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel

    return {
        "text_encoder": FlaxCLIPTextModel,
        "vae": FlaxAutoencoderKL,
        "unet": FlaxUNet2DConditionModel,
    }


def _present(folder: str, name: str, variant: str | None = None) -> bool:
    """Whether ``name`` (of ``variant``) is in ``folder``, whole or sharded with an index."""
    from flax_latentup.weights import variant_name

    single = os.path.join(folder, variant_name(name, variant))
    index = os.path.join(folder, variant_name(name + ".index.json", variant))
    return os.path.isfile(single) or os.path.isfile(index)


def _load_pickle(path: str) -> Mapping[str, np.ndarray]:
    """One torch pickle's state dict as numpy arrays (``weights_only=True``)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"cannot read torch checkpoint {path}: {e}") from None
    if isinstance(state, Mapping) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ConversionError(
            f"{path} holds a {type(state).__name__}, expected a state dict (a mapping "
            "of parameter names to tensors)"
        )
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ConversionError(f"{path}: entry {k!r} is not a tensor")
        v = v.detach().cpu()
        if v.dtype == torch.bfloat16:
            import ml_dtypes

            out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = v.numpy()
    return out


def read_torch_weights(
    folder: str, names: tuple[str, ...], variant: str | None = None
) -> Mapping[str, np.ndarray]:
    """The first of ``names`` (of ``variant``, e.g. ``NAME.fp16.safetensors``) in ``folder``
    as a mapping of numpy arrays (safetensors read lazily; torch pickles loaded with
    ``weights_only=True`` and turned into numpy). Sharded checkpoints (``NAME.index.json``
    beside the shards) are read through their index."""
    from flax_latentup.weights import WeightsError, open_weights, shard_index, variant_name

    for name in names:
        if not _present(folder, name, variant):
            continue
        if name.endswith(".safetensors"):
            return open_weights(folder, [name], variant)
        path = os.path.join(folder, variant_name(name, variant))
        if os.path.isfile(path):
            return _load_pickle(path)
        # sharded pickles: NAME.index.json maps each tensor to its shard
        weight_map = shard_index(folder, name, variant)
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            part = _load_pickle(os.path.join(folder, shard))
            listed = {k for k, v in weight_map.items() if v == shard}
            if missing := sorted(listed - part.keys()):
                raise ConversionError(
                    f"{os.path.join(folder, shard)} lacks {len(missing)} tensor(s) its index "
                    f"lists there, e.g. {missing[0]!r}"
                )
            out.update((k, part[k]) for k in listed)
        return out
    wanted = [variant_name(n, variant) for n in names]
    raise WeightsError(f"no torch weights in {folder}: expected one of {wanted}")


def source_layout(folder: str, part: str, variant: str | None = None) -> str:
    """``"flax"`` if the component folder holds this package's weights (of ``variant``),
    ``"torch"`` if torch ones, else a WeightsError naming what was looked for."""
    from flax_latentup.weights import FLAX_WEIGHTS_NAME, WeightsError, variant_name

    if _present(folder, FLAX_WEIGHTS_NAME, variant):
        return "flax"
    if any(_present(folder, n, variant) for n in torch_files(part)):
        return "torch"
    wanted = [variant_name(n, variant) for n in (FLAX_WEIGHTS_NAME, *torch_files(part))]
    raise WeightsError(f"no weights in {folder}: expected one of {wanted}")


def resolve_source(
    src: str, variant: str | None = None, *, weights: bool = True, revision: str | None = None
) -> str:
    """A local folder for ``src``: a folder, or a hub id fetched (at ``revision``) with its
    safetensors weights of ``variant`` (and, for a component that has none, its ``.bin`` torch
    pickles); without ``weights``, its configs, tokenizer and scheduler only (what the checks
    read)."""
    from flax_latentup import hub
    from flax_latentup.weights import FLAX_WEIGHTS_NAME

    if not weights:
        return hub.resolve(src, allow_patterns=list(hub.PIPELINE_CONFIG_PATTERNS))
    allow, ignore = hub.with_variant(hub.PIPELINE_PATTERNS, variant)
    folder = hub.resolve(src, allow_patterns=allow, ignore_patterns=ignore, revision=revision)
    if not os.path.isdir(os.path.expanduser(os.fspath(src))):
        # whole or sharded (NAME.bin.index[.VARIANT].json beside NAME[.VARIANT]-0000k-of-0000n.bin)
        pickles = (
            [f"*.{variant}.bin", f"*.bin.index.{variant}.json", f"*.{variant}-*-of-*.bin"]
            if variant
            else ["*.bin", "*.bin.index.json"]
        )
        for part in COMPONENTS:
            names = torch_files(part)
            sub = os.path.join(folder, part)
            if not any(_present(sub, n, variant) for n in (FLAX_WEIGHTS_NAME, *names)):
                allow = [*allow, *(f"{part}/{p}" for p in pickles)]
                folder = hub.resolve(
                    src, allow_patterns=allow, ignore_patterns=ignore, revision=revision
                )
    return folder


def check_destination(
    src: str,
    dst: str,
    overwrite: bool,
    variant: str | None = None,
    source_variant: str | None = None,
) -> None:
    """Refuse a destination that would lose data or cannot be written, before any work.

    A ``variant`` is written beside the pipeline DST holds (its other files kept): DST may
    then be that pipeline, the source's own folder included when the variants differ; an
    existing copy of the variant there is replaced only with ``overwrite``."""
    from flax_latentup.files import TMP_PREFIX, check_save_folder, is_stale_temporary
    from flax_latentup.pipeline import MODEL_CLASSES, PIPELINE_PARTS

    real = check_save_folder(dst, "DST")
    beside = variant is not None and os.path.isfile(os.path.join(real, "model_index.json"))
    if os.path.isdir(os.path.expanduser(src)) and not (beside and variant != source_variant):
        source = os.path.realpath(os.path.expanduser(src))
        replaced = [os.path.join(real, p) for p in (*PIPELINE_PARTS, "model_index.json")]
        if _same_folder(source, real) or any(_within(source, r) for r in replaced):
            raise ConversionError(
                f"DST {dst!r} is the source folder (or holds it where the pipeline goes): "
                "converting there would replace the source's weights; choose another folder"
            )
    now = time.time()
    held = [
        e
        for e in (os.listdir(real) if os.path.isdir(real) else ())
        if not (  # what a killed save left behind does not count (the save removes it)
            e.startswith(TMP_PREFIX)
            and is_stale_temporary(e, os.lstat(os.path.join(real, e)).st_mtime, now)
        )
    ]
    if overwrite or not held:
        return
    if not beside:
        raise ConversionError(
            f"DST {dst!r} exists and is not empty (pass --overwrite to replace the pipeline "
            "in it; other files there are left alone)"
        )
    for part, model in MODEL_CLASSES.items():
        sub = os.path.join(real, part)
        have = sorted(os.listdir(sub)) if os.path.isdir(sub) else []
        taken = [
            f
            for f in have
            if any(fnmatch.fnmatchcase(f, p) for p in model.weights_patterns(variant))
        ]
        if taken:
            raise ConversionError(
                f"DST {dst!r} already holds the variant {variant!r} ({part}/{taken[0]}): pass "
                "--overwrite to replace it"
            )


def _same_folder(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one folder, by identity (device and inode), so that two
    names of it (a bind mount, a case-insensitive file system) count as one."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (compared as :func:`_same_folder`)."""
    path = os.path.abspath(path)
    while True:
        if _same_folder(path, folder):
            return True
        parent = os.path.dirname(path)
        if parent == path:
            return False
        path = parent


def _check_variant_name(flag: str, variant: str | None) -> str | None:
    from flax_latentup import hub

    try:
        return hub.check_variant(variant)
    except ValueError as e:
        raise ConversionError(f"{flag}: {e}") from None


def convert(
    src: str,
    dst: str,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    layout: str = "flax",
    variant: str | None = None,
    source_variant: str | None = None,
    verify: bool = False,
):
    """Convert the pipeline at ``src`` (torch or Flax weights, of ``source_variant``) into a
    ``layout`` pipeline folder ``dst`` (its weights as ``variant``). Returns the loaded Flax
    pipeline and, with ``verify``, ``(folder, variant)`` of the torch side to compare with
    (else ``None``). Everything is checked before any weights are read."""
    import jax.numpy as jnp

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline, hub
    from flax_latentup.models.base import REPLACE_WITHOUT_VARIANT, read_config, read_json
    from flax_latentup.pipeline import (
        MODEL_CLASSES,
        check_pipeline_folder,
        check_variant_folder,
        load_tokenizer,
        read_pipeline_index,
    )
    from flax_latentup.sampling import EulerSchedulerConfig
    from flax_latentup.weights import FLAX_WEIGHTS_NAME, Float16RangeError, open_weights

    dst = os.path.expanduser(os.fspath(dst))
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ConversionError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    variant = _check_variant_name("--variant", variant)
    source_variant = _check_variant_name("--source-variant", source_variant)
    check_destination(src, dst, overwrite, variant, source_variant)
    # a hub source: its configs, tokenizer and scheduler first, so that every check below is
    # made before its weights are fetched
    folder = resolve_source(src, source_variant, weights=False)
    try:
        read_pipeline_index(folder)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    check_pipeline_folder(folder)
    configs = {
        part: read_config(cls.config_class, os.path.join(folder, part, "config.json"))
        for part, cls in MODEL_CLASSES.items()
    }
    tokenizer = load_tokenizer(os.path.join(folder, "tokenizer"))
    scheduler_path = os.path.join(folder, "scheduler", "scheduler_config.json")
    scheduler = read_json(scheduler_path)
    read_config(EulerSchedulerConfig, scheduler_path)  # a value it cannot use: named with its file
    if variant is not None:
        try:
            check_variant_folder(
                dst,
                configs,
                layout == "torch",
                variant,
                scheduler=EulerSchedulerConfig.from_dict(scheduler),
                tokenizer=tokenizer,
            )
        except ValueError as e:  # said of the Python API there: said of this command here
            raise type(e)(
                str(e).replace(
                    REPLACE_WITHOUT_VARIANT,
                    "convert without --variant (and with --overwrite) to replace that pipeline",
                )
            ) from None
    # now with the weights, of the commit just checked
    folder = resolve_source(src, source_variant, revision=hub.snapshot_commit(folder))
    layouts = {
        part: source_layout(os.path.join(folder, part), part, source_variant) for part in configs
    }
    torch_side = None
    if verify:
        if layout == "torch":
            torch_side = (dst, variant)
        elif all(v == "torch" for v in layouts.values()):
            torch_side = (folder, source_variant)
        else:
            raise ConversionError(
                "--verify compares with torch: SRC holds Flax weights, so write DST in the "
                "torch layout (--layout torch) to verify"
            )
    param_dtype = jnp.dtype(dtype)
    models = {}
    for part, cls in MODEL_CLASSES.items():
        sub = os.path.join(folder, part)
        if layouts[part] == "torch":
            tensors = read_torch_weights(sub, torch_files(part), source_variant)
        else:
            tensors = open_weights(sub, [FLAX_WEIGHTS_NAME], source_variant)
        try:
            models[part] = cls.from_tensors(
                configs[part],
                tensors,
                torch_layout=layouts[part] == "torch",
                param_dtype=param_dtype,
                source=sub,
            )
        except Float16RangeError as e:  # said of the Python API there: of this command here
            more = f" (and {len(e.keys) - 1} more)" if len(e.keys) > 1 else ""
            raise ConversionError(_FLOAT16_RANGE.format(part=part, name=e.keys[0] + more)) from None
        if param_dtype == jnp.float16:
            _check_finite(part, models[part])
    pipe = FlaxStableDiffusionLatentUpscalePipeline(
        models["text_encoder"], models["vae"], models["unet"], tokenizer, scheduler
    )
    pipe.save_pretrained(dst, torch_layout=layout == "torch", variant=variant)
    return pipe, torch_side


def _check_finite(part: str, model) -> None:
    """A ConversionError naming the first parameter of ``model`` that is not finite (after
    casting to float16: values beyond its range become infinite)."""
    import jax
    from flax import nnx

    for path, value in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
        if not np.isfinite(np.asarray(value, np.float32)).all():
            name = ".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            raise ConversionError(_FLOAT16_RANGE.format(part=part, name=name))


_FLOAT16_RANGE = (
    "--dtype float16: {part} parameter {name} holds values beyond float16's range (65504) or "
    "non-finite ones; store bfloat16 or float32 weights instead"
)


def verify(folder: str, pipe, variant: str | None = None) -> dict[str, float]:
    """Run each torch component of ``folder`` (its weights of ``variant``, computed in float32)
    and the Flax one on one random input; returns the max abs error relative to the torch
    output's max abs value, per component."""
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    rng = np.random.default_rng(0)
    errors = {}
    kw = dict(variant=variant, dtype=torch.float32)

    def rel(a, b):
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

    with torch.no_grad():
        te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"), **kw).eval()
        vocab = te.config.vocab_size
        ids = rng.integers(0, vocab, (1, 77)).astype(np.int64)
        ref = te(torch.from_numpy(ids), output_hidden_states=True)
        got = pipe.text_encoder(jnp.asarray(ids, jnp.int32))
        errors["text_encoder"] = max(
            rel(got.hidden_states[-1], ref.hidden_states[-1].numpy()),
            rel(got.pooler_output, ref.pooler_output.numpy()),
        )
        del te

        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae"), **kw).eval()
        c = vae.config.latent_channels
        z = rng.standard_normal((1, 8, 8, c)).astype(np.float32)
        ref = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
        got = pipe.vae.decode(jnp.asarray(z))
        decoded = rel(got, ref.transpose(0, 2, 3, 1))
        # and the encoder (picture inputs): the posterior's mean and log-variance
        side = 8 * pipe.vae.config.downsample_factor
        x = rng.uniform(-1, 1, (1, side, side, 3)).astype(np.float32)
        ref = vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
        got = pipe.vae.encode(jnp.asarray(x))
        errors["vae"] = max(
            decoded,
            rel(got.mean, ref.mean.numpy().transpose(0, 2, 3, 1)),
            rel(got.logvar, ref.logvar.numpy().transpose(0, 2, 3, 1)),
        )
        del vae

        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), **kw).eval()
        cfg = unet.config
        x = rng.standard_normal((1, 16, 16, cfg.in_channels)).astype(np.float32)
        ctx = rng.standard_normal((1, 77, cfg.cross_attention_dim)).astype(np.float32)
        tc = rng.standard_normal((1, cfg.time_cond_proj_dim)).astype(np.float32)
        t = np.array([0.3], np.float32)
        ref = unet(
            torch.from_numpy(x.transpose(0, 3, 1, 2)),
            torch.from_numpy(t),
            encoder_hidden_states=torch.from_numpy(ctx),
            timestep_cond=torch.from_numpy(tc),
        ).sample.numpy()
        got = pipe.unet(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(tc))
        errors["unet"] = rel(got, ref.transpose(0, 2, 3, 1))
    return errors


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flax-latentup convert",
        description="Convert a StableDiffusionLatentUpscalePipeline (torch or Flax weights; "
        "folder or hub id) into a Flax or torch pipeline folder.",
    )
    p.add_argument("src", help="pipeline folder (torch or Flax weights) or hub repo id")
    p.add_argument("dst", help="output folder for the converted pipeline")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="stored weight dtype (default: %(default)s, whatever SRC stores)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="flax",
        help="weights DST receives: flax (flax_model.safetensors, default) or torch "
        "(the checkpoints diffusers and transformers load)",
    )
    p.add_argument(
        "--variant",
        metavar="NAME",
        help="write the weights as this variant (NAME.fp16.safetensors for fp16) beside the "
        "pipeline DST holds, keeping its other files",
    )
    p.add_argument(
        "--source-variant",
        metavar="NAME",
        help="read SRC's weights of this variant (e.g. fp16) instead of the plain ones",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare torch (DST in the torch layout, else SRC) and Flax on one random input",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty DST (its pipeline parts are replaced, other files kept; "
        "with --variant, that variant's weights there are replaced)",
    )
    return p


# Variant names that say a dtype, and that dtype.
VARIANT_DTYPES = {
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flax_latentup import ConfigError, HubError, WeightsError

    said = VARIANT_DTYPES.get(args.variant or "")
    if said is not None and said != args.dtype:
        print(
            f"note: --variant {args.variant} stores the weights as {args.dtype} (--dtype {said} "
            f"stores {said})",
            file=sys.stderr,
        )

    try:
        pipe, torch_side = convert(
            args.src,
            args.dst,
            dtype=args.dtype,
            overwrite=args.overwrite,
            layout=args.layout,
            variant=args.variant,
            source_variant=args.source_variant,
            verify=args.verify,
        )
    except (
        ConversionError,
        ConfigError,
        HubError,
        WeightsError,
        FileNotFoundError,
        ValueError,
        OSError,
    ) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}" + (f" (variant {args.variant})" if args.variant else ""))
    if torch_side is not None:
        if args.layout == "flax":  # verify what was written: DST read back
            import jax.numpy as jnp

            from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline

            pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
                os.path.expanduser(args.dst),
                variant=args.variant,
                param_dtype=jnp.dtype(args.dtype),
            )
        errors = verify(torch_side[0], pipe, torch_side[1])
        tol = VERIFY_TOLERANCE[args.dtype]
        ok = True
        for part, err in errors.items():
            flag = "ok" if err <= tol else "TOO LARGE"
            ok &= err <= tol
            print(
                f"verify {part:13s} max |flax - torch| / max |torch| = {err:.3e}  ({flag}, tol {tol:g})"
            )
        return 0 if ok else 1
    return 0

"""Turn a torch latent-upscaler pipeline (folder or hub id) into a Flax pipeline folder.

Usage::

    python -m convert SRC DST [--dtype float32|bfloat16|float16] [--verify] [--overwrite]

SRC is a diffusers-layout folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) holding safetensors or ``.bin`` torch pickles (read with
``torch.load(weights_only=True)``), or a hub repo id. DST receives the same layout with
``flax_model.safetensors`` weights, loadable by
``FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(DST)`` without torch.
``--verify`` runs each torch component and its Flax counterpart on one random input and
prints the largest difference.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

import numpy as np

COMPONENTS = ("text_encoder", "vae", "unet")
TORCH_FILES = {
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
}
DTYPES = ("float32", "bfloat16", "float16")
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


def read_torch_weights(folder: str, names: tuple[str, ...]) -> Mapping[str, np.ndarray]:
    """The first of ``names`` in ``folder`` as a mapping of numpy arrays (safetensors read
    lazily; torch pickles loaded with ``weights_only=True`` and turned into numpy)."""
    from flax_latentup.weights import WeightsError, open_weights

    for name in names:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors") and (
            os.path.isfile(path) or os.path.isfile(path + ".index.json")
        ):
            return open_weights(folder, [name])
        if name.endswith(".bin") and os.path.isfile(path):
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
    raise WeightsError(f"no torch weights in {folder}: expected one of {names}")


def resolve_source(src: str) -> str:
    """A local folder for ``src``: a folder, or a hub id fetched with its safetensors weights
    (and, for a component that has none, its ``.bin`` torch pickles)."""
    from flax_latentup import hub

    folder = hub.resolve(src, allow_patterns=hub.PIPELINE_PATTERNS)
    if not os.path.isdir(os.path.expanduser(os.fspath(src))):
        for part, names in TORCH_FILES.items():
            sub = os.path.join(folder, part)
            if not any(_present(sub, n) for n in names if n.endswith(".safetensors")):
                folder = hub.resolve(src, allow_patterns=[*hub.PIPELINE_PATTERNS, f"{part}/*.bin"])
    return folder


def _present(folder: str, name: str) -> bool:
    path = os.path.join(folder, name)
    return os.path.isfile(path) or os.path.isfile(path + ".index.json")


def check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Refuse a destination that would lose data or cannot be written, before any work."""
    from flax_latentup.files import check_save_folder
    from flax_latentup.pipeline import PIPELINE_PARTS

    real = check_save_folder(dst, "DST")
    if os.path.isdir(os.path.expanduser(src)):
        source = os.path.realpath(os.path.expanduser(src))
        replaced = [os.path.join(real, p) for p in (*PIPELINE_PARTS, "model_index.json")]
        if source == real or any(source == r or source.startswith(r + os.sep) for r in replaced):
            raise ConversionError(
                f"DST {dst!r} is the source folder (or holds it where the Flax pipeline goes): "
                "converting there would replace the torch weights; choose another folder"
            )
    if os.path.isdir(real) and os.listdir(real) and not overwrite:
        raise ConversionError(
            f"DST {dst!r} exists and is not empty (pass --overwrite to replace the pipeline "
            "in it; other files there are left alone)"
        )


def convert(src: str, dst: str, *, dtype: str = "float32", overwrite: bool = False):
    """Convert the torch pipeline at ``src`` into a Flax pipeline folder ``dst``; returns the
    loaded Flax pipeline."""
    import jax.numpy as jnp
    from transformers import CLIPTokenizer

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
    from flax_latentup.models.base import read_json
    from flax_latentup.pipeline import check_pipeline_folder

    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    check_destination(src, dst, overwrite)
    folder = resolve_source(src)
    index = read_json(os.path.join(folder, "model_index.json"))
    if index.get("_class_name") != "StableDiffusionLatentUpscalePipeline":
        raise ConversionError(
            f"{folder}: model_index.json `_class_name` is {index.get('_class_name')!r}, "
            "expected 'StableDiffusionLatentUpscalePipeline'"
        )
    check_pipeline_folder(folder)
    param_dtype = jnp.dtype(dtype)
    models = {}
    for part, cls in _flax_classes().items():
        sub = os.path.join(folder, part)
        config = cls.config_class.from_dict(read_json(os.path.join(sub, "config.json")))
        tensors = read_torch_weights(sub, TORCH_FILES[part])
        models[part] = cls.from_tensors(
            config, tensors, torch_layout=True, param_dtype=param_dtype, source=sub
        )
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    scheduler = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    pipe = FlaxStableDiffusionLatentUpscalePipeline(
        models["text_encoder"], models["vae"], models["unet"], tokenizer, scheduler
    )
    pipe.save_pretrained(dst)
    return pipe, folder


def verify(folder: str, pipe, dtype: str = "float32") -> dict[str, float]:
    """Run each torch component of ``folder`` and the Flax one on one random input; returns
    the max abs error relative to the torch output's max abs value, per component."""
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    rng = np.random.default_rng(0)
    errors = {}

    def rel(a, b):
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))

    with torch.no_grad():
        te = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
        vocab = te.config.vocab_size
        ids = rng.integers(0, vocab, (1, 77)).astype(np.int64)
        ref = te(torch.from_numpy(ids), output_hidden_states=True)
        got = pipe.text_encoder(jnp.asarray(ids, jnp.int32))
        errors["text_encoder"] = max(
            rel(got.hidden_states[-1], ref.hidden_states[-1].numpy()),
            rel(got.pooler_output, ref.pooler_output.numpy()),
        )
        del te

        vae = AutoencoderKL.from_pretrained(os.path.join(folder, "vae")).eval()
        c = vae.config.latent_channels
        z = rng.standard_normal((1, 8, 8, c)).astype(np.float32)
        ref = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy()
        got = pipe.vae.decode(jnp.asarray(z))
        errors["vae"] = rel(got, ref.transpose(0, 2, 3, 1))
        del vae

        unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval()
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
        description="Convert a torch StableDiffusionLatentUpscalePipeline (folder or hub id) "
        "into a Flax pipeline folder.",
    )
    p.add_argument("src", help="torch pipeline folder or hub repo id")
    p.add_argument("dst", help="output folder for the Flax pipeline")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="stored weight dtype")
    p.add_argument(
        "--verify", action="store_true", help="compare torch and Flax on one random input"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty DST (its pipeline parts are replaced, other files kept)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from flax_latentup import ConfigError, HubError, WeightsError

    try:
        pipe, folder = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite)
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
    print(f"wrote {args.dst}")
    if args.verify:
        errors = verify(folder, pipe, args.dtype)
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

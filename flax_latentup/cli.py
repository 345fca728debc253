"""The ``flax-latentup`` command: batch upscaling of folders, conversion, version.

``flax-latentup upscale -i INPUT [INPUT ...] -o OUTDIR [options]`` upscales pictures (PNG,
JPEG, WebP) and ``.npy`` low-res latents 2x. Outputs mirror the input names, are written
atomically (temporary file, then rename) and are skipped when they exist, so a killed run
continues where it stopped when started again. A corrupt input is reported and skipped;
the exit code is 1 when anything failed, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

from flax_latentup import __version__

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
LATENT_EXTS = (".npy",)
OUT_EXTS = ("png", "jpg", "webp")
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_MODEL = "stabilityai/sd-x2-latent-upscaler"
REPORT_NAME = "flax-latentup-report.json"
TMP_PREFIX = ".flax-latentup-tmp-"


class UsageError(Exception):
    """A bad command line, found before any model is loaded."""


# --------------------------------------------------------------------------------------------
# Work items
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    """One input file and where its output goes."""

    src: str
    rel: str  # relative output name without extension (folder structure kept)
    out: str = ""
    prompt: str | None = None
    seed: int = 0
    note: str | None = None


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_latentup", "jax_compilation_cache")


def _is_input(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS + LATENT_EXTS)


def collect_inputs(inputs: Sequence[str], recursive: bool) -> list[Item]:
    """Expand files, folders and glob patterns into work items (sorted, de-duplicated)."""
    items: dict[str, Item] = {}
    for spec in inputs:
        if os.path.isdir(spec):
            pattern = "**/*" if recursive else "*"
            found = sorted(
                p
                for p in glob.glob(os.path.join(spec, pattern), recursive=recursive)
                if os.path.isfile(p) and _is_input(p)
            )
            if not found:
                hint = "" if recursive else " (use -r to search sub-folders)"
                raise UsageError(f"input folder {spec!r} holds no PNG/JPEG/WebP/.npy files{hint}")
            for p in found:
                rel = os.path.splitext(os.path.relpath(p, spec))[0]
                items.setdefault(os.path.abspath(p), Item(src=p, rel=rel))
        elif os.path.isfile(spec):
            if not _is_input(spec):
                raise UsageError(
                    f"input {spec!r} is not a PNG/JPEG/WebP picture or .npy latents file"
                )
            items.setdefault(
                os.path.abspath(spec),
                Item(src=spec, rel=os.path.splitext(os.path.basename(spec))[0]),
            )
        elif glob.has_magic(spec):
            found = sorted(
                p
                for p in glob.glob(spec, recursive=recursive)
                if os.path.isfile(p) and _is_input(p)
            )
            if not found:
                raise UsageError(f"pattern {spec!r} matches no PNG/JPEG/WebP/.npy files")
            for p in found:
                items.setdefault(
                    os.path.abspath(p), Item(src=p, rel=os.path.splitext(os.path.basename(p))[0])
                )
        else:
            raise UsageError(f"input not found: {spec!r}")
    names: dict[str, str] = {}
    for item in items.values():
        if item.rel in names:
            raise UsageError(
                f"inputs {names[item.rel]!r} and {item.src!r} would both write output {item.rel!r}"
            )
        names[item.rel] = item.src
    return list(items.values())


def item_seed(seed: int, rel: str) -> int:
    """A per-image seed from ``--seed`` and the image's relative path (stable across runs)."""
    digest = hashlib.sha256(f"{seed}:{rel}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_output_dir(outdir: str, inputs: Sequence[str], recursive: bool) -> None:
    """Refuse an output folder inside a recursed input folder; make sure it is writable."""
    out = os.path.realpath(outdir)
    if recursive:
        for spec in inputs:
            if os.path.isdir(spec):
                src = os.path.realpath(spec)
                if out == src or out.startswith(src + os.sep):
                    raise UsageError(
                        f"output folder {outdir!r} is inside input folder {spec!r}: with -r its "
                        "outputs would be read back as inputs; choose another output folder"
                    )
    try:
        os.makedirs(outdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=outdir)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):  # another process may have cleaned it
            os.remove(probe)
    except OSError as e:
        raise UsageError(f"output folder {outdir!r} is not writable: {e}") from None


def report_path_for(path: str, process: tuple[int, int]) -> str:
    """The report path of this process: ``path`` itself for a single process, else with
    ``.process-I-of-N`` before the extension (each process reports its own share)."""
    index, count = process
    if count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.process-{index}-of-{count}{ext}"


def remove_stale_temporaries(outdir: str, process_count: int = 1) -> int:
    """Delete temporary files a killed run left behind; returns how many this process removed.

    With several processes (``--distributed``, ``process_count > 1``) each cleans its output
    folder, shared or not, and all wait until every one has cleaned before any of them writes,
    so that no process deletes a file another one has in flight."""
    n = _remove_temporaries(outdir)
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("flax-latentup: stale temporaries removed")
    return n


def _remove_temporaries(outdir: str) -> int:
    n = 0
    for root, _, files in os.walk(outdir):
        for f in files:
            if f.startswith(TMP_PREFIX):
                try:
                    os.remove(os.path.join(root, f))
                    n += 1
                except OSError:
                    pass
    return n


def atomic_save(image, path: str, ext: str) -> None:
    """Write a PIL image to ``path`` through a temporary file in the same folder."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix="." + ext, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
            kwargs = {"quality": 95} if ext in ("jpg", "webp") else {}
            image.save(f, format=fmt, **kwargs)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------


def read_input(path: str, nchw: bool, latent_channels: int = 4):
    """(array, kind) for a picture (uint8 HWC) or latents (float32 HWC)."""
    import numpy as np

    if path.lower().endswith(LATENT_EXTS):
        arr = np.load(path, allow_pickle=False)
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                raise ValueError(f"latents file holds a batch of {arr.shape[0]}; expected one")
            arr = arr[0]
        if arr.ndim != 3:
            raise ValueError(
                f"latents must be [h, w, {latent_channels}] or [1, h, w, {latent_channels}], got {arr.shape}"
            )
        if nchw:
            arr = arr.transpose(1, 2, 0)
        if arr.shape[-1] != latent_channels:
            hint = " (saved from torch? pass --nchw)" if arr.shape[0] == latent_channels else ""
            raise ValueError(
                f"latents must have {latent_channels} channels last, got shape {arr.shape}{hint}"
            )
        if not np.issubdtype(arr.dtype, np.floating) or not np.isfinite(arr).all():
            raise ValueError("latents must be finite floating-point values")
        return arr.astype(np.float32), "latents"
    import PIL.Image

    with PIL.Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("RGB"), dtype=np.uint8), "pixels"


def fit_size(arr, kind: str):
    """``(array, note)``: pictures whose sides are not multiples of 32 are resized down to the
    nearest multiples (bicubic, as diffusers' image processor resizes to its multiple);
    latents must already fit. Raises ValueError for what cannot be used."""
    import numpy as np

    h, w = arr.shape[:2]
    if kind == "latents":
        if h % 4 or w % 4 or h < 8 or w < 8:
            raise ValueError(
                f"latents size {w}x{h} is not supported: sides must be multiples of 4, at least 8"
            )
        return arr, None
    if h < 64 or w < 64:
        raise ValueError(f"picture size {w}x{h} is too small: sides must be at least 64")
    nh, nw = h // 32 * 32, w // 32 * 32
    if (nh, nw) == (h, w):
        return arr, None
    import PIL.Image

    resized = PIL.Image.fromarray(arr).resize((nw, nh), PIL.Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8), f"resized from {w}x{h} to {nw}x{nh}"


# --------------------------------------------------------------------------------------------
# The upscale command
# --------------------------------------------------------------------------------------------


def add_upscale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--input",
        nargs="+",
        required=True,
        metavar="INPUT",
        help="picture/.npy files, folders or glob patterns",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument(
        "-r", "--recursive", action="store_true", help="search input folders recursively"
    )
    p.add_argument(
        "-n",
        "--model",
        default=DEFAULT_MODEL,
        help="hub repo id or local folder (default: %(default)s)",
    )
    p.add_argument(
        "--prompt", default="", help="text prompt for every image (a sidecar NAME.txt overrides it)"
    )
    p.add_argument("--prompt-file", help="file whose text is the prompt for every image")
    p.add_argument(
        "--negative-prompt", default=None, help="negative prompt (used when --guidance > 1)"
    )
    p.add_argument("--steps", type=int, default=20, help="Euler steps (default: %(default)s)")
    p.add_argument(
        "--guidance", type=float, default=0.0, help="guidance scale; 0 ignores the prompt (default)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; each image's seed derives from it and its path",
    )
    p.add_argument(
        "--batch-size", type=int, default=1, help="images per device call (default: %(default)s)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="compute dtype")
    p.add_argument(
        "--fp32",
        action="store_const",
        const="float32",
        dest="dtype",
        help="same as --dtype float32",
    )
    p.add_argument(
        "--tile", action="store_true", help="tiled VAE decode (large outputs, less memory)"
    )
    p.add_argument(
        "--ext", choices=OUT_EXTS, default="png", help="output format (default: %(default)s)"
    )
    p.add_argument("--suffix", default="", help="appended to output names, e.g. _x2")
    p.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    p.add_argument(
        "--nchw",
        action="store_true",
        help=".npy latents are [4, h, w] / [1, 4, h, w] (torch layout)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize and upscale this host's share",
    )
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="JAX persistent compilation cache (default: a user cache folder)",
    )
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use the persistent compilation cache",
    )
    p.add_argument(
        "--report", default=None, help=f"JSON report path (default: OUTDIR/{REPORT_NAME})"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def validate_upscale_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UsageError(f"--prompt-file {args.prompt_file!r} not found")
        with open(args.prompt_file, encoding="utf-8") as f:
            args.prompt = f.read().strip()
    if os.sep in args.suffix or (os.altsep and os.altsep in args.suffix):
        raise UsageError(f"--suffix must not contain a path separator, got {args.suffix!r}")


def resolve_model(model: str) -> str:
    """The local folder of ``--model`` (fetched from the hub if needed); a UsageError if unknown."""
    from flax_latentup import hub

    try:
        return hub.resolve(model, allow_patterns=hub.PIPELINE_PATTERNS)
    except hub.HubError as e:
        raise UsageError(f"--model: {e}") from None


def enable_compile_cache(path: str) -> None:
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _batches(items: list[Item], size: int) -> Iterable[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def run_upscale(args: argparse.Namespace) -> int:
    """The ``upscale`` command; returns the exit code."""
    validate_upscale_args(args)
    items = collect_inputs(args.input, args.recursive)
    check_output_dir(args.output, args.input, args.recursive)
    model_dir = resolve_model(args.model)
    process = (0, 1)  # (index, count) among the processes sharing the work
    if args.distributed:
        import jax

        from flax_latentup import parallel

        parallel.initialize_distributed()
        process = (jax.process_index(), jax.process_count())
        items = parallel.process_share(items)
    cache = None if args.no_compile_cache else (args.compile_cache or default_cache_dir())
    if cache:
        enable_compile_cache(cache)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline

    stale = remove_stale_temporaries(args.output, process[1])
    started = time.perf_counter()
    report: dict[str, Any] = {
        "version": __version__,
        "model": args.model,
        "settings": {
            "steps": args.steps,
            "guidance": args.guidance,
            "seed": args.seed,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "tile": args.tile,
            "ext": args.ext,
        },
        "process": {"index": process[0], "count": process[1]},
        "done": [],
        "skipped": [],
        "failed": [],
        "stale_temporaries_removed": stale,
    }
    todo: list[Item] = []
    for item in items:
        item.out = os.path.join(args.output, item.rel + args.suffix + "." + args.ext)
        item.seed = item_seed(args.seed, item.rel)
        if os.path.exists(item.out) and not args.overwrite:
            report["skipped"].append(
                {"input": item.src, "output": item.out, "reason": "output exists"}
            )
        else:
            todo.append(item)

    compile_seconds = [0.0]

    def on_event(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)

    pipe = None
    if todo:
        pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
            model_dir, dtype=jnp.dtype(args.dtype)
        )
        pipe.set_progress_bar_config(disable=True)
        if args.tile:
            pipe.enable_vae_tiling()
    load_seconds = time.perf_counter() - started

    # Read, check and group by (kind, size) so that each shape compiles once.
    groups: dict[tuple, list[tuple[Item, Any]]] = {}
    for item in todo:
        try:
            arr, kind = read_input(item.src, args.nchw)
        except Exception as e:  # unreadable or corrupt input: report and go on
            report["failed"].append({"input": item.src, "reason": f"cannot read: {e}"})
            continue
        try:
            arr, note = fit_size(arr, kind)
        except ValueError as e:
            report["failed"].append({"input": item.src, "reason": str(e)})
            continue
        item.note = note
        sidecar = os.path.splitext(item.src)[0] + ".txt"
        item.prompt = args.prompt
        if os.path.isfile(sidecar):
            with open(sidecar, encoding="utf-8") as f:
                item.prompt = f.read().strip()
        groups.setdefault((kind, arr.shape), []).append((item, arr))

    total = sum(len(g) for g in groups.values())
    bar = tqdm(total=total, unit="img", disable=args.quiet or total == 0, dynamic_ncols=True)
    run_started = time.perf_counter()
    for members in groups.values():
        for chunk in _batches(members, args.batch_size):
            n = len(chunk)
            arrays = [a for _, a in chunk]
            seeds = [it.seed for it, _ in chunk]
            prompts = [it.prompt for it, _ in chunk]
            # pad to the batch size so every batch of this group has one compiled shape
            while len(arrays) < args.batch_size:
                arrays.append(arrays[-1])
                seeds.append(seeds[-1])
                prompts.append(prompts[-1])
            try:
                images = pipe(
                    prompt=prompts,
                    image=np.stack(arrays),
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    negative_prompt=args.negative_prompt,
                    rng=seeds,
                    output_type="pil",
                ).images[:n]
            except Exception as e:
                for it, _ in chunk:
                    report["failed"].append({"input": it.src, "reason": f"upscaling failed: {e}"})
                bar.update(n)
                continue
            for (it, _), im in zip(chunk, images, strict=True):
                try:
                    atomic_save(im, it.out, args.ext)
                    entry = {"input": it.src, "output": it.out, "seed": it.seed}
                    if it.note:
                        entry["note"] = it.note
                    report["done"].append(entry)
                except OSError as e:
                    report["failed"].append(
                        {"input": it.src, "reason": f"cannot write {it.out}: {e}"}
                    )
            bar.update(n)
    bar.close()
    run_seconds = time.perf_counter() - run_started
    done = len(report["done"])
    report["timing"] = {
        "load_seconds": round(load_seconds, 3),
        "compile_seconds": round(compile_seconds[0], 3),
        "run_seconds_including_compile": round(run_seconds, 3),
        "images_per_second_excluding_compile": round(
            done / max(run_seconds - compile_seconds[0], 1e-9), 4
        )
        if done
        else 0.0,
        "compile_cache": cache,
    }
    report_path = report_path_for(args.report or os.path.join(args.output, REPORT_NAME), process)
    folder = os.path.dirname(report_path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, report_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise

    print(
        f"done {done}, skipped {len(report['skipped'])}, failed {len(report['failed'])} "
        f"(compile {compile_seconds[0]:.1f}s, run {run_seconds:.1f}s); report: {report_path}"
    )
    for f in report["failed"]:
        print(f"  failed: {f['input']}: {f['reason']}")
    return 1 if report["failed"] else 0


def run_selftest(outdir: str) -> int:
    """Upscale a generated picture with a freshly built tiny model; 0 when the output is right."""
    import numpy as np
    import PIL.Image

    from flax_latentup.tiny import make_tiny_pipeline

    with tempfile.TemporaryDirectory(prefix="flax-latentup-selftest-") as tmp:
        model = os.path.join(tmp, "tiny-model")
        make_tiny_pipeline(model)
        y, x = np.mgrid[0:64, 0:64]
        picture = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
        src = os.path.join(tmp, "gradient.png")
        PIL.Image.fromarray(picture).save(src)
        args = build_parser().parse_args(
            [
                "upscale",
                "-i",
                src,
                "-o",
                outdir,
                "-n",
                model,
                "--steps",
                "4",
                "--no-compile-cache",
                "--overwrite",
                "--quiet",
            ]
        )
        code = run_upscale(args)
    out = os.path.join(outdir, "gradient.png")
    if code != 0 or not os.path.isfile(out):
        print("selftest FAILED", file=sys.stderr)
        return 1
    with PIL.Image.open(out) as im:
        size = im.size
    ok = size == (128, 128)
    print(f"selftest {'passed' if ok else 'FAILED'}: {out} ({size[0]}x{size[1]})")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-latentup",
        description="JAX/Flax Stable Diffusion x2 latent upscaler.",
    )
    parser.add_argument("--version", action="version", version=f"flax-latentup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser(
        "upscale",
        help="upscale pictures or latents 2x",
        description="Upscale pictures (PNG/JPEG/WebP) or .npy low-res latents 2x.",
    )
    add_upscale_args(up)
    sub.add_parser("convert", help="convert a torch pipeline into a Flax folder", add_help=False)
    st = sub.add_parser(
        "selftest",
        help="check this install offline: upscale a generated picture with a tiny random model",
        description="Build a tiny random-weight pipeline folder (no download), upscale a "
        "generated 64x64 picture through the full pipeline and write the result.",
    )
    st.add_argument("-o", "--output", default="flax-latentup-selftest", help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flax-latentup`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        try:
            from flax_latentup_convert import main as convert_main
        except ImportError:
            print(
                "error: `flax-latentup convert` needs the converter and torch: "
                "pip install 'flax_latentup[torch]'",
                file=sys.stderr,
            )
            return 2
        return convert_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "selftest":
        return run_selftest(args.output)
    if args.command == "upscale":
        try:
            return run_upscale(args)
        except UsageError as e:
            print(f"flax-latentup upscale: error: {e}", file=sys.stderr)
            return 2
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

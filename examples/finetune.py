"""Fine-tune the x2 latent upscaler's UNet on a folder of high-resolution pictures.

    python examples/finetune.py --model stabilityai/sd-x2-latent-upscaler \\
        --data ./pictures --output ./run --resolution 512 --batch-size 4 --steps 2000

Each step takes random square crops of ``--resolution`` pixels (after resizing the shorter
side to it), VAE-encodes them for the target latents, and VAE-encodes the crops downsampled 2x
for the low-res latents (see :func:`flax_latentup.training.make_latents`). A picture's caption
is the text file with the same stem (``cat.png`` -> ``cat.txt``), else the empty prompt.

Checkpoints go to ``--output/checkpoint-<step>/`` every ``--checkpoint-every`` steps and at
the end; a new run with the same ``--output`` resumes from the latest one, drawing the same
crops and noise as an uninterrupted run would (settings other than the checkpoint's are
refused, listed). Arguments, pictures and captions are checked before the model loads
(``--resolution`` as soon as it has: the VAE's downsampling factor sets its unit); a
non-finite loss stops the run (exit status 1) without saving. See FINETUNING.md.

Several hosts (a TPU pod, a GPU cluster): start it on every host with the same arguments and
``--distributed``; ``--batch-size`` is then the global batch, each host loading and encoding
its share, and ``--output`` must be a folder every host sees (process 0 writes it).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import warnings

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
from flax_latentup.cli import IMAGE_EXTS, open_picture, upright_transpose
from flax_latentup.files import check_save_folder
from flax_latentup.parallel import all_processes
from flax_latentup.pipeline import check_picture_mode, pil_to_rgb
from flax_latentup.training import (
    OBJECTIVES,
    SEED_LIMIT,
    NonFiniteError,
    TrainConfig,
    Trainer,
    checkpoint_folders,
    checkpoint_info,
    latest_checkpoint,
    make_latents,
)

LISTED = 10  # bad files named in a message (then a count)

# The scheme by which a step's pictures and crops are drawn, recorded in every checkpoint and
# raised whenever this script draws differently: 3 (the first recorded) = picture choice and
# crops from seeds of their own, pictures turned upright by their EXIF orientation.
DRAWS = 3

# the flag of each setting a resumed run must keep
FLAGS = {
    "learning_rate": "--learning-rate",
    "lr_schedule": "--lr-schedule",
    "lr_warmup_steps": "--lr-warmup-steps",
    "total_steps": "--steps",
    "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm",
    "ema_decay": "--ema-decay",
    "ema_warmup": "--no-ema-warmup",
    "objective": "--objective",
    "sigma_loc": "--sigma-loc",
    "sigma_scale": "--sigma-scale",
    "cfg_dropout": "--cfg-dropout",
    "seed": "--seed",
    "model": "--model",
    "data": "--data",
    "resolution": "--resolution",
    "batch_size": "--batch-size",
    "processes": "the number of processes",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="pipeline folder or hub repo id")
    p.add_argument("--data", required=True, help="folder of high-resolution pictures")
    p.add_argument("--output", required=True, help="folder for checkpoints (resumed from)")
    p.add_argument("--resolution", type=int, default=512, help="crop side in pixels")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps")
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "linear", "cosine"),
        default="constant",
        help="after the warm-up: constant, or down to 0 at --steps (linear / half cosine)",
    )
    p.add_argument("--lr-warmup-steps", type=int, default=0, help="linear warm-up from 0")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="<= 0: no clipping")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="the EMA's weight, at most")
    p.add_argument(
        "--no-ema-warmup",
        action="store_true",
        help="EMA weight --ema-decay from the first step (default: min(decay, k / (9 + k)) at "
        "update k, 0 at the first)",
    )
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="variance",
        help="variance: k-diffusion's loss with the UNet's log-variance channel (its 5th), as "
        "the published model was built for; mse: the plain squared error (default: variance)",
    )
    p.add_argument("--sigma-loc", type=float, default=-1.2, help="mean of log sigma")
    p.add_argument("--sigma-scale", type=float, default=1.2, help="std of log sigma")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="P(caption -> '')")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    p.add_argument("--remat", action="store_true", help="rematerialise UNet blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize; every host trains its batch share",
    )
    return p.parse_args(argv)


def list_pictures(folder: str) -> list[str]:
    """The picture files (by extension; folders named like pictures are not) of ``folder``."""
    if not os.path.isdir(folder):
        raise SystemExit(f"--data {folder!r} is not a folder; expected a folder of pictures")
    paths = sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        # not hidden files: macOS's "._name.png" beside each picture holds no picture
        if f.lower().endswith(IMAGE_EXTS)
        and not f.startswith(".")
        and os.path.isfile(os.path.join(folder, f))
    )
    if not paths:
        raise SystemExit(f"no pictures ({', '.join(IMAGE_EXTS)}) in {folder}")
    return paths


def caption_file(path: str) -> str:
    return os.path.splitext(path)[0] + ".txt"


def caption_of(path: str) -> str:
    """The picture's caption: its ``.txt`` file (UTF-8), else the empty prompt."""
    txt = caption_file(path)
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8-sig") as f:  # a byte-order mark is not text
            return f.read().strip()
    return ""


def scan_pictures(paths: list[str], resolution: int) -> tuple[list[str], list[str]]:
    """``(captions, small)``: every picture's caption and the pictures whose shorter side is
    under ``resolution``. Every picture's header is read and every caption decoded first: a
    file that cannot be is reported with the others (SystemExit) before any training."""
    bad, small, captions = [], [], []
    for path in paths:
        try:
            with Image.open(path) as im:
                check_picture_mode(im)
                w, h = im.size
            if min(w, h) < resolution:
                small.append(path)
        except Exception as e:  # not a picture, an unknown format, a decompression bomb...
            bad.append(f"{path}: not a readable picture ({type(e).__name__}: {e})")
        try:
            captions.append(caption_of(path))
        except (OSError, UnicodeDecodeError) as e:
            bad.append(f"{caption_file(path)}: not a readable UTF-8 caption ({e})")
    if bad:
        more = f"\n  ... and {len(bad) - LISTED} more" if len(bad) > LISTED else ""
        raise SystemExit(
            f"{len(bad)} file(s) in --data cannot be read:\n  "
            + "\n  ".join(bad[:LISTED])
            + more
            + "\nFix or remove them (a caption must be UTF-8 text), then run again."
        )
    return captions, small


def load_crop(path: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop (shorter side resized to ``size``), random h-flip,
    as float32 ``[size, size, 3]`` in [-1, 1], of the picture turned upright by its EXIF
    orientation. A picture that cannot be decoded (a truncated
    file) raises a ValueError naming it."""
    try:
        with open_picture(path) as opened:
            im = pil_to_rgb(opened)  # decodes it; 16-bit grey is scaled to 8 bits, not clipped
            orientation = upright_transpose(opened)  # after decoding: a PNG's may come last
    except Exception as e:
        raise ValueError(
            f"cannot decode the picture {path} ({type(e).__name__}: {e}): it is probably "
            "truncated or corrupt"
        ) from e
    if orientation is not None:  # upright, as viewers show it and diffusers' load_image reads it
        im = im.transpose(orientation)
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize(
        (max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC
    )
    x = int(rng.integers(0, im.width - size + 1))
    y = int(rng.integers(0, im.height - size + 1))
    arr = np.asarray(im.crop((x, y, x + size, y + size)), np.float32) / 127.5 - 1.0
    return arr[:, ::-1] if rng.random() < 0.5 else arr


def step_pictures(paths, step: int, args, rows=None) -> tuple[np.ndarray, list[int]]:
    """The crops of one step's batch (of its ``rows``, default all): the pictures are a
    function of (seed, step), each crop of (seed, step, row), so resuming draws the same and
    a row is the same whichever host loads it. The two kinds of draws have seeds of their own
    (numpy pads a seed with zeros: (seed, step) and (seed, step, 0) would be one stream)."""
    rng = np.random.default_rng([args.seed, step, 0])
    idx = rng.choice(len(paths), args.batch_size, replace=len(paths) < args.batch_size)
    rows = range(args.batch_size) if rows is None else rows
    crops = [
        load_crop(paths[idx[r]], args.resolution, np.random.default_rng([args.seed, step, 1, r]))
        for r in rows
    ]
    return np.stack(crops), [int(idx[r]) for r in rows]


_LEFTOVER = re.compile(r"^checkpoint-\d+\.tmp$")


def prune(output: str, keep: int, current: str | None = None) -> None:
    """Delete all but the newest ``keep`` (by step; 0: keep all) checkpoints of ``output`` and
    the ``checkpoint-<digits>.tmp`` folders that killed saves left. Only folders named exactly
    ``checkpoint-<digits>`` count (a ``checkpoint-best`` of yours stays), and ``current``
    (the checkpoint just written, and its ``.tmp``) is never deleted."""
    current = None if current is None else os.path.realpath(current)
    doomed = [p for _, p in checkpoint_folders(output)][:-keep] if keep > 0 else []
    doomed += [
        os.path.join(output, n)
        for n in os.listdir(output)
        if _LEFTOVER.match(n) and os.path.isdir(os.path.join(output, n))
    ]
    for path in doomed:
        real = os.path.realpath(path)
        if current is not None and real in (current, current + ".tmp"):
            continue
        shutil.rmtree(path, ignore_errors=True)


def check_arguments(args: argparse.Namespace) -> None:
    """SystemExit naming the first argument out of its range."""
    for flag, value, low in (
        ("--resolution", args.resolution, 1),
        ("--batch-size", args.batch_size, 1),
        ("--steps", args.steps, 1),
        ("--checkpoint-every", args.checkpoint_every, 1),
        ("--keep", args.keep, 0),
        ("--seed", args.seed, 0),
    ):
        if value < low:
            raise SystemExit(f"{flag} must be >= {low}, got {value}")
    if args.seed > SEED_LIMIT - 2:  # the VAE's noise draws from seed + 1
        raise SystemExit(f"--seed must be in [0, {SEED_LIMIT - 2}], got {args.seed}")


def run_settings(args: argparse.Namespace, processes: int) -> dict:
    """The settings recorded in every checkpoint (beyond the TrainConfig) that a resumed run
    must share: the draws and the data depend on them."""
    model = os.path.realpath(args.model) if os.path.isdir(args.model) else args.model
    return {
        "model": model,
        "data": os.path.realpath(args.data),
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "processes": processes,
        "draws": DRAWS,
    }


def resume_point(args, config: TrainConfig, run: dict) -> str | None:
    """The checkpoint to resume from (None: start at step 0), after refusing (SystemExit) an
    ``--output`` whose checkpoints a new run would mix with its own, or a resume with
    settings other than the checkpoint's."""
    found = checkpoint_folders(args.output)
    if not found:
        return None
    top_step, top = found[-1]
    if args.no_resume:
        raise SystemExit(
            f"--output {args.output} holds checkpoints of an earlier run, up to step "
            f"{top_step} ({os.path.basename(top)}): a new run there would have its checkpoints "
            "pruned in favour of the old ones' (or overwrite those of the same step). Choose "
            "another --output, or remove those checkpoints first."
        )
    last = latest_checkpoint(args.output)
    if last != top:
        raise SystemExit(
            f"--output {args.output}: {top} has no trainer_state.json (a checkpoint not "
            "written by this script, or damaged), so this run can neither resume from it nor "
            "keep its own checkpoints next to it. Remove it, or choose another --output."
        )
    try:
        info = checkpoint_info(last)
    except ValueError as e:  # another trainer's trainer_state.json, or damaged
        raise SystemExit(
            f"--output {args.output}: {e}. Remove {os.path.basename(last)}, or choose another "
            "--output."
        ) from None
    changes = config.changes_from(info.get("config", {}))
    recorded = info.get("run", {})  # none in checkpoints of earlier builds
    moved = [(k, recorded[k], v) for k, v in run.items() if k in recorded and recorded[k] != v]
    # a model or data folder may move (or be mounted elsewhere on another host): a note only
    for name, old, new in [c for c in moved if c[0] in ("model", "data")]:
        if jax.process_index() == 0:
            print(
                f"note: {FLAGS[name]} was {old!r} when {os.path.basename(last)} was saved, "
                f"now {new!r}: resuming on the assumption that it holds the same content",
                file=sys.stderr,
            )
    # another draw scheme changes what the rest of the run sees, not whether it can go on
    if recorded.get("draws") != DRAWS and jax.process_index() == 0:
        scheme = f"scheme {recorded['draws']}" if "draws" in recorded else "an earlier scheme"
        print(
            f"note: {os.path.basename(last)} was saved by a version of this script that drew "
            f"pictures and crops by {scheme} (now scheme {DRAWS}): the resumed run goes on "
            "with other crops than an uninterrupted run of that version would have seen",
            file=sys.stderr,
        )
    changes += [c for c in moved if c[0] not in ("model", "data", "draws")]
    if changes:
        lines = "\n".join(
            f"  {name} ({FLAGS[name]}): {old!r} -> {new!r}"
            if name in FLAGS
            else f"  {name}: {old!r} -> {new!r}"
            for name, old, new in changes
        )
        note = ""
        if any(name == "total_steps" for name, _, _ in changes):
            note = (
                "\n(--steps is where a linear or cosine learning-rate schedule reaches 0: it "
                "may change only when the schedule is constant, before and after.)"
            )
        raise SystemExit(
            f"--output {args.output} holds a run at step {info.get('step')} "
            f"({os.path.basename(last)}) whose settings differ from this command's:\n"
            f"{lines}{note}\nTo resume it, run with its settings; to train with these, choose "
            "another --output (or remove its checkpoints)."
        )
    return last


def main(argv=None) -> int:
    args = parse_args(argv)
    check_arguments(args)
    try:  # the settings are checked before the model loads
        config = TrainConfig(
            learning_rate=args.learning_rate,
            lr_schedule=args.lr_schedule,
            lr_warmup_steps=args.lr_warmup_steps,
            total_steps=args.steps,
            weight_decay=args.weight_decay,
            max_grad_norm=None if args.max_grad_norm <= 0 else args.max_grad_norm,
            ema_decay=args.ema_decay,
            ema_warmup=not args.no_ema_warmup,
            objective=args.objective,
            sigma_loc=args.sigma_loc,
            sigma_scale=args.sigma_scale,
            cfg_dropout=args.cfg_dropout,
            seed=args.seed,
        )
    except (TypeError, ValueError) as e:
        raise SystemExit(f"bad training settings: {e}") from None
    try:
        check_save_folder(args.output, "--output")
    except OSError as e:
        raise SystemExit(str(e)) from None
    if not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data!r} is not a folder; expected a folder of pictures")
    if args.distributed:
        from flax_latentup import parallel

        # the processes step together and end together: one that stops on an error must not
        # wait at exit for a day (the upscaling default) while the others wait for its step
        parallel.initialize_distributed(shutdown_timeout_seconds=300)
    me, count = jax.process_index(), jax.process_count()
    if args.batch_size % count:
        raise SystemExit(f"--batch-size {args.batch_size} must divide over {count} processes")
    if (args.batch_size // count) % jax.local_device_count():
        where = f"each of the {count} processes' share" if count > 1 else "it"
        raise SystemExit(
            f"--batch-size {args.batch_size} must divide over the devices: {where} over "
            f"{jax.local_device_count()} local device(s)"
        )
    run = run_settings(args, count)
    if count > 1:  # every process must resume from the same checkpoint; compared first (a
        # collective), before any check that could stop some of the processes only
        latest = max((step for step, _ in checkpoint_folders(args.output)), default=-1)
        starts = all_processes(np.int32(latest)).tolist()
        if len(set(starts)) > 1:
            raise SystemExit(
                f"--output {args.output}: the processes found their latest checkpoints at "
                f"steps {starts} (in process order; -1: none): --output must be one folder "
                "that every process sees (a shared disk or a mounted bucket)"
            )
    last = resume_point(args, config, run)
    start = 0 if last is None else int(checkpoint_info(last)["step"])
    if start >= args.steps:
        if me == 0:
            print(f"{last} is at step {start} of --steps {args.steps}: nothing to do")
        return 0

    paths = list_pictures(args.data)
    captions, small = scan_pictures(paths, args.resolution)
    if small and me == 0:
        names = ", ".join(os.path.basename(p) for p in small[:5])
        names += ", ..." if len(small) > 5 else ""
        print(
            f"warning: {len(small)} of {len(paths)} pictures have a side under --resolution "
            f"{args.resolution} pixels and are upsampled (blurrier targets): {names}",
            file=sys.stderr,
        )
    share = args.batch_size // count
    rows = range(me * share, (me + 1) * share)  # this process's rows of every batch
    try:
        pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # not found, not fetchable, not this pipeline
        raise SystemExit(f"--model {args.model!r}: {e}") from None
    f = pipe.vae.config.downsample_factor
    step, fewest = pipe.unet.config.sample_sides  # the latents' sides (the low-res: halves)
    unit, least = f * math.lcm(step, 2), f * max(fewest, 2)
    if args.resolution % unit or args.resolution < least:
        raise SystemExit(
            f"--resolution must be a multiple of {unit} and at least {least}, got "
            f"{args.resolution} (the UNet takes latents whose sides are multiples of {step}, "
            f"at least {fewest}; one latent is {f} pixels)"
        )

    # frozen text encoder: every caption is tokenized once (77 ids each) and a step's captions
    # are embedded with the step (one compiled shape; the embeddings, 77 x 768 floats a
    # caption, are never all held)
    unique = sorted(set(captions) | {""})
    ids = tokenize_captions(pipe, unique)
    row = {c: i for i, c in enumerate(unique)}
    context, pooled = pipe.encode_ids(ids[row[""]][None])
    uncond = (context[0], pooled[0])

    try:
        trainer = Trainer(pipe.unet, uncond, config, remat=args.remat)
    except ValueError as e:  # a UNet without the log-variance channel --objective needs
        message = str(e).replace('objective="mse"', "--objective mse")
        raise SystemExit(f"--model {args.model}: {message}") from None
    if last is not None:
        try:
            state = trainer.load_checkpoint(last)
        except ValueError as e:  # another model's UNet, another optimizer layout
            raise SystemExit(f"--output {args.output}: cannot resume: {e}") from None
        if me == 0:
            print(f"resuming from {last}", file=sys.stderr)
    else:
        state = trainer.init_state()

    vae_key = jax.random.fold_in(jax.random.key(args.seed + 1), me)
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        desc="fine-tune",
        disable=me != 0,
    )
    for step in bar:
        done = step + 1
        try:
            pictures, idx = step_pictures(paths, step, args, rows)
            failed = None
        except ValueError as e:  # a picture corrupt past its header
            failed = e
        if count > 1:  # all processes stop together (the others would wait in the step)
            failing = [i for i, f in enumerate(all_processes(np.int32(failed is not None))) if f]
            if failing and failed is None:
                bar.close()
                raise SystemExit(
                    f"step {done}: process {failing[0]} cannot decode one of its pictures (its "
                    "message names it); stopping"
                )
        if failed is not None:
            bar.close()
            raise SystemExit(
                f"step {done}: {failed}. Fix or remove it from --data and run again (the run "
                f"resumes from {last or 'step 0'}; without the picture its draws change)."
            )
        batch = dict(make_latents(pipe.vae, pictures, jax.random.fold_in(vae_key, step)))
        batch["context"], batch["pooled"] = pipe.encode_ids(ids[[row[captions[i]] for i in idx]])
        state, metrics = trainer.step(state, batch)
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            bar.close()
            raise SystemExit(
                diverged(f"the loss is {loss}, the gradient norm {grad_norm}", done, args, last)
            )
        bar.set_postfix(loss=f"{loss:.4f}", mse=f"{float(metrics['mse']):.4f}")
        if done % args.checkpoint_every == 0 or done == args.steps:
            try:
                path = trainer.save_checkpoint(args.output, state, run)  # all; process 0 writes
            except NonFiniteError:
                bar.close()
                raise SystemExit(
                    diverged("the weights hold NaN or infinity", done, args, last)
                ) from None
            except OSError as e:  # a full disk: nothing of it is left, earlier ones are kept
                bar.close()
                good = f"the last checkpoint is {last}" if last else "no checkpoint was saved"
                raise SystemExit(
                    f"step {done}: cannot write its checkpoint: {e}. Stopped with nothing "
                    f"pruned ({good}); make room (or fix --output) and run again to resume."
                ) from None
            last = path
            if me == 0:
                prune(args.output, args.keep, path)
                bar.write(f"saved {path}")
    return 0


TOKENIZE_CHUNK = 4096  # captions tokenized per call


def tokenize_captions(pipe, captions: list[str]) -> np.ndarray:
    """The token ids ``[N, 77]`` of ``captions``, as the pipeline tokenizes prompts: those
    longer than the text encoder's tokens are cut, and counted in one warning."""
    with warnings.catch_warnings(record=True) as cut:
        warnings.simplefilter("always")
        # in chunks: the tokenizer's own records of a caption are far larger than its ids
        ids = np.concatenate(
            [
                pipe.tokenize(captions[i : i + TOKENIZE_CHUNK])
                for i in range(0, len(captions), TOKENIZE_CHUNK)
            ]
        )
    long = 0
    for w in cut:
        if "is longer than the text encoder" in str(w.message):
            long += 1
        else:  # other warnings are shown as they would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if long and jax.process_index() == 0:
        print(
            f"warning: {long} caption(s) are longer than the text encoder's "
            f"{pipe.tokenizer.model_max_length} tokens; their ends are left out",
            file=sys.stderr,
        )
    return ids


def diverged(what: str, step: int, args, last: str | None) -> str:
    """The message of a run stopped at a non-finite step."""
    good = f"the last good checkpoint is {last}" if last else "no checkpoint was saved"
    return (
        f"step {step}: {what}: training diverged, and stopped with nothing saved or pruned "
        f"({good}). The usual cause is a learning rate too high (--learning-rate "
        f"{args.learning_rate:g}): start again with a lower one, or a warm-up "
        "(--lr-warmup-steps), in another --output (resuming here with these settings would "
        "diverge the same way)."
    )


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune the x2 latent upscaler's UNet on a folder of high-resolution pictures.

    python examples/finetune.py --model stabilityai/sd-x2-latent-upscaler \\
        --data ./pictures --output ./run --resolution 512 --batch-size 4 --steps 2000

Each step takes random square crops of ``--resolution`` pixels (after resizing the shorter
side to it), VAE-encodes them for the target latents, and VAE-encodes the crops downsampled 2x
for the low-res latents (see :func:`flax_latentup.training.make_latents`). A picture's caption
is the text file with the same stem (``cat.png`` -> ``cat.txt``), else the empty prompt.

Checkpoints go to ``--output/checkpoint-<step>/`` every ``--checkpoint-every`` steps and at
the end; a new run with the same ``--output`` resumes from the latest one, drawing the same
crops and noise as an uninterrupted run would. See FINETUNING.md.

Several hosts (a TPU pod, a GPU cluster): start it on every host with the same arguments and
``--distributed``; ``--batch-size`` is then the global batch, each host loading and encoding
its share, and ``--output`` must be a folder every host sees (process 0 writes it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import jax
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
from flax_latentup.training import TrainConfig, Trainer, latest_checkpoint, make_latents

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
        help="EMA weight --ema-decay from the first step (default: min(decay, k / (9 + k)))",
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
    paths = sorted(
        os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(EXTENSIONS)
    )
    if not paths:
        raise SystemExit(f"no pictures ({', '.join(EXTENSIONS)}) in {folder}")
    return paths


def caption_of(path: str) -> str:
    txt = os.path.splitext(path)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt) as f:
            return f.read().strip()
    return ""


def load_crop(path: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``size`` x ``size`` crop (shorter side resized to ``size``), random h-flip,
    as float32 ``[size, size, 3]`` in [-1, 1]."""
    with Image.open(path) as im:
        im = im.convert("RGB")
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
    a row is the same whichever host loads it."""
    rng = np.random.default_rng([args.seed, step])
    idx = rng.choice(len(paths), args.batch_size, replace=len(paths) < args.batch_size)
    rows = range(args.batch_size) if rows is None else rows
    crops = [
        load_crop(paths[idx[r]], args.resolution, np.random.default_rng([args.seed, step, r]))
        for r in rows
    ]
    return np.stack(crops), [int(idx[r]) for r in rows]


def prune(output: str, keep: int) -> None:
    if keep <= 0:
        return
    names = sorted(n for n in os.listdir(output) if n.startswith("checkpoint-") and "." not in n)
    for name in names[:-keep]:
        shutil.rmtree(os.path.join(output, name), ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:  # the settings are checked before the model loads
        config = TrainConfig(
            learning_rate=args.learning_rate,
            lr_schedule=args.lr_schedule,
            lr_warmup_steps=args.lr_warmup_steps,
            total_steps=args.steps,
            weight_decay=args.weight_decay,
            max_grad_norm=args.max_grad_norm if args.max_grad_norm > 0 else None,
            ema_decay=args.ema_decay,
            ema_warmup=not args.no_ema_warmup,
            sigma_loc=args.sigma_loc,
            sigma_scale=args.sigma_scale,
            cfg_dropout=args.cfg_dropout,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"bad training settings: {e}") from None
    paths = list_pictures(args.data)
    if args.distributed:
        from flax_latentup import parallel

        parallel.initialize_distributed()
    me, count = jax.process_index(), jax.process_count()
    if args.batch_size % count:
        raise SystemExit(f"--batch-size {args.batch_size} must divide over {count} processes")
    share = args.batch_size // count
    rows = range(me * share, (me + 1) * share)  # this process's rows of every batch
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(args.model)
    f = pipe.vae.config.downsample_factor
    if args.resolution % (2 * f) or args.resolution // f < 16:
        raise SystemExit(
            f"--resolution must be a multiple of {2 * f} and at least {16 * f} "
            "(the UNet needs upscaled latents of at least 16x16)"
        )

    # frozen text encoder: every caption is embedded once
    captions = [caption_of(p) for p in paths]
    unique = sorted(set(captions) | {""})
    context, pooled = (np.asarray(a) for a in pipe.encode_prompt(unique))
    row = {c: i for i, c in enumerate(unique)}
    uncond = (context[row[""]], pooled[row[""]])

    trainer = Trainer(pipe.unet, uncond, config, remat=args.remat)
    last = None if args.no_resume else latest_checkpoint(args.output)
    if last is not None:
        state = trainer.load_checkpoint(last)
        if me == 0:
            print(f"resuming from {last}", file=sys.stderr)
    else:
        state = trainer.init_state()
    start = int(state.step)

    vae_key = jax.random.fold_in(jax.random.key(args.seed + 1), me)
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        desc="fine-tune",
        disable=me != 0,
    )
    for step in bar:
        pictures, idx = step_pictures(paths, step, args, rows)
        batch = dict(make_latents(pipe.vae, pictures, jax.random.fold_in(vae_key, step)))
        batch["context"] = context[[row[captions[i]] for i in idx]]
        batch["pooled"] = pooled[[row[captions[i]] for i in idx]]
        state, metrics = trainer.step(state, batch)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        done = step + 1
        if done % args.checkpoint_every == 0 or done == args.steps:
            path = trainer.save_checkpoint(args.output, state)  # every process, 0 writes
            if me == 0:
                prune(args.output, args.keep)
                bar.write(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The convolutions of the UNet and the VAE, one at a time: XLA's own against the rewritten
forms of ``flax_latentup.models.conv`` and against torch (oneDNN) on the same data.

Rows: 3x3 convolutions (XLA direct vs Winograd F(2x2, 3x3)), 1x1 convolutions (XLA vs a
matrix product) and the VAE's "repeat 2x, then 3x3 conv" (vs the four-phase form), at the
shapes the published models run at 64x64 latents / 512x512 pixels. Each time is the best of
``--repeats`` calls (the machine's noise only ever adds time); the kernel transforms are
inside the timed call, except for the UNet's Winograd rows marked "prepared", which the
sampling loop pays once per pipeline call rather than per step. The error column is the max
abs difference to float64 torch, relative to the output's scale.

    python benchmarks/bench_conv.py            # all rows, a few minutes on 2 cores
    python benchmarks/bench_conv.py --quick    # a few rows
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (kind, batch, side, in, out); side: the input map's side
ROWS = [
    ("3x3", 1, 64, 384, 384),
    ("3x3", 1, 64, 768, 384),
    ("3x3", 1, 32, 384, 384),
    ("3x3", 1, 16, 768, 768),
    ("3x3", 1, 16, 1536, 768),
    ("3x3", 1, 8, 768, 768),
    ("3x3", 2, 64, 384, 384),
    ("3x3", 1, 64, 512, 512),
    ("3x3", 1, 128, 512, 512),
    ("3x3", 1, 256, 512, 256),
    ("3x3", 1, 256, 256, 256),
    ("3x3", 1, 512, 256, 128),
    ("3x3", 1, 512, 128, 128),
    ("1x1", 1, 64, 768, 384),
    ("1x1", 1, 256, 512, 256),
    ("up", 1, 64, 512, 512),
    ("up", 1, 128, 512, 512),
    ("up", 1, 256, 256, 256),
]
QUICK = [ROWS[0], ROWS[5], ROWS[10], ROWS[13], ROWS[17]]


def best(repeats: int, fn, *args) -> float:
    """The fastest of ``repeats`` calls of ``fn(*args)`` after one warm-up (compile) call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure(kind: str, n: int, side: int, cin: int, cout: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from flax_latentup.models import conv as C

    rng = np.random.default_rng(0)
    ks = 1 if kind == "1x1" else 3
    pad = ks // 2
    x = rng.standard_normal((n, side, side, cin), dtype=np.float32)
    k = rng.standard_normal((ks, ks, cin, cout), dtype=np.float32) / np.float32(
        np.sqrt(ks * ks * cin)
    )
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    kt = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())

    def torch_conv(xt, kt):
        if kind == "up":
            xt = torch.nn.functional.interpolate(xt, scale_factor=2.0, mode="nearest")
        return torch.nn.functional.conv2d(xt, kt, padding=pad)

    with torch.inference_mode():
        t_torch = best(repeats, torch_conv, xt, kt)  # block_until_ready passes tensors through
        ref = torch_conv(xt.double(), kt.double()).numpy().transpose(0, 2, 3, 1)

    padding = ((pad, pad), (pad, pad))
    nhwc = ("NHWC", "HWIO", "NHWC")

    def xla(x, k):
        if kind == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=nhwc)

    ours = {
        "3x3": C.winograd_conv3x3,
        "1x1": lambda x, k: jnp.einsum("nhwi,io->nhwo", x, k[0, 0]),
        "up": C.upsample2x_conv3x3,
    }[kind]
    xj, kj = jnp.asarray(x), jnp.asarray(k)
    f_xla, f_ours = jax.jit(xla), jax.jit(ours)
    t_xla = best(repeats, f_xla, xj, kj)
    t_ours = best(repeats, f_ours, xj, kj)
    t_prep = None
    if kind == "3x3":
        u = jax.block_until_ready(jax.jit(C.winograd_kernel)(kj))
        t_prep = best(repeats, jax.jit(C.winograd_conv3x3_transformed), xj, u)
    scale = float(np.max(np.abs(ref)))
    if kind == "3x3":
        auto = "winograd" if C.use_winograd(x.shape, k.shape, jnp.float32) else "xla"
    else:
        auto = "ours" if C._rewrite_chosen(jnp.float32) else "xla"
    return dict(
        kind=kind,
        batch=n,
        side=side,
        cin=cin,
        cout=cout,
        torch_s=t_torch,
        xla_s=t_xla,
        ours_s=t_ours,
        ours_prepared_s=t_prep,
        xla_rel_err=float(np.max(np.abs(np.asarray(f_xla(xj, kj)) - ref))) / scale,
        ours_rel_err=float(np.max(np.abs(np.asarray(f_ours(xj, kj)) - ref))) / scale,
        automatic_choice=auto,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default="bench_conv.json")
    args = parser.parse_args()

    import jax
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    head = f"{'kind':<5}{'shape (N,side,in,out)':<24}{'torch ms':>10}{'xla ms':>9}{'ours ms':>9}"
    head += f"{'prepared':>10}{'xla err':>9}{'ours err':>10}"
    print(head)
    print("-" * len(head))
    results = []
    for row_spec in QUICK if args.quick else ROWS:
        row = measure(*row_spec, args.repeats)
        results.append(row)
        t_prep = row["ours_prepared_s"]
        prep = f"{1e3 * t_prep:10.1f}" if t_prep is not None else f"{'-':>10}"
        print(
            f"{row['kind']:<5}{str(row_spec[1:]):<24}{1e3 * row['torch_s']:10.1f}"
            f"{1e3 * row['xla_s']:9.1f}{1e3 * row['ours_s']:9.1f}{prep}"
            f"{row['xla_rel_err']:9.1e}{row['ours_rel_err']:10.1e}  "
            f"auto: {row['automatic_choice']}",
            flush=True,
        )
    with open(args.json, "w") as f:
        report = {
            "date": time.strftime("%Y-%m-%d"),
            "jax": jax.__version__,
            "torch": torch.__version__,
            "repeats": args.repeats,
            "rows": results,
        }
        json.dump(report, f, indent=2)
    print(f"JSON: {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()

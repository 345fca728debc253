"""Decode one 2048x2048 picture (256x256 latents) with the published SD kl-f8 VAE config.

Random weights: the model is built abstractly (``nnx.eval_shape``, nothing allocated) and each
parameter is then filled with seeded random values in JAX. Two variants, each in its own
subprocess so that their peak memories (``ru_maxrss``) are separate:

* ``untiled``: the whole picture at once. The mid-block attention runs over 256*256 = 65536
  positions; its float32 score matrix would take 65536^2 * 4 bytes = 17.2 GB (16 GiB), so the
  automatic choice of :func:`flax_latentup.attention` chunks the queries (1024 at a time:
  256 MiB of scores per chunk).
* ``tiled``: diffusers' ``enable_tiling()`` scheme, tiles of ``config.sample_size`` pixels
  (256 -> 32x32 latents) overlapping by a quarter, one compiled program for all tiles.

Each variant reports the wall time of its first call, with the part spent compiling
(``--repeats N`` adds calls of the compiled program), and the process's peak RSS.

    python benchmarks/bench_vae_decode.py                # both variants
    python benchmarks/bench_vae_decode.py --variant tiled --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# the checkout this script lives in, ahead of any installed copy of the package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LATENT = 256  # 256x256 latents -> 2048x2048 pixels
SCORE_BYTES = (LATENT * LATENT) ** 2 * 4


def random_vae(seed: int = 0):
    """The published config with random parameters, filled in JAX without a torch model."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from flax_latentup import AutoencoderKLConfig, FlaxAutoencoderKL

    graphdef, abstract = nnx.split(FlaxAutoencoderKL.abstract(AutoencoderKLConfig.sd_kl_f8()))
    key = jax.random.key(seed)
    leaves = []
    for index, (path, var) in enumerate(nnx.to_flat_state(abstract)):
        noise = jax.random.normal(jax.random.fold_in(key, index), var.shape, jnp.float32)
        name = str(path[-1])
        if name == "kernel":  # fan-in scaled, like the default inits
            fan_in = 1
            for d in var.shape[:-1]:
                fan_in *= d
            value = noise / jnp.sqrt(fan_in)
        elif name == "scale":
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        leaves.append((path, var.replace(value.astype(var.dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def run_variant(variant: str, repeats: int, tile_sample_size: int | None) -> dict:
    import jax
    import jax.numpy as jnp

    from flax_latentup.models import layers

    compile_seconds: list[float] = []

    def on_event(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    vae = random_vae()
    compile_seconds.clear()  # only the decode's compiles count
    z = jax.random.normal(jax.random.key(1), (1, LATENT, LATENT, 4), jnp.float32)
    tiled = variant == "tiled"
    q = jax.ShapeDtypeStruct((1, LATENT * LATENT, 1, 512), jnp.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = vae.decode(z, tiled=tiled, tile_sample_size=tile_sample_size)
        out.block_until_ready()
        times.append(time.perf_counter() - start)
    tile = vae.tile_sizes(tile_sample_size)[0] if tiled else None
    return {
        "variant": variant,
        "output_shape": list(out.shape),
        "finite": bool(jnp.isfinite(out).all()),
        "attention": "per tile (32x32 latents)"
        if tiled
        else layers.choose_attention_implementation(q, q),
        "tile_sample_size": tile,
        "seconds": [round(t, 1) for t in times],
        "compile_seconds": round(sum(compile_seconds), 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("untiled", "tiled"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tile-sample-size", type=int, default=None)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.repeats, args.tile_sample_size)))
        return

    import jax

    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores")
    print(
        f"a float32 score matrix over {LATENT}x{LATENT} latents would take "
        f"{SCORE_BYTES / 1e9:.1f} GB ({SCORE_BYTES / 2**30:.0f} GiB)"
    )
    for variant in ("untiled", "tiled"):
        cmd = [sys.executable, __file__, "--variant", variant, "--repeats", str(args.repeats)]
        if args.tile_sample_size:
            cmd += ["--tile-sample-size", str(args.tile_sample_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}")
            continue
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        first, *rest = result["seconds"]
        again = f", then {', '.join(f'{t:.1f}' for t in rest)} s" if rest else ""
        print(
            f"{variant:8s} {result['output_shape']}: first call {first:.1f} s (of which "
            f"{result['compile_seconds']:.1f} s compiling){again}; peak RSS {result['peak_rss_gib']:.2f} GiB; attention "
            f"{result['attention']}; finite {result['finite']}"
        )


if __name__ == "__main__":
    main()

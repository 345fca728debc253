"""End-to-end x2 latent upscaling: the Flax port against diffusers on the same weights and inputs.

The published configs (K-UNet 372.6 M, SD kl-f8 VAE, CLIP ViT-L/14 text tower) are built in
torch with seeded random weights (every parameter perturbed, so all of them matter), saved as a
diffusers pipeline folder, and loaded from that folder by both sides: diffusers'
``StableDiffusionLatentUpscalePipeline`` and ``FlaxStableDiffusionLatentUpscalePipeline``.
``--model DIR`` loads an existing diffusers-layout folder instead (e.g. the hub's files).

Both sides get the same low-res latents, the same initial noise, prompt, steps and guidance.
Each side runs in its own subprocess (separate peak memory, no shared thread pools). The two
processes run side by side but take turns: each timed call of one side is followed by one of
the other, so a machine whose speed drifts during the run (other load, clock changes) slows
both sides alike instead of whichever happened to run second (``--sequential`` runs one
whole side after the other instead). Each side reports: the first call (the port compiles there), the median of ``--repeats`` further calls,
one UNet call on its own (per step), the achieved FLOP/s against the analytic count (0.32
TFLOP per image per UNet call at 64x64 latents, scaled by area, x2 rows under CFG) and the
peak RSS. The outputs are compared: a fast wrong answer is not a result.

    python benchmarks/bench_pipeline.py                       # CPU defaults, a few minutes
    python benchmarks/bench_pipeline.py --unet-only           # one UNet call, port vs torch
    python benchmarks/bench_pipeline.py --devices 1 2 --batch 2 --sides jax
    python benchmarks/bench_pipeline.py --device gpu --batch 8 --latent 64 --steps 20 \\
        --dtype bfloat16 --torch-dtype float16 --torch eager compile --guidance 7.5
    python benchmarks/bench_pipeline.py --tiny --steps 1 --repeats 1   # checks the script

torch runs as diffusers users run it at their fastest: eager (its default attention, SDPA), and
with ``--torch ... compile`` also ``torch.compile`` of the UNet and the VAE decoder (the first
torch variant takes turns with the port; further ones run on their own afterwards). On a GPU
the UNet's TFLOP/s are also given as a fraction of the device's bfloat16 peak.

Writes a table to stdout and everything to ``--json`` (default ``bench_pipeline.json``).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PROCESS_START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the checkout this script lives in, ahead of any installed copy of the package
sys.path.insert(0, ROOT)

UNET_TFLOP_64 = 0.32  # analytic, one image, one UNet call at 64x64 upscaled latents
PROMPT = "a photo of the cat"


# --------------------------------------------------------------------------------------------
# Helpers shared by the parent and the workers
# --------------------------------------------------------------------------------------------


def cores() -> int:
    return len(os.sched_getaffinity(0))


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(v) for v in f.read().split()[:3]]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def unet_tflop(rows: int, side: int) -> float:
    """Analytic TFLOP of one UNet call on ``rows`` images with ``side x side`` latents."""
    return UNET_TFLOP_64 * rows * (side / 64) ** 2


def vae_decode_tflop(images: int, side: int) -> float:
    """Analytic TFLOP of the SD kl-f8 decoder on ``side x side`` latents (convs, attention)."""

    def conv(cin: int, cout: int, hw: int, k: int = 3) -> float:
        return 2.0 * k * k * cin * cout * hw

    def resnet(cin: int, cout: int, hw: int) -> float:
        return (
            conv(cin, cout, hw)
            + conv(cout, cout, hw)
            + (conv(cin, cout, hw, 1) if cin != cout else 0)
        )

    hw = side * side
    flop = conv(4, 512, hw) + 2 * resnet(512, 512, hw)
    flop += 4 * 2.0 * hw * 512 * 512 + 2 * 2.0 * hw * hw * 512  # mid-block attention
    cin = 512
    for i, cout in enumerate((512, 512, 256, 128)):
        flop += resnet(cin, cout, hw) + 2 * resnet(cout, cout, hw)
        cin = cout
        if i < 3:
            hw *= 4
            flop += conv(cout, cout, hw)
    flop += conv(128, 3, hw)
    return images * flop / 1e12


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# Building the model folder (torch)
# --------------------------------------------------------------------------------------------


def build_model_folder(folder: str, seed: int = 0, tiny: bool = False) -> None:
    """Write a diffusers pipeline folder with seeded random weights: the published configs, or
    with ``tiny`` the test suite's small ones (a quick check of the script itself)."""
    from tests.helpers import (
        SD_KL_F8_VAE,
        SD_X2_UNET,
        VIT_L14_TEXT,
        make_torch_pipeline,
        write_clip_tokenizer,
    )

    configs = {} if tiny else dict(unet=SD_X2_UNET, vae=SD_KL_F8_VAE, text=VIT_L14_TEXT)
    with tempfile.TemporaryDirectory() as tok:
        pipe = make_torch_pipeline(seed, tokenizer_dir=write_clip_tokenizer(tok), **configs)
        pipe.save_pretrained(folder, safe_serialization=True)


# --------------------------------------------------------------------------------------------
# Workers: one side each, in its own process
# --------------------------------------------------------------------------------------------


class Baton:
    """Turn-taking between the two worker processes, through files in a shared folder.

    ``turn`` holds the name of the side allowed to run; ``done-<side>`` marks a side that
    has finished (or failed), after which the other runs on alone. A worker holds the turn
    from its start (loading and compiling included) and hands it over after each timed call.
    """

    def __init__(self, folder: str | None, me: str, other: str):
        self.folder, self.me, self.other = folder, me, other

    def _path(self, name: str) -> str:
        return os.path.join(self.folder, name)

    def _write_turn(self, side: str) -> None:
        tmp = self._path(f"turn.{self.me}.tmp")
        with open(tmp, "w") as f:
            f.write(side)
        os.replace(tmp, self._path("turn"))

    def _mine(self) -> bool:
        if os.path.exists(self._path(f"done-{self.other}")):
            return True
        with open(self._path("turn")) as f:
            return f.read() == self.me

    def wait(self) -> None:
        while self.folder and not self._mine():
            time.sleep(0.02)

    def hand_over(self) -> None:
        """Let the other side run one call (if it is still running), then wait for the turn."""
        if self.folder and not os.path.exists(self._path(f"done-{self.other}")):
            self._write_turn(self.other)
            self.wait()

    def finish(self) -> None:
        if self.folder:
            open(self._path(f"done-{self.me}"), "w").close()
            self._write_turn(self.other)


BATON = Baton(None, "", "")


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    start = time.perf_counter()
    out = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        BATON.hand_over()
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return first, times, out


def worker_jax(spec: dict) -> dict:
    from flax_latentup.models.layers import attention_config

    # the whole worker under one attention setting (read when the programs are traced)
    with attention_config(implementation=spec.get("attention")):
        return _worker_jax(spec)


def _worker_jax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    if spec.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compilation_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
    from flax_latentup.models.conv import using_winograd_kernels, winograd_kernels

    compile_events: list[float] = []

    def on_event(event: str, seconds: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compile_events.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(on_event)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[spec["dtype"]]
    base_rss = peak_rss_gib()
    start = time.perf_counter()
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(spec["model"], dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    data = np.load(spec["inputs"])
    result: dict = {
        "side": "jax",
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "attention": spec.get("attention") or "auto",
        "load_s": load_s,
        "cases": [],
    }

    stash: dict = {}
    finish = pipe._finish_images

    def keep_latents(out, *rest):
        stash["latents"] = np.asarray(out["latents"])
        return finish(out, *rest)

    pipe._finish_images = keep_latents  # the final latents too, for the comparison
    graphdef, state = nnx.split(pipe.unet)
    # One UNet call as the sampling loop makes it: the pipeline transforms the Winograd
    # kernels once for its weights and keeps them (flax_latentup.models.conv), so here once,
    # outside the timed calls; the transform's own time is reported as winograd_kernels_s.
    kernels_fn = jax.jit(lambda state: winograd_kernels(nnx.merge(graphdef, state)))
    kernels_fn = kernels_fn.lower(state).compile()
    start = time.perf_counter()
    jax.block_until_ready(kernels_fn(state))  # dropped: the pipeline keeps its own copy
    result["winograd_kernels_s"] = time.perf_counter() - start

    @jax.jit
    def unet_call(state, kernels, x, t, ctx, tc):
        unet = nnx.merge(graphdef, state)
        with using_winograd_kernels(unet, kernels):
            return unet(x, t, ctx, tc)

    for case in spec["cases"]:
        g = case["guidance"]
        entry: dict = {"guidance": g}
        if not spec["unet_only"]:

            def call(g=g):
                return pipe(
                    prompt=[PROMPT] * spec["batch"],
                    image=data["low"],
                    num_inference_steps=spec["steps"],
                    guidance_scale=g,
                    latents=data["noise"],
                    output_type="np",
                ).images

            compile_events.clear()
            first, times, images = _timed(call, spec["repeats"])
            entry.update(
                first_s=first,
                compile_s=sum(compile_events),
                times_s=times,
                start_to_first_output_s=time.perf_counter() - PROCESS_START
                if not result["cases"]
                else None,
            )
            np.save(os.path.join(spec["out"], f"jax_images_{g}.npy"), images)
            np.save(os.path.join(spec["out"], f"jax_latents_{g}.npy"), stash["latents"])
        if spec["unet_timing"]:
            unet = data_unet(spec, case, pipe.unet.config, np)
            args = [jnp.asarray(unet[k]).astype(dtype) for k in ("x", "t", "ctx", "tc")]
            compile_events.clear()
            first, times, out = _timed(
                lambda args=args: unet_call(
                    state, pipe._unet_winograd_kernels(), *args
                ).block_until_ready(),
                spec["unet_repeats"],
            )
            entry.update(unet_first_s=first, unet_compile_s=sum(compile_events), unet_s=times)
            np.save(os.path.join(spec["out"], f"jax_unet_{g}.npy"), np.asarray(out, np.float32))
        result["cases"].append(entry)
    if spec["unet_timing"] and not spec["unet_only"]:
        vae_graphdef, vae_state = nnx.split(pipe.vae)
        decode = jax.jit(lambda st, z: nnx.merge(vae_graphdef, st).decode(z))
        z = jnp.asarray(data_latents(spec, np)).astype(dtype)
        first, times, _ = _timed(
            lambda: decode(vae_state, z).block_until_ready(), spec["unet_repeats"]
        )
        result.update(vae_decode_first_s=first, vae_decode_s=times)
    result["peak_rss_gib"] = peak_rss_gib()
    result["base_rss_gib"] = base_rss
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["device_peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return result


def data_latents(spec: dict, np):
    """Random latents ``[B, 2h, 2w, 4]`` (NHWC) for timing the VAE decode alone."""
    side = 2 * spec["latent"]
    return np.random.RandomState(8).randn(spec["batch"], side, side, 4).astype(np.float32)


def data_unet(spec: dict, case: dict, config, np) -> dict:
    """Random UNet inputs (NHWC) for one call with the rows of ``case``; ``config``: the UNet's
    config (either side's: the names are the same)."""
    rows = spec["batch"] * (2 if case["guidance"] > 1 else 1)
    side = 2 * spec["latent"]
    rng = np.random.RandomState(7)
    return {
        "x": rng.randn(rows, side, side, config.in_channels).astype(np.float32),
        "t": np.full((rows,), np.log(3.0) * 0.25, np.float32),
        "ctx": rng.randn(rows, 77, config.cross_attention_dim).astype(np.float32),
        "tc": rng.randn(rows, config.time_cond_proj_dim).astype(np.float32),
    }


TORCH_DTYPES = ("float32", "float16", "bfloat16")


def compile_torch_pipeline(pipe, mode: str) -> None:
    """torch.compile the UNet and the VAE decoder the way diffusers' speed guide does:
    channels-last weights, 1x1 convs as matrix products, coordinate-descent tuning, one
    static graph each (``dynamic=False``: the CFG and non-CFG batch sizes each get their own
    specialised graph rather than one symbolic-shape graph)."""
    import torch
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True, dynamic=False)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True, dynamic=False)


def worker_torch(spec: dict) -> dict:
    import numpy as np
    import torch
    from diffusers import StableDiffusionLatentUpscalePipeline

    torch.set_num_threads(cores())
    device = {"cpu": "cpu", "gpu": "cuda"}.get(spec["device"], spec["device"])
    dtype = getattr(torch, spec["torch_dtype"])
    name = spec["name"]
    if device == "cuda":
        # fastest cuDNN conv algorithms for these shapes; TF32 where float32 is asked for
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    base_rss = peak_rss_gib()
    start = time.perf_counter()
    # diffusers names the argument `dtype` where it has `_resolve_dtype`, `torch_dtype` before
    from diffusers.utils import deprecation_utils

    dtype_arg = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(spec["model"], **{dtype_arg: dtype})
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    processors = sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})
    if spec["variant"] == "compile":
        compile_torch_pipeline(pipe, spec["compile_mode"])
    load_s = time.perf_counter() - start
    data = np.load(spec["inputs"])
    low = torch.from_numpy(data["low"].transpose(0, 3, 1, 2)).to(device, dtype)
    noise = torch.from_numpy(data["noise"].transpose(0, 3, 1, 2)).to(device, dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    result: dict = {
        "side": name,
        "variant": spec["variant"],
        "compile_mode": spec["compile_mode"] if spec["variant"] == "compile" else None,
        "dtype": spec["torch_dtype"],
        "attention_processors": processors,
        "threads": torch.get_num_threads(),
        "device": device,
        "device_kind": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "load_s": load_s,
        "cases": [],
    }
    stash: dict = {}

    def keep(step, timestep, latents):
        stash["latents"] = latents

    for case in spec["cases"]:
        g = case["guidance"]
        entry: dict = {"guidance": g}
        with torch.inference_mode():
            if not spec["unet_only"]:

                def call(g=g):
                    images = pipe(
                        prompt=[PROMPT] * spec["batch"],
                        image=low,
                        num_inference_steps=spec["steps"],
                        guidance_scale=g,
                        latents=noise,
                        output_type="np",
                        callback=keep,
                    ).images
                    sync()
                    return images

                first, times, images = _timed(call, spec["repeats"])
                entry.update(first_s=first, times_s=times)
                if spec["variant"] == "compile":  # torch compiles inside its first call
                    entry["compile_s"] = first - median(times)
                np.save(os.path.join(spec["out"], f"{name}_images_{g}.npy"), images)
                lat = stash["latents"].float().cpu().numpy().transpose(0, 2, 3, 1)
                np.save(os.path.join(spec["out"], f"{name}_latents_{g}.npy"), lat)
            if spec["unet_timing"]:
                unet = data_unet(spec, case, pipe.unet.config, np)
                args = {k: torch.from_numpy(v).to(device, dtype) for k, v in unet.items()}
                x = args["x"].permute(0, 3, 1, 2).contiguous()

                def unet_call(x=x, args=args):
                    out = pipe.unet(
                        x, args["t"], args["ctx"], timestep_cond=args["tc"], return_dict=False
                    )[0]
                    sync()
                    return out

                first, times, out = _timed(unet_call, spec["unet_repeats"])
                entry.update(unet_first_s=first, unet_s=times)
                np.save(
                    os.path.join(spec["out"], f"{name}_unet_{g}.npy"),
                    out.float().cpu().numpy().transpose(0, 2, 3, 1),
                )
        result["cases"].append(entry)
    if spec["unet_timing"] and not spec["unet_only"]:
        z = torch.from_numpy(data_latents(spec, np).transpose(0, 3, 1, 2)).to(device, dtype)

        def decode():
            out = pipe.vae.decode(z, return_dict=False)[0]
            sync()
            return out

        with torch.inference_mode():
            first, times, _ = _timed(decode, spec["unet_repeats"])
        result.update(vae_decode_first_s=first, vae_decode_s=times)
    result["peak_rss_gib"] = peak_rss_gib()
    result["base_rss_gib"] = base_rss
    if device == "cuda":
        result["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# --------------------------------------------------------------------------------------------
# The parent: inputs, workers, comparison, table
# --------------------------------------------------------------------------------------------


def jax_platforms(device: str) -> str:
    """JAX_PLATFORMS for ``--device``: "gpu" names the CUDA backend alone (JAX reads a bare
    "gpu" as CUDA, ROCm and oneAPI together, and fails on the first one it lacks)."""
    return {"gpu": "cuda"}.get(device, device)


def start_worker(side: str, spec: dict, devices: int) -> tuple[subprocess.Popen, dict]:
    """Start one worker process: ``side`` is "jax" or "torch" (``spec["name"]`` tells the torch
    variant); JAX gets ``devices`` host devices."""
    env = dict(os.environ)
    if side == "jax":
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
        if devices > 1:
            flags.append(f"--xla_force_host_platform_device_count={devices}")
        env["XLA_FLAGS"] = " ".join(flags)
        if spec["device"] != "auto":
            env["JAX_PLATFORMS"] = jax_platforms(spec["device"])
    tag = f"{spec.get('name', side)}_{devices}"
    spec_path = os.path.join(spec["out"], f"spec_{tag}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    out = open(os.path.join(spec["out"], f"out_{tag}.txt"), "w+")
    err = open(os.path.join(spec["out"], f"err_{tag}.txt"), "w+")
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", side, spec_path],
        env=env,
        stdout=out,
        stderr=err,
        text=True,
    )
    meta = {
        "side": spec.get("name", side),
        "start": time.perf_counter(),
        "out": out,
        "err": err,
        "xla_flags": env.get("XLA_FLAGS", "") if side == "jax" else None,
    }
    return proc, meta


class WorkerFailed(Exception):
    pass


def collect_workers(
    workers: list[tuple[subprocess.Popen, dict]], timeout: float | None = None
) -> list[dict]:
    """Wait for every worker. If one fails, or any is still running ``timeout`` seconds after
    its start, stop them all and raise :class:`WorkerFailed` with the reason."""

    def stop_all() -> None:
        for other, _ in workers:
            if other.poll() is None:
                other.kill()
                other.wait()

    ended: dict[int, float] = {}
    while len(ended) < len(workers):
        for i, (proc, meta) in enumerate(workers):
            if i in ended:
                continue
            if proc.poll() is None:
                if timeout is not None and time.perf_counter() - meta["start"] > timeout:
                    stop_all()
                    raise WorkerFailed(f"{meta['side']} worker still running after {timeout:g} s")
                continue
            ended[i] = time.perf_counter() - meta["start"]
            if proc.returncode:
                stop_all()
                meta["err"].seek(0)
                raise WorkerFailed(f"{meta['side']} worker failed:\n{meta['err'].read()[-4000:]}")
        time.sleep(0.1)
    results = []
    for i, (_, meta) in enumerate(workers):
        meta["out"].seek(0)
        result = json.loads(meta["out"].read().strip().splitlines()[-1])
        result["process_s"] = ended[i]
        result["xla_flags"] = meta["xla_flags"]
        results.append(result)
        meta["out"].close()
        meta["err"].close()
    return results


def run_worker(side: str, spec: dict, devices: int, timeout: float | None = None) -> dict:
    return collect_workers([start_worker(side, spec, devices)], timeout)[0]


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "torch", "diffusers", "transformers", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def compare(out_dir: str, what: str, g: float, name: str, ref: str) -> dict | None:
    """How far ``name``'s saved output is from ``ref``'s (None where either is missing)."""
    import numpy as np

    paths = [os.path.join(out_dir, f"{n}_{what}_{g}.npy") for n in (name, ref)]
    if not all(os.path.exists(p) for p in paths):
        return None
    a, b = (np.load(p).astype(np.float64) for p in paths)
    if a.shape != b.shape:
        return {"shape_mismatch": [list(a.shape), list(b.shape)]}
    finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    d = np.abs(a - b)
    return {
        "finite": finite,
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "max_abs_ref": float(np.abs(b).max()),
        "rel_diff": float(d.max() / max(np.abs(b).max(), 1e-12)),
    }


# dense bfloat16 matrix-unit peaks (TFLOP/s, no sparsity), from the makers' data sheets; the
# first name contained in the device's name wins, so the more specific names come first
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("TPU v6 lite", 918.0),
    ("TPU v5p", 459.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v4", 275.0),
)


def bf16_peak_tflops(device_kind: str | None) -> float | None:
    """The bfloat16 peak of a known accelerator, by name (None for CPUs and unknown ones)."""
    for name, peak in BF16_PEAK_TFLOPS:
        if device_kind and name.lower() in device_kind.lower():
            return peak
    return None


def fmt(x: float | None, unit: str = "", digits: int = 2) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:.{digits}f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers-layout pipeline folder (default: build one)")
    parser.add_argument("--save-model", help="build the random model into this folder and keep it")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--latent", type=int, default=32, help="low-res latent side (out: 2x)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", type=float, nargs="+", default=[0.0, 7.5])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls after the first")
    parser.add_argument("--unet-repeats", type=int, default=5)
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the port's dtype"
    )
    parser.add_argument(
        "--torch-dtype",
        choices=TORCH_DTYPES,
        help="torch's dtype (default: --dtype; on GPUs torch is at its fastest in float16)",
    )
    parser.add_argument(
        "--torch",
        nargs="+",
        choices=("eager", "compile"),
        default=["eager"],
        dest="torch_variants",
        help="torch variants: eager (SDPA attention) and/or torch.compile of UNet and VAE decoder",
    )
    parser.add_argument(
        "--torch-compile-mode",
        default="max-autotune",
        help="torch.compile mode (default, reduce-overhead, max-autotune, ...)",
    )
    parser.add_argument(
        "--compile-timeout",
        type=float,
        help="seconds after which the torch.compile variant is given up (reported as missing)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the device's bfloat16 peak, TFLOP/s (default: known accelerators by name)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, gpu, tpu (JAX) / cuda (torch)")
    parser.add_argument("--unet-only", action="store_true", help="one UNet call per side")
    parser.add_argument("--no-unet-timing", action="store_true", help="skip the UNet-alone part")
    parser.add_argument("--sides", nargs="+", choices=("jax", "torch"), default=["jax", "torch"])
    parser.add_argument(
        "--devices", type=int, nargs="+", default=[1], help="JAX host device counts (CPU)"
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the sides one after the other instead of taking turns call by call",
    )
    parser.add_argument(
        "--attention",
        choices=("xla", "chunked", "cudnn"),
        help="the port's attention everywhere (default: chosen per layer, cuDNN where it fits)",
    )
    parser.add_argument("--compilation-cache", help="JAX persistent compilation cache folder")
    parser.add_argument(
        "--tiny", action="store_true", help="the test suite's tiny configs (checks the script)"
    )
    parser.add_argument("--json", default="bench_pipeline.json")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        side, spec_path = args.worker
        with open(spec_path) as f:
            spec = json.load(f)
        global BATON
        BATON = Baton(spec.get("baton"), side, "torch" if side == "jax" else "jax")
        BATON.wait()
        try:
            result = (worker_jax if side == "jax" else worker_torch)(spec)
        finally:
            BATON.finish()
        print(json.dumps(result))
        return

    import numpy as np

    load_before = loadavg()
    work = tempfile.mkdtemp(prefix="bench-pipeline-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # a run that stops early too
    # a time limit's SIGTERM (`timeout`) ends the run through the exit handlers as well
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    model = args.model or args.save_model
    build_s = None
    if model is None or not os.path.exists(os.path.join(model, "model_index.json")):
        model = model or os.path.join(work, "model")
        which = "tiny test" if args.tiny else "published"
        print(f"building the {which} configs with random weights in {model} ...", flush=True)
        start = time.perf_counter()
        # a subprocess, so that the torch models do not count in this process's memory
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {ROOT!r}); "
                "from benchmarks.bench_pipeline import build_model_folder as b; "
                f"b({model!r}, tiny={args.tiny!r})",
            ],
            check=True,
        )
        build_s = time.perf_counter() - start

    rng = np.random.RandomState(0)
    side = args.latent
    low = rng.randn(args.batch, side, side, 4).astype(np.float32)
    noise = rng.randn(args.batch, 2 * side, 2 * side, 4).astype(np.float32)
    inputs = os.path.join(work, "inputs.npz")
    np.savez(inputs, low=low, noise=noise)
    spec = {
        "model": os.path.abspath(model),
        "inputs": inputs,
        "out": work,
        "batch": args.batch,
        "latent": side,
        "steps": args.steps,
        "repeats": args.repeats,
        "unet_repeats": args.unet_repeats,
        "dtype": args.dtype,
        "torch_dtype": args.torch_dtype or args.dtype,
        "compile_mode": args.torch_compile_mode,
        "attention": args.attention,
        "device": args.device,
        "unet_only": args.unet_only,
        "unet_timing": args.unet_only or not args.no_unet_timing,
        "cases": [{"guidance": g} for g in args.guidance],
        "compilation_cache": args.compilation_cache,
    }
    results: dict = {}
    failed: dict[str, str] = {}

    def landed(name: str, res: dict | None = None, reason: str | None = None) -> None:
        """One worker is done: show its times and write what has landed so far to the JSON
        file (replaced by the full report at the end), so that a run cut short keeps them."""
        if res is not None:
            results[name] = res
            times = [
                f"g={g:g}: "
                + ", ".join(
                    f"{label} {median(c[key]):.4g} s"
                    for key, label in (("times_s", "pipeline"), ("unet_s", "UNet"))
                    if c.get(key)
                )
                for g, c in zip(args.guidance, res.get("cases", []), strict=False)
            ]
            print(f"{name}: done in {res.get('process_s', 0):.1f} s; " + "; ".join(times))
        if reason is not None:
            failed[name] = reason
            print(f"{name}: {reason}", flush=True)
        partial = {
            "partial": True,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": versions(),
            "spec": spec,
            "failed": failed,
            "processes": results,
        }
        tmp = f"{args.json}.tmp"
        with open(tmp, "w") as f:
            json.dump(partial, f, indent=2)
        os.replace(tmp, args.json)
        sys.stdout.flush()

    jax_counts = list(args.devices) if "jax" in args.sides else []
    torch_runs = []  # (results name, worker spec)
    if "torch" in args.sides:
        for variant in dict.fromkeys(args.torch_variants):
            name = "torch" if variant == "eager" else f"torch_{variant}"
            torch_runs.append((name, dict(spec, name=name, variant=variant)))

    def keep_first_outputs() -> None:
        """Comparisons use the first device count's outputs: set them aside from later runs."""
        for g in args.guidance:
            for what in ("images", "latents", "unet"):
                src = os.path.join(work, f"jax_{what}_{g}.npy")
                if os.path.exists(src):
                    os.replace(src, os.path.join(work, f"jaxkeep_{what}_{g}.npy"))

    if torch_runs and jax_counts and not args.sequential:
        # the port and the first torch variant take turns; further variants run on their own
        n = jax_counts.pop(0)
        name, torch_spec = torch_runs.pop(0)
        print(f"{name} and jax ({n} device(s)), taking turns ...", flush=True)
        baton = os.path.join(work, "baton")
        os.makedirs(baton)
        with open(os.path.join(baton, "turn"), "w") as f:
            f.write("torch")
        try:
            torch_res, jax_res = collect_workers(
                [
                    start_worker("torch", dict(torch_spec, baton=baton), 1),
                    start_worker("jax", dict(spec, name="jax", baton=baton), n),
                ]
            )
        except WorkerFailed as e:
            landed(f"{name} and jax{n}", reason=str(e))
            raise SystemExit(str(e)) from None
        torch_res["interleaved"] = jax_res["interleaved"] = True
        landed(name, torch_res)
        landed(f"jax{n}", jax_res)
        keep_first_outputs()
    for name, torch_spec in torch_runs:
        print(f"{name} ...", flush=True)
        timeout = args.compile_timeout if torch_spec["variant"] == "compile" else None
        try:
            landed(name, run_worker("torch", torch_spec, 1, timeout))
        except WorkerFailed as e:
            landed(name, reason=str(e))
            if not results:  # nothing to report without it
                raise SystemExit(str(e)) from None
    for n in jax_counts:
        print(f"jax, {n} device(s) ...", flush=True)
        try:
            landed(f"jax{n}", run_worker("jax", dict(spec, name="jax"), n))
        except WorkerFailed as e:
            landed(f"jax{n}", reason=str(e))
            raise SystemExit(str(e)) from None
        if n == args.devices[0]:
            keep_first_outputs()
    for g in args.guidance:
        for what in ("images", "latents", "unet"):
            src = os.path.join(work, f"jaxkeep_{what}_{g}.npy")
            if os.path.exists(src):
                os.replace(src, os.path.join(work, f"jax_{what}_{g}.npy"))
    load_after = loadavg()

    # ---- summary ----
    out_side = 2 * side
    jax_name = f"jax{args.devices[0]}"
    torch_names = [n for n in results if n.startswith("torch")]
    peaks = {
        name: args.peak_tflops or bf16_peak_tflops(res.get("device_kind"))
        for name, res in results.items()
    }
    rows_out = []
    for i, g in enumerate(args.guidance):
        rows = args.batch * (2 if g > 1 else 1)
        # the analytic counts are for the published configs: none for --tiny
        tflop_unet = None if args.tiny else unet_tflop(rows, out_side)
        tflop_vae = None if args.tiny else vae_decode_tflop(args.batch, out_side)
        row: dict = {
            "guidance": g,
            "cfg": g > 1,
            "unet_rows": rows,
            "unet_tflop": tflop_unet,
            "vae_decode_tflop": tflop_vae,
        }
        for name, res in results.items():
            c = res["cases"][i]
            r: dict = {}
            if "times_s" in c:
                t = median(c["times_s"])
                r.update(
                    times_s=c["times_s"],
                    first_s=c["first_s"],
                    start_to_first_output_s=c.get("start_to_first_output_s"),
                    compile_s=c.get("compile_s"),
                    median_s=t,
                    images_per_s=args.batch / t,
                    pipeline_tflops=None
                    if args.tiny
                    else (tflop_unet * args.steps + tflop_vae) / t,
                )
            if "unet_s" in c:
                u = median(c["unet_s"])
                r.update(
                    unet_times_s=c["unet_s"],
                    unet_first_s=c["unet_first_s"],
                    unet_median_s=u,
                    unet_tflops=None if args.tiny else tflop_unet / u,
                )
                if r["unet_tflops"] is not None and peaks[name]:
                    r["unet_peak_fraction"] = r["unet_tflops"] / peaks[name]
            row[name] = r
        # time ratios (port / torch: below 1 is faster) and agreement, per torch variant
        row["ratios"], row["agreement"] = {}, {}
        for tname in torch_names:
            if jax_name not in results:
                break
            row["ratios"][tname] = {
                key: row[jax_name][key] / row[tname][key]
                for key in ("median_s", "unet_median_s")
                if key in row[jax_name] and key in row[tname]
            }
            row["agreement"][tname] = {
                what: compare(work, what, g, "jax", tname) for what in ("images", "latents", "unet")
            }
        rows_out.append(row)

    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "cpu": cpu_model(),
        "cores": cores(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "workload": {
            "batch": args.batch,
            "low_res_latents": [side, side],
            "latents": [out_side, out_side],
            "pixels": [8 * out_side, 8 * out_side],
            "steps": args.steps,
            "dtype": args.dtype,
            "torch_dtype": spec["torch_dtype"],
            "torch_variants": torch_names,
            "torch_compile_mode": args.torch_compile_mode
            if "compile" in args.torch_variants
            else None,
            "device": args.device,
            "unet_only": args.unet_only,
            "model": args.model
            or f"random weights, {'tiny test' if args.tiny else 'published'} configs",
            "build_s": build_s,
        },
        "bf16_peak_tflops": peaks,
        "failed": failed,
        "processes": {
            name: {k: v for k, v in res.items() if k != "cases"} for name, res in results.items()
        },
        "cases": rows_out,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)

    v = report["versions"]
    print(
        f"\n{report['date']}  {report['cpu']}, {report['cores']} cores; jax {v['jax']} "
        f"(jaxlib {v['jaxlib']}), flax {v['flax']}, torch {v['torch']}, diffusers "
        f"{v['diffusers']}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    kinds = sorted({str(res.get("device_kind")) for res in results.values()})
    print(
        f"workload: batch {args.batch}, {side}x{side} -> {out_side}x{out_side} latents "
        f"({8 * out_side} px), {args.steps} steps; port {args.dtype}, torch "
        f"{spec['torch_dtype']} ({', '.join(torch_names) or 'not run'}); {args.device}: "
        + ", ".join(kinds)
    )
    if not args.tiny:
        print(
            f"analytic work: UNet {unet_tflop(1, out_side):.3f} TFLOP per image per step (x2 "
            f"under CFG), VAE decode {vae_decode_tflop(1, out_side):.3f} TFLOP per image; "
            "TF/s below = (steps x UNet + VAE decode) / median time"
        )
    width = max([len(n) for n in results] + [8]) + 2
    head = (
        f"{'case':<10}{'side':<{width}}{'first s':>9}{'compile s':>10}{'median s':>10}"
        f"{'img/s':>8}{'TF/s':>7}{'UNet s':>9}{'UNet TF/s':>10}{'of peak':>8}{'RSS GiB':>8}"
        f"{'dev GiB':>8}"
    )
    print(head)
    print("-" * len(head))
    for row in rows_out:
        case = f"g={row['guidance']:g}" + (" CFG" if row["cfg"] else "")
        for name, res in results.items():
            r = row[name]
            frac = r.get("unet_peak_fraction")
            print(
                f"{case:<10}{name:<{width}}{fmt(r.get('first_s'), '', 1):>9}"
                f"{fmt(r.get('compile_s'), '', 1):>10}{fmt(r.get('median_s'), '', 3):>10}"
                f"{fmt(r.get('images_per_s'), '', 3):>8}{fmt(r.get('pipeline_tflops'), '', 1):>7}"
                f"{fmt(r.get('unet_median_s'), '', 4):>9}{fmt(r.get('unet_tflops'), '', 1):>10}"
                f"{fmt(frac and 100 * frac, '%', 1):>8}{fmt(res['peak_rss_gib'], '', 2):>8}"
                f"{fmt(res.get('device_peak_gib'), '', 2):>8}"
            )
        for tname, ratio in row["ratios"].items():
            parts = [
                f"{label} {ratio[key]:.3f} ({1 / ratio[key]:.2f}x)"
                for key, label in (("median_s", "pipeline"), ("unet_median_s", "UNet"))
                if key in ratio
            ]
            if parts:
                print(f"{'':<10}port/{tname} time (speed-up): " + ", ".join(parts))
        for tname, agreement in row["agreement"].items():
            for what, cmp in agreement.items():
                if cmp and "max_abs_diff" in cmp:
                    print(
                        f"{'':<10}|port - {tname}| {what}: max {cmp['max_abs_diff']:.2e}, mean "
                        f"{cmp['mean_abs_diff']:.2e} (max |{tname}| {cmp['max_abs_ref']:.2e})"
                        + ("" if cmp["finite"] else "  NOT FINITE")
                    )
    for name, res in results.items():
        if res.get("vae_decode_s"):
            t = median(res["vae_decode_s"])
            tf = None if args.tiny else vae_decode_tflop(args.batch, out_side)
            print(
                f"VAE decode alone ({name}): median {t:.3f} s"
                + (f", {tf / t:.2f} TFLOP/s" if tf else "")
            )
        if res.get("winograd_kernels_s") is not None:
            print(
                f"UNet Winograd kernel transform ({name}): {res['winograd_kernels_s']:.2f} s, "
                "once per loaded pipeline, in its first call (not in 'UNet s')"
            )
        if res.get("attention_processors"):
            print(f"{name}: attention {', '.join(res['attention_processors'])}")
    for name, reason in failed.items():
        print(f"{name}: no results ({reason.splitlines()[0]})")
    print(f"\nJSON: {os.path.abspath(args.json)}")
    shutil.rmtree(work, ignore_errors=True)  # inputs, outputs and a model built here


if __name__ == "__main__":
    main()

"""The benchmark script runs end to end (tiny configs) and its report holds what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks import bench_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bf16_peak_lookup():
    peak = bench_pipeline.bf16_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.4
    assert peak("NVIDIA H100 PCIe") == 756.0  # the specific name before the family's
    assert peak("NVIDIA GH200 480GB") == 989.4
    assert peak("NVIDIA H200") == 989.4
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("TPU v5 lite") == 197.0
    assert peak("cpu") is None
    assert peak(None) is None


def test_bench_pipeline_tiny(tmp_path):
    """Both sides run the tiny model through the script, taking turns; the outputs agree."""
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "bench_pipeline.py"),
        "--tiny",
        "--steps", "2",
        "--repeats", "1",
        "--unet-repeats", "1",
        "--guidance", "6",
        "--json", str(out),
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "port/torch time (speed-up)" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["processes"]) == {"torch", "jax1"}
    assert report["processes"]["torch"]["interleaved"]
    assert report["workload"]["torch_variants"] == ["torch"]
    assert report["workload"]["pixels"] == [512, 512]
    for case, g in zip(report["cases"], (6.0,), strict=True):
        assert case["guidance"] == g and case["unet_rows"] == 2  # classifier-free guidance
        for side in ("torch", "jax1"):
            assert len(case[side]["times_s"]) == 1 and case[side]["median_s"] > 0
            assert case[side]["unet_median_s"] > 0
        ratio = case["ratios"]["torch"]
        assert abs(ratio["median_s"] - case["jax1"]["median_s"] / case["torch"]["median_s"]) < 1e-12
        agreement = case["agreement"]["torch"]
        # float32 on both sides, same weights and inputs: a whole sampled image within 1e-3,
        # one UNet call within 1e-5 relative
        assert agreement["images"]["finite"]
        assert agreement["images"]["max_abs_diff"] <= 1e-3, agreement["images"]
        assert agreement["latents"]["max_abs_diff"] <= 1e-3 * agreement["latents"]["max_abs_ref"]
        assert agreement["unet"]["rel_diff"] <= 1e-5, agreement["unet"]


def test_gpu_run_script_parses_and_rejects_unknown_steps(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    proc = subprocess.run(
        ["bash", script, "env", "benchmark"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path / "out")),
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown step 'benchmark'" in proc.stdout
    assert not (tmp_path / "out").exists(), "nothing runs or is written before the steps check"

"""The benchmark script runs end to end (tiny configs) and its report holds what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

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


def gpu_run(tmp_path, *steps: str, **settings: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``gpu_run.sh STEPS`` checking itself on the CPU; (process, {name: bytes} of the pack)."""
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_RUN_PLATFORM="cpu", **settings)
    env.pop("JAX_PLATFORMS", None)  # the script sets it
    script = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
    proc = subprocess.run(
        ["bash", script, *steps], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert sorted(os.listdir(out)) == ["gpu_run.tar.gz", "summary.txt"], proc.stdout[-3000:]
    with tarfile.open(out / "gpu_run.tar.gz") as tar:
        packed = {
            os.path.normpath(m.name): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile()
        }
    packed["summary.txt"] = (out / "summary.txt").read_bytes()
    return proc, packed


@pytest.mark.heavy
def test_gpu_run_on_the_cpu_packs_the_benchmark(tmp_path):
    """The GPU script's steps, checked on the CPU: the CUDA tests skip, and the benchmark runs
    both sides on the tiny model, taking turns; its report holds what it claims."""
    proc, packed = gpu_run(tmp_path, "env", "tests", "bench")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"env.log", "cuda-tests.log", "cuda-tests.xml", "steps.log"} <= set(packed)
    assert b"jax sees [CpuDevice(id=0)]" in packed["env.log"]
    assert b"8 skipped" in packed["cuda-tests.log"]  # no GPU here: every CUDA test skips
    summary = packed["summary.txt"].decode()
    for step in ("env", "tests", "bench"):
        assert f"### {step} done in" in summary
    assert "port/torch time (speed-up)" in packed["bench_pipeline.log"].decode()

    report = json.loads(packed["bench_pipeline.json"])
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


def test_gpu_run_starts_no_step_past_its_budget(tmp_path):
    # 41 s: env starts with 31 s left; after it (imports of torch and JAX: seconds) under the
    # 30 s a step needs are left, so the benchmark is not started
    proc, packed = gpu_run(tmp_path, "env", "bench", GPU_RUN_BUDGET="41")
    assert proc.returncode == 1
    steps = packed["steps.log"].decode()
    assert "### env done in" in steps
    assert "### bench not started:" in steps and "of GPU_RUN_BUDGET=41" in steps
    assert "bench_pipeline.log" not in packed


@pytest.mark.parametrize(
    "steps, settings, message",
    [
        (
            ["env", "benchmark"],
            {},
            "unknown step 'benchmark' (expected env, tests, bench, flags or cli)",
        ),
        (["env"], {"GPU_RUN_PLATFORM": "tpu"}, "GPU_RUN_PLATFORM must be cuda or cpu, got 'tpu'"),
        (
            ["env"],
            {"GPU_RUN_BUDGET": "9m"},
            "GPU_RUN_BUDGET must be a whole number of seconds, got '9m'",
        ),
        (
            ["env"],
            {"STEP_TIMEOUT": "ten"},
            "STEP_TIMEOUT must be a whole number of seconds, got 'ten'",
        ),
    ],
)
def test_gpu_run_script_checks_its_arguments_first(tmp_path, steps, settings, message):
    script = os.path.join(ROOT, "benchmarks", "gpu_run.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    proc = subprocess.run(
        ["bash", script, *steps],
        capture_output=True,
        text=True,
        env=dict(os.environ, OUT=str(tmp_path / "out"), **settings),
        timeout=60,
    )
    assert proc.returncode == 2
    assert message in proc.stdout
    assert not (tmp_path / "out").exists(), "nothing runs or is written before the checks"


def test_gpu_worker_runs_jax_on_cuda_alone(tmp_path, monkeypatch):
    """``--device gpu`` starts the port's worker with JAX_PLATFORMS=cuda: a bare "gpu" makes JAX
    initialise ROCm and oneAPI too, and fail where they are missing."""
    seen = {}

    class Popen:
        def __init__(self, cmd, env, **kwargs):
            seen["env"] = env

    monkeypatch.setattr(bench_pipeline.subprocess, "Popen", Popen)
    for device, platforms in (("gpu", "cuda"), ("cuda", "cuda"), ("tpu", "tpu"), ("cpu", "cpu")):
        _, meta = bench_pipeline.start_worker("jax", {"device": device, "out": str(tmp_path)}, 1)
        meta["out"].close()
        meta["err"].close()
        assert seen["env"]["JAX_PLATFORMS"] == platforms, device


def test_benchmark_keeps_each_result_as_it_lands(tmp_path, monkeypatch, capsys):
    """A benchmark cut short (a worker failing, or the time limit) still leaves the results of
    the workers done before in its JSON file, and shows them as they come."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    torch_result = {"cases": [{"times_s": [2.0, 3.0, 4.0], "unet_s": [0.5]}], "process_s": 9.0}

    def run_worker(side, spec, devices, timeout=None):
        if side == "torch":
            return dict(torch_result)
        raise bench_pipeline.WorkerFailed("jax worker failed:\nRuntimeError: no backend")

    monkeypatch.setattr(bench_pipeline, "run_worker", run_worker)
    out = tmp_path / "bench.json"
    argv = ["bench_pipeline.py", "--tiny", "--model", str(model), "--guidance", "6"]
    argv += ["--sequential", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="no backend"):
        bench_pipeline.main()
    report = json.loads(out.read_text())
    assert report["partial"] is True
    assert report["processes"]["torch"]["cases"] == torch_result["cases"]
    assert "no backend" in report["failed"]["jax1"]
    assert "torch: done in 9.0 s; g=6: pipeline 3 s, UNet 0.5 s" in capsys.readouterr().out


@pytest.mark.heavy
def test_benchmark_stopped_by_its_time_limit_leaves_no_work_folder(tmp_path):
    """``timeout`` stops the benchmark with SIGTERM: its work folder (inputs, outputs, a model
    built there) is removed on the way out, as at a normal end."""
    import signal
    import time

    env = dict(os.environ, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu")
    script = os.path.join(ROOT, "benchmarks", "bench_pipeline.py")
    argv = [sys.executable, script, "--tiny", "--steps", "2", "--guidance", "6", "--repeats", "9"]
    argv += ["--json", str(tmp_path / "b.json")]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=tmp_path
    )
    try:
        for line in proc.stdout:  # the workers have started: the work folder is in use
            if "taking turns" in line:
                break
        assert [p for p in os.listdir(tmp_path) if p.startswith("bench-pipeline-")]
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGTERM)  # as `timeout` does: the whole process group
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("bench-pipeline-")]

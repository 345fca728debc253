"""The ``flax-latentup upscale`` batch command on a tiny model folder."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest

from flax_latentup.cli import main, make_upscale_folders, read_input
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_png(path, w=64, h=64, seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def make_folder(root, n=4, corrupt=True, odd=True):
    """n good 64x64 pictures (one in a sub-folder), one corrupt file, one 80x64 picture."""
    for i in range(n):
        sub = "sub" if i == n - 1 else ""
        write_png(os.path.join(root, sub, f"img{i}.png"), seed=i)
    if corrupt:
        with open(os.path.join(root, "broken.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n this is not a picture")
    if odd:
        write_png(os.path.join(root, "odd.png"), w=80, h=64, seed=99)
    return root


def run_cli(*argv, capsys=None):
    code = main(["upscale", *map(str, argv)])
    return code


COMMON = ("--steps", "2", "--no-compile-cache", "--quiet")


def read_report(outdir):
    with open(os.path.join(outdir, "flax-latentup-report.json")) as f:
        return json.load(f)


def outputs(outdir):
    found = []
    for root, _, files in os.walk(outdir):
        found += [
            os.path.relpath(os.path.join(root, f), outdir)
            for f in files
            if f.endswith(".png") and not f.startswith(".flax-latentup-tmp-")
        ]
    return sorted(found)


def test_folder_with_failure_then_rerun(flax_pipe_dir, tmp_path, capsys):
    src = make_folder(str(tmp_path / "in"))
    out = tmp_path / "out"
    code = run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON)
    assert code == 1, "a failed input must give a non-zero exit code"
    assert outputs(out) == ["img0.png", "img1.png", "img2.png", "odd.png", "sub/img3.png"]
    for name in outputs(out):
        with PIL.Image.open(out / name) as im:
            assert im.size == ((128, 128) if name != "odd.png" else (128, 128))
    report = read_report(out)
    assert len(report["done"]) == 5 and len(report["skipped"]) == 0
    assert [os.path.basename(f["input"]) for f in report["failed"]] == ["broken.png"]
    assert "cannot read" in report["failed"][0]["reason"]
    odd = [d for d in report["done"] if d["input"].endswith("odd.png")][0]
    assert odd["note"] == "resized from 80x64 to 64x64"
    printed = capsys.readouterr().out
    assert "done 5, skipped 0, failed 1" in printed and "broken.png" in printed

    # Rerun: everything is skipped and no model is even loaded.
    before = {n: os.path.getmtime(out / n) for n in outputs(out)}
    t0 = time.perf_counter()
    code = run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON)
    assert code == 1  # the corrupt file still fails
    report = read_report(out)
    assert len(report["done"]) == 0 and len(report["skipped"]) == 5
    assert {n: os.path.getmtime(out / n) for n in outputs(out)} == before
    assert time.perf_counter() - t0 < 30


def test_seeds_follow_paths_not_order(flax_pipe_dir, tmp_path):
    """An image's pixels depend on --seed and its relative path, not on what else runs."""
    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("-i", src, "-o", a, "-r", "-n", flax_pipe_dir, *COMMON) == 0
    assert run_cli("-i", os.path.join(src, "img1.png"), "-o", b, "-n", flax_pipe_dir, *COMMON) == 0
    assert (a / "img1.png").read_bytes() == (b / "img1.png").read_bytes()
    c = tmp_path / "c"
    assert run_cli("-i", src, "-o", c, "-r", "-n", flax_pipe_dir, "--seed", "7", *COMMON) == 0
    assert (a / "img1.png").read_bytes() != (c / "img1.png").read_bytes()


def test_npy_latents_and_options(flax_pipe_dir, tmp_path):
    src = tmp_path / "lat"
    src.mkdir()
    rng = np.random.default_rng(0)
    np.save(src / "a.npy", rng.standard_normal((8, 8, 4)).astype(np.float32))
    np.save(src / "b.npy", rng.standard_normal((1, 8, 12, 4)).astype(np.float32))
    out = tmp_path / "out"
    code = run_cli(
        "-i",
        src,
        "-o",
        out,
        "-n",
        flax_pipe_dir,
        "--suffix",
        "_x2",
        "--ext",
        "webp",
        "--prompt",
        "a cat",
        "--guidance",
        "6",
        "--negative-prompt",
        "dog",
        "--batch-size",
        "2",
        *COMMON,
    )
    assert code == 0
    with PIL.Image.open(out / "a_x2.webp") as im:
        assert im.size == (128, 128)
    with PIL.Image.open(out / "b_x2.webp") as im:
        assert im.size == (192, 128)
    # NCHW latents saved from torch need --nchw
    nchw = tmp_path / "nchw"
    nchw.mkdir()
    np.save(nchw / "t.npy", rng.standard_normal((1, 4, 8, 8)).astype(np.float32))
    assert run_cli("-i", nchw, "-o", tmp_path / "o2", "-n", flax_pipe_dir, *COMMON) == 1
    assert "--nchw" in read_report(tmp_path / "o2")["failed"][0]["reason"]
    # --unet / --vae replace the model folder's own: here it has none of them
    shutil.copytree(flax_pipe_dir, tmp_path / "bare")
    shutil.rmtree(tmp_path / "bare" / "unet")
    shutil.rmtree(tmp_path / "bare" / "vae")
    parts = {p: os.path.join(flax_pipe_dir, p) for p in ("unet", "vae")}
    argv = ("--nchw", "--unet", parts["unet"], "--vae", parts["vae"])
    assert run_cli("-i", nchw, "-o", tmp_path / "o3", "-n", tmp_path / "bare", *argv, *COMMON) == 0
    report = read_report(tmp_path / "o3")
    assert (report["unet"], report["vae"]) == (parts["unet"], parts["vae"])
    assert [e["output"] for e in report["done"]] == [str(tmp_path / "o3" / "t.png")]


def cli_subprocess(*argv):
    return subprocess.Popen(
        [sys.executable, "-m", "flax_latentup.cli", "upscale", *map(str, argv)],
        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.heavy
def test_killed_run_resumes_byte_identical(flax_pipe_dir, tmp_path):
    src = tmp_path / "in"
    for i in range(12):
        write_png(str(src / f"p{i:02d}.png"), seed=i)
    args = (
        "-i",
        src,
        "-n",
        flax_pipe_dir,
        "--steps",
        "40",
        "--quiet",
        "--compile-cache",
        tmp_path / "cache",
    )
    ref = tmp_path / "ref"
    proc = cli_subprocess(*args, "-o", ref)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    assert len(outputs(ref)) == 12
    assert os.listdir(tmp_path / "cache"), "the persistent compilation cache stayed empty"

    out = tmp_path / "out"
    proc = cli_subprocess(*args, "-o", out)
    deadline = time.time() + 600
    while time.time() < deadline and not outputs(out) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = outputs(out)
    assert 1 <= len(partial) < 12, f"the kill came too late to test resuming ({len(partial)} done)"

    proc = cli_subprocess(*args, "-o", out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
    report = read_report(out)
    assert len(report["skipped"]) == len(partial) and len(report["done"]) == 12 - len(partial)
    assert outputs(out) == outputs(ref)
    for name in outputs(ref):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    leftovers = [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".flax-latentup-tmp-")]
    assert leftovers == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["-i", "{tmp}/missing.png", "-o", "{tmp}/o"], "input not found"),
        (["-i", "{tmp}/in", "-o", ""], "-o/--output is empty"),
        (["-i", "{tmp}/empty", "-o", "{tmp}/o"], "holds no PNG/JPEG/WebP/BMP/TIFF/GIF/.npy files"),
        (["-i", "{tmp}/in", "-o", "{tmp}/in/out", "-r"], "inside input folder"),
        (["-i", "{tmp}/in", "-o", "{tmp}/in/a.png/x"], "not writable"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "-n", "{tmp}/no-such-model"], "--model"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--variant", "../fp16"], "--variant"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--steps", "0"], "--steps"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--batch-size", "0"], "--batch-size"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--guidance", "nan"], "--guidance"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--prompt-file", "{tmp}/nope.txt"], "--prompt-file"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--prompt-file", "{tmp}/in"], "is not a file"),
        (
            ["-i", "{tmp}/in", "-o", "{tmp}/o", "--prompt", "x", "--prompt-file", "{tmp}/in"],
            "not both",
        ),
        (
            ["-i", "{tmp}/in", "-o", "{tmp}/o", "--fp32", "--dtype", "bfloat16"],
            "give either --dtype or --fp32 (the same as --dtype float32), not both",
        ),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--prompt-file", "{tmp}/latin1.txt"], "utf-8"),
        (
            ["-i", "{tmp}/in", "-o", "{tmp}/o", "--prompt", os.fsdecode(b"caf\xe9")],
            '--prompt is not UTF-8 text ("caf\\xe9")',
        ),
        (
            ["-i", "{tmp}/in", "-o", "{tmp}/o", "--negative-prompt", os.fsdecode(b"\xff")],
            "--negative-prompt is not UTF-8 text",
        ),
        (["-i", "{tmp}/in", "-o", "{tmp}/in"], "would be the input itself"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--report", "{tmp}/in"], "is a folder"),
        (["-i", "{tmp}/in", "-o", "{tmp}/o", "--report", "{tmp}/in/a.png/r.json"], "--report"),
    ],
)
def test_usage_errors_before_loading(tmp_path, capsys, argv, message):
    write_png(str(tmp_path / "in" / "a.png"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "-n" not in argv:
        argv += ["-n", str(tmp_path / "in")]  # never reached: the error comes first
    code = run_cli(*argv, "--no-compile-cache")
    assert code == 2
    assert message in capsys.readouterr().err


def test_component_flags_are_checked_before_loading(flax_pipe_dir, tmp_path, capsys):
    """--unet / --vae folders are checked for a config and for fitting --model's other
    components, from the configs alone (these folders hold no weights), before any loading."""
    write_png(str(tmp_path / "in" / "a.png"))
    checkpoint = tmp_path / "checkpoint-00000100"
    for sub in ("unet", "unet_ema"):
        (checkpoint / sub).mkdir(parents=True)
        shutil.copy(os.path.join(flax_pipe_dir, "unet", "config.json"), checkpoint / sub)
    vae = tmp_path / "vae8"
    vae.mkdir()
    with open(os.path.join(flax_pipe_dir, "vae", "config.json")) as f:
        config = json.load(f)
    (vae / "config.json").write_text(json.dumps({**config, "latent_channels": 8}))
    base = ("-i", tmp_path / "in", "-o", tmp_path / "o", "-n", flax_pipe_dir, "--no-compile-cache")
    cases = [
        (("--unet", checkpoint), "its subfolders unet, unet_ema have one: pass one of them"),
        (("--vae", tmp_path / "in"), "--vae: config.json not found in"),
        (("--unet", tmp_path / "missing"), "--unet: model folder not found"),
        (("--vae", vae), "--vae does not fit --model: unet.config.in_channels (8) must be twice"),
        (("--unet", checkpoint / "unet_ema", "--vae", vae), "--unet and --vae do not fit"),
        (("--unet", checkpoint), "pass one of them (or its name to --unet-subfolder)"),
        (("--vae", tmp_path, "--vae-subfolder", "vae8"), "--vae does not fit --model"),
        (("--vae", tmp_path, "--vae-subfolder", "vae8/"), "--vae does not fit --model"),
        (("--unet", checkpoint, "--unet-subfolder", "nope"), "subfolder 'nope' not found in"),
        (("--unet-subfolder", "unet_ema"), "--unet-subfolder needs --unet"),
        (("--unet", checkpoint, "--unet-subfolder", "../x"), "must be a relative path inside"),
        (
            ("--vae", vae, "--vae-subfolder", ""),
            "--vae-subfolder must be a relative path inside --vae, such as vae,",
        ),
        (("--vae", vae, "--vae-subfolder", "\\"), "--vae-subfolder must be a relative path"),
    ]
    for extra, message in cases:
        assert run_cli(*base, *extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists()


def test_component_from_a_hub_repo_subfolder(flax_pipe_dir, tmp_path, monkeypatch, capsys):
    """``--unet REPO --unet-subfolder unet_ema``: a fine-tuning checkpoint pushed to the hub
    whole gives its EMA UNet, fetched alone; without the subfolder, the message names the
    flag."""
    remote = tmp_path / "remote"
    for sub in ("unet", "unet_ema"):
        shutil.copytree(os.path.join(flax_pipe_dir, "unet"), remote / sub)
    names = [str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()]
    fetched = helpers.fake_hub(
        monkeypatch, tmp_path / "snapshot", names, source=remote, repo_id="me/checkpoint"
    )
    write_png(str(tmp_path / "in" / "a.png"))
    argv = ("-i", tmp_path / "in", "-o", tmp_path / "o", "-n", flax_pipe_dir, *COMMON)
    assert run_cli(*argv, "--unet", "me/checkpoint") == 2
    err = capsys.readouterr().err
    assert "at its root: a model in a subfolder (a pipeline's unet/ or vae/) loads with " in err
    assert "--unet-subfolder, or with its pipeline" in err and fetched == []
    assert run_cli(*argv, "--unet", "me/checkpoint", "--unet-subfolder", "unet_ema") == 0
    assert sorted(fetched) == sorted(n for n in names if n.startswith("unet_ema/"))
    report = read_report(tmp_path / "o")
    assert (report["unet"], report["unet_subfolder"]) == ("me/checkpoint", "unet_ema")
    assert outputs(tmp_path / "o") == ["a.png"]


def test_fp32_is_dtype_float32():
    from flax_latentup.cli import build_parser, validate_upscale_args

    for extra, dtype in (
        ([], "auto"),
        (["--fp32"], "float32"),
        (["--dtype", "float16"], "float16"),
    ):
        args = build_parser().parse_args(["upscale", "-i", "in", "-o", "out", *extra])
        validate_upscale_args(args)
        assert args.dtype == dtype, extra


def test_version_and_convert_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("flax-latentup ")
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    assert "into a Flax or torch pipeline folder" in capsys.readouterr().out


def run_distributed(argvs: list[list[str]], timeout: float = 600) -> list[tuple[int, str]]:
    """``flax-latentup ARGV --distributed`` in one local process per ``argvs`` entry, started
    together: their ``(exit code, stderr)``."""
    port = helpers.free_port()
    code = "import sys; from flax_latentup.cli import main; sys.exit(main())"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *argv, "--distributed"],
            env=dict(
                os.environ,
                PYTHONPATH=ROOT,
                JAX_PLATFORMS="cpu",
                FLAX_LATENTUP_COORDINATOR=f"127.0.0.1:{port}",
                FLAX_LATENTUP_NUM_PROCESSES=str(len(argvs)),
                FLAX_LATENTUP_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, argv in enumerate(argvs)
    ]
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            results.append((p.returncode, err))
    finally:  # none left running after a timeout
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.heavy
def test_distributed_checks_stop_every_process(flax_pipe_dir, tmp_path):
    """``--distributed``: a process that fails its checks (an input it cannot find) stops the
    others at once, each saying why; so do processes that list different inputs or were given
    other settings, naming what differs. Nothing is upscaled."""
    a = make_folder(str(tmp_path / "a"), n=2, corrupt=False, odd=False)
    b = make_folder(str(tmp_path / "b"), n=3, corrupt=False, odd=False)
    out = tmp_path / "out"
    argv = ["upscale", "-o", str(out), "-r", "-n", flax_pipe_dir, *COMMON]
    missing = str(tmp_path / "nowhere.png")
    started = time.monotonic()
    (c0, e0), (c1, e1) = run_distributed([[*argv, "-i", a], [*argv, "-i", missing]], timeout=120)
    assert time.monotonic() - started < 100, "the first process waited for the second"
    assert (c0, c1) == (2, 2), (e0[-2000:], e1[-2000:])
    assert "process(es) 1 of 2 stopped at their checks" in e0, e0[-2000:]
    assert "nowhere.png" in e1 and "stopped at their checks" not in e1, e1[-2000:]
    assert not out.exists(), "the output folder was left made for a run that did not start"
    (c0, e0), (c1, e1) = run_distributed(
        [[*argv, "-i", a], [*argv, "-i", b, "--seed", "7"]], timeout=120
    )
    assert (c0, c1) == (2, 2), (e0[-2000:], e1[-2000:])
    for i, err in enumerate((e0, e1)):
        assert (
            "the processes differ in the inputs (process 0: 2, process 1: 3), --seed (process "
            f"{i} is this one)"
        ) in err, err[-2000:]
    # a copy of the model whose UNet weights differ (same names and sizes)
    other = str(tmp_path / "other_model")
    shutil.copytree(flax_pipe_dir, other)
    retrain_unet(other)
    (c0, e0), (c1, e1) = run_distributed([[*argv, "-i", a], [*argv, "-i", a, "-n", other]])
    assert (c0, c1) == (2, 2), (e0[-2000:], e1[-2000:])
    for err in (e0, e1):
        assert "the processes differ in --model (process" in err, err[-2000:]
    assert not out.exists()


def retrain_unet(model_dir: str) -> None:
    """Change the UNet weights of the pipeline folder ``model_dir`` in place, as training
    does (file names and sizes stay)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    [path] = [
        os.path.join(model_dir, "unet", n)
        for n in os.listdir(os.path.join(model_dir, "unet"))
        if n.endswith(".safetensors")
    ]
    size = os.path.getsize(path)
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
    tensors = {k: v + np.ones((), v.dtype) for k, v in load_file(path).items()}
    save_file(tensors, path, metadata=metadata)
    assert os.path.getsize(path) == size


def test_model_fingerprints_tell_models_not_paths(flax_pipe_dir, tmp_path):
    """What ``--distributed`` processes compare of their models: a copy elsewhere, with other
    bookkeeping in its configs, is the same model; changed weights or configs, or a ``--unet``
    given to one only, are not."""
    from flax_latentup.cli import model_fingerprints

    mine = model_fingerprints(flax_pipe_dir, {})
    assert set(mine) == {"--model", "--unet", "--vae"}
    copy = str(tmp_path / "copy")
    shutil.copytree(flax_pipe_dir, copy)
    config = os.path.join(copy, "vae", "config.json")
    with open(config) as f:
        data = json.load(f)
    with open(config, "w") as f:
        json.dump({**data, "_name_or_path": "/elsewhere", "_diffusers_version": "0.0"}, f)
    assert model_fingerprints(copy, {}) == mine
    data["scaling_factor"] = 0.5
    with open(config, "w") as f:
        json.dump(data, f)
    assert model_fingerprints(copy, {})["--model"] != mine["--model"]
    shutil.rmtree(copy)
    shutil.copytree(flax_pipe_dir, copy)
    retrain_unet(copy)
    assert model_fingerprints(copy, {})["--model"] != mine["--model"]
    given = model_fingerprints(flax_pipe_dir, {"unet": os.path.join(copy, "unet")})
    assert given["--unet"] != mine["--unet"] and given["--vae"] == mine["--vae"]
    assert given["--model"] != mine["--model"], "the model's own UNet left out"
    assert given == model_fingerprints(flax_pipe_dir, {"unet": os.path.join(copy, "unet")})


def test_variant_some_models_lack(flax_pipe_dir, tmp_path):
    """``--variant``: a model without weights of it takes its plain ones (as the pipeline
    loads them), and the run's fingerprint covers the weights that load; a model folder none
    of whose models has the variant is a usage error naming them."""
    import jax.numpy as jnp

    from flax_latentup.cli import UsageError, model_fingerprints, resolve_model
    from flax_latentup.models.unet import FlaxUNet2DConditionModel

    folder = str(tmp_path / "pipe")
    shutil.copytree(flax_pipe_dir, folder)
    unet = FlaxUNet2DConditionModel.from_pretrained(folder, "unet", param_dtype=jnp.bfloat16)
    unet.save_pretrained(os.path.join(folder, "unet"), variant="bf16")
    assert resolve_model(folder, "bf16") == folder
    plain = model_fingerprints(folder, {})
    assert plain == model_fingerprints(flax_pipe_dir, {})
    assert model_fingerprints(folder, {}, "bf16")["--model"] != plain["--model"]
    with pytest.raises(
        UsageError, match="--variant: none of text_encoder, vae has weights of variant 'bf16'"
    ):
        resolve_model(folder, "bf16", skip=("unet",))


@pytest.mark.heavy
def test_distributed_processes_share_one_output_folder(flax_pipe_dir, tmp_path):
    """``--distributed``: two processes upscale their shares into one output folder. A killed
    run's temporary is removed (once, before either process writes), each process writes its
    own report, the shares cover the inputs once, and the pictures are those of a
    single-process run."""
    src = make_folder(str(tmp_path / "in"), n=5, corrupt=False, odd=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".flax-latentup-tmp-killed.png").write_bytes(b"half a picture")
    argv = ["upscale", "-i", src, "-o", str(out), "-r", *COMMON]
    copy = str(tmp_path / "model_copy")  # each host its own copy of the model: one model
    shutil.copytree(flax_pipe_dir, copy)
    for code, err in run_distributed([[*argv, "-n", flax_pipe_dir], [*argv, "-n", copy]]):
        assert code == 0, err[-3000:]
    names = ["img0.png", "img1.png", "img2.png", "img3.png", "sub/img4.png"]
    assert outputs(out) == names
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".flax-latentup-tmp-")]
    assert not (out / "flax-latentup-report.json").exists()
    reports = []
    for i in range(2):
        with open(out / f"flax-latentup-report.process-{i}-of-2.json") as f:
            reports.append(json.load(f))
        assert reports[i]["process"] == {"index": i, "count": 2}
        assert reports[i]["failed"] == [] and reports[i]["skipped"] == []
    assert sum(r["stale_temporaries_removed"] for r in reports) == 1
    shares = [[os.path.relpath(d["output"], out) for d in r["done"]] for r in reports]
    assert [len(s) for s in shares] == [3, 2] and sorted(shares[0] + shares[1]) == names

    single = tmp_path / "single"
    assert run_cli("-i", src, "-o", single, "-r", "-n", flax_pipe_dir, *COMMON) == 0
    for name in names:
        with PIL.Image.open(out / name) as a, PIL.Image.open(single / name) as b:
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
        assert diff <= 1, f"{name}: the distributed run differs from one process by {diff} levels"

    # a rerun after a stop that left process 0's share undone: the three pictures left are
    # split between both processes (2 + 1), not left to process 0 while process 1 idles, and
    # the two done before are reported once, by process 0
    for name in names[:3]:
        (out / name).unlink()
    for code, err in run_distributed([[*argv, "-n", flax_pipe_dir], [*argv, "-n", copy]]):
        assert code == 0, err[-3000:]
    assert outputs(out) == names
    reports = []
    for i in range(2):
        with open(out / f"flax-latentup-report.process-{i}-of-2.json") as f:
            reports.append(json.load(f))
    shares = [[os.path.relpath(d["output"], out) for d in r["done"]] for r in reports]
    assert shares == [names[:2], names[2:3]]
    skipped = [[os.path.relpath(d["output"], out) for d in r["skipped"]] for r in reports]
    assert skipped == [names[3:], []]
    assert reports[0]["skipped"][0]["reason"] == "output exists"


def test_inputs_are_read_one_batch_ahead(flax_pipe_dir, tmp_path, monkeypatch):
    """Sizes come from the files' headers; pixels are decoded a batch at a time, at most one
    batch ahead of the device, so memory does not grow with the number of inputs."""
    import jax

    import flax_latentup.cli as cli
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    src = make_folder(str(tmp_path / "in"), n=5, corrupt=False, odd=False)
    events, precisions = [], []
    read_input, call = cli.read_input, P.__call__

    def spy_read(path, *a, **kw):
        events.append("read")
        return read_input(path, *a, **kw)

    def spy_call(self, *a, **kw):
        events.append("call")
        precisions.append(jax.config.jax_default_matmul_precision)
        return call(self, *a, **kw)

    monkeypatch.setattr(cli, "read_input", spy_read)
    monkeypatch.setattr(P, "__call__", spy_call)
    out = tmp_path / "out"
    assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON) == 0
    assert len(outputs(out)) == 5 and events.count("call") == 5 and events.count("read") == 5
    for k in range(5):  # before call k: batches 0..k, and at most batch k+1 read ahead
        reads = events[: [i for i, e in enumerate(events) if e == "call"][k]].count("read")
        assert k + 1 <= reads <= k + 2, f"{reads} pictures read before upscaling batch {k}"
    report = read_report(out)
    assert report["settings"]["dtype"] == "float32", "auto is float32 on the CPU"
    # float32 runs under "highest" matmul precision, so that TPUs and GPUs do not drop to
    # bfloat16 passes / TF32 (on CPUs it changes nothing); the setting stays inside the run
    assert report["settings"]["precision"] == "highest"
    assert precisions == ["highest"] * 5
    assert jax.config.jax_default_matmul_precision is None
    assert report["settings"]["batch_size"] == 1 and report["settings"]["devices"] == 1


def test_picture_corrupt_past_its_header(flax_pipe_dir, tmp_path):
    """A picture whose header reads but whose pixels do not fails alone: the other pictures of
    its batch are upscaled as they would be without it."""
    src = tmp_path / "in"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        write_png(str(src / f"{name}.png"), seed=seed)
    data = (src / "b.png").read_bytes()
    (src / "b.png").write_bytes(data[: len(data) // 2])  # truncated inside the pixel data
    out = tmp_path / "out"
    code = run_cli("-i", src, "-o", out, "-n", flax_pipe_dir, "--batch-size", "2", *COMMON)
    assert code == 1
    report = read_report(out)
    assert [os.path.basename(f["input"]) for f in report["failed"]] == ["b.png"]
    assert "cannot read" in report["failed"][0]["reason"]
    assert outputs(out) == ["a.png", "c.png"]
    (src / "b.png").unlink()
    ref = tmp_path / "ref"
    assert run_cli("-i", src, "-o", ref, "-n", flax_pipe_dir, "--batch-size", "2", *COMMON) == 0
    for name in ("a.png", "c.png"):
        with PIL.Image.open(out / name) as x, PIL.Image.open(ref / name) as y:
            diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max()
        assert diff <= 1, f"{name} differs by {diff} levels when its batch-mate failed"


def test_unwritable_output_is_reported_and_the_rest_written(flax_pipe_dir, tmp_path):
    """A write that fails (here: a folder where a picture's sub-folder should go) is reported
    for that picture; the others are written."""
    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)  # sub/img2.png
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").write_text("a file where the sub-folder should be")
    code = run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON)
    assert code == 1
    report = read_report(out)
    assert [os.path.basename(f["input"]) for f in report["failed"]] == ["img2.png"]
    assert "cannot write" in report["failed"][0]["reason"]
    assert outputs(out) == ["img0.png", "img1.png"]
    assert not [f for _, _, fs in os.walk(out) for f in fs if f.startswith(".flax-latentup-tmp-")]


def test_dtype_and_batch_defaults():
    from flax_latentup.cli import plan_batch, resolve_dtype

    class Device:
        def __init__(self, platform, compute_capability=None):
            self.platform, self.compute_capability = platform, compute_capability

    assert resolve_dtype("auto", Device("cpu")) == "float32"
    assert resolve_dtype("auto", Device("tpu")) == "bfloat16"
    assert resolve_dtype("auto", Device("gpu", "9.0")) == "bfloat16"  # H100
    assert resolve_dtype("auto", Device("gpu", "8.9")) == "bfloat16"  # L4
    assert resolve_dtype("auto", Device("gpu", "7.5")) == "float16"  # T4: no bf16 units
    assert resolve_dtype("auto", Device("gpu", "gfx90a")) == "bfloat16"  # AMD MI250
    assert resolve_dtype("float32", Device("tpu")) == "float32"
    from flax_latentup import preferred_dtype

    assert preferred_dtype() == np.float32  # this machine's first device, a CPU
    assert plan_batch(None, 1) == (1, None)
    assert plan_batch(None, 8) == (8, None)
    assert plan_batch(16, 8) == (16, None)
    size, note = plan_batch(3, 2)
    assert size == 3 and "computes 4 images" in note and "multiple of 2" in note
    from flax_latentup.cli import resolve_precision

    assert resolve_precision("auto", "float32") == "highest"
    assert resolve_precision("auto", "bfloat16") == "default"
    assert resolve_precision("high", "float32") == "high"
    import jax

    from flax_latentup.cli import precision_scope

    with precision_scope("highest"):
        assert jax.config.jax_default_matmul_precision == "highest"
    with precision_scope("default"):
        assert jax.config.jax_default_matmul_precision is None


def test_default_batch_is_one_image_per_device(flax_pipe_dir, tmp_path):
    """With two devices the default batch is two, split over them; the pictures are those of a
    one-device run."""
    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)
    out = tmp_path / "two"
    code = "import sys; from flax_latentup.cli import main; sys.exit(main())"
    argv = ["upscale", "-i", src, "-o", str(out), "-r", "-n", flax_pipe_dir, *COMMON]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv],
        env=dict(
            os.environ,
            PYTHONPATH=ROOT,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=helpers.xla_flags("--xla_force_host_platform_device_count=2"),
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    settings = read_report(out)["settings"]
    assert settings["batch_size"] == 2 and settings["devices"] == 2
    one = tmp_path / "one"
    assert run_cli("-i", src, "-o", one, "-r", "-n", flax_pipe_dir, *COMMON) == 0
    assert outputs(out) == outputs(one) == ["img0.png", "img1.png", "sub/img2.png"]
    for name in outputs(one):
        with PIL.Image.open(out / name) as a, PIL.Image.open(one / name) as b:
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
        assert diff <= 1, f"{name}: two devices differ from one by {diff} levels"


def test_exif_orientation_is_applied(flax_pipe_dir, tmp_path):
    """A picture stored on its side with an EXIF orientation is upscaled upright, as diffusers'
    load_image (PIL.ImageOps.exif_transpose) shows it: the same output as an upright copy."""
    import PIL.ImageOps

    rng = np.random.default_rng(4)
    stored = PIL.Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    (tmp_path / "side").mkdir()
    (tmp_path / "upright").mkdir()
    stored.save(tmp_path / "side" / "p.png", exif=exif)
    with PIL.Image.open(tmp_path / "side" / "p.png") as im:
        upright = PIL.ImageOps.exif_transpose(im)
        assert upright.size == (64, 96)
        upright.save(tmp_path / "upright" / "p.png")
    for name in ("side", "upright"):
        src = tmp_path / name
        assert run_cli("-i", src, "-o", tmp_path / f"out_{name}", "-n", flax_pipe_dir, *COMMON) == 0
    with PIL.Image.open(tmp_path / "out_side" / "p.png") as a:
        assert a.size == (128, 192)
        with PIL.Image.open(tmp_path / "out_upright" / "p.png") as b:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "ext,mode", [("png", "RGB"), ("tif", "RGB"), ("tif", "L"), ("tif", "RGBA"), ("webp", "RGB")]
)
def test_every_exif_orientation_reads_as_diffusers_load_image(tmp_path, ext, mode):
    """For each EXIF orientation and format (TIFF: one that Pillow itself may turn upright,
    and from a file decode wrongly), the header's size and the pixels read are those of
    diffusers' load_image (PIL.ImageOps.exif_transpose) of the same picture as a PNG."""
    import PIL.ImageOps

    from flax_latentup.cli import probe_input

    rng = np.random.default_rng(8)
    stored = PIL.Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    stored = stored.convert(mode)
    for orientation in range(1, 9):
        exif = PIL.Image.Exif()
        exif[0x0112] = orientation
        path = str(tmp_path / f"o{orientation}.{ext}")
        stored.save(path, exif=exif, **({"lossless": True} if ext == "webp" else {}))
        stored.save(tmp_path / "reference.png", exif=exif)
        with PIL.Image.open(tmp_path / "reference.png") as im:
            want = np.asarray(PIL.ImageOps.exif_transpose(im).convert("RGB"))
        got = read_input(path, nchw=False).array
        np.testing.assert_array_equal(got, want, err_msg=f"orientation {orientation}")
        assert probe_input(path, nchw=False)[1] == want.shape, orientation


def test_odd_folders_and_files(flax_pipe_dir, tmp_path, monkeypatch):
    """A prompt file that is not UTF-8 fails its picture alone; a link back up the tree is not
    followed; hidden files are left out; a group smaller than --batch-size is padded only to
    its own size; outputs and the report get a new file's usual permissions."""
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)  # img0, img1, sub/img2
    (tmp_path / "in" / "img0.txt").write_bytes(b"caf\xe9 au lait")
    os.symlink("..", tmp_path / "in" / "sub" / "loop")
    write_png(str(tmp_path / "in" / ".hidden.png"))
    batches = []
    call = P.__call__

    def spy(self, *a, **kw):
        batches.append(np.shape(kw["image"])[0])
        return call(self, *a, **kw)

    monkeypatch.setattr(P, "__call__", spy)
    out = tmp_path / "out"
    argv = ["-i", src, "-o", out, "-r", "-n", flax_pipe_dir, "--batch-size", "4", *COMMON]
    code = run_cli(*argv, "--guidance", "2")  # prompts are read where they are used
    assert code == 1
    assert outputs(out) == ["img1.png", "sub/img2.png"]
    report = read_report(out)
    assert [os.path.basename(f["input"]) for f in report["failed"]] == ["img0.png"]
    assert "cannot read its prompt" in report["failed"][0]["reason"]
    assert batches == [2], "two pictures run as a batch of two, not padded to four"
    umask = os.umask(0o022)
    os.umask(umask)
    for name in ["img1.png", "sub/img2.png", "flax-latentup-report.json"]:
        mode = os.stat(out / name).st_mode & 0o777
        assert mode == 0o666 & ~umask, f"{name}: mode {oct(mode)}"


def test_only_temporaries_of_finished_runs_are_removed(tmp_path):
    """Two runs may share an output folder: a run removes the temporaries of runs that are
    over (a dead process of this host, anything over an hour old, unnamed ones) and keeps
    those of a run still writing (a live process here, a recent one from another host)."""
    from flax_latentup.cli import TMP_PREFIX, remove_stale_temporaries, temporary_prefix

    host = temporary_prefix().split("@")[1]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            f"{TMP_PREFIX}{live.pid}@{host}@abc.png": True,  # kept
            f"{TMP_PREFIX}{dead.pid}@{host}@abc.png": False,
            f"{TMP_PREFIX}{os.getpid()}@{host}@abc.png": False,  # this run has written nothing
            f"{TMP_PREFIX}{dead.pid}@other-host@abc.png": True,  # another host's, recent
            f"{TMP_PREFIX}{live.pid}@other-host@old.png": False,  # made old below
            f"{TMP_PREFIX}killed.png": False,  # no writer named
        }
        (tmp_path / "sub").mkdir()
        for name in names:
            (tmp_path / "sub" / name).write_bytes(b"part of a picture")
        old = time.time() - 2 * 3600
        os.utime(tmp_path / "sub" / f"{TMP_PREFIX}{live.pid}@other-host@old.png", (old, old))
        assert remove_stale_temporaries(str(tmp_path)) == 4
        assert sorted(os.listdir(tmp_path / "sub")) == sorted(
            n for n, keep in names.items() if keep
        )
    finally:
        live.kill()
        live.wait()


def test_sixteen_bit_grey_pictures_keep_their_tones(tmp_path):
    """A 16-bit grey PNG is brought to 8 bits by scale (Pillow's RGB conversion clips at 255,
    which would turn most of it white)."""
    grey = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    path = str(tmp_path / "grey16.png")
    PIL.Image.fromarray(grey).save(path)
    got = read_input(path, nchw=False)
    arr = got.array
    assert got.kind == "pixels" and arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    want = np.round(grey / 257.0)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], want)


def test_out_of_device_memory_names_what_needs_less(flax_pipe_dir, tmp_path, monkeypatch):
    """A call that runs out of device memory fails its pictures with a reason that names the
    settings needing less: a smaller --batch-size (where a device ran several), --tile (where
    off). Other errors are reported as they are. Nothing is written for them."""
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    src = make_folder(str(tmp_path / "in"), n=2, corrupt=False, odd=False)
    raised = {}

    def fail(self, *a, **kw):
        raise RuntimeError(raised["message"])

    monkeypatch.setattr(P, "__call__", fail)
    oom = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."
    cases = [
        (
            oom,
            ("--batch-size", "2"),
            " [out of device memory: try a --batch-size under 2 (the "
            "call ran 2 on 1 device(s)) or --tile (the VAE in tiles, for large pictures)]",
        ),
        (oom, ("--tile",), ""),  # one picture per device, tiled: nothing to name
        (
            "CUDA error: out of memory",
            (),
            " [out of device memory: try --tile (the VAE in tiles, for large pictures)]",
        ),
        ("something else", ("--batch-size", "2"), ""),
    ]
    for i, (message, flags, hint) in enumerate(cases):
        raised["message"] = message
        out = tmp_path / f"out{i}"
        assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *flags, *COMMON) == 1
        report = read_report(out)
        assert not report["done"] and outputs(out) == []
        reasons = {f["reason"] for f in report["failed"]}
        assert reasons == {f"upscaling failed: {message}{hint}"}, (flags, reasons)


def test_bmp_tiff_gif_inputs_upscale_as_their_first_frame(flax_pipe_dir, tmp_path):
    """BMP, TIFF and GIF pictures upscale exactly as PNGs of the same pixels (same names, so
    same seeds); of an animated GIF or a multi-page TIFF the first frame, which the report
    notes. A 32-bit float TIFF fails alone, saying why."""
    rng = np.random.default_rng(11)
    pics = [
        PIL.Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)) for _ in range(3)
    ]
    ref, new = tmp_path / "ref", tmp_path / "new"
    ref.mkdir()
    new.mkdir()
    pics[0].save(new / "a.bmp")
    pics[0].save(new / "b.tif", save_all=True, append_images=pics[1:2])  # two pages
    pics[1].save(new / "c.gif", save_all=True, append_images=pics[2:], duration=100)
    PIL.Image.fromarray(rng.random((64, 96), dtype=np.float32), mode="F").save(new / "f.tif")
    pics[0].save(ref / "a.png")
    pics[0].save(ref / "b.png")
    with PIL.Image.open(new / "c.gif") as gif:  # the GIF's first frame, palette-quantized
        assert gif.n_frames == 2
        gif.convert("RGB").save(ref / "c.png")

    assert run_cli("-i", new, "-o", tmp_path / "out_new", "-n", flax_pipe_dir, *COMMON) == 1
    assert run_cli("-i", ref, "-o", tmp_path / "out_ref", "-n", flax_pipe_dir, *COMMON) == 0
    report = read_report(tmp_path / "out_new")
    notes = {os.path.basename(e["input"]): e.get("note") for e in report["done"]}
    assert notes == {
        "a.bmp": None,
        "b.tif": "the first of 2 frames",
        "c.gif": "the first of 2 frames",
    }
    (failed,) = report["failed"]
    assert os.path.basename(failed["input"]) == "f.tif" and "PIL mode F" in failed["reason"]
    for name in "abc":
        with PIL.Image.open(tmp_path / "out_new" / f"{name}.png") as got:
            with PIL.Image.open(tmp_path / "out_ref" / f"{name}.png") as want:
                assert got.size == (192, 128)
                np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_rgb_colour_profile_goes_with_the_upscale(flax_pipe_dir, tmp_path):
    """An input's embedded ICC profile of RGB colours is written into its output (PNG, JPEG):
    the model keeps the input's colour values, so the profile still describes them. A profile
    of other colours (here CIELAB) is not, as the output is RGB; no profile, none written."""
    from PIL import ImageCms

    rgb_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    lab_icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    src = tmp_path / "in"
    src.mkdir()
    pic = PIL.Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 96, 3), np.uint8))
    pic.save(src / "tagged.png", icc_profile=rgb_icc)
    pic.save(src / "lab.png", icc_profile=lab_icc)
    pic.save(src / "plain.png")
    assert run_cli("-i", src, "-o", tmp_path / "png", "-n", flax_pipe_dir, *COMMON) == 0
    out = tmp_path / "jpg"
    args = ("-i", src / "tagged.png", "-o", out, "-n", flax_pipe_dir, "--ext", "jpg", *COMMON)
    assert run_cli(*args) == 0
    for path, want in [
        (tmp_path / "png" / "tagged.png", rgb_icc),
        (tmp_path / "jpg" / "tagged.jpg", rgb_icc),
        (tmp_path / "png" / "lab.png", None),
        (tmp_path / "png" / "plain.png", None),
    ]:
        with PIL.Image.open(path) as im:
            assert im.info.get("icc_profile") == want, path


@pytest.mark.parametrize("value", [0, 1234, 65535])
def test_alpha_of_16_bit_grey_with_a_transparent_value(tmp_path, value):
    """A 16-bit grey PNG marks one 16-bit value transparent (tRNS): exactly the pixels of that
    value are transparent, whatever other values clip to in 8 bits."""
    grey = np.full((32, 48), 40000, np.uint16)
    grey[:16, :16] = value
    grey[16:, :8] = value + 1 if value < 65535 else value - 1  # a neighbour value stays opaque
    PIL.Image.fromarray(grey).save(tmp_path / "g.png", transparency=value)
    with PIL.Image.open(tmp_path / "g.png") as im:
        assert im.mode.startswith("I") and im.info["transparency"] == value
    want = np.where(grey == value, 0, 255)
    got = read_input(str(tmp_path / "g.png"), False, alpha_size=(32, 48))
    np.testing.assert_array_equal(got.alpha, want)
    np.testing.assert_array_equal(got.array[..., 0], np.round(grey / 257.0))  # colours scaled
    double = read_input(str(tmp_path / "g.png"), False, alpha_size=(64, 96)).alpha.astype(int)
    assert (double[:28, :28] == 0).all() and (double[36:] == 255).all()
    assert (double[:, 36:] == 255).all()


def write_png16_rgb(path, pixels: np.ndarray, transparent: tuple[int, int, int]) -> None:
    """A 48-bit colour PNG (Pillow writes none) with one colour marked transparent (tRNS)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w, _ = pixels.shape
    rows = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))
    with open(path, "wb") as f:
        f.write(
            b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        )
        f.write(chunk(b"tRNS", struct.pack(">HHH", *transparent)))
        f.write(chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_alpha_of_16_bit_colour_with_a_transparent_colour(tmp_path):
    """A 48-bit colour PNG marks a 16-bit colour transparent (tRNS): the pixels of that colour
    are transparent (Pillow would compare it with its 8-bit colours and find none), and so,
    as the README says, are those within 1/256 of it (Pillow keeps the high bytes only);
    others are opaque."""
    key = (1000, 2000, 3000)
    pixels = np.random.default_rng(3).integers(4096, 65536, (32, 48, 3)).astype(np.uint16)
    pixels[:16, :16] = key
    pixels[20, 20] = (1000 | 255, 2000, 3000)  # the key's high bytes: transparent too, as said
    pixels[21, 21] = (1000 + 256, 2000, 3000)  # another high byte: opaque
    write_png16_rgb(tmp_path / "c.png", pixels, key)
    got = read_input(str(tmp_path / "c.png"), False, alpha_size=(32, 48))
    want = np.where((pixels >> 8 == np.array(key) >> 8).all(-1), 0, 255)
    assert want[20, 20] == 0 and want[21, 21] == 255 and (want[:16, :16] == 0).all()
    np.testing.assert_array_equal(got.alpha, want)
    np.testing.assert_array_equal(got.array, pixels >> 8)  # Pillow's 8 bits: the high bytes


def test_transparency_is_kept_beside_the_upscale(flax_pipe_dir, tmp_path):
    """A picture's alpha channel (or its palette's transparent colour) is resized to the
    output beside the upscaled colours, which stay those of a run that drops it; JPEG
    outputs, which hold no transparency, say so in the report."""
    rng = np.random.default_rng(7)
    src = tmp_path / "in"
    src.mkdir()
    rgb = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
    alpha = np.zeros((64, 96), np.uint8)
    alpha[:, 48:] = 255  # the left half transparent
    PIL.Image.fromarray(np.dstack([rgb, alpha])).save(src / "rgba.png")
    indices = rng.integers(1, 256, (64, 96), dtype=np.uint8)
    indices[:32, :32] = 0  # palette entry 0, marked transparent: the top-left block
    pal = PIL.Image.fromarray(indices, mode="P")
    pal.putpalette(rng.integers(0, 256, 768, dtype=np.uint8).tolist())
    pal.save(src / "pal.png", transparency=0)
    PIL.Image.fromarray(rgb).save(src / "plain.png")

    for mode in ("keep", "drop"):
        out = tmp_path / mode
        assert run_cli("-i", src, "-o", out, "-n", flax_pipe_dir, "--alpha", mode, *COMMON) == 0
        assert read_report(out)["settings"]["alpha"] == mode
    entries = {os.path.basename(e["input"]): e for e in read_report(tmp_path / "keep")["done"]}
    assert entries["rgba.png"]["alpha"] == entries["pal.png"]["alpha"] == "kept"
    assert "alpha" not in entries["plain.png"]
    opened = {}
    for mode in ("keep", "drop"):
        for name in ("rgba", "pal", "plain"):
            with PIL.Image.open(tmp_path / mode / f"{name}.png") as im:
                assert im.size == (192, 128)
                opened[mode, name] = (im.mode, np.asarray(im))
    for name in ("rgba", "pal", "plain"):
        assert opened["drop", name][0] == "RGB"
        kept_mode, kept = opened["keep", name]
        assert kept_mode == ("RGB" if name == "plain" else "RGBA")
        # the colours are the model's, untouched by the transparency beside them
        np.testing.assert_array_equal(kept[..., :3], opened["drop", name][1])
    a = opened["keep", "rgba"][1][..., 3].astype(int)
    # 2x bicubic reaches 4 output pixels either side of the edge at x = 96
    assert (a[:, :92] == 0).all() and (a[:, 100:] == 255).all()
    assert (np.diff(a, axis=1) >= 0).all()
    p = opened["keep", "pal"][1][..., 3]
    assert (p[:60, :60] == 0).all() and (p[68:] == 255).all() and (p[:, 68:] == 255).all()

    out = tmp_path / "jpg"
    assert (
        run_cli("-i", src / "rgba.png", "-o", out, "-n", flax_pipe_dir, "--ext", "jpg", *COMMON)
        == 0
    )
    (entry,) = read_report(out)["done"]
    assert entry["alpha"] == "dropped: JPG holds no transparency"
    with PIL.Image.open(out / "rgba.jpg") as im:
        assert im.mode == "RGB" and im.size == (192, 128)


def test_outputs_beside_their_inputs_are_not_read_back(flax_pipe_dir, tmp_path, capsys):
    """Outputs written into the input folder are left out as inputs when the command runs
    again (by folder or by pattern): no upscale of an upscale, and --overwrite, which would
    replace them as inputs, is refused. A file name that is not UTF-8 is upscaled and printed;
    a link to a listed file is left out in favour of the file's own name, and a broken link
    fails alone."""
    src = tmp_path / "in"
    write_png(str(src / "a.png"), seed=1)
    write_png(str(src / "b.png"), seed=2)
    raw = os.fsdecode(b"caf\xe9")  # a name that is not UTF-8
    write_png(os.path.join(src, raw + ".png"), seed=3)
    os.symlink("b.png", src / "link.png")
    os.symlink("nowhere.png", os.path.join(src, os.fsdecode(b"gon\xe9.png")))
    base = ("-n", flax_pipe_dir, "--suffix", "_x2", *COMMON)
    assert run_cli("-i", src, "-o", src, *base) == 1
    out = capsys.readouterr().out
    assert "failed: " + str(src) + "/gon\\xe9.png: cannot read" in out, out
    made = sorted(p for p in os.listdir(src) if "_x2" in p)
    assert made == sorted(["a_x2.png", "b_x2.png", raw + "_x2.png"])
    report = read_report(src)
    assert {"input": str(src / "link.png"), "reason": f"the same file as {src / 'b.png'}"} in (
        report["skipped"]
    )
    first = {name: (src / name).read_bytes() for name in made}
    for again in (src, src / "*.png"):
        assert run_cli("-i", again, "-o", src, *base) == 1
        assert sorted(p for p in os.listdir(src) if "_x2" in p) == made
        report = read_report(src)
        left_out = {
            os.path.basename(e["input"]) for e in report["skipped"] if "an earlier" in e["reason"]
        }
        assert left_out == set(made)
    assert {name: (src / name).read_bytes() for name in made} == first
    capsys.readouterr()
    assert run_cli("-i", src, "-o", src, *base, "--overwrite") == 2
    assert "--overwrite would replace input" in capsys.readouterr().err
    # two originals where one's output name is the other: the second is never written over
    other = tmp_path / "pair"
    write_png(str(other / "x.png"), seed=4)
    write_png(str(other / "x_x2.png"), seed=5)
    kept = (other / "x_x2.png").read_bytes()
    assert run_cli("-i", other, "-o", other, *base) == 0
    assert run_cli("-i", other, "-o", other, *base, "--overwrite") == 2
    assert (other / "x_x2.png").read_bytes() == kept


def test_an_output_where_another_needs_a_folder_is_refused(flax_pipe_dir, tmp_path, capsys):
    """x.jpg writes x.png and x.png/y.png writes x.png/y.png: refused before anything runs
    (exit 2, both named), not failed after the upscale on every run."""
    src = tmp_path / "in"
    src.mkdir()
    PIL.Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(src / "x.jpg")
    write_png(str(src / "x.png" / "y.png"))
    assert run_cli("-r", "-i", src, "-o", tmp_path / "o", "-n", flax_pipe_dir, *COMMON) == 2
    err = capsys.readouterr().err
    assert "the output for " + repr(str(src / "x.jpg")) + " would be a file where" in err, err
    assert repr(str(src / "x.png" / "y.png")) + " needs a folder" in err, err
    assert not (tmp_path / "o").exists()


def test_rerun_into_the_input_folder_goes_on(flax_pipe_dir, tmp_path, capsys):
    """A JPEG upscaled into its own folder writes NAME.png beside it; the same command again
    leaves that output out as an input (it is the JPEG's output) rather than refusing it as
    its own output."""
    src = tmp_path / "in"
    src.mkdir()
    PIL.Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(src / "a.jpg")
    base = ("-i", src, "-o", src, "-n", flax_pipe_dir, *COMMON)
    assert run_cli(*base) == 0
    written = (src / "a.png").read_bytes()
    capsys.readouterr()
    assert run_cli(*base) == 0, capsys.readouterr().err
    report = read_report(src)
    assert [e["input"] for e in report["skipped"]] == [str(src / "a.png"), str(src / "a.jpg")]
    assert "where the output of" in report["skipped"][0]["reason"]
    assert (src / "a.png").read_bytes() == written
    assert run_cli(*base, "--overwrite") == 2
    assert "--overwrite would replace input" in capsys.readouterr().err


def test_one_folder_by_two_paths_is_one_folder(flax_pipe_dir, tmp_path, monkeypatch, capsys):
    """Where the file system says two folder paths are one folder (a bind mount, a folder
    mounted twice in a container: same device and inode), outputs are never written over the
    inputs there, and -r refuses an output folder inside the input folder; two hard links to
    one file stay two names."""
    import flax_latentup.cli as cli

    src, mnt = tmp_path / "pictures", tmp_path / "mounted"
    write_png(str(src / "a.png"), seed=1)
    mnt.mkdir()
    real_key = cli._file_key

    def file_key(path):  # mounted/ is pictures/ by another path
        path = os.path.realpath(path)
        if path == str(mnt) or path.startswith(str(mnt) + os.sep):
            path = str(src) + path[len(str(mnt)) :]
        return real_key(path)

    monkeypatch.setattr(cli, "_file_key", file_key)
    base = ("-n", flax_pipe_dir, *COMMON)
    before = (src / "a.png").read_bytes()
    for extra in ((), ("--overwrite",)):
        assert run_cli("-i", src, "-o", mnt, *base, *extra) == 2
        assert "would be the input itself" in capsys.readouterr().err
    assert run_cli("-r", "-i", src, "-o", mnt / "up", *base) == 2
    assert "is inside input folder" in capsys.readouterr().err
    assert (src / "a.png").read_bytes() == before and not (mnt / "up").exists()
    monkeypatch.setattr(cli, "_file_key", real_key)
    other = tmp_path / "other"
    other.mkdir()
    os.link(src / "a.png", other / "a.png")  # a hard link: writing other/a.png leaves src's
    assert run_cli("-i", src, "-o", other, *base, "--overwrite") == 0
    assert (src / "a.png").read_bytes() == before != (other / "a.png").read_bytes()


def test_outputs_that_cannot_be_are_found_before_upscaling(flax_pipe_dir, tmp_path, capsys):
    """An output too large for its format fails from the header scan, and a folder where an
    output goes fails that input; neither is computed. A folder where the report goes, a bad
    --model, --variant or --compile-cache, and a selftest output that is a file are usage
    errors; so is no command at all."""
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    write_png(str(tmp_path / "in" / "wide.png"), w=8256, h=64)
    write_png(str(tmp_path / "in" / "a.png"))
    out = tmp_path / "out"
    (out / "a.webp").mkdir(parents=True)
    calls = []
    call = P.__call__
    P.__call__ = lambda self, *a, **kw: calls.append(1) or call(self, *a, **kw)
    try:
        code = run_cli(
            "-i", tmp_path / "in", "-o", out, "-n", flax_pipe_dir, "--ext", "webp", *COMMON
        )
    finally:
        P.__call__ = call
    assert code == 1 and calls == []
    reasons = {os.path.basename(e["input"]): e["reason"] for e in read_report(out)["failed"]}
    assert (
        "its output, 16512x128, is larger than WEBP holds (16383 pixels a side)"
        in reasons["wide.png"]
    )
    assert "a folder is in its place" in reasons["a.png"]
    (tmp_path / "out2" / "flax-latentup-report.json").mkdir(parents=True)
    (tmp_path / "cache-file").write_text("")
    (tmp_path / "prompt.txt").write_text("a photo")
    (tmp_path / "common.txt").write_text("a photo")  # a.png's sidecar prompt, through a link
    os.symlink(tmp_path / "common.txt", tmp_path / "in" / "a.txt")
    (tmp_path / "o_real").mkdir()
    os.symlink(tmp_path / "o_real", tmp_path / "olink")
    before = {p: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    capsys.readouterr()
    base = ("-i", tmp_path / "in", "-o", tmp_path / "o")
    inputs = tmp_path / "in"
    cases = [
        (("-o", tmp_path / "out2", "-n", flax_pipe_dir), "the report"),
        (("-n", flax_pipe_dir, "--report", inputs / "a.png"), "a.png' is the input"),
        (("-n", flax_pipe_dir, "--report", inputs / "a.txt"), "is the prompt file of"),
        (("-n", flax_pipe_dir, "--report", tmp_path / "o" / "a.png"), "is where the output of"),
        (
            ("-n", flax_pipe_dir, "--report", tmp_path / "o" / "a.png" / "r.json"),
            "is below where the output of",
        ),
        (("-n", flax_pipe_dir, "--report", tmp_path / "o"), "is a folder the output of"),
        (("-n", flax_pipe_dir, "--report", tmp_path / "common.txt"), "is the prompt file of"),
        (
            ("-n", flax_pipe_dir, "-o", tmp_path / "olink", "--report")
            + (tmp_path / "o_real" / "a.png" / "r.json",),
            "is below where the output of",
        ),
        (
            ("-n", flax_pipe_dir, "--prompt-file", tmp_path / "prompt.txt", "--report")
            + (tmp_path / "prompt.txt",),
            "is the --prompt-file",
        ),
        (("-n", tmp_path / "in"), "is not a pipeline folder (it has no model_index.json)"),
        (("-n", flax_pipe_dir, "--variant", "fp16"), "--variant: "),
        (("-n", flax_pipe_dir, "--compile-cache", tmp_path / "cache-file"), "--compile-cache"),
        (
            ("-n", flax_pipe_dir, "--compile-cache", tmp_path / "c", "--no-compile-cache"),
            "not both",
        ),
    ]
    for extra, message in cases:
        assert main(["upscale", *map(str, base), *map(str, extra), "--quiet"]) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
    assert {p: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    assert (tmp_path / "prompt.txt").read_text() == (tmp_path / "common.txt").read_text()
    assert main(["selftest", "-o", str(tmp_path / "cache-file")]) == 2
    assert "not writable" in capsys.readouterr().err
    assert main([]) == 2


def test_interrupted_run_reports_what_it_wrote(flax_pipe_dir, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a run: the pictures written so far are in the report, marked interrupted,
    the exit code is 130 and a rerun does the rest."""
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)
    call, seen = P.__call__, []

    def interrupt_second(self, *a, **kw):
        seen.append(1)
        if len(seen) == 2:
            deadline = time.monotonic() + 60  # the first picture's write is under way
            while not (out / "img0.png").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt
        return call(self, *a, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(P, "__call__", interrupt_second)
    assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON) == 130
    assert "run the same command again" in capsys.readouterr().err
    report = read_report(out)
    assert report["interrupted"] is True
    assert [os.path.basename(e["output"]) for e in report["done"]] == ["img0.png"]
    assert outputs(out) == ["img0.png"]
    monkeypatch.setattr(P, "__call__", call)
    assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON) == 0
    assert outputs(out) == ["img0.png", "img1.png", "sub/img2.png"]
    assert "interrupted" not in read_report(out)


def test_stop_signals_are_not_lost(flax_pipe_dir, tmp_path, monkeypatch, capsys):
    """A Ctrl-C that Python swallowed where it landed (XLA's garbage-collection callbacks
    cannot raise) still stops the run at the next batch; SIGTERM stops it as Ctrl-C does,
    report written, with the shell's code for it (143). The command ends at once after an
    interrupt, with its code, rather than through the interpreter's teardown."""
    import signal

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P

    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)
    call = P.__call__

    def signalled_during_first(sig, swallowed):
        seen = []

        def spy(self, *a, **kw):
            seen.append(1)
            if len(seen) == 1:
                try:
                    os.kill(os.getpid(), sig)
                    time.sleep(1)  # the handler runs here
                except KeyboardInterrupt:
                    if not swallowed:
                        raise
            return call(self, *a, **kw)

        return spy

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig, swallowed, code in ((signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)):
        out = tmp_path / f"out{code}"
        monkeypatch.setattr(P, "__call__", signalled_during_first(sig, swallowed))
        assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON) == code
        assert "run the same command again" in capsys.readouterr().err
        report = read_report(out)
        assert report["interrupted"] is True
        # swallowed, the first batch went on and was written; raised, it was not
        assert outputs(out) == (["img0.png"] if swallowed else [])
        assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    monkeypatch.setattr(P, "__call__", call)
    # before the run's own handling: while the model loads
    load = P.from_pretrained.__func__

    def terminated_while_loading(cls, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return load(cls, *a, **kw)

    monkeypatch.setattr(P, "from_pretrained", classmethod(terminated_while_loading))
    out = tmp_path / "out-loading"
    assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON) == 143
    assert "interrupted" in capsys.readouterr().err
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    code = "import flax_latentup.cli as c; c.main = lambda: 143; print('said'); c.console_main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (143, "said\n")


def test_recursive_globs_do_not_go_into_folder_links(tmp_path, monkeypatch):
    """``-r`` with a ``**`` pattern lists what ``glob.glob(recursive=True)`` lists where there
    are no links (hidden names left out alike), but does not go into links to folders: links
    back up the tree end the listing (glob would take 2**40 paths) and add nothing."""
    import glob

    from flax_latentup.cli import collect_inputs, glob_inputs

    monkeypatch.chdir(tmp_path)
    names = ["a.png", ".h.png", "d1/x.png", "d1/.hid/y.png", "d1/d2/z.png", "d1/d2/.z.png"]
    names += ["d3/w.npy", "d1/d2/d4/q.png", "x/y/z/k.png"]
    for name in names:
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        open(name, "w").close()
    patterns = ["**/*.png", "**", "d1/**/*.png", "**/d2/*", "*/**/*.png", "d1/**", "**/.*"]
    patterns += ["./**/*.png", str(tmp_path / "**" / "*.png"), "d?/**/[a-z].png", "d1//**//*"]
    for pattern in patterns:
        want = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        assert [p for p in glob_inputs(pattern, True) if os.path.isfile(p)] == want, pattern
    for pattern in ("d1/**/", "**/"):  # folders only
        assert glob_inputs(pattern, True) == sorted(glob.glob(pattern, recursive=True))
    os.symlink("..", "d1/loop")
    os.symlink("..", "d1/d2/loop")
    assert not [p for p in glob_inputs("**/*/*.png", True) if "loop" in p]
    started = time.monotonic()
    items = collect_inputs(["**/*.png"], recursive=True)
    assert time.monotonic() - started < 5
    assert sorted(i.src for i in items) == [
        "a.png",
        "d1/d2/d4/q.png",
        "d1/d2/z.png",
        "d1/x.png",
    ] + ["x/y/z/k.png"]


def test_a_report_that_cannot_be_written_is_said(flax_pipe_dir, tmp_path, monkeypatch, capsys):
    """A full disk when the report is written: the summary and the failures are still printed,
    the error names the report, and the exit code is 1; the pictures written stay."""
    from flax_latentup import files

    write_png(str(tmp_path / "in" / "a.png"))
    atomic_write = files.atomic_write

    def full_disk(path, *a, **kw):
        if path.endswith(".json"):
            raise OSError(28, "No space left on device")
        return atomic_write(path, *a, **kw)

    monkeypatch.setattr(files, "atomic_write", full_disk)
    assert run_cli("-i", tmp_path / "in", "-o", tmp_path / "o", "-n", flax_pipe_dir, *COMMON) == 1
    out, err = capsys.readouterr()
    assert "done 1, skipped 0, failed 0" in out and "report: not written" in out, out
    assert "error: cannot write the report " in err and "No space left on device" in err, err
    assert outputs(tmp_path / "o") == ["a.png"]


def test_summary_lines_print_on_a_console_that_is_not_utf8(monkeypatch):
    """A name the console's encoding cannot hold is printed with escapes, not a traceback."""
    import io

    from flax_latentup.cli import say

    raw = io.BytesIO()
    stdout = io.TextIOWrapper(raw, encoding="latin-1", write_through=True)
    monkeypatch.setattr(sys, "stdout", stdout)
    say("failed: 写真.png: café")
    assert raw.getvalue().decode("latin-1") == "failed: \\u5199\\u771f.png: café\n"


def test_ctrl_c_while_waiting_for_a_write_reports_it(flax_pipe_dir, tmp_path, monkeypatch):
    """Ctrl-C while the run waits for a picture's write: that write finishes, and the report
    of the interrupted run names it with the others written."""
    import concurrent.futures

    import flax_latentup.cli as cli

    cut = []

    class Waited:  # a write's future: the run's first wait for one is cut by Ctrl-C
        def __init__(self, future):
            self.future = future

        def cancelled(self):
            return self.future.cancelled()

        def result(self):
            if not cut:
                cut.append(self)
                concurrent.futures.wait([self.future])  # the write goes on to its end
                raise KeyboardInterrupt
            return self.future.result()

    class Pool(concurrent.futures.ThreadPoolExecutor):
        def submit(self, *a, **kw):
            future = super().submit(*a, **kw)
            return Waited(future) if self._thread_name_prefix.endswith("write") else future

    monkeypatch.setattr(cli.concurrent.futures, "ThreadPoolExecutor", Pool)
    src = make_folder(str(tmp_path / "in"), n=3, corrupt=False, odd=False)
    out = tmp_path / "out"
    assert run_cli("-i", src, "-o", out, "-r", "-n", flax_pipe_dir, *COMMON) == 130
    report = read_report(out)
    assert report["interrupted"] is True
    assert len(cut) == 1
    assert [os.path.relpath(e["output"], out) for e in report["done"]] == outputs(out) != []


def test_distributed_settings_from_the_environment_are_checked(monkeypatch):
    from flax_latentup import parallel

    monkeypatch.setenv("FLAX_LATENTUP_NUM_PROCESSES", "two")
    with pytest.raises(
        ValueError, match="FLAX_LATENTUP_NUM_PROCESSES must be an integer >= 1, got 'two'"
    ):
        parallel.initialize_distributed("localhost:1234")
    monkeypatch.setenv("FLAX_LATENTUP_NUM_PROCESSES", "2")
    monkeypatch.setenv("FLAX_LATENTUP_PROCESS_ID", "-1")
    with pytest.raises(ValueError, match="FLAX_LATENTUP_PROCESS_ID must be an integer >= 0"):
        parallel.initialize_distributed("localhost:1234")


def test_distributed_processes_wait_for_each_other_at_exit(monkeypatch):
    """At exit the processes of a distributed run wait for one another: for a day by default
    (JAX's own 5 minutes abort hosts that finish their shares earlier than the slowest), or as
    long as the caller says."""
    import jax

    from flax_latentup import parallel

    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    parallel.initialize_distributed("localhost:1234", 2, 0)
    parallel.initialize_distributed("localhost:1234", 2, 1, shutdown_timeout_seconds=60)
    assert calls[0]["shutdown_timeout_seconds"] == parallel.SHUTDOWN_TIMEOUT_S == 86400
    assert calls[1]["shutdown_timeout_seconds"] == 60
    assert calls[1]["process_id"] == 1 and calls[1]["coordinator_address"] == "localhost:1234"


def test_output_names_that_differ_only_in_case(tmp_path, monkeypatch, capsys):
    """Where the output folder's file system ignores case (macOS's, Windows'), two inputs
    whose output names differ only in case would write one file: refused (exit 2) before
    anything loads, naming both; an input whose name is another's output name but for case is
    left out as that output; two names of one file are one input. Where case counts (this
    machine's), both are upscaled."""
    from flax_latentup import cli, files

    for folder, name in (("a", "x.png"), ("b", "X.png")):
        write_png(str(tmp_path / folder / name))
    write_png(str(tmp_path / "c" / "p.png"))
    write_png(str(tmp_path / "c" / "p_x2.png"))
    globs = [str(tmp_path / "a" / "*.png"), str(tmp_path / "b" / "*.png")]
    assert files.ignores_case(str(tmp_path / "out" / "not-made")) is False
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"], "the probe left nothing"
    items, skipped = cli.plan_outputs(
        cli.collect_inputs(globs, False), str(tmp_path / "out"), "", "png", False
    )
    assert sorted(os.path.basename(i.out) for i in items) == ["X.png", "x.png"] and not skipped

    real_exists = os.path.exists

    def exists_ignoring_case(path):  # a file system that ignores case, as the probe sees it
        folder, name = os.path.split(os.fspath(path))
        return real_exists(path) or (
            os.path.isdir(folder) and name.casefold() in {f.casefold() for f in os.listdir(folder)}
        )

    monkeypatch.setattr(os.path, "exists", exists_ignoring_case)
    assert files.ignores_case(str(tmp_path / "out" / "not-made")) is True
    monkeypatch.undo()
    monkeypatch.setattr(files, "ignores_case", lambda folder: True)
    out = tmp_path / "out"
    assert run_cli("-i", *globs, "-o", out, "-n", tmp_path / "no-model", *COMMON) == 2
    err = capsys.readouterr().err
    assert (
        f"inputs {str(tmp_path / 'a' / 'x.png')!r} and {str(tmp_path / 'b' / 'X.png')!r} would "
        "both write output 'X' (and 'x': the output folder's file system ignores case)"
    ) in err, err
    assert not out.exists()
    src = str(tmp_path / "c")
    items, skipped = cli.plan_outputs(cli.collect_inputs([src], False), src, "_X2", "png", False)
    assert [i.src for i in items] == [os.path.join(src, "p.png")]
    assert skipped == [
        {
            "input": os.path.join(src, "p_x2.png"),
            "reason": f"it is where the output of {os.path.join(src, 'p.png')} goes (an earlier "
            "run's?)",
        }
    ]
    with pytest.raises(cli.UsageError, match="--overwrite would replace input"):
        cli.plan_outputs(cli.collect_inputs([src], False), src, "_X2", "png", True)
    # two names of one file (as "p.png" and "P.png" are where case is ignored): one input
    os.link(os.path.join(src, "p.png"), os.path.join(src, "q.png"))
    listed = {"skipped": [], "failed": []}
    names = [os.path.join(src, n) for n in ("p.png", "q.png")]
    assert [i.src for i in cli.collect_inputs(names, False, listed)] == names[:1]
    assert listed["skipped"] == [{"input": names[1], "reason": f"the same file as {names[0]}"}]


def test_folders_made_for_a_run_are_removed_if_it_does_not_start(tmp_path):
    """``files.make_folders`` says which folders it made; ``remove_made_folders`` removes
    those, but a folder something was written in since, and what was there before, stay."""
    from flax_latentup import files

    (tmp_path / "was").mkdir()
    made = files.make_folders(str(tmp_path / "was" / "a" / "b"))
    assert made == [str(tmp_path / "was" / "a" / "b"), str(tmp_path / "was" / "a")]
    assert files.make_folders(str(tmp_path / "was" / "a" / "b")) == []
    files.remove_made_folders(made)
    assert sorted(os.listdir(tmp_path)) == ["was"] and os.listdir(tmp_path / "was") == []
    made = files.make_folders(str(tmp_path / "was" / "a" / "b"))
    (tmp_path / "was" / "a" / "kept.txt").write_text("x")
    files.remove_made_folders(made)
    assert os.listdir(tmp_path / "was" / "a") == ["kept.txt"]
    # the output and report folders of a run, made together, go together
    args = argparse.Namespace(output=str(tmp_path / "new" / "out"))
    args.report = str(tmp_path / "new" / "rep" / "r.json")
    files.remove_made_folders(make_upscale_folders(args))
    assert not (tmp_path / "new").exists()
    # a path through a link's "..": made (and removed) where the link's target leads
    (tmp_path / "elsewhere" / "dir").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere" / "dir", tmp_path / "link")
    made = files.make_folders(str(tmp_path / "link" / ".." / "out"))
    assert (tmp_path / "elsewhere" / "out").is_dir()
    files.remove_made_folders(made)
    assert os.listdir(tmp_path / "elsewhere") == ["dir"]


def test_inputs_given_twice_and_prompts_left_unused(flax_pipe_dir, tmp_path, capsys):
    """Each -i counts (argparse would keep the last alone); at --guidance 0 the prompts are
    not used: a note says so, and a sidecar prompt is not read, so one that is not UTF-8 fails
    nothing."""
    write_png(str(tmp_path / "a" / "one.png"), seed=1)
    write_png(str(tmp_path / "b" / "two.png"), seed=2)
    (tmp_path / "b" / "two.txt").write_bytes(b"caf\xe9")  # Latin-1: unreadable as a prompt
    out = tmp_path / "out"
    argv = ["-i", tmp_path / "a", "-i", tmp_path / "b", "-o", out, "-n", flax_pipe_dir]
    capsys.readouterr()
    assert run_cli(*argv, "--prompt", "a cat", "--negative-prompt", "dog", *COMMON) == 0
    assert outputs(out) == ["one.png", "two.png"]
    err = capsys.readouterr().err
    assert "note: --prompt is not used at --guidance 0" in err
    assert "note: --negative-prompt is used only with classifier-free guidance" in err
    assert read_report(out)["failed"] == []


def test_weights_that_do_not_fit_the_config_stop_the_run_cleanly(flax_pipe_dir, tmp_path, capsys):
    """A model whose weights do not fit its config.json (found only as the weights load) stops
    with exit 2 and one message, before any picture is upscaled, and leaves no output folder
    made for nothing."""
    bad = tmp_path / "model"
    shutil.copytree(flax_pipe_dir, bad)
    config = json.loads((bad / "unet" / "config.json").read_text())
    config["layers_per_block"] += 1
    (bad / "unet" / "config.json").write_text(json.dumps(config))
    write_png(str(tmp_path / "in" / "a.png"))
    out = tmp_path / "out"
    capsys.readouterr()
    for extra in (("-n", bad), ("-n", flax_pipe_dir, "--unet", bad / "unet")):
        assert run_cli("-i", tmp_path / "in", "-o", out, *extra, *COMMON) == 2
        err = capsys.readouterr().err
        assert "cannot load the model" in err and "Traceback" not in err
        assert not out.exists()

"""The converter: torch pipeline folders (safetensors or .bin) to Flax folders."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from flax_latentup_convert import convert_checkpoint
from safetensors.torch import load_file

from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
from flax_latentup.cli import main as cli_main


def _run(pipe, seed=0):
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    return pipe(
        prompt="a cat",
        image=low,
        num_inference_steps=2,
        guidance_scale=0.0,
        output_type="np",
        rng=seed,
    ).images


def test_convert_safetensors_with_verify(torch_pipe_dir, flax_pipe_dir, tmp_path, capsys):
    dst = tmp_path / "flax"
    code = cli_main(["convert", torch_pipe_dir, str(dst), "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    for part in ("text_encoder", "vae", "unet"):
        assert (dst / part / "flax_model.safetensors").is_file()
        line = [ln for ln in out.splitlines() if ln.startswith(f"verify {part}")][0]
        err = float(line.split("=")[1].split()[0])
        assert err <= 1e-5, line  # float32 models on one random input each
    converted = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(dst))
    converted.set_progress_bar_config(disable=True)
    direct = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir)
    direct.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_run(converted), _run(direct))


def test_convert_bin_pickles_and_bfloat16(torch_pipe_dir, tmp_path):
    src = tmp_path / "bin"
    shutil.copytree(torch_pipe_dir, src)
    for part, name in (
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ):
        st = src / part / f"{name}.safetensors"
        torch.save(
            load_file(str(st)),
            src / part / f"{'pytorch_model' if part == 'text_encoder' else name}.bin",
        )
        os.remove(st)
    # the runtime loader points .bin users at the converter
    from flax_latentup import WeightsError

    with pytest.raises(WeightsError, match="flax-latentup convert"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(src))
    dst = tmp_path / "flax16"
    assert convert_checkpoint.main([str(src), str(dst), "--dtype", "bfloat16"]) == 0
    from flax_latentup.weights import TensorFile

    stored = TensorFile(dst / "unet" / "flax_model.safetensors")
    assert {stored.dtype(k) for k in stored} == {"bf16"}
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(dst))
    ref = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir)
    ref.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    err = np.max(np.abs(_run(pipe) - _run(ref)))
    assert err < 5e-2, f"bfloat16-stored weights moved the picture by {err:.3g}"


def test_convert_refuses_to_overwrite(torch_pipe_dir, tmp_path, capsys):
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert convert_checkpoint.main([torch_pipe_dir, str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"


def test_selftest_command(tmp_path, capsys):
    assert cli_main(["selftest", "-o", str(tmp_path / "st")]) == 0
    assert "selftest passed" in capsys.readouterr().out
    assert (tmp_path / "st" / "gradient.png").is_file()

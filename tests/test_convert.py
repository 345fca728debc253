"""The converter: torch pipeline folders (safetensors or .bin) to Flax folders."""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import torch
from flax import nnx
from flax_latentup_convert import convert_checkpoint
from safetensors.torch import load_file

from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline
from flax_latentup.cli import main as cli_main
from tests import helpers


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


@pytest.mark.heavy
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


def test_convert_sharded_bin_pickles(torch_pipe_dir, tmp_path):
    """A component saved as sharded torch pickles (``NAME.bin.index[.VARIANT].json`` beside
    its shards) converts to exactly the weights of its safetensors."""
    from diffusers import UNet2DConditionModel

    from flax_latentup.weights import TensorFile

    src = tmp_path / "sharded"
    shutil.copytree(torch_pipe_dir, src)
    unet = UNet2DConditionModel.from_pretrained(torch_pipe_dir, subfolder="unet")
    os.remove(src / "unet" / "diffusion_pytorch_model.safetensors")
    unet.save_pretrained(src / "unet", safe_serialization=False, max_shard_size="200KB")
    unet.save_pretrained(
        src / "unet", safe_serialization=False, max_shard_size="200KB", variant="fp16"
    )
    names = os.listdir(src / "unet")
    assert "diffusion_pytorch_model.bin.index.json" in names
    assert "diffusion_pytorch_model.bin.index.fp16.json" in names
    assert sum(n.endswith(".bin") for n in names) > 4  # the shards of both

    want = load_file(os.path.join(torch_pipe_dir, "unet", "diffusion_pytorch_model.safetensors"))
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    for variant in (None, "fp16"):
        got = convert_checkpoint.read_torch_weights(str(src / "unet"), names, variant)
        assert sorted(got) == sorted(want)
        for key, value in want.items():
            np.testing.assert_array_equal(got[key], value.numpy(), err_msg=key)

    dst = tmp_path / "flax"
    assert convert_checkpoint.main([str(src), str(dst)]) == 0
    converted = TensorFile(dst / "unet" / "flax_model.safetensors")
    direct = tmp_path / "direct"
    FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir).save_pretrained(direct)
    expected = TensorFile(direct / "unet" / "flax_model.safetensors")
    assert sorted(converted) == sorted(expected)
    for key in expected:
        np.testing.assert_array_equal(converted[key], expected[key], err_msg=key)

    # a shard without a tensor its index puts there
    index = src / "unet" / "diffusion_pytorch_model.bin.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    key, shard = next(iter(weight_map.items()))
    state = torch.load(src / "unet" / shard, weights_only=True)
    del state[key]
    torch.save(state, src / "unet" / shard)
    with pytest.raises(convert_checkpoint.ConversionError, match=f"lacks 1 tensor.*{key}"):
        convert_checkpoint.read_torch_weights(str(src / "unet"), names)


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


def test_convert_refuses_its_own_source_and_unwritable_places(torch_pipe_dir, tmp_path, capsys):
    """Converting into the source folder would replace its torch weights: refused, even with
    --overwrite, as are a file or a folder under a file as DST, all before any work; nothing is
    written or lost."""
    src = tmp_path / "src"
    shutil.copytree(torch_pipe_dir, src)
    before = sorted(str(p.relative_to(src)) for p in src.rglob("*"))
    assert convert_checkpoint.main([str(src), str(src), "--overwrite"]) == 2
    assert "source folder" in capsys.readouterr().err
    assert sorted(str(p.relative_to(src)) for p in src.rglob("*")) == before
    (tmp_path / "afile").write_text("x")
    assert convert_checkpoint.main([str(src), str(tmp_path / "afile")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert convert_checkpoint.main([str(src), str(tmp_path / "afile" / "out")]) == 2
    assert "under a file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"
    # a source without a tokenizer's files is refused before its models are converted
    for f in (src / "tokenizer").iterdir():
        f.unlink()
    assert convert_checkpoint.main([str(src), str(tmp_path / "out")]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_convert_into_a_folder_that_holds_the_source(torch_pipe_dir, tmp_path):
    """DST may hold other things, the source among them: only the pipeline's entries are
    written there."""
    models = tmp_path / "models"
    shutil.copytree(torch_pipe_dir, models / "torch")
    (models / "notes.txt").write_text("mine")
    assert convert_checkpoint.main([str(models / "torch"), str(models), "--overwrite"]) == 0
    assert (models / "notes.txt").read_text() == "mine"
    assert (models / "torch" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(models))
    assert pipe.unet.config.in_channels == 8


def test_hub_fetches_no_weight_variants():
    """The patterns a hub download uses (through huggingface_hub's own filter) take the plain
    safetensors, configs and tokenizer files and leave out pickles and fp16 variants."""
    from huggingface_hub.utils import filter_repo_objects

    from flax_latentup import hub

    repo = [
        "model_index.json",
        "README.md",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder/model.fp16.safetensors",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.bin",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
    ]
    allow, ignore = hub.with_variant(hub.PIPELINE_PATTERNS, None)
    got = set(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore))
    assert got == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model-00001-of-00002.safetensors",
        "vae/diffusion_pytorch_model-00002-of-00002.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.json",
    }
    # a variant takes its own weights (and shards, and index) in place of the plain ones
    allow, ignore = hub.with_variant(hub.PIPELINE_PATTERNS, "fp16")
    got = set(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore))
    assert got == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
        "vae/diffusion_pytorch_model.safetensors.index.fp16.json",
    }
    # components given to from_pretrained (unet=..., vae=...) are not fetched at all
    allow, ignore = hub.pipeline_patterns("fp16", skip=("unet", "vae"))
    got = set(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore))
    assert got == {
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/merges.txt",
        "tokenizer/vocab.json",
    }
    allow, ignore = hub.pipeline_patterns(None, skip=("tokenizer",))
    got = set(filter_repo_objects(repo, allow_patterns=allow, ignore_patterns=ignore))
    assert {f for f in got if f.startswith(("tokenizer/", "unet/"))} == {
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    }


def test_weight_variants_load(torch_pipe_dir, tmp_path):
    """``variant="fp16"`` loads the ``NAME.fp16.safetensors`` files diffusers writes with
    ``save_pretrained(variant="fp16")`` (one of them sharded here), the plain files without it;
    a missing variant and a malformed name are named in the errors."""
    import copy

    from diffusers import StableDiffusionLatentUpscalePipeline

    from flax_latentup import FlaxAutoencoderKL, WeightsError

    folder = tmp_path / "p"
    shutil.copytree(torch_pipe_dir, folder)
    torch_pipe = StableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir)
    half = copy.deepcopy(torch_pipe).to(torch.float16)
    half.save_pretrained(folder, variant="fp16")
    (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    half.vae.save_pretrained(folder / "vae", variant="fp16", max_shard_size="100KB")
    assert (folder / "vae" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert not (folder / "vae" / "diffusion_pytorch_model.fp16.safetensors").exists()
    assert (folder / "text_encoder" / "model.fp16.safetensors").is_file()

    plain = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder))
    fp16 = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder), variant="fp16")
    for part in ("text_encoder", "vae", "unet"):
        a, b = jax.tree.leaves(plain.params[part]), jax.tree.leaves(fp16.params[part])
        assert all(x.dtype == y.dtype == jnp.float32 for x, y in zip(a, b, strict=True))
        # the variant's weights are the plain ones rounded to float16, and not the plain ones
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(y), np.asarray(x).astype(np.float16))
        assert any(not np.array_equal(x, y) for x, y in zip(a, b, strict=True)), part
    vae = FlaxAutoencoderKL.from_pretrained(str(folder), "vae", variant="fp16")
    leaves = jax.tree.leaves(nnx.state(vae)), jax.tree.leaves(fp16.params["vae"])
    for x, y in zip(*leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    with pytest.raises(WeightsError, match="variant 'bf16' not found"):
        FlaxAutoencoderKL.from_pretrained(str(folder), "vae", variant="bf16")
    with pytest.raises(ValueError, match="variant must be"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(folder), variant="fp16/x")
    # a folder holding only variants says so when loaded without variant=
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"holds the weights variants \['fp16'\]: pass variant="):
        FlaxAutoencoderKL.from_pretrained(str(folder), "vae")


def test_malformed_shard_index_and_pickle(tmp_path):
    from flax_latentup import WeightsError
    from flax_latentup.weights import open_weights

    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(WeightsError, match="weight_map"):
        open_weights(str(tmp_path), ["m.safetensors"])
    torch.save([torch.zeros(2)], tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(convert_checkpoint.ConversionError, match="expected a state dict"):
        convert_checkpoint.read_torch_weights(str(tmp_path), ("diffusion_pytorch_model.bin",))


def test_saved_configs_keep_every_source_entry(torch_pipe_dir, tmp_path):
    """A converted folder's config.json files hold every entry of the torch ones, with the
    same values (entries the port does not use are carried along, not dropped)."""
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir)
    pipe.save_pretrained(tmp_path / "flax")
    for part in ("text_encoder", "vae", "unet"):
        with open(os.path.join(torch_pipe_dir, part, "config.json")) as f:
            source = json.load(f)
        with open(tmp_path / "flax" / part / "config.json") as f:
            saved = json.load(f)
        differ = {k: (v, saved.get(k, "<missing>")) for k, v in source.items() if saved.get(k) != v}
        assert not differ, f"{part}: {differ}"


def _files(folder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_convert_layouts_and_variants(torch_pipe_dir, flax_pipe_dir, tmp_path, capsys):
    """Flax folders convert back to torch checkpoints that diffusers loads bit for bit (and
    --verify then compares with them); --variant adds that variant beside the pipeline DST
    holds, the source's folder included, without touching its other files; --source-variant
    reads one. Conflicts are refused before any weights are read, with nothing written."""
    from diffusers import StableDiffusionLatentUpscalePipeline

    want = StableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir)

    def assert_torch_equal(folder, variant=None, dtype=torch.float32):
        got = StableDiffusionLatentUpscalePipeline.from_pretrained(
            str(folder), variant=variant, dtype=dtype
        )
        for part in ("text_encoder", "vae", "unet"):
            helpers.assert_same_state_dict(getattr(got, part), getattr(want, part), dtype, part)

    # Flax -> torch, verified against the torch checkpoints written
    back = tmp_path / "back"
    code = convert_checkpoint.main([flax_pipe_dir, str(back), "--layout", "torch", "--verify"])
    out = capsys.readouterr().out
    assert code == 0, out
    errors = [float(ln.split("=")[1].split()[0]) for ln in out.splitlines() if "verify" in ln]
    assert len(errors) == 3 and max(errors) <= 1e-5, out  # float32, the same weights
    assert_torch_equal(back)

    # an fp16 variant added to the source folder itself; its other files stay as they were
    before = _files(back)
    args = [str(back), str(back), "--layout", "torch", "--dtype", "float16", "--variant", "fp16"]
    assert convert_checkpoint.main(args) == 0
    after = _files(back)
    assert {k: after[k] for k in before} == before
    assert sorted(set(after) - set(before)) == [
        "text_encoder/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert_torch_equal(back, "fp16", torch.float16)
    # that variant again: only with --overwrite; read as the source, it cannot be written over
    assert convert_checkpoint.main(args) == 2
    assert "already holds the variant 'fp16'" in capsys.readouterr().err
    assert convert_checkpoint.main([*args, "--source-variant", "fp16", "--overwrite"]) == 2
    assert "source folder" in capsys.readouterr().err
    assert convert_checkpoint.main([*args, "--overwrite"]) == 0
    assert _files(back) == after  # the same weights, written again

    # --source-variant: the float16 weights, into a Flax folder
    half = tmp_path / "half"
    assert convert_checkpoint.main([str(back), str(half), "--source-variant", "fp16"]) == 0
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(half))
    got = np.asarray(pipe.unet.conv_in.kernel[...]).transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(got, want.unet.conv_in.weight.detach().half().float().numpy())
    assert not np.array_equal(got, want.unet.conv_in.weight.detach().numpy())

    # refused before any weights are read, nothing written
    resched = tmp_path / "resched"  # the source pipeline with another schedule
    shutil.copytree(flax_pipe_dir, resched)
    config = json.loads((resched / "scheduler" / "scheduler_config.json").read_text())
    (resched / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(config | {"timestep_spacing": "trailing"})
    )
    capsys.readouterr()
    before = _files(tmp_path)
    refusals = [
        (
            [str(resched), str(half), "--variant", "bf16"],
            "holds another scheduler: its scheduler_config.json differs from this scheduler's in "
            "timestep_spacing. A weights variant is saved beside the same model: choose another "
            "folder, or convert without --variant (and with --overwrite) to replace that pipeline",
        ),
        ([flax_pipe_dir, str(tmp_path / "x"), "--verify"], "--verify compares with torch"),
        ([torch_pipe_dir, str(back), "--variant", "bf16"], "Flax-layout variant 'bf16' belongs"),
        ([torch_pipe_dir, str(half), "--variant", "../x"], "--variant: variant must be"),
        ([str(half), str(tmp_path / "x"), "--source-variant", "bf16"], "flax_model.bf16"),
    ]
    for argv, message in refusals:
        assert convert_checkpoint.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert _files(tmp_path) == before
    assert not (tmp_path / "x").exists()


def test_sharded_flax_weights_load(flax_pipe_dir, tmp_path):
    """A Flax folder whose weights are sharded (flax_model-0000k-of-0000n.safetensors and
    their index) loads as the Flax layout, equal to the whole file."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    from flax_latentup import FlaxUNet2DConditionModel

    folder = tmp_path / "sharded"
    shutil.copytree(flax_pipe_dir, folder)
    whole = folder / "unet" / "flax_model.safetensors"
    tensors = load_np(str(whole))
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2]), start=1):
        shard = f"flax_model-{i:05d}-of-00002.safetensors"
        save_np({k: tensors[k] for k in part}, str(folder / "unet" / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "unet" / "flax_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": weight_map})
    )
    whole.unlink()
    got = FlaxUNet2DConditionModel.from_pretrained(str(folder), "unet")
    want = FlaxUNet2DConditionModel.from_pretrained(flax_pipe_dir, "unet")
    for a, b in zip(jax.tree.leaves(nnx.state(got)), jax.tree.leaves(nnx.state(want)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_interrupted_swap_puts_the_folder_back(flax_pipe_dir, tmp_path, monkeypatch):
    """A save interrupted while its new entries are renamed into place (here after two of them)
    puts back every entry that was there: the folder is as it was, byte for byte."""
    from flax_latentup import files

    folder = tmp_path / "saved"
    shutil.copytree(flax_pipe_dir, folder)
    (folder / "notes.txt").write_text("mine")

    def snapshot():
        return {
            os.path.relpath(os.path.join(root, f), folder): open(os.path.join(root, f), "rb").read()
            for root, _, fs in os.walk(folder)
            for f in fs
        }

    flax_pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(flax_pipe_dir)
    before = snapshot()
    replace, placed, real = os.replace, [], os.path.realpath(folder)

    def interrupting(a, b):
        if os.path.dirname(b) == real:  # a new entry renamed into place
            placed.append(b)
            if len(placed) == 2:  # the second entry: the first is in, the second moved aside
                raise KeyboardInterrupt
        return replace(a, b)

    monkeypatch.setattr(files.os, "replace", interrupting)
    with pytest.raises(KeyboardInterrupt):
        flax_pipe.save_pretrained(folder, torch_layout=True)
    monkeypatch.setattr(files.os, "replace", replace)
    assert snapshot() == before
    assert not [e for e in os.listdir(folder) if e.startswith(files.TMP_PREFIX)]


def test_convert_names_dtype_troubles_and_finds_its_source(
    torch_pipe_dir, tmp_path, monkeypatch, capsys
):
    """float16 weights beyond its range are refused by name; a variant named after a dtype
    other than --dtype gets a note; '~' in DST is the home folder; a killed save's leftover
    does not make DST non-empty; and the source is recognised as DST by identity, not by its
    path's spelling."""
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    from flax_latentup import files

    src = tmp_path / "big"
    shutil.copytree(torch_pipe_dir, src)
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_np(str(weights))
    tensors["conv_out.bias"] = np.full_like(tensors["conv_out.bias"], 1e5)
    save_np(tensors, str(weights))
    assert cli_main(["convert", str(src), str(tmp_path / "f16"), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype float16: unet parameter conv_out.bias holds values beyond" in err, err
    assert not (tmp_path / "f16").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    stale = (
        tmp_path / "home" / "out" / (files.TMP_PREFIX + "999999999@" + files._host_name() + "@x")
    )
    stale.mkdir(parents=True)
    assert cli_main(["convert", torch_pipe_dir, "~/out", "--variant", "fp16"]) == 0
    assert "note: --variant fp16 stores the weights as float32" in capsys.readouterr().err
    assert (tmp_path / "home" / "out" / "unet" / "flax_model.fp16.safetensors").is_file()
    assert not stale.exists()
    assert not os.path.exists("~")
    # the source under another spelling of its path (realpath made blind to links)
    alias = tmp_path / "alias"
    os.symlink(src, alias)
    monkeypatch.setattr(os.path, "realpath", os.path.abspath)
    assert cli_main(["convert", str(src), str(alias), "--overwrite"]) == 2
    assert "is the source folder" in capsys.readouterr().err
    assert weights.is_file()


def test_verify_runs_the_vae_encoder_too(torch_pipe_dir):
    """--verify compares the VAE's encoder (picture inputs go through it) as well as its
    decoder: a Flax VAE whose quant_conv is wrong fails it."""
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir)
    kernel = pipe.vae.quant_conv.kernel  # (the untouched VAE passes: the test above)
    kernel.value = jnp.zeros_like(kernel.value)
    assert convert_checkpoint.verify(torch_pipe_dir, pipe)["vae"] > 0.1


CONFIG_TYPOS = [
    ("unet/config.json", "in_channels", None, "`in_channels` = None is not an integer"),
    (
        "unet/config.json",
        "block_out_channels",
        [32, "32", 64, 64],
        "`block_out_channels[1]` = '32' is not an integer",
    ),
    (
        "unet/config.json",
        "flip_sin_to_cos",
        "yes",
        "`flip_sin_to_cos` = 'yes' is not true or false",
    ),
    ("vae/config.json", "scaling_factor", "0.18", "`scaling_factor` = '0.18' is not a number"),
    ("vae/config.json", "down_block_types", "DownEncoderBlock2D", "is not a list of strings"),
    ("text_encoder/config.json", "num_attention_heads", 0, "must be at least 1"),
    ("text_encoder/config.json", "hidden_act", None, None),  # null: the default, as before
    (
        "scheduler/scheduler_config.json",
        "num_train_timesteps",
        "1000",
        "`num_train_timesteps` = '1000' is not an integer",
    ),
]


@pytest.mark.parametrize("config,key,value,message", CONFIG_TYPOS, ids=[c[1] for c in CONFIG_TYPOS])
def test_config_value_of_the_wrong_type_is_named_with_its_file(
    torch_pipe_dir, tmp_path, capsys, config, key, value, message
):
    """A config.json value of the wrong type (null, a string for a number, ...) is named, with
    its file, by loading, the converter and the batch command, before any weights are read."""
    from flax_latentup import ConfigError

    src = tmp_path / "src"
    shutil.copytree(torch_pipe_dir, src)
    path = src / config
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    if message is None:  # null stands for the default
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(src))
        return
    refused_everywhere(src, tmp_path, capsys, ConfigError, f"{path}: ", message)


def refused_everywhere(src, tmp_path, capsys, error, prefix: str, message: str) -> None:
    """Loading the pipeline folder ``src`` raises ``error`` starting with ``prefix`` and
    holding ``message``; the converter and the batch command stop with it (exit 2) before
    they write anything."""
    with pytest.raises(error) as caught:
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(str(src))
    assert str(caught.value).startswith(prefix) and message in str(caught.value), caught.value
    assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert f"error: {prefix}" in err and message in err, err
    assert not (tmp_path / "dst").exists()
    picture = tmp_path / "in.png"
    PIL.Image.new("RGB", (64, 64)).save(picture)
    out = tmp_path / "up"
    assert cli_main(["upscale", "-i", str(picture), "-o", str(out), "--model", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"--model: {prefix}" in err and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("name", ["tokenizer.json", "vocab.json"])
def test_damaged_tokenizer_is_named(torch_pipe_dir, tmp_path, capsys, name):
    src = tmp_path / "src"
    shutil.copytree(torch_pipe_dir, src)
    if name == "vocab.json":  # the hub repo's files, without tokenizer.json
        (src / "tokenizer" / "tokenizer.json").unlink()
        helpers.write_clip_tokenizer(str(src / "tokenizer"))
    (src / "tokenizer" / name).write_text('{"cut sh')
    folder = str(src / "tokenizer")
    refused_everywhere(src, tmp_path, capsys, ValueError, f"{folder}: ", "damaged or cut short")


@pytest.mark.parametrize(
    "index, message",
    [
        (
            {"_class_name": "StableDiffusionPipeline"},
            ": `_class_name` is 'StableDiffusionPipeline'",
        ),
        (["a list"], " must hold a JSON object, got list"),
    ],
)
def test_another_pipeline_is_named(torch_pipe_dir, tmp_path, capsys, index, message):
    """A folder whose model_index.json names another pipeline (or is no JSON object) is
    refused by loading, the converter and the batch command alike, naming the file."""
    src = tmp_path / "src"
    shutil.copytree(torch_pipe_dir, src)
    (src / "model_index.json").write_text(json.dumps(index))
    path = str(src / "model_index.json")
    refused_everywhere(src, tmp_path, capsys, ValueError, path + message, "")


def fake_hub(monkeypatch, tmp_path, repo):
    """A fake hub repo of the file names ``repo`` (written empty under ``tmp_path/snapshot``);
    returns the list the fetched names are put in."""
    return helpers.fake_hub(monkeypatch, tmp_path / "snapshot", repo)


def test_hub_pipeline_is_checked_before_its_weights_are_fetched(
    torch_pipe_dir, tmp_path, monkeypatch
):
    """Loading a pipeline from a hub repo, and converting one, fetch its configs, tokenizer
    and scheduler first: a problem they show (an unsupported scheduler option; a torch
    pipeline where a Flax variant is to go beside) is reported with no weights fetched; a
    good repo then loads whole."""
    from flax_latentup import ConfigError

    remote = shutil.copytree(torch_pipe_dir, tmp_path / "remote")
    names = [str(p.relative_to(remote)) for p in remote.rglob("*") if p.is_file()]
    commit = "ab" * 20
    snapshot = tmp_path / "cache" / "snapshots" / commit
    revisions = []
    fetched = helpers.fake_hub(monkeypatch, snapshot, names, source=remote, revisions=revisions)
    scheduler = remote / "scheduler" / "scheduler_config.json"
    good = scheduler.read_text()
    scheduler.write_text(json.dumps({**json.loads(good), "prediction_type": "epsilon"}))
    with pytest.raises(ConfigError, match="prediction_type"):
        FlaxStableDiffusionLatentUpscalePipeline.from_pretrained("me/upscaler")
    assert fetched and not [n for n in fetched if n.endswith(".safetensors")], fetched
    scheduler.write_text(good)
    shutil.rmtree(snapshot)
    fetched.clear()
    with pytest.raises(ValueError, match=r"holds a pipeline 'StableDiffusionLatentUpscalePip"):
        convert_checkpoint.convert("me/upscaler", torch_pipe_dir, variant="fp16")
    assert fetched and not [n for n in fetched if n.endswith(".safetensors")], fetched
    revisions.clear()
    pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained("me/upscaler")
    assert sorted(set(fetched)) == sorted(names)
    # the weights are fetched at the commit whose configs were checked
    assert revisions == [None, commit]
    revisions.clear()
    convert_checkpoint.convert("me/upscaler", str(tmp_path / "converted"))
    assert revisions == [None, commit]
    assert (
        pipe.unet.config
        == FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_pipe_dir).unet.config
    )


def test_hub_subfolder_with_a_dot_fetches_its_weights(tmp_path, monkeypatch):
    """A model in a hub repo's subfolder whose name holds a dot ("v1.0/unet") is fetched with
    its plain weights and without their variants (a variant pattern's "*" matches "/" too)."""
    from flax_latentup import hub

    repo = [
        "v1.0/unet/config.json",
        "v1.0/unet/diffusion_pytorch_model.safetensors",
        "v1.0/unet/diffusion_pytorch_model.fp16.safetensors",
        "v1.0/vae/diffusion_pytorch_model.safetensors",
    ]
    fetched = fake_hub(monkeypatch, tmp_path, repo)
    for subfolder in ("v1.0/unet", "v1.0/unet/"):  # a trailing slash names the same folder
        fetched.clear()
        folder = hub.resolve("me/models", subfolder=subfolder)
        assert folder == str(tmp_path / "snapshot" / "v1.0" / "unet")
        assert sorted(fetched) == [
            "v1.0/unet/config.json",
            "v1.0/unet/diffusion_pytorch_model.safetensors",
        ]
    fetched.clear()
    allow, ignore = hub.with_variant(hub.MODEL_PATTERNS, "fp16")
    hub.resolve("me/models", subfolder="v1.0/unet", allow_patterns=allow, ignore_patterns=ignore)
    assert sorted(fetched) == [
        "v1.0/unet/config.json",
        "v1.0/unet/diffusion_pytorch_model.fp16.safetensors",
    ]


def test_hub_fetches_no_deeper_folders(tmp_path, monkeypatch):
    """A model at a hub repo's root is fetched without the models in its subfolders (a
    fine-tuning checkpoint's ``unet/`` and ``unet_ema/``), a model in a subfolder without the
    folders under it, and a pipeline without folders nested in its components."""
    from flax_latentup import hub

    repo = [
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/old/config.json",
        "unet/old/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "unet_ema/diffusion_pytorch_model.safetensors",
    ]
    fetched = fake_hub(monkeypatch, tmp_path, repo)
    hub.resolve("me/models")
    assert sorted(fetched) == ["config.json", "diffusion_pytorch_model.safetensors"]
    fetched.clear()
    hub.resolve("me/models", subfolder="unet")
    assert sorted(fetched) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    fetched.clear()
    with pytest.raises(hub.HubError) as e:  # a pipeline repo (or another one) at its root
        hub.resolve("me/models", subfolder="unet/old/none")
    assert str(e.value) == "hub repo 'me/models' has no subfolder 'unet/old/none'"
    allow, ignore = hub.pipeline_patterns(None)
    hub.resolve("me/models", allow_patterns=allow, ignore_patterns=ignore)
    assert sorted(fetched) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet_ema/config.json",
        "unet_ema/diffusion_pytorch_model.safetensors",
    ]
    pipeline = [f for f in repo if "/" in f or f == "model_index.json"]
    fake_hub(monkeypatch, tmp_path / "pipeline", pipeline)
    with pytest.raises(hub.HubError) as e:
        hub.resolve("me/pipeline")
    assert str(e.value) == (
        "hub repo 'me/pipeline' holds none of config.json, *.safetensors, "
        "*.safetensors.index.json at its root: a model in a subfolder (a pipeline's unet/ or "
        "vae/) loads with subfolder=..., or with its pipeline"
    )

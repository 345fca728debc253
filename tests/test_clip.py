"""FlaxCLIPTextModel against transformers' CLIPTextModel on the same seeded weights."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from flax_latentup import ConfigError, FlaxCLIPTextModel, WeightsError
from tests import helpers


def torch_outputs(model, ids: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True)
    return {
        "hidden_states[-1]": out.hidden_states[-1].numpy(),
        "last_hidden_state": out.last_hidden_state.numpy(),
        "pooler_output": out.pooler_output.numpy(),
        "n_hidden": len(out.hidden_states),
    }


def flax_outputs(model: FlaxCLIPTextModel, ids: np.ndarray) -> dict[str, np.ndarray]:
    out = model(jnp.asarray(ids))
    return {
        "hidden_states[-1]": np.asarray(out.hidden_states[-1], np.float32),
        "last_hidden_state": np.asarray(out.last_hidden_state, np.float32),
        "pooler_output": np.asarray(out.pooler_output, np.float32),
        "n_hidden": len(out.hidden_states),
    }


def save_variant(model, folder: str, *, eos_token_id: int, legacy_keys: bool) -> str:
    """Save ``model`` with the given pooling rule (eos id) and key spelling."""
    model.config.eos_token_id = eos_token_id
    model.eos_token_id = eos_token_id
    return helpers.save_clip_text_model(model, folder, legacy_keys=legacy_keys)


def assert_parity(torch_model, folder, ids, tol):
    ref = torch_outputs(torch_model, ids)
    got = flax_outputs(FlaxCLIPTextModel.from_pretrained(folder), ids)
    assert got["n_hidden"] == ref["n_hidden"]
    for name in ("hidden_states[-1]", "last_hidden_state", "pooler_output"):
        err = float(np.max(np.abs(got[name] - ref[name])))
        assert err <= tol, f"{name}: max abs error {err:.3g} > {tol}"


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> np.ndarray:
    ids = helpers.tokenize(tokenizer, helpers.PROMPTS)
    # the long prompt fills all 77 positions: text up to the last one, which is the eos token
    assert (ids[-1, :-1] != tokenizer.eos_token_id).all() and ids[-1, -1] == tokenizer.eos_token_id
    return ids


@pytest.mark.parametrize("legacy_keys", [True, False], ids=["text_model-prefix", "no-prefix"])
@pytest.mark.parametrize("eos_rule", ["argmax", "first-eos"])
def test_tiny_parity(tmp_path, tokenizer, prompt_ids, legacy_keys, eos_rule):
    model = helpers.make_clip_text_model(seed=3, **helpers.TINY_CLIP)
    eos = 2 if eos_rule == "argmax" else tokenizer.eos_token_id
    folder = save_variant(model, str(tmp_path), eos_token_id=eos, legacy_keys=legacy_keys)
    assert_parity(model, folder, prompt_ids, tol=1e-5)


def test_pooling_rules_differ(tmp_path, tiny_clip):
    """The two rules pick different tokens when a larger id follows the first eos."""
    model, _ = tiny_clip
    ids = np.array([[547, 320, 548, 999, 5]], np.int32)  # eos at 2, a larger id at 3
    for eos, want in ((2, 3), (548, 2)):
        folder = save_variant(model, str(tmp_path / str(eos)), eos_token_id=eos, legacy_keys=False)
        flax_model = FlaxCLIPTextModel.from_pretrained(folder)
        assert int(flax_model.pooling_positions(jnp.asarray(ids))[0]) == want
        assert_parity(model, folder, ids, tol=1e-5)
    model.config.eos_token_id = model.eos_token_id = 2


@pytest.fixture(scope="module")
def vit_l14():
    return helpers.make_clip_text_model(seed=7, **helpers.VIT_L14_TEXT)


@pytest.mark.slow
@pytest.mark.parametrize(
    "eos_rule,legacy_keys", [("argmax", True), ("first-eos", False)], ids=["hub-style", "v5-style"]
)
def test_vit_l14_parity(tmp_path, vit_l14, tokenizer, prompt_ids, eos_rule, legacy_keys):
    eos = 2 if eos_rule == "argmax" else tokenizer.eos_token_id
    folder = save_variant(vit_l14, str(tmp_path), eos_token_id=eos, legacy_keys=legacy_keys)
    assert_parity(vit_l14, folder, prompt_ids, tol=1e-4)
    vit_l14.config.eos_token_id = vit_l14.eos_token_id = 2


def test_round_trip_bitwise(tmp_path, tiny_clip, prompt_ids):
    _, folder = tiny_clip
    model = FlaxCLIPTextModel.from_pretrained(folder)
    model.save_pretrained(tmp_path / "flax")
    assert sorted(os.listdir(tmp_path / "flax")) == ["config.json", "flax_model.safetensors"]
    again = FlaxCLIPTextModel.from_pretrained(str(tmp_path / "flax"))
    assert again.config == model.config
    a, b = model(jnp.asarray(prompt_ids)), again(jnp.asarray(prompt_ids))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # transformers' pickle of the same weights would go on loading there: refused
    (tmp_path / "flax" / "pytorch_model.bin").write_bytes(b"old weights")
    with pytest.raises(FileExistsError, match=r"holds pytorch_model\.bin, torch weights"):
        model.save_pretrained(tmp_path / "flax")


def test_torch_layout_save_names_the_dtype_of_its_weights(tmp_path, tiny_clip):
    """transformers loads a checkpoint in the dtype its config.json names: a save in another
    dtype than the source's brings that entry along, so transformers reads the weights back
    in the dtype they were saved in."""
    import copy

    from transformers import CLIPTextModel

    source = tmp_path / "bf16"
    # transformers writes "dtype": "bfloat16" in config.json (a copy: the fixture is shared)
    copy.deepcopy(tiny_clip[0]).to(torch.bfloat16).save_pretrained(source)
    assert json.loads((source / "config.json").read_text())["dtype"] == "bfloat16"
    cases = (("float32", jnp.float32, torch.float32), ("bfloat16", jnp.bfloat16, torch.bfloat16))
    for name, param_dtype, torch_dtype in cases:
        flax = FlaxCLIPTextModel.from_pretrained(str(source), param_dtype=param_dtype)
        flax.save_pretrained(tmp_path / name, torch_layout=True)
        assert json.loads((tmp_path / name / "config.json").read_text())["dtype"] == name
        assert CLIPTextModel.from_pretrained(str(tmp_path / name)).dtype == torch_dtype


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------


def _edited_copy(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return str(dst)


def test_with_projection_checkpoint_loads_its_text_tower(tmp_path, tiny_clip, prompt_ids):
    """A CLIPTextModelWithProjection checkpoint loads as its text tower, as transformers'
    CLIPTextModel loads it (text_projection left unused): the same outputs."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(**dict(helpers.TINY_CLIP, eos_token_id=2, projection_dim=16))
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(tmp_path / "proj")
    flax = FlaxCLIPTextModel.from_pretrained(str(tmp_path / "proj"))
    tower = CLIPTextModel.from_pretrained(str(tmp_path / "proj")).eval()
    with torch.no_grad():
        want = tower(torch.from_numpy(prompt_ids.astype(np.int64)))
    got = flax(jnp.asarray(prompt_ids))
    for name in ("last_hidden_state", "pooler_output"):
        err = np.max(np.abs(np.asarray(getattr(got, name)) - getattr(want, name).numpy()))
        assert err <= 1e-5, f"{name}: {err:.3g}"


def test_missing_key_named(tmp_path, tiny_clip):
    _, folder = tiny_clip
    bad = _edited_copy(folder, tmp_path / "m", lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(WeightsError, match=r"missing key.*encoder\.layers\.1\.mlp\.fc2\.bias"):
        FlaxCLIPTextModel.from_pretrained(bad)


def test_unexpected_key_named(tmp_path, tiny_clip):
    _, folder = tiny_clip

    def add(t):
        t["encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)

    bad = _edited_copy(folder, tmp_path / "u", add)
    with pytest.raises(WeightsError, match=r"unexpected key.*encoder\.layers\.0\.extra\.weight"):
        FlaxCLIPTextModel.from_pretrained(bad)


def test_shape_mismatch_named(tmp_path, tiny_clip):
    _, folder = tiny_clip

    def reshape(t):
        t["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)

    bad = _edited_copy(folder, tmp_path / "s", reshape)
    with pytest.raises(
        WeightsError, match=r"shape mismatch for 'encoder\.layers\.0\.self_attn\.q_proj\.weight'"
    ):
        FlaxCLIPTextModel.from_pretrained(bad)


def test_all_problems_in_one_error(tmp_path, tiny_clip):
    _, folder = tiny_clip

    def edit(t):
        t.pop("final_layer_norm.bias")
        t["bogus"] = np.zeros(1, np.float32)
        t["embeddings.position_embedding.weight"] = np.zeros((76, 32), np.float32)

    bad = _edited_copy(folder, tmp_path / "all", edit)
    with pytest.raises(WeightsError) as info:
        FlaxCLIPTextModel.from_pretrained(bad)
    msg = str(info.value)
    assert "final_layer_norm.bias" in msg and "bogus" in msg
    assert "embeddings.position_embedding.weight" in msg


def test_integer_weights_rejected(tmp_path, tiny_clip):
    _, folder = tiny_clip

    def edit(t):
        t["final_layer_norm.bias"] = np.zeros(32, np.int32)

    bad = _edited_copy(folder, tmp_path / "int", edit)
    with pytest.raises(WeightsError, match=r"dtype of 'final_layer_norm\.bias' is int32"):
        FlaxCLIPTextModel.from_pretrained(bad)


def test_truncated_file_is_a_clear_error(tmp_path, tiny_clip):
    _, folder = tiny_clip
    shutil.copytree(folder, tmp_path / "t")
    path = tmp_path / "t" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"cannot read safetensors file .*model\.safetensors"):
        FlaxCLIPTextModel.from_pretrained(str(tmp_path / "t"))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="truncated or is not a safetensors file"):
        FlaxCLIPTextModel.from_pretrained(str(tmp_path / "t"))


def test_unsupported_config_named(tmp_path, tiny_clip):
    _, folder = tiny_clip
    shutil.copytree(folder, tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["hidden_act"] = "relu"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"`hidden_act` = 'relu' is not supported"):
        FlaxCLIPTextModel.from_pretrained(str(tmp_path / "c"))


def test_another_models_folder_is_named(tmp_path, tiny_clip):
    """A diffusers model's folder (a UNet's) given as the text encoder's is named from its
    config, before any weights are read."""
    helpers.save_unet(helpers.make_unet(seed=0, **helpers.TINY_UNET), str(tmp_path / "unet"))
    with pytest.raises(
        ConfigError, match=r"config.json: CLIPTextModel config: .* diffusers 'UNet2DConditionModel'"
    ):
        FlaxCLIPTextModel.from_pretrained(str(tmp_path / "unet"))


def test_missing_folder_and_weights(tmp_path):
    from flax_latentup import HubError

    with pytest.raises(HubError, match="model folder not found"):
        FlaxCLIPTextModel.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match="no weights in"):
        FlaxCLIPTextModel.from_pretrained(str(tmp_path / "empty"))


def test_bad_input_ids(tiny_clip):
    _, folder = tiny_clip
    model = FlaxCLIPTextModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="input_ids must be an integer array"):
        model(jnp.zeros((77,), jnp.int32))
    with pytest.raises(ValueError, match="input_ids must have an integer dtype"):
        model(jnp.zeros((1, 77), jnp.float32))
    with pytest.raises(ValueError, match="input_ids length 78"):
        model(jnp.zeros((1, 78), jnp.int32))


# --------------------------------------------------------------------------------------------
# Precision and jit
# --------------------------------------------------------------------------------------------


def test_bfloat16_close_to_float32(tiny_clip, prompt_ids):
    _, folder = tiny_clip
    ids = jnp.asarray(prompt_ids)
    f32 = FlaxCLIPTextModel.from_pretrained(folder)(ids)
    bf16 = FlaxCLIPTextModel.from_pretrained(folder, dtype=jnp.bfloat16)(ids)
    assert bf16.last_hidden_state.dtype == jnp.bfloat16
    for name in ("last_hidden_state", "pooler_output"):
        a = np.asarray(getattr(f32, name))
        b = np.asarray(getattr(bf16, name), np.float32)
        err = np.max(np.abs(a - b)) / np.max(np.abs(a))
        # bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3) through two layers.
        assert err <= 2e-2, f"{name}: bf16 max abs error relative to the output's scale {err:.3g}"


def test_jit_matches_eager(tiny_clip, prompt_ids):
    from flax import nnx

    _, folder = tiny_clip
    model = FlaxCLIPTextModel.from_pretrained(folder)
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, ids):
        return nnx.merge(graphdef, state)(ids).last_hidden_state

    ids = jnp.asarray(prompt_ids)
    np.testing.assert_allclose(
        np.asarray(encode(state, ids)), np.asarray(model(ids).last_hidden_state), atol=1e-6
    )


@pytest.mark.parametrize(
    "given",
    [
        {"model_type": "clip_text_model"},
        {"model_type": "clip_text_model", "vocab_size": 1000, "num_hidden_layers": 2},
        {"model_type": "clip", "text_config": {"hidden_size": 64, "num_attention_heads": 4}},
    ],
)
def test_config_keys_left_out_read_as_transformers_reads_them(given):
    """A config.json that leaves keys out means transformers' defaults for them (a 512-wide,
    8-head tower with eos 49407), not the upscaler's ViT-L/14 values: the port builds the
    model transformers builds from the same file."""
    from transformers import CLIPConfig
    from transformers import CLIPTextConfig as TorchConfig

    from flax_latentup import CLIPTextConfig

    if given["model_type"] == "clip":
        reference = CLIPConfig.from_dict(given).text_config
    else:
        reference = TorchConfig.from_dict(given)
    config = CLIPTextConfig.from_dict(given)
    for field in dataclasses.fields(CLIPTextConfig):
        if field.name != "extra":
            assert getattr(config, field.name) == getattr(reference, field.name), field.name

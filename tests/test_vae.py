"""FlaxAutoencoderKL against diffusers' AutoencoderKL on the same seeded weights."""

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
from flax import nnx
from safetensors.numpy import load_file, save_file

from flax_latentup import (
    AutoencoderKLConfig,
    ConfigError,
    DiagonalGaussianDistribution,
    FlaxAutoencoderKL,
    WeightsError,
    attention,
    attention_config,
    nonfinite_images,
)
from flax_latentup.models import layers
from flax_latentup.models.conv import conv_config
from flax_latentup.models.vae import _run
from tests import helpers

RNG = np.random.default_rng(1234)


def pictures(b: int, h: int, w: int) -> np.ndarray:
    return RNG.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)


def latents(b: int, h: int, w: int, c: int = 4) -> np.ndarray:
    return RNG.standard_normal((b, h, w, c)).astype(np.float32)


def torch_encode(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        post = model.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
    return post.mean.numpy().transpose(0, 2, 3, 1), post.logvar.numpy().transpose(0, 2, 3, 1)


def torch_decode(model, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
    return out.numpy().transpose(0, 2, 3, 1)


def max_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)))


@pytest.fixture(scope="module")
def vae(tiny_vae) -> FlaxAutoencoderKL:
    return FlaxAutoencoderKL.from_pretrained(tiny_vae[1])


def assert_parity(torch_model, flax_model, x, z, *, enc_tol, dec_tol):
    ref_mean, ref_logvar = torch_encode(torch_model, x)
    post = flax_model.encode(x)
    err_mean, err_logvar = max_err(post.mean, ref_mean), max_err(post.logvar, ref_logvar)
    assert err_mean <= enc_tol, f"encode mean: max abs error {err_mean:.3g} > {enc_tol}"
    assert err_logvar <= enc_tol, f"encode logvar: max abs error {err_logvar:.3g} > {enc_tol}"
    err_dec = max_err(flax_model.decode(z), torch_decode(torch_model, z))
    assert err_dec <= dec_tol, f"decode: max abs error {err_dec:.3g} > {dec_tol}"


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


def test_tiny_parity(tiny_vae, vae):
    model, _ = tiny_vae
    assert_parity(model, vae, pictures(2, 16, 24), latents(2, 12, 10), enc_tol=1e-4, dec_tol=1e-4)


@pytest.mark.parametrize("implementation", ["fast", "xla"])
def test_parity_with_each_convolution_implementation(tiny_vae, implementation):
    """Winograd, product and polyphase-upsampling forms forced on, and XLA's own
    convolutions forced on: both match diffusers, untiled and tiled."""
    model, folder = tiny_vae
    with conv_config(implementation):
        flax_model = FlaxAutoencoderKL.from_pretrained(folder)
        assert_parity(
            model, flax_model, pictures(1, 16, 24), latents(1, 12, 10), enc_tol=1e-4, dec_tol=1e-4
        )
        z = latents(1, 20, 28)
        with helpers.torch_tiling(model, TILE):
            ref = torch_decode(model, z)
        err = max_err(flax_model.decode(z, tiled=True, tile_sample_size=TILE), ref)
        assert err <= 1e-3, f"{implementation} tiled decode: max abs error {err:.3g} > 1e-3"


def test_tiny_variant_parity(tmp_path):
    """No quant convs and no mid-block attention, three blocks with two layers each."""
    config = dict(
        helpers.TINY_VAE,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=False,
    )
    model = helpers.make_vae(seed=5, **config)
    flax_model = FlaxAutoencoderKL.from_pretrained(helpers.save_vae(model, str(tmp_path)))
    assert flax_model.quant_conv is None and flax_model.decoder.mid_block.attentions is None
    assert flax_model.config.downsample_factor == 4
    assert_parity(
        model, flax_model, pictures(1, 16, 8), latents(1, 3, 5), enc_tol=1e-4, dec_tol=1e-4
    )


@pytest.mark.slow
def test_sd_kl_f8_parity(tmp_path):
    """The published config (random weights) at 64x64 pixels / 8x8 latents."""
    model = helpers.make_vae(seed=11, **helpers.SD_KL_F8_VAE)
    folder = helpers.save_vae(model, str(tmp_path))
    flax_model = FlaxAutoencoderKL.from_pretrained(folder)
    assert flax_model.config == AutoencoderKLConfig.sd_kl_f8()
    assert_parity(
        model, flax_model, pictures(1, 64, 64), latents(1, 8, 8), enc_tol=1e-4, dec_tol=5e-4
    )


# --------------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------------

TILE = 16  # pixels; 8 latents with the tiny model's factor 2


@pytest.mark.parametrize(
    "hw", [(20, 28), (17, 5)], ids=["partial-edge-tiles", "narrower-than-tile"]
)
def test_tiled_decode_matches_diffusers(tiny_vae, vae, hw):
    model, _ = tiny_vae
    z = latents(2, *hw)
    with helpers.torch_tiling(model, TILE):
        ref = torch_decode(model, z)
    got = vae.decode(z, tiled=True, tile_sample_size=TILE)
    err = max_err(got, ref)
    assert err <= 1e-3, f"tiled decode: max abs error {err:.3g} > 1e-3"
    # the tiling really changed the result (tiles see less context than the whole picture)
    assert max_err(vae.decode(z), ref) > 1e-2


def test_tiled_encode_matches_diffusers(tiny_vae, vae):
    model, _ = tiny_vae
    x = pictures(2, 40, 56)
    with helpers.torch_tiling(model, TILE):
        ref_mean, ref_logvar = torch_encode(model, x)
    post = vae.encode(x, tiled=True, tile_sample_size=TILE)
    for name, got, ref in (("mean", post.mean, ref_mean), ("logvar", post.logvar, ref_logvar)):
        err = max_err(got, ref)
        assert err <= 1e-3, f"tiled encode {name}: max abs error {err:.3g} > 1e-3"
    assert max_err(vae.encode(x).mean, ref_mean) > 1e-2


def test_one_tile_is_not_tiled(tiny_vae, vae):
    """An input that fits in one tile gives exactly the untiled result (as in diffusers)."""
    model, _ = tiny_vae
    z, x = latents(1, 8, 6), pictures(1, 16, 12)
    np.testing.assert_array_equal(
        np.asarray(vae.decode(z, tiled=True, tile_sample_size=TILE)), np.asarray(vae.decode(z))
    )
    np.testing.assert_array_equal(
        np.asarray(vae.encode(x, tiled=True, tile_sample_size=TILE).mean),
        np.asarray(vae.encode(x).mean),
    )
    with helpers.torch_tiling(model, TILE):
        err = max_err(vae.decode(z, tiled=True, tile_sample_size=TILE), torch_decode(model, z))
    assert err <= 1e-4, f"one-tile decode: max abs error {err:.3g} > 1e-4"


def test_new_size_does_not_recompile_the_network(vae):
    vae.decode(latents(1, 12, 12), tiled=True, tile_sample_size=TILE)
    vae.encode(pictures(1, 24, 24), tiled=True, tile_sample_size=TILE)
    compiled = _run._cache_size()
    for h, w in ((9, 31), (26, 11)):
        out = vae.decode(latents(1, h, w), tiled=True, tile_sample_size=TILE)
        assert out.shape == (1, 2 * h, 2 * w, 3)
        post = vae.encode(pictures(1, 2 * h, 2 * w), tiled=True, tile_sample_size=TILE)
        assert post.mean.shape == (1, h, w, 4)
    assert _run._cache_size() == compiled


def test_bad_tile_size(vae):
    with pytest.raises(ValueError, match=r"tile_sample_size \(tile_sample_size = 12\)"):
        vae.decode(latents(1, 20, 20), tiled=True, tile_sample_size=12)


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "key-mask"])
def test_chunked_attention_equals_full(with_mask):
    key = jax.random.key(0)
    q, k, v = (jax.random.normal(kk, (2, 300, 2, 16)) for kk in jax.random.split(key, 3))
    mask = (jnp.arange(300) < 217)[None] if with_mask else None
    full = attention(q, k, v, implementation="xla", key_mask=mask)
    chunked = attention(q, k, v, implementation="chunked", query_chunk_size=64, key_mask=mask)
    err = max_err(chunked, full)
    assert err <= 1e-5, f"chunked vs full attention: max abs error {err:.3g} > 1e-5"
    if with_mask:  # masked keys change the result
        assert max_err(full, attention(q, k, v, implementation="xla")) > 1e-3


class _FakeGpu:
    def __init__(self, compute_capability: str):
        self.compute_capability = compute_capability


@pytest.mark.parametrize(
    "capability, head_dim, dtype, expected",
    [
        ("9.0", 64, jnp.bfloat16, "cudnn"),  # H100: the UNet's and CLIP's heads
        ("9.0", 256, jnp.float16, "cudnn"),
        ("9.0", 512, jnp.bfloat16, "xla"),  # the VAE's single 512-wide head
        ("9.0", 60, jnp.bfloat16, "xla"),  # not a multiple of 8
        ("9.0", 64, jnp.float32, "xla"),
        ("8.0", 128, jnp.bfloat16, "cudnn"),  # A100
        ("8.9", 256, jnp.bfloat16, "xla"),  # L4: 128 at most before Hopper
        ("7.5", 64, jnp.float16, "xla"),  # T4: no fused cuDNN attention
        ("gfx90a", 64, jnp.bfloat16, "xla"),  # a ROCm GPU
    ],
)
def test_cudnn_attention_only_where_the_gpu_takes_it(
    monkeypatch, capability, head_dim, dtype, expected
):
    """The automatic choice asks for cuDNN's fused attention only on GPUs and shapes it
    supports (jax.nn.dot_product_attention raises on the others)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [_FakeGpu(capability)])
    q = jax.ShapeDtypeStruct((2, 77, 4, head_dim), dtype)
    assert layers.choose_attention_implementation(q, q) == expected
    assert layers.choose_attention_implementation(q, q, masked=True) == "xla"


def test_vae_chunked_attention_equals_full(vae):
    z = latents(1, 12, 10)
    with attention_config("xla"):
        full = vae.decode(z)
    with attention_config("chunked", query_chunk_size=16):
        chunked = vae.decode(z)
    err = max_err(chunked, full)
    assert err <= 1e-5, f"VAE decode, chunked vs full attention: max abs error {err:.3g} > 1e-5"


def _largest_intermediate(jaxpr) -> int:
    """The most elements of any value computed in ``jaxpr``, sub-jaxprs included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(var.aval.shape)))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    biggest = max(biggest, _largest_intermediate(inner))
    return biggest


def test_large_latents_never_hold_the_full_score_matrix():
    """At 256x256 latents (65536 positions) the untiled decode chunks its attention."""
    config = AutoencoderKLConfig.tiny()
    graphdef, state = nnx.split(FlaxAutoencoderKL.abstract(config))
    z = jax.ShapeDtypeStruct((1, 256, 256, 4), jnp.float32)

    def largest() -> int:
        # a new function per trace: make_jaxpr caches per function, not per attention setting
        jaxpr = jax.make_jaxpr(lambda s, z: nnx.merge(graphdef, s).decode(z))(state, z)
        return _largest_intermediate(jaxpr.jaxpr)

    scores = 65536 * 65536
    q = jax.ShapeDtypeStruct((1, 65536, 1, 512), jnp.float32)
    assert layers.choose_attention_implementation(q, q) == "chunked"
    assert largest() < scores // 16
    with attention_config("xla"):  # the walk does see a full score matrix when there is one
        assert largest() >= scores


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def test_round_trip_bitwise(tmp_path, vae):
    vae.save_pretrained(tmp_path / "flax")
    assert sorted(os.listdir(tmp_path / "flax")) == ["config.json", "flax_model.safetensors"]
    again = FlaxAutoencoderKL.from_pretrained(str(tmp_path / "flax"))
    assert again.config == vae.config
    z, x = latents(1, 6, 4), pictures(1, 8, 12)
    np.testing.assert_array_equal(np.asarray(again.decode(z)), np.asarray(vae.decode(z)))
    np.testing.assert_array_equal(
        np.asarray(again.encode(x).logvar), np.asarray(vae.encode(x).logvar)
    )


def test_save_replaces_weights_and_config_together(tmp_path, vae, monkeypatch):
    """Saving over a saved model: when the config cannot be written, the old weights stay
    too, and when the weights cannot, the old config; no temporary file is left either way."""
    import safetensors.numpy

    import flax_latentup.models.base as base

    folder = tmp_path / "m"
    vae.save_pretrained(folder)
    before = {n: (folder / n).read_bytes() for n in os.listdir(folder)}
    other = FlaxAutoencoderKL(dataclasses.replace(vae.config, scaling_factor=0.5), rngs=nnx.Rngs(1))

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    for module, name in ((base.json, "dump"), (safetensors.numpy, "save_file")):
        with monkeypatch.context() as m:
            m.setattr(module, name, fail)
            with pytest.raises(OSError, match="No space left"):
                other.save_pretrained(folder)
        assert {n: (folder / n).read_bytes() for n in os.listdir(folder)} == before, name
    other.save_pretrained(folder)
    assert FlaxAutoencoderKL.from_pretrained(folder).config.scaling_factor == 0.5


def test_flax_save_refuses_a_folder_of_torch_weights(tmp_path, tiny_vae, vae):
    """diffusers would go on loading the torch weights of a folder that the Flax layout is
    saved into: refused before anything is written; the torch layout replaces them, and a
    variant goes beside them."""
    from diffusers import AutoencoderKL

    folder = shutil.copytree(tiny_vae[1], tmp_path / "torch")
    before = sorted(os.listdir(folder))
    with pytest.raises(FileExistsError, match=r"holds diffusion_pytorch_model\.safetensors, "):
        vae.save_pretrained(folder)
    assert sorted(os.listdir(folder)) == before
    vae.save_pretrained(folder, variant="bf16")
    assert "flax_model.bf16.safetensors" in os.listdir(folder)
    changed = FlaxAutoencoderKL(vae.config, rngs=nnx.Rngs(7))
    changed.save_pretrained(folder, torch_layout=True)
    theirs = AutoencoderKL.from_pretrained(folder).decoder.conv_out.bias.detach().numpy()
    np.testing.assert_array_equal(theirs, np.asarray(changed.decoder.conv_out.bias[...]))
    sharded = tmp_path / "sharded"
    tiny_vae[0].save_pretrained(sharded, max_shard_size="100KB")
    with pytest.raises(
        FileExistsError, match=r"holds diffusion_pytorch_model-00001-of-\d+\.safetensors, "
    ):
        vae.save_pretrained(sharded)


def test_config_json_reads_back_in_diffusers(tmp_path, tiny_vae, vae):
    from diffusers import AutoencoderKL

    vae.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        written = json.load(f)
    assert written["_class_name"] == "AutoencoderKL"
    reread = AutoencoderKL.from_config(written).config
    for key, value in tiny_vae[0].config.items():
        if not key.startswith("_"):
            want = list(value) if isinstance(value, tuple) else value
            got = list(reread[key]) if isinstance(reread[key], tuple) else reread[key]
            assert got == want, key


def _edited_copy(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return str(dst)


def test_float16_load_refuses_weights_beyond_its_range(tmp_path, tiny_vae):
    """Weights beyond float16's range would load as inf under param_dtype=float16: refused,
    naming them (a float32 load of the same folder is fine)."""
    key = "decoder.conv_out.bias"

    def edit(t):
        t[key] = t[key].copy()
        t[key][0] = 1e5

    folder = _edited_copy(tiny_vae[1], tmp_path / "big", edit)
    with pytest.raises(
        WeightsError, match=r"1 weight\(s\) hold .*inf: decoder\.conv_out\.bias; load"
    ):
        FlaxAutoencoderKL.from_pretrained(folder, dtype=jnp.float16, param_dtype=jnp.float16)
    vae = FlaxAutoencoderKL.from_pretrained(folder)
    assert float(vae.decoder.conv_out.bias[...][0]) == 1e5


def test_missing_key_named(tmp_path, tiny_vae):
    key = "decoder.up_blocks.1.resnets.0.conv_shortcut.bias"
    bad = _edited_copy(tiny_vae[1], tmp_path / "m", lambda t: t.pop(key))
    with pytest.raises(WeightsError, match=r"1 missing key\(s\): " + key.replace(".", r"\.") + "$"):
        FlaxAutoencoderKL.from_pretrained(bad)


@pytest.mark.parametrize("form", ["linear", "conv"])
def test_legacy_attention_keys(tmp_path, tiny_vae, vae, form):
    """query/key/value/proj_attn (diffusers < 0.14), also stored as 1x1 convolutions."""
    folder = helpers.save_vae(tiny_vae[0], str(tmp_path), legacy_attention=form)
    stored = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    assert stored["decoder.mid_block.attentions.0.proj_attn.weight"].ndim == (
        4 if form == "conv" else 2
    )
    assert not any(".to_q." in k for k in stored)
    old = FlaxAutoencoderKL.from_pretrained(folder)
    z, x = latents(1, 6, 6), pictures(1, 8, 8)
    np.testing.assert_array_equal(np.asarray(old.decode(z)), np.asarray(vae.decode(z)))
    np.testing.assert_array_equal(np.asarray(old.encode(x).mean), np.asarray(vae.encode(x).mean))


def test_unsupported_config_named(tmp_path, tiny_vae):
    shutil.copytree(tiny_vae[1], tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    config = json.loads(path.read_text())
    config["down_block_types"] = ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    path.write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match=r"`down_block_types` = 'AttnDownEncoderBlock2D' is not supported"
    ):
        FlaxAutoencoderKL.from_pretrained(str(tmp_path / "c"))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "`up_block_types`"),
        (dict(act_fn="relu"), "`act_fn` = 'relu'"),
        (dict(_class_name="AutoencoderTiny"), "`_class_name` = 'AutoencoderTiny'"),
        (dict(block_out_channels=[32, 64, 64]), "must have the same, non-zero length"),
        (dict(norm_num_groups=24), "not divisible by `norm_num_groups`"),
        (dict(latents_mean=[0.0, 1.0]), "`latents_mean` has 2 entries"),
    ],
)
def test_config_rejections(tiny_vae, change, match):
    config = dict(tiny_vae[0].config, **change)
    with pytest.raises(ConfigError, match=match):
        AutoencoderKLConfig.from_dict(config)


def test_config_fields_read(tiny_vae):
    config = dict(
        tiny_vae[0].config,
        shift_factor=0.1159,
        latents_mean=[0.1, 0.2, 0.3, 0.4],
        latents_std=[1.0, 2.0, 3.0, 4.0],
        force_upcast=False,
        scaling_factor=0.3611,
        sample_size=[64, 64],
    )
    cfg = AutoencoderKLConfig.from_dict(config)
    assert (cfg.shift_factor, cfg.scaling_factor, cfg.force_upcast) == (0.1159, 0.3611, False)
    assert cfg.latents_mean == (0.1, 0.2, 0.3, 0.4) and cfg.latents_std == (1.0, 2.0, 3.0, 4.0)
    assert cfg.sample_size == 64
    assert AutoencoderKLConfig.from_dict(cfg.to_dict()) == cfg
    assert AutoencoderKLConfig.from_dict(helpers.SD_KL_F8_VAE) == AutoencoderKLConfig.sd_kl_f8()
    assert AutoencoderKLConfig.sd_kl_f8().downsample_factor == 8


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def test_bad_inputs_fail_before_compiling(vae):
    compiled = _run._cache_size()
    nan_x = pictures(1, 8, 8)
    nan_x[0, 3, 3, 1] = np.nan
    inf_z = latents(1, 5, 5)
    inf_z[0, 1, 2, 3] = np.inf
    cases = [
        (lambda: vae.encode(pictures(1, 8, 8)[..., :2]), r"^x must have 3 channels"),
        (lambda: vae.encode(pictures(1, 8, 8).transpose(0, 3, 1, 2)), r"^x .*channels-first"),
        (lambda: vae.encode(pictures(1, 10, 7)), r"^x height and width must be multiples of 2"),
        (lambda: vae.encode(pictures(1, 8, 8)[0]), r"^x must be a 4-D array"),
        (
            lambda: vae.encode(np.zeros((1, 8, 8, 3), np.uint8)),
            r"^x must have a floating-point dtype, got uint8",
        ),
        (lambda: vae.encode(nan_x), r"^x contains NaN"),
        (lambda: vae.encode(jnp.asarray(nan_x), tiled=True), r"^x contains NaN"),
        (lambda: vae.decode(latents(1, 5, 5, c=3)), r"^z must have 4 channels"),
        (lambda: vae.decode(latents(1, 5, 5)[None]), r"^z must be a 4-D array"),
        (lambda: vae.decode(latents(0, 5, 5)), r"^z is empty"),
        (lambda: vae.decode(inf_z), r"^z contains NaN or infinite"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    assert _run._cache_size() == compiled


def test_runs_inside_jit(vae):
    """Under an outer jit the checks stay shape-only and the result is unchanged."""
    graphdef, state = nnx.split(vae)

    @jax.jit
    def round_trip(state, x):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode(x).mode())

    x = pictures(1, 8, 12)
    err = max_err(round_trip(state, x), vae.decode(vae.encode(x).mode()))
    assert err <= 1e-5, f"jit vs eager: max abs error {err:.3g}"

    @jax.jit
    def tiled_decode(state, z):  # the tiles are cut and blended with jnp under the trace
        return nnx.merge(graphdef, state).decode(z, tiled=True, tile_sample_size=TILE)

    z = latents(1, 13, 10)
    err = max_err(tiled_decode(state, z), vae.decode(z, tiled=True, tile_sample_size=TILE))
    assert err <= 1e-5, f"tiled decode, jit vs eager: max abs error {err:.3g}"


# --------------------------------------------------------------------------------------------
# Posterior and precision
# --------------------------------------------------------------------------------------------


def test_posterior():
    moments = jnp.asarray(latents(2, 3, 3, c=8))
    moments = moments.at[0, 0, 0, 4].set(100.0).at[0, 0, 1, 5].set(-100.0)
    post = DiagonalGaussianDistribution.from_moments(moments)
    assert float(post.logvar[0, 0, 0, 0]) == 20.0 and float(post.logvar[0, 0, 1, 1]) == -30.0
    np.testing.assert_array_equal(np.asarray(post.mode()), np.asarray(moments[..., :4]))
    np.testing.assert_allclose(np.asarray(post.std) ** 2, np.asarray(post.var), rtol=1e-6)
    key = jax.random.key(3)
    want = post.mean + post.std * jax.random.normal(key, (2, 3, 3, 4))
    np.testing.assert_array_equal(np.asarray(post.sample(key)), np.asarray(want))
    assert max_err(post.sample(jax.random.key(4)), want) > 0.1
    # one key per image: an image's draw does not depend on the batch around it
    keys = jax.random.split(key, 2)
    first = DiagonalGaussianDistribution(post.mean[:1], post.logvar[:1]).sample(keys[:1])
    np.testing.assert_array_equal(np.asarray(post.sample(keys)[:1]), np.asarray(first))
    with pytest.raises(ValueError, match="key holds 3 keys for a batch of 2"):
        post.sample(jax.random.split(key, 3))
    leaves = jax.tree.leaves(jax.jit(lambda p: p)(post))  # a pytree
    assert len(leaves) == 2


def test_posterior_kl_and_nll_match_diffusers():
    """``kl`` (to the standard normal or to another posterior) and ``nll`` per image equal
    diffusers' on the same moments (NCHW there); a key that is not a PRNG key is named."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Theirs

    moments, other_moments = latents(2, 3, 5, c=8), latents(2, 3, 5, c=8)
    sample = latents(2, 3, 5)
    ours = DiagonalGaussianDistribution.from_moments(jnp.asarray(moments))
    other = DiagonalGaussianDistribution.from_moments(jnp.asarray(other_moments))
    theirs = Theirs(torch.from_numpy(moments.transpose(0, 3, 1, 2)))
    theirs_other = Theirs(torch.from_numpy(other_moments.transpose(0, 3, 1, 2)))
    pairs = [
        (ours.kl(), theirs.kl()),
        (ours.kl(other), theirs.kl(theirs_other)),
        (ours.nll(sample), theirs.nll(torch.from_numpy(sample.transpose(0, 3, 1, 2)))),
    ]
    for got, want in pairs:
        assert got.shape == (2,)
        np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5)
    # the KL of a posterior to itself is 0
    np.testing.assert_allclose(np.asarray(ours.kl(ours)), 0.0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(ours.nll(sample, axis=(1, 2))).sum(-1), np.asarray(ours.nll(sample)), rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"sample has shape \(2, 3, 5, 3\)"):
        ours.nll(sample[..., :3])
    for bad in (0, np.zeros(3, np.uint32), jax.random.split(jax.random.key(0), (2, 2))):
        with pytest.raises(ValueError, match="key must be a JAX PRNG key"):
            ours.sample(bad)
    assert ours.sample(jax.random.PRNGKey(1)).shape == (2, 3, 5, 4)  # a raw key works too


def test_bfloat16_decode_close_to_float32(tiny_vae):
    z = latents(1, 12, 12)
    f32 = np.asarray(FlaxAutoencoderKL.from_pretrained(tiny_vae[1]).decode(z))
    bf16 = FlaxAutoencoderKL.from_pretrained(tiny_vae[1], dtype=jnp.bfloat16).decode(z)
    assert bf16.dtype == jnp.bfloat16
    err = max_err(bf16, f32) / float(np.max(np.abs(f32)))
    # bf16 keeps 8 mantissa bits (relative step 3.9e-3) through ~10 layers
    assert err <= 3e-2, f"bf16 decode: max abs error relative to the output's scale {err:.3g}"


def test_nonfinite_images(tiny_vae):
    pics = jnp.zeros((4, 4, 4, 3)).at[1, 2, 3, 0].set(jnp.inf).at[3, 0, 0, 2].set(jnp.nan)
    assert nonfinite_images(pics).tolist() == [False, True, False, True]
    # float16 overflows on huge latents; the same latents decode fine in float32
    z = latents(2, 6, 6)
    z[1] *= 1e5
    fp16 = FlaxAutoencoderKL.from_pretrained(tiny_vae[1], dtype=jnp.float16)
    assert nonfinite_images(fp16.decode(z)).tolist() == [False, True]
    f32 = FlaxAutoencoderKL.from_pretrained(tiny_vae[1])
    assert nonfinite_images(f32.decode(z)).tolist() == [False, False]

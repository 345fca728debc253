"""FlaxUNet2DConditionModel against diffusers' UNet2DConditionModel (K blocks) on the same
seeded weights, loaded through the public ``from_pretrained`` from real checkpoint folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from flax_latentup import ConfigError, FlaxUNet2DConditionModel, UNet2DConditionConfig, WeightsError
from flax_latentup.configs import AutoencoderKLConfig, CLIPTextConfig
from flax_latentup.models.conv import conv_config
from flax_latentup.models.layers import k_downsample_2d, k_upsample_2d
from flax_latentup.weights import WEIGHTS as CHECKPOINT_VARIABLES
from flax_latentup.weights import FixedParam, flat_params
from tests import helpers

WEIGHTS = "diffusion_pytorch_model.safetensors"
# Parameters of the published UNet, counted on diffusers' model.
SD_X2_PARAMS = 372_560_645


def to_flax(inputs: dict) -> dict:
    out = {k: jnp.asarray(v) for k, v in inputs.items()}
    out["sample"] = jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1))
    return out


def jitted(model: FlaxUNet2DConditionModel):
    """The model call jitted with the NNX state as an argument; returns (fn, state)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, sample, timestep, encoder_hidden_states, timestep_cond=None):
        return nnx.merge(graphdef, state)(sample, timestep, encoder_hidden_states, timestep_cond)

    return run, state


def max_err(got, ref) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float32) - ref)))


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    """(torch model, folder) of diffusers' fast-test UNet with seeded random weights."""
    model = helpers.make_unet(seed=0, **helpers.TINY_UNET)
    return model, helpers.save_unet(model, str(tmp_path_factory.mktemp("tiny_unet")))


@pytest.fixture(scope="module")
def small_unet(tmp_path_factory):
    model = helpers.make_unet(seed=10, **helpers.SMALL_UNET)
    return model, helpers.save_unet(model, str(tmp_path_factory.mktemp("small_unet")))


@pytest.fixture(scope="module")
def tiny_flax(tiny_unet):
    return FlaxUNet2DConditionModel.from_pretrained(tiny_unet[1])


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(16, 16), (16, 24)], ids=["16x16", "16x24"])
@pytest.mark.parametrize("which", ["tiny", "small"])
def test_small_config_parity(request, which, size):
    torch_model, folder = request.getfixturevalue(f"{which}_unet")
    config = helpers.TINY_UNET if which == "tiny" else helpers.SMALL_UNET
    inputs = helpers.unet_inputs(config, batch=2, height=size[0], width=size[1], seed=1)
    ref = helpers.torch_unet_output(torch_model, inputs)
    run, state = jitted(FlaxUNet2DConditionModel.from_pretrained(folder))
    got = run(state, **to_flax(inputs))
    assert got.shape == ref.shape == (2, *size, config["out_channels"])
    err = max_err(got, ref)
    assert err <= 1e-4, (
        f"{which} {size}: max abs error {err:.3g} > 1e-4 (output scale {np.abs(ref).max():.3g})"
    )


@pytest.mark.parametrize("implementation", ["fast", "xla"])
def test_parity_with_each_convolution_implementation(tiny_unet, implementation):
    """Winograd / product forms forced on (whatever the channel counts), and XLA's own
    convolutions forced on: both match diffusers."""
    torch_model, folder = tiny_unet
    inputs = helpers.unet_inputs(helpers.TINY_UNET, batch=2, height=16, width=24, seed=4)
    ref = helpers.torch_unet_output(torch_model, inputs)
    with conv_config(implementation):
        run, state = jitted(FlaxUNet2DConditionModel.from_pretrained(folder))
        got = run(state, **to_flax(inputs))
    err = max_err(got, ref)
    assert err <= 1e-4, f"{implementation}: max abs error {err:.3g} > 1e-4"


def test_scalar_timestep_broadcasts(tiny_unet, tiny_flax):
    """A scalar or [1] timestep is used for every row, as diffusers expands it."""
    inputs = helpers.unet_inputs(helpers.TINY_UNET, batch=2, height=16, width=16, seed=2)
    x = to_flax(inputs)
    per_row = tiny_flax(**dict(x, timestep=jnp.full((2,), 0.3, jnp.float32)))
    for t in (0.3, jnp.float32(0.3), jnp.asarray([0.3], jnp.float32)):
        np.testing.assert_array_equal(
            np.asarray(tiny_flax(**dict(x, timestep=t))), np.asarray(per_row)
        )
    ref = helpers.torch_unet_output(tiny_unet[0], dict(inputs, timestep=np.float32([0.3, 0.3])))
    assert max_err(per_row, ref) <= 1e-4


@pytest.fixture(scope="module")
def sd_x2_unet(tmp_path_factory):
    """The published config with random weights: saved once, with diffusers' reference output.

    The folder's config.json uses the older key ``timestep_act_2`` (read as
    ``timestep_post_act``). The torch model is dropped once its output is computed.
    """
    model = helpers.make_unet(seed=20, **helpers.SD_X2_UNET)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    folder = helpers.save_unet(model, str(tmp_path_factory.mktemp("sd_x2_unet")))
    cfg_path = os.path.join(folder, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["timestep_act_2"] = cfg.pop("timestep_post_act")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    inputs = helpers.unet_inputs(
        helpers.SD_X2_UNET, batch=1, height=16, width=16, seed=3, length=77
    )
    ref = helpers.torch_unet_output(model, inputs)
    del model
    return {
        "folder": folder,
        "n_params": n_params,
        "n_trainable": n_trainable,
        "inputs": inputs,
        "ref": ref,
    }


@pytest.mark.heavy
@pytest.mark.slow
def test_sd_x2_config_parity(sd_x2_unet):
    assert sd_x2_unet["n_params"] == SD_X2_PARAMS
    model = FlaxUNet2DConditionModel.from_pretrained(sd_x2_unet["folder"])
    assert model.config == UNet2DConditionConfig.sd_x2_latent_upscaler()
    n = sum(v.size for v in jax.tree.leaves(nnx.state(model, CHECKPOINT_VARIABLES)))
    assert n == SD_X2_PARAMS, f"{n} parameters, diffusers has {SD_X2_PARAMS}"
    # the trainable ones are diffusers' too: all but the fixed Fourier vector
    trainable = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert trainable == sd_x2_unet["n_trainable"] < n, (trainable, sd_x2_unet["n_trainable"])
    ref = sd_x2_unet["ref"]
    got = model(**to_flax(sd_x2_unet["inputs"]))
    err = max_err(got, ref)
    rel = err / float(np.abs(ref).max())
    print(f"sd-x2 UNet 16x16: max abs error {err:.3g}, relative to the output's scale {rel:.3g}")
    assert rel <= 1e-3, f"max abs error relative to the output's scale {rel:.3g} > 1e-3"


_MEASURE_LOAD = textwrap.dedent(
    """
    import json, resource, sys, threading, time
    import jax
    from flax import nnx
    from flax_latentup import FlaxUNet2DConditionModel

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024

    peak_anon, done = [status("RssAnon")], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon.append(status("RssAnon"))
            time.sleep(0.002)

    base_anon, base_hwm = status("RssAnon"), status("VmHWM")
    thread = threading.Thread(target=sample)
    thread.start()
    model = FlaxUNet2DConditionModel.from_pretrained(sys.argv[1])
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    done.set()
    thread.join()
    peak_anon.append(status("RssAnon"))
    param_bytes = sum(v.nbytes for v in jax.tree.leaves(nnx.state(model)))
    print(json.dumps(dict(
        param_bytes=param_bytes,
        anon=max(peak_anon) - base_anon,
        hwm=status("VmHWM") - base_hwm,
    )))
    """
)


@pytest.mark.slow
def test_sd_x2_load_memory(sd_x2_unet):
    """Loading builds the model abstractly and reads one tensor at a time: the process's
    private memory grows by about one copy of the weights. (The safetensors file is
    memory-mapped while it is read, so the resident-set high-water mark also counts the
    file's pages, which the kernel can drop: it is reported, bounded more loosely.)"""
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE_LOAD, sd_x2_unet["folder"]],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    gb = {k: v / 2**30 for k, v in m.items()}
    msg = (
        f"weights {gb['param_bytes']:.2f} GiB; load raised private (anonymous) memory by "
        f"{gb['anon']:.2f} GiB and the RSS high-water mark by {gb['hwm']:.2f} GiB"
    )
    print(msg)
    assert m["anon"] <= 1.15 * m["param_bytes"] + 200 * 2**20, msg
    assert m["hwm"] <= 2.15 * m["param_bytes"] + 200 * 2**20, msg


# --------------------------------------------------------------------------------------------
# Precision and jit
# --------------------------------------------------------------------------------------------


def test_bfloat16_close_to_float32(tiny_unet):
    _, folder = tiny_unet
    x = to_flax(helpers.unet_inputs(helpers.TINY_UNET, batch=2, height=16, width=24, seed=4))
    run32, state32 = jitted(FlaxUNet2DConditionModel.from_pretrained(folder))
    bf16 = FlaxUNet2DConditionModel.from_pretrained(folder, dtype=jnp.bfloat16)
    run16, state16 = jitted(bf16)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(bf16)))
    a = np.asarray(run32(state32, **x))
    b = run16(state16, **x)
    assert b.dtype == jnp.bfloat16
    rel = max_err(b, a) / float(np.abs(a).max())
    # bf16 keeps 8 mantissa bits (relative step 2^-8 = 3.9e-3) through ~40 layers.
    assert rel <= 3e-2, f"bf16 max abs error relative to the output's scale {rel:.3g} > 3e-2"


def test_jit_does_not_recompile(tiny_flax):
    run, state = jitted(tiny_flax)
    x = to_flax(helpers.unet_inputs(helpers.TINY_UNET, batch=2, height=16, width=16, seed=5))
    y = to_flax(helpers.unet_inputs(helpers.TINY_UNET, batch=2, height=16, width=16, seed=6))
    first = run(state, **x)
    assert run._cache_size() == 1
    # new timesteps, text and condition (same shapes): the same program runs
    second = run(state, **dict(y, sample=x["sample"]))
    assert run._cache_size() == 1
    assert max_err(second, np.asarray(first)) > 1e-3


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit,match",
    [
        (dict(sample=jnp.zeros((2, 16, 16, 4))), r"sample has 4 channels .* in_channels=8"),
        (dict(sample=jnp.zeros((2, 8, 16, 16))), r"sample has 16 channels"),
        (dict(sample=jnp.zeros((2, 16, 16))), r"sample must be an array \[batch, height"),
        (dict(sample=jnp.zeros((2, 16, 20, 8))), r"sample height and width must be multiples of 8"),
        (dict(sample=jnp.zeros((2, 12, 16, 8))), r"sample height and width .* got 12x16"),
        (dict(sample=jnp.zeros((2, 8, 8, 8))), r"sample height and width .* at least 16"),
        (dict(timestep=jnp.zeros((3,))), r"timestep must be a scalar or have shape \[batch\]"),
        (
            dict(encoder_hidden_states=jnp.zeros((1, 7, 32))),
            r"encoder_hidden_states has batch size 1, sample has 2",
        ),
        (
            dict(encoder_hidden_states=jnp.zeros((2, 7, 24))),
            r"encoder_hidden_states has width 24, .* cross_attention_dim=32",
        ),
        (dict(encoder_hidden_states=jnp.zeros((2, 32))), r"encoder_hidden_states must be an array"),
        (dict(timestep_cond=jnp.zeros((1, 160))), r"timestep_cond has batch size 1, sample has 2"),
        (
            dict(timestep_cond=jnp.zeros((2, 128))),
            r"timestep_cond has width 128, .* time_cond_proj_dim=160",
        ),
        (dict(sample=jnp.zeros((2, 16, 16, 8), jnp.int32)), r"sample must have a floating"),
        (
            dict(encoder_hidden_states=jnp.zeros((2, 7, 32), bool)),
            r"encoder_hidden_states must have a floating-point dtype, got bool",
        ),
        (dict(timestep_cond=jnp.zeros((2, 160), jnp.complex64)), r"timestep_cond must have a"),
        (dict(timestep=jnp.zeros((2,), bool)), r"timestep must have a numeric dtype, got bool"),
    ],
)
def test_bad_inputs_named(tiny_flax, edit, match):
    x = dict(to_flax(helpers.unet_inputs(helpers.TINY_UNET, 2, 16, 16)), **edit)
    with pytest.raises(ValueError, match=match):
        tiny_flax(**x)
    run, state = jitted(tiny_flax)
    with pytest.raises(ValueError, match=match):  # at trace time, before anything compiles
        run(state, **x)


def test_torch_tensors_and_text_are_named(tiny_flax, tiny_unet, tmp_path):
    """The Flax modules take numpy or JAX arrays: a torch tensor (which the pipeline takes,
    NCHW) is named as such by the UNet, the VAE and the text encoder, a timestep given as text
    too, before anything is traced."""
    import torch

    from flax_latentup import FlaxAutoencoderKL, FlaxCLIPTextModel

    x = to_flax(helpers.unet_inputs(helpers.TINY_UNET, 2, 16, 16))
    as_torch = torch.from_numpy(np.asarray(x["sample"]))
    with pytest.raises(ValueError, match=r"^sample is a torch tensor: .* channels last"):
        tiny_flax(**dict(x, sample=as_torch))
    with pytest.raises(ValueError, match=r"^timestep must have a numeric dtype, got <U3"):
        tiny_flax(**dict(x, timestep="0.1"))
    vae = FlaxAutoencoderKL.abstract(AutoencoderKLConfig.tiny())
    with pytest.raises(ValueError, match=r"^z is a torch tensor"):
        vae.decode(torch.zeros(1, 8, 8, 4))
    clip = FlaxCLIPTextModel.abstract(CLIPTextConfig.tiny())
    with pytest.raises(ValueError, match=r"^input_ids is a torch tensor: .* \(e.g. input_ids"):
        clip(torch.zeros(1, 7, dtype=torch.int64))


def test_direct_construction_checks_its_arguments():
    """Building a model directly names a config of another kind (a config.json dict) and a
    dtype that is not float32, bfloat16 or float16, before any weight is made."""
    from flax_latentup import FlaxAutoencoderKL, FlaxCLIPTextModel

    rngs = nnx.Rngs(0)
    with pytest.raises(
        TypeError, match=r"^config must be of type UNet2DConditionConfig \(build one"
    ):
        FlaxUNet2DConditionModel(helpers.TINY_UNET, rngs=rngs)
    with pytest.raises(
        TypeError, match=r"^config must be of type AutoencoderKLConfig, got CLIPText"
    ):
        FlaxAutoencoderKL(CLIPTextConfig.tiny(), rngs=rngs)
    with pytest.raises(TypeError, match=r"^dtype must be float32, bfloat16 or float16, got int8"):
        FlaxAutoencoderKL(AutoencoderKLConfig.tiny(), rngs=rngs, dtype=jnp.int8)
    with pytest.raises(TypeError, match=r"^param_dtype must be float32, bfloat16 or float16"):
        FlaxCLIPTextModel(CLIPTextConfig.tiny(), rngs=rngs, param_dtype="int32")
    model = FlaxCLIPTextModel(CLIPTextConfig.tiny(), rngs=rngs, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_abstract_models_are_the_models_built_with_rngs(dtype):
    """``abstract`` (what loading fills) has the graph (modules and variable types), shapes and
    dtypes of the model built with a real ``nnx.Rngs``, for each of the three models."""
    from flax_latentup import FlaxAutoencoderKL, FlaxCLIPTextModel

    def shapes(state):
        return [(v.shape, v.dtype) for v in jax.tree.leaves(state)]

    for cls, config in [
        (FlaxUNet2DConditionModel, UNet2DConditionConfig.from_dict(helpers.SMALL_UNET)),
        (FlaxAutoencoderKL, AutoencoderKLConfig.tiny()),
        (FlaxCLIPTextModel, CLIPTextConfig.tiny()),
    ]:
        kw = dict(dtype=dtype, param_dtype=dtype)
        graph, state = nnx.split(cls.abstract(config, **kw))
        want_graph, want_state = nnx.split(cls(config, rngs=nnx.Rngs(0), **kw))
        assert graph == want_graph, cls.__name__
        assert jax.tree.structure(state) == jax.tree.structure(want_state), cls.__name__
        assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(state))
        assert shapes(state) == shapes(want_state), cls.__name__


def test_timestep_cond_without_projection(small_unet):
    model = FlaxUNet2DConditionModel.abstract(
        UNet2DConditionConfig.from_dict(dict(small_unet[0].config, time_cond_proj_dim=None))
    )
    x = to_flax(helpers.unet_inputs(helpers.SMALL_UNET, 1, 16, 16))
    with pytest.raises(ValueError, match="timestep_cond was given but the model has no"):
        model(**x)


@pytest.mark.parametrize("size", [(8, 8), (12, 16), (16, 20)])
def test_sizes_diffusers_cannot_run(tiny_unet, tiny_flax, size):
    """Sizes the check rejects also fail inside diffusers (reflect padding of a 1-pixel map,
    or up-sampled maps that no longer match their skips)."""
    inputs = helpers.unet_inputs(helpers.TINY_UNET, batch=1, height=size[0], width=size[1])
    with pytest.raises(RuntimeError):
        helpers.torch_unet_output(tiny_unet[0], inputs)
    with pytest.raises(ValueError, match="sample height and width"):
        tiny_flax(**to_flax(inputs))


# --------------------------------------------------------------------------------------------
# Resamplers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(2, 2), (4, 6), (16, 24), (5, 7), (3, 3)])
def test_k_resamplers_match_diffusers(size):
    from diffusers.models.downsampling import KDownsample2D
    from diffusers.models.upsampling import KUpsample2D

    x = np.random.RandomState(0).randn(2, 5, *size).astype(np.float32)
    for torch_op, op in ((KDownsample2D(), k_downsample_2d), (KUpsample2D(), k_upsample_2d)):
        with torch.no_grad():
            ref = torch_op(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
        got = op(jnp.asarray(x.transpose(0, 2, 3, 1)))
        assert got.shape == ref.shape
        assert max_err(got, ref) <= 1e-6, type(torch_op).__name__


def test_k_resamplers_are_per_channel():
    """Each output channel depends on its own input channel only."""
    x = jnp.zeros((1, 4, 4, 3)).at[..., 1].set(1.0)
    for op in (k_downsample_2d, k_upsample_2d):
        y = np.asarray(op(x))
        assert np.all(y[..., 0] == 0) and np.all(y[..., 2] == 0) and np.allclose(y[..., 1], 1.0)
    with pytest.raises(ValueError, match="at least 2x2"):
        k_upsample_2d(jnp.zeros((1, 1, 4, 3)))


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("mid_block_type", "UNetMidBlock2DCrossAttn", "`mid_block_type`"),
        ("norm_num_groups", 32, "`norm_num_groups` = 32"),
        ("time_embedding_type", "positional", "`time_embedding_type` = 'positional'"),
        ("class_embed_type", "timestep", "`class_embed_type`"),
        ("num_class_embeds", 10, "`num_class_embeds`"),
        ("addition_embed_type", "text", "`addition_embed_type`"),
        ("encoder_hid_dim", 16, "`encoder_hid_dim`"),
        ("attention_type", "gated", "`attention_type`"),
        ("act_fn", "tanh", "`act_fn` = 'tanh'"),
        ("timestep_post_act", "tanh", "`timestep_post_act` = 'tanh'"),
        ("layers_per_block", [2, 2, 1, 2], "`layers_per_block`"),
        ("cross_attention_dim", [32, 32, 16, 32], "`cross_attention_dim`"),
        ("conv_in_kernel", 2, "`conv_in_kernel` = 2"),
        ("attention_head_dim", [8, 8], "`attention_head_dim`"),
        (
            "down_block_types",
            [
                "KDownBlock2D",
                "CrossAttnDownBlock2D",
                "KCrossAttnDownBlock2D",
                "KCrossAttnDownBlock2D",
            ],
            "`down_block_types` = 'CrossAttnDownBlock2D'",
        ),
        (
            "up_block_types",
            ["KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "UpBlock2D"],
            "`up_block_types` = 'UpBlock2D'",
        ),
        ("_class_name", "UNet2DModel", "`_class_name`"),
    ],
)
def test_unsupported_config_named(tiny_unet, key, value, match):
    cfg = dict(tiny_unet[0].config, _class_name="UNet2DConditionModel")
    cfg[key] = value
    with pytest.raises(ConfigError, match=match):
        UNet2DConditionConfig.from_dict(cfg)


def test_missing_keys_take_diffusers_defaults(tiny_unet):
    cfg = dict(tiny_unet[0].config)
    del cfg["time_embedding_type"]  # diffusers' default is "positional"
    with pytest.raises(ConfigError, match="`time_embedding_type` = 'positional'"):
        UNet2DConditionConfig.from_dict(cfg)
    cfg = dict(tiny_unet[0].config)
    del cfg["mid_block_type"]  # diffusers' default builds a mid block
    with pytest.raises(ConfigError, match="`mid_block_type` = 'UNetMidBlock2DCrossAttn'"):
        UNet2DConditionConfig.from_dict(cfg)


def test_timestep_act_2_spelling(tiny_unet):
    cfg = dict(tiny_unet[0].config)
    cfg["timestep_act_2"] = cfg.pop("timestep_post_act")
    assert UNet2DConditionConfig.from_dict(cfg).timestep_post_act == "gelu"
    cfg["timestep_post_act"] = "silu"
    with pytest.raises(ConfigError, match="`timestep_act_2` = 'gelu' disagree"):
        UNet2DConditionConfig.from_dict(cfg)


def test_config_diffusers_builds_but_cannot_run_is_rejected():
    """With block_out_channels [32, 64, 64, 64], diffusers takes up block 1 for the "first"
    up block (in == out == time-embedding width) and builds it without room for its skip."""
    config = dict(helpers.TINY_UNET, block_out_channels=[32, 64, 64, 64])
    model = helpers.make_unet(seed=0, **config)
    with pytest.raises(RuntimeError):
        helpers.torch_unet_output(model, helpers.unet_inputs(config, 1, 16, 16))
    with pytest.raises(ConfigError, match="up block 1 .* receives 128"):
        UNet2DConditionConfig.from_dict(model.config)


def test_presets():
    assert UNet2DConditionConfig.tiny() == UNet2DConditionConfig.from_dict(helpers.TINY_UNET)
    assert UNet2DConditionConfig.sd_x2_latent_upscaler() == UNet2DConditionConfig.from_dict(
        helpers.SD_X2_UNET
    )


@pytest.mark.parametrize("which", ["TINY_UNET", "SMALL_UNET"])
def test_to_dict_read_back_by_diffusers(tmp_path, which):
    """diffusers builds, from ``to_dict()``, a model whose checkpoint loads strictly."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionConfig.from_dict(getattr(helpers, which))
    torch_model = UNet2DConditionModel.from_config(config.to_dict())
    assert UNet2DConditionConfig.from_dict(torch_model.config) == config
    helpers.save_unet(torch_model, str(tmp_path))
    FlaxUNet2DConditionModel.from_pretrained(str(tmp_path))


def test_fourier_vector_is_fixed_in_training(tiny_unet):
    """The Fourier projection's random vector is loaded from the checkpoint but not trained, as
    in diffusers (requires_grad=False): an optimizer step over nnx.Param leaves it as loaded,
    and diffusers freezes it alone."""
    import optax

    torch_model, folder = tiny_unet
    model = FlaxUNet2DConditionModel.from_pretrained(folder)
    assert isinstance(model.time_proj.weight, FixedParam)
    want = torch_model.time_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.time_proj.weight[...]), want)
    x = to_flax(helpers.unet_inputs(helpers.TINY_UNET, batch=1, height=16, width=16, seed=2))
    before = {k: np.asarray(v) for k, v in flat_params(model).items()}
    optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(**x) ** 2))(model))
    after = {k: np.asarray(v) for k, v in flat_params(model).items()}
    unchanged = {k for k in before if np.array_equal(before[k], after[k])}
    # besides it, only the key biases, whose gradient is 0 (softmax ignores a shift of all
    # of a query's scores)
    assert "time_proj.weight" in unchanged
    assert all(k.endswith(".to_k.bias") for k in unchanged - {"time_proj.weight"}), unchanged
    frozen = [n for n, p in torch_model.named_parameters() if not p.requires_grad]
    assert frozen == ["time_proj.weight"]


def test_round_trip_bitwise(tmp_path, tiny_flax):
    tiny_flax.save_pretrained(tmp_path / "flax")
    assert sorted(os.listdir(tmp_path / "flax")) == ["config.json", "flax_model.safetensors"]
    again = FlaxUNet2DConditionModel.from_pretrained(str(tmp_path / "flax"))
    assert again.config == tiny_flax.config
    a = jax.tree.leaves(nnx.state(tiny_flax))
    b = jax.tree.leaves(nnx.state(again))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------------------------
# Strict loading
# --------------------------------------------------------------------------------------------


def _edited_copy(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    return str(dst)


def test_checkpoint_mismatches_named(tmp_path, tiny_unet):
    _, folder = tiny_unet

    def edit(t):
        t.pop("up_blocks.0.attentions.1.attn2.norm_cross.bias")
        t["down_blocks.1.attentions.0.attn2.extra.weight"] = np.zeros(3, np.float32)
        t["time_proj.weight"] = np.zeros(31, np.float32)

    bad = _edited_copy(folder, tmp_path / "bad", edit)
    with pytest.raises(WeightsError) as info:
        FlaxUNet2DConditionModel.from_pretrained(bad)
    msg = str(info.value)
    assert "missing key(s): up_blocks.0.attentions.1.attn2.norm_cross.bias" in msg
    assert "unexpected key(s): down_blocks.1.attentions.0.attn2.extra.weight" in msg
    assert "shape mismatch for 'time_proj.weight'" in msg


def test_resampler_buffers_ignored(tmp_path, tiny_unet, tiny_flax):
    """Checkpoints that store the resamplers' fixed kernels load; the kernels carry nothing."""
    _, folder = tiny_unet
    kernel = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float32) / 64

    def add(t):
        for i in range(3):
            t[f"down_blocks.{i}.downsamplers.0.kernel"] = kernel
            t[f"up_blocks.{i}.upsamplers.0.kernel"] = 4 * kernel

    model = FlaxUNet2DConditionModel.from_pretrained(_edited_copy(folder, tmp_path / "k", add))
    for x, y in zip(
        jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(tiny_flax)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

"""Gradients of the Flax models against torch autograd on the same seeded weights and inputs.

Each test builds a scalar loss ``sum(W * output)`` with fixed random ``W`` on both sides and
compares the gradient of every parameter, mapped from torch to the NNX layout by the rule
table of :mod:`flax_latentup.weights`. The error reported and bounded is, per parameter,
``||g_jax - g_torch||_2 / ||g_torch||_2``, maximised over parameters (float32, CPU).
Rematerialised models (``set_remat(True)``) must give the same gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from flax_latentup import FlaxAutoencoderKL, FlaxCLIPTextModel, FlaxUNet2DConditionModel
from flax_latentup.weights import torch_key
from tests import helpers

RTOL = 1e-4
# A key-projection bias adds the same amount to every score of a query: softmax cancels it, so
# its exact gradient is zero and both sides hold rounding noise. Those are checked against the
# largest parameter gradient instead.
ZERO_GRAD_SUFFIXES = ("to_k.bias", "k_proj.bias")


def torch_grads(model: torch.nn.Module, rename=lambda k: k) -> dict[str, np.ndarray]:
    return {
        rename(name): p.grad.detach().numpy().copy()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def flat_grads(grads: nnx.State) -> dict[str, np.ndarray]:
    """NNX gradients keyed by the torch key of their parameter, in the NNX layout."""
    out = {}
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g[...] if isinstance(g, nnx.Variable) else g)
        out[torch_key(path, g.ndim)[0]] = g
    return out


def relative_errors(grads: nnx.State, ref: dict[str, np.ndarray]) -> dict[str, float]:
    """``||g_jax - g_torch|| / ||g_torch||`` per parameter; every torch gradient is used once."""
    errors = {}
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g[...] if isinstance(g, nnx.Variable) else g)
        key, rule = torch_key(path, g.ndim)
        want = ref[key] if rule is None else rule.to_flax(ref[key])
        assert g.shape == want.shape, key
        errors[key] = float(np.linalg.norm(g - want)) / max(float(np.linalg.norm(want)), 1e-30)
    assert set(errors) == set(ref), f"unmatched: {set(ref) ^ set(errors)}"
    return errors


def param_grad(model: nnx.Module, loss, *args):
    """``jax.grad`` of ``loss(model, *args)`` w.r.t. the model's parameters and ``args``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, *args):
        def f(params, *args):
            return loss(nnx.merge(graphdef, params, rest), *args)

        return jax.grad(f, argnums=tuple(range(len(args) + 1)))(params, *args)

    return run(params, *args)


def assert_close_grads(grads, ref, name):
    errors = relative_errors(grads, ref)
    largest = max(float(np.linalg.norm(g)) for g in ref.values())
    for key in [k for k in errors if k.endswith(ZERO_GRAD_SUFFIXES)]:
        assert np.linalg.norm(ref[key]) < 1e-5 * largest, key
        del errors[key]
    mine = flat_grads(grads)
    for key in ref:
        if key.endswith(ZERO_GRAD_SUFFIXES):
            assert np.linalg.norm(mine[key]) < 1e-5 * largest, key
    worst = max(errors, key=errors.get)
    print(f"{name}: {len(errors)} parameters, max relative L2 error {errors[worst]:.2e} ({worst})")
    assert errors[worst] < RTOL, f"{name}: {worst} relative error {errors[worst]:.2e}"
    return errors


def assert_same_grads(a, b, rtol=1e-5):
    """Leaf by leaf within ``rtol`` relative (rounding noise of zero gradients aside)."""
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    floor = 1e-3 * max(float(np.linalg.norm(y)) for y in b)
    for x, y in zip(a, b, strict=True):
        diff = float(np.linalg.norm(np.asarray(x) - np.asarray(y)))
        assert diff <= rtol * max(float(np.linalg.norm(y)), floor)


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet_pair(tmp_path_factory):
    model = helpers.make_unet(seed=3, **helpers.PIPE_UNET)
    folder = helpers.save_unet(model, str(tmp_path_factory.mktemp("grad_unet")))
    return model, FlaxUNet2DConditionModel.from_pretrained(folder)


def _unet_loss(weight):
    def loss(model, sample, timestep, context, cond):
        return jnp.sum(model(sample, timestep, context, cond) * weight)

    return loss


def test_unet_gradients_match_torch(unet_pair):
    torch_model, flax_model = unet_pair
    inputs = helpers.unet_inputs(helpers.PIPE_UNET, batch=2, height=16, width=16, seed=5)
    weight = np.random.RandomState(6).randn(2, 16, 16, helpers.PIPE_UNET["out_channels"])
    weight = weight.astype(np.float32)

    # the Fourier weight is frozen in diffusers (no gradient) and a FixedParam here (not in
    # the nnx.Param split): both sides differentiate the same parameters
    torch_model.zero_grad()
    sample = torch.from_numpy(inputs["sample"]).requires_grad_(True)
    out = torch_model(
        sample,
        torch.from_numpy(inputs["timestep"]),
        torch.from_numpy(inputs["encoder_hidden_states"]),
        timestep_cond=torch.from_numpy(inputs["timestep_cond"]),
    ).sample
    (out * torch.from_numpy(weight.transpose(0, 3, 1, 2))).sum().backward()
    ref = torch_grads(torch_model)

    args = (
        jnp.asarray(inputs["sample"].transpose(0, 2, 3, 1)),
        jnp.asarray(inputs["timestep"]),
        jnp.asarray(inputs["encoder_hidden_states"]),
        jnp.asarray(inputs["timestep_cond"]),
    )
    loss = _unet_loss(jnp.asarray(weight))
    grads = param_grad(flax_model, loss, *args)
    assert_close_grads(grads[0], ref, "unet")
    g_sample = np.asarray(grads[1]).transpose(0, 3, 1, 2)
    want = sample.grad.numpy()
    assert np.linalg.norm(g_sample - want) < RTOL * np.linalg.norm(want)

    flax_model.set_remat(True)
    try:
        remat_grads = param_grad(flax_model, loss, *args)
    finally:
        flax_model.set_remat(False)
    assert_same_grads(remat_grads, grads)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------


def test_vae_gradients_match_torch(tiny_vae):
    torch_model, folder = tiny_vae
    flax_model = FlaxAutoencoderKL.from_pretrained(folder)
    rng = np.random.RandomState(7)
    x = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    z = rng.randn(2, 4, 8, 8).astype(np.float32)
    w_pix = rng.randn(2, 16, 16, 3).astype(np.float32)
    w_mean, w_logvar = rng.randn(2, 2, 8, 8, 4).astype(np.float32)

    torch_model.zero_grad()
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    dist = torch_model.encode(torch.from_numpy(x)).latent_dist
    pixels = torch_model.decode(torch.from_numpy(z)).sample
    loss = (pixels * t(w_pix)).sum() + (dist.mean * t(w_mean)).sum()
    (loss + (dist.logvar * t(w_logvar)).sum()).backward()
    ref = torch_grads(torch_model)
    for p in torch_model.parameters():
        p.grad = None

    def jloss(model, x, z):
        post = model.encode(x)
        total = jnp.sum(model.decode(z) * w_pix) + jnp.sum(post.mean * w_mean)
        return total + jnp.sum(post.logvar * w_logvar)

    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(z.transpose(0, 2, 3, 1)))
    grads = param_grad(flax_model, jloss, *args)
    assert_close_grads(grads[0], ref, "vae")

    flax_model.set_remat(True)
    assert_same_grads(param_grad(flax_model, jloss, *args), grads)


# --------------------------------------------------------------------------------------------
# CLIP text encoder
# --------------------------------------------------------------------------------------------


def test_clip_gradients_match_torch(tiny_clip):
    torch_model, folder = tiny_clip
    flax_model = FlaxCLIPTextModel.from_pretrained(folder)
    rng = np.random.RandomState(8)
    ids = rng.randint(2, helpers.TINY_CLIP["vocab_size"] - 1, (2, 12)).astype(np.int64)
    ids[:, 0] = 0
    ids[0, 7] = ids[1, 11] = helpers.TINY_CLIP["vocab_size"] - 1  # the pooled (argmax) tokens
    d = helpers.TINY_CLIP["hidden_size"]
    w_last, w_ctx = rng.randn(2, 2, 12, d).astype(np.float32)
    w_pool = rng.randn(2, d).astype(np.float32)

    torch_model.zero_grad()
    out = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    loss = (out.last_hidden_state * torch.from_numpy(w_last)).sum()
    loss = loss + (out.hidden_states[-1] * torch.from_numpy(w_ctx)).sum()
    (loss + (out.pooler_output * torch.from_numpy(w_pool)).sum()).backward()
    ref = torch_grads(torch_model, FlaxCLIPTextModel.key_map.rename)
    for p in torch_model.parameters():
        p.grad = None

    def jloss(model, ids):
        o = model(ids)
        total = jnp.sum(o.last_hidden_state * w_last) + jnp.sum(o.hidden_states[-1] * w_ctx)
        return total + jnp.sum(o.pooler_output * w_pool)

    ids_j = jnp.asarray(ids.astype(np.int32))
    graphdef, params, rest = nnx.split(flax_model, nnx.Param, ...)

    def grad_of(graphdef):
        return jax.jit(jax.grad(lambda p: jloss(nnx.merge(graphdef, p, rest), ids_j)))(params)

    grads = grad_of(graphdef)
    assert_close_grads(grads, ref, "clip")

    flax_model.set_remat(True)
    assert_same_grads(grad_of(nnx.graphdef(flax_model)), grads)

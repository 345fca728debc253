"""The rewritten convolutions (Winograd 3x3, 1x1 as a product, polyphase upsample+conv)
against XLA's own convolution, and the rules that choose them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_latentup.models import conv as C

NHWC = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, k, stride=1, padding=((1, 1), (1, 1))):
    return jax.lax.conv_general_dilated(
        x, k, (stride, stride), padding, dimension_numbers=NHWC, precision="highest"
    )


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def arrays(shape_x, shape_k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape_x, dtype=np.float32)
    k = rng.standard_normal(shape_k, dtype=np.float32) / np.sqrt(np.prod(shape_k[:-1]))
    return jnp.asarray(x), jnp.asarray(k)


def primitives(fn, *args) -> set[str]:
    """The primitives of a fresh trace of ``fn`` (a new function object each time, so no
    cached trace hides a changed setting)."""
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args)
    return {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}


@pytest.mark.parametrize(
    "n,h,w,c,o",
    [(1, 8, 8, 16, 24), (2, 5, 7, 8, 8), (3, 16, 24, 32, 16), (1, 1, 1, 4, 4), (1, 2, 3, 4, 5)],
)
def test_winograd_equals_direct_convolution(n, h, w, c, o):
    x, k = arrays((n, h, w, c), (3, 3, c, o))
    got = jax.jit(C.winograd_conv3x3)(x, k)
    assert got.shape == (n, h, w, o)
    err = rel_err(got, lax_conv(x, k))
    assert err <= 1e-6, f"max abs error {err:.3g} of the output's scale > 1e-6"


def test_winograd_kernel_is_g_g_gt():
    """The 16 transformed matrices equal ``G g G^T`` computed with the matrix G."""
    g_mat = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    _, k = arrays((1, 1, 1, 3), (3, 3, 3, 2), seed=1)
    ref = np.einsum("ik,jl,klco->ijco", g_mat, g_mat, np.asarray(k, np.float64)).reshape(16, 3, 2)
    got = np.stack([np.asarray(u) for u in C.winograd_kernel(k)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,h,w,c,o", [(1, 4, 4, 8, 8), (2, 3, 5, 6, 4), (1, 1, 1, 3, 2)])
def test_polyphase_upsample_equals_repeat_then_convolve(n, h, w, c, o):
    x, k = arrays((n, h, w, c), (3, 3, c, o), seed=2)
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    got = jax.jit(C.upsample2x_conv3x3)(x, k)
    assert got.shape == (n, 2 * h, 2 * w, o)
    err = rel_err(got, lax_conv(up, k))
    assert err <= 1e-6, f"max abs error {err:.3g} of the output's scale > 1e-6"


def _grads(fn, x, k, r):
    return jax.grad(lambda x, k: jnp.sum(fn(x, k) * r), argnums=(0, 1))(x, k)


def test_gradients_match_direct_convolution():
    x, k = arrays((2, 6, 10, 8), (3, 3, 8, 12), seed=3)
    r = jnp.asarray(np.random.default_rng(4).standard_normal((2, 6, 10, 12), dtype=np.float32))
    for got, ref in zip(
        _grads(C.winograd_conv3x3, x, k, r), _grads(lax_conv, x, k, r), strict=True
    ):
        assert rel_err(got, ref) <= 1e-6
    x = x[:, :3, :5]  # upsampled: back to [2, 6, 10, 8]

    def repeat_then_conv(x, k):
        return lax_conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), k)

    got = _grads(C.upsample2x_conv3x3, x, k, r)
    for g, ref in zip(got, _grads(repeat_then_conv, x, k, r), strict=True):
        assert rel_err(g, ref) <= 1e-6


def test_dispatch_follows_the_setting():
    x, k = arrays((1, 8, 8, 4), (3, 3, 4, 4))
    k1 = k[1:2, 1:2]

    def call(x, k, **kw):
        return C.conv_general_dilated(
            x, k, (1, 1), kw.get("padding", ((1, 1), (1, 1))), dimension_numbers=NHWC
        )

    with C.conv_config("fast"):
        assert "conv_general_dilated" not in primitives(call, x, k)  # Winograd
        assert "conv_general_dilated" not in primitives(
            lambda x, k: call(x, k, padding="VALID"), x, k1
        )  # 1x1 as a product
        # a strided conv is not a Winograd case: XLA's
        strided = lambda x, k: C.conv_general_dilated(  # noqa: E731
            x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC
        )
        assert "conv_general_dilated" in primitives(strided, x, k)
        np.testing.assert_allclose(strided(x, k), lax_conv(x, k, 2), rtol=0, atol=1e-5)
        np.testing.assert_allclose(call(x, k), lax_conv(x, k), rtol=0, atol=1e-5)
    with C.conv_config("xla"):
        assert "conv_general_dilated" in primitives(call, x, k)
        assert "conv_general_dilated" in primitives(lambda x, k: call(x, k, padding="VALID"), x, k1)
    # the automatic rule: narrow channels stay with XLA's convolution
    assert "conv_general_dilated" in primitives(call, x, k)


def test_automatic_rule():
    cpu = jax.default_backend() == "cpu"
    assert C.use_winograd((1, 64, 64, 384), (3, 3, 384, 384), jnp.float32) == cpu
    assert C.use_winograd((1, 32, 32, 512), (3, 3, 512, 256), jnp.float32) == cpu
    assert not C.use_winograd((1, 64, 64, 256), (3, 3, 256, 256), jnp.float32)
    assert not C.use_winograd((1, 64, 64, 128), (3, 3, 128, 128), jnp.float32)
    assert not C.use_winograd((1, 64, 64, 384), (3, 3, 384, 384), jnp.bfloat16)
    assert C.use_polyphase_upsample(jnp.float32) == cpu
    assert not C.use_polyphase_upsample(jnp.bfloat16)
    with C.conv_config("xla"):
        assert not C.use_polyphase_upsample(jnp.float32)
    with C.conv_config("fast"):
        assert C.use_polyphase_upsample(jnp.bfloat16)


def test_nnx_conv_with_the_dispatcher_matches_plain_nnx_conv():
    x, _ = arrays((2, 9, 7, 6), (3, 3, 6, 5))
    for size, pad in ((3, ((1, 1), (1, 1))), (3, "SAME"), (1, "VALID"), (1, ((0, 0), (0, 0)))):
        plain = nnx.Conv(6, 5, (size, size), padding=pad, rngs=nnx.Rngs(0))
        ours = nnx.Conv(
            6, 5, (size, size), padding=pad, rngs=nnx.Rngs(0),
            conv_general_dilated=C.conv_general_dilated,
        )  # fmt: skip
        with C.conv_config("fast"):
            got = ours(x)
        err = rel_err(got, plain(x))
        assert err <= 1e-6, f"{size}x{size} {pad}: {err:.3g}"


def test_bad_setting_is_named():
    with pytest.raises(ValueError, match="implementation must be one of"):
        with C.conv_config("winograd-please"):
            pass
    x, k = arrays((1, 4, 4, 3), (3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"kernel must be \[3, 3, 3, O\]"):
        C.winograd_conv3x3(x, k)
    with pytest.raises(ValueError, match=r"kernel must be \[3, 3, 3, O\]"):
        C.upsample2x_conv3x3(x, k)


class _Net(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.a = C.Conv(4, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)
        self.b = C.Conv(6, 6, (1, 1), padding="VALID", rngs=rngs)
        self.c = C.Conv(6, 5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)

    def __call__(self, x):
        return self.c(self.b(self.a(x)))


def test_kernels_transformed_once_are_used():
    net = _Net()
    x, _ = arrays((2, 8, 6, 4), (1, 1, 1, 1), seed=6)
    with C.conv_config("xla"):
        assert C.winograd_kernels(net) == {}
        ref = net(x)
    with C.conv_config("fast"):
        kernels = C.winograd_kernels(net)
        assert list(kernels) == [("a",)]  # the 3x3 stride-1 conv only
        with C.using_winograd_kernels(net, kernels):
            assert rel_err(net(x), ref) <= 1e-6
            # the module really reads the given matrices: zero them and only its bias is left
            zeros = {("a",): [jnp.zeros_like(u) for u in kernels[("a",)]]}
        with C.using_winograd_kernels(net, zeros):
            np.testing.assert_array_equal(
                np.asarray(net.a(x)), np.broadcast_to(np.asarray(net.a.bias[...]), (2, 8, 6, 6))
            )
        assert C._PREPARED == {}  # nothing left behind after the blocks
        assert rel_err(net(x), ref) <= 1e-6

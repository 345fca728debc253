"""Data parallelism on fake CPU devices and two local processes (each run in a subprocess, so
the device count of the rest of the suite is unaffected)."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from flax_latentup.parallel import process_share
from tests.helpers import finish, free_port, run_python, xla_flags


def results_on_devices(code: str, devices: int, out_file) -> dict[str, np.ndarray]:
    """Run ``code`` in a process with ``devices`` fake CPU devices; the arrays of its dict
    ``res``, which it ends with (saved to ``out_file`` and read back)."""
    code = textwrap.dedent(code) + f"\nimport numpy\nnumpy.savez({str(out_file)!r}, **res)\n"
    flags = xla_flags(f"--xla_force_host_platform_device_count={devices}")
    finish(run_python(code, env={"XLA_FLAGS": flags}))
    return dict(np.load(out_file))


def test_per_image_keys_on_several_devices(tmp_path):
    """Per-image keys wherever they lie: a list of keys on different devices, and an array
    of keys sharded over them, give the keys' own data."""
    code = """
    import jax, numpy as np
    from flax_latentup.pipeline import image_keys
    keys = jax.random.split(jax.random.key(3), 4)
    data = np.asarray(jax.random.key_data(keys))
    spread = [jax.device_put(k, d) for k, d in zip(keys, jax.devices(), strict=True)]
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
    sharded = jax.device_put(keys, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    res = {"data": data, "listed": image_keys(spread, 4), "sharded": image_keys(sharded, 4)}
    """
    res = results_on_devices(code, 4, tmp_path / "out.npz")
    np.testing.assert_array_equal(res["listed"], res["data"])
    np.testing.assert_array_equal(res["sharded"], res["data"])


@pytest.mark.heavy
def test_eight_devices_pmap_sharded_single(flax_pipe_dir, tmp_path):
    out_file = tmp_path / "out.npz"
    code = f"""
    import jax, numpy as np
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P
    assert jax.device_count() == 8, jax.devices()
    pipe = P.from_pretrained({flax_pipe_dir!r}); pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    low = rng.standard_normal((8, 8, 8, 4)).astype(np.float32)
    prompts = [f"a photo of the cat {{i}}" for i in range(8)]
    kw = dict(num_inference_steps=2, guidance_scale=6.0, negative_prompt="dog", output_type="np", rng=42)
    from flax_latentup import parallel
    res = {{}}
    for n in (8, 5):
        res[f"sharded{{n}}"] = pipe(prompt=prompts[:n], image=low[:n], **kw).images
        res[f"pmap{{n}}"] = pipe(prompt=prompts[:n], image=low[:n], use_pmap=True, **kw).images
        res[f"single{{n}}"] = pipe(prompt=prompts[:n], image=low[:n], devices=jax.devices()[:1], **kw).images
        if n == 5:  # an odd batch over two devices
            res["two5"] = pipe(prompt=prompts[:5], image=low[:5], devices=jax.devices()[:2], **kw).images
    # the pmap and sharded paths share one copy of the weights on the devices, made once:
    # later calls copy nothing between devices (each is sent its share of the batch directly)
    pipe(prompt=prompts[:5], image=low[:5], use_pmap=True, **kw)
    (copy,) = pipe._replicated.values()
    for extra in ({{}}, {{"use_pmap": True}}):
        with jax.transfer_guard_device_to_device("disallow"):
            pipe(prompt=prompts[:5], image=low[:5], **extra, **kw)
    assert list(pipe._replicated.values()) == [copy]
    # weights replicated over other devices than the call's are named, before any compiling
    try:
        on_two = parallel.replicate({{"w": np.zeros(3, np.float32)}}, jax.devices()[:2])
        parallel.pmap_upscale(None, on_two, {{}}, None, devices=jax.devices()[:4], replicated=True)
        raise AssertionError("no error")
    except ValueError as e:
        assert "over the 4 devices this call runs on, in their order; params['w'] is on 2 device(s)" in str(e), e
    # image i alone, with the key of index i
    key = jax.random.key(42)
    for i in (0, 4, 7):
        res[f"alone{{i}}"] = pipe(prompt=prompts[i], image=low[i:i+1], devices=jax.devices()[:1],
                                 **{{**kw, "rng": [jax.random.fold_in(key, i)]}}).images
    # one device that is not the default one: the program runs there
    seen = {{}}
    finish = pipe._finish_images
    def spy(out, *rest):
        seen["devices"] = sorted(str(d) for d in out["latents"].devices())
        return finish(out, *rest)
    pipe._finish_images = spy
    res["device3"] = pipe(prompt=prompts[:2], image=low[:2], devices=[jax.devices()[3]], **kw).images
    assert seen["devices"] == [str(jax.devices()[3])], seen
    pipe._finish_images = finish
    # a tiled decode (on the host side, after the program) runs on the device asked for too
    import flax_latentup.models.vae as vae_module
    tiles_on, run_tile = [], vae_module._run
    def spy_run(*args, **kwargs):
        out = run_tile(*args, **kwargs)
        tiles_on.append(str(next(iter(out.devices()))))
        return out
    vae_module._run = spy_run
    pipe.enable_vae_tiling(tile_sample_size=64)
    res["tiled3"] = pipe(prompt=prompts[:2], image=low[:2], devices=[jax.devices()[3]], **kw).images
    on3 = sorted(set(tiles_on))
    tiles_on.clear()
    res["tiled0"] = pipe(prompt=prompts[:2], image=low[:2], devices=jax.devices()[:1], **kw).images
    pipe.disable_vae_tiling()
    vae_module._run = run_tile
    assert on3 == [str(jax.devices()[3])] and sorted(set(tiles_on)) == [str(jax.devices()[0])], (on3, tiles_on)
    # devices given as a generator (read once); a 2-D mesh splits the batch along "data" only,
    # padded to that axis's size (the other axis holds copies)
    res["generator5"] = pipe(prompt=prompts[:5], image=low[:5],
                             devices=(d for d in jax.devices()[:2]), **kw).images
    from jax.sharding import Mesh
    padded_to, pad = [], parallel._pad_batch
    def spy_pad(batch, multiple):
        padded_to.append(multiple)
        return pad(batch, multiple)
    parallel._pad_batch = spy_pad
    mesh2d = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
    res["mesh2d5"] = pipe(prompt=prompts[:5], image=low[:5], mesh=mesh2d, **kw).images
    parallel._pad_batch = pad
    assert padded_to == [4], padded_to
    # a mesh of jax.make_mesh (Explicit axes), and calls inside the caller's jax.set_mesh: the
    # call runs where it is told (its devices, its mesh), as outside that context
    explicit = jax.make_mesh((8,), ("data",))
    res["make_mesh5"] = pipe(prompt=prompts[:5], image=low[:5], mesh=explicit, **kw).images
    with jax.set_mesh(explicit):
        res["in_context3"] = pipe(prompt=prompts[:2], image=low[:2], devices=[jax.devices()[3]],
                                  **kw).images
        res["in_context5"] = pipe(prompt=prompts[:5], image=low[:5], mesh=explicit, **kw).images
    """
    res = results_on_devices(code, 8, out_file)
    for n in (8, 5):
        ref = res[f"single{n}"]
        assert ref.shape == (n, 128, 128, 3)
        for path in ("sharded", "pmap", "two") if n == 5 else ("sharded", "pmap"):
            err = np.max(np.abs(res[f"{path}{n}"] - ref))
            assert err <= 1e-5, f"{path} batch {n}: max abs difference {err:.3g} from one device"
    for i in (0, 4, 7):
        err = np.max(np.abs(res[f"alone{i}"][0] - res["single8"][i]))
        assert err <= 1e-5, f"image {i} alone differs from its batched run by {err:.3g}"
    np.testing.assert_allclose(res["single5"], res["single8"][:5], atol=1e-5)
    np.testing.assert_allclose(res["device3"], res["single8"][:2], atol=1e-5)
    np.testing.assert_allclose(res["generator5"], res["two5"], atol=1e-6)
    np.testing.assert_allclose(res["tiled3"], res["tiled0"], atol=1e-6)
    np.testing.assert_allclose(res["mesh2d5"], res["single5"], atol=1e-5)
    np.testing.assert_allclose(res["make_mesh5"], res["single5"], atol=1e-5)
    np.testing.assert_allclose(res["in_context5"], res["single5"], atol=1e-5)
    np.testing.assert_allclose(res["in_context3"], res["device3"], atol=1e-6)


@pytest.mark.heavy
def test_tiled_vae_work_is_split_over_the_devices(flax_pipe_dir, tmp_path):
    """With tiling on and several devices, the tiled encode of the pictures and the tiled
    decode of the results run on all devices (each tile split along the batch, an odd batch
    padded), with the sampling program's copy of the VAE's weights (one copy for the pmap and
    sharded paths, also on a mesh whose data axis is 1); the float16 retry goes the same way, and so does a batch-split input to the
    VAE alone when its weights are on those devices. Results equal one device's."""
    out_file = tmp_path / "tiled.npz"
    code = f"""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import flax_latentup.models.vae as vae_module
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P
    assert jax.device_count() == 4, jax.devices()
    pipe = P.from_pretrained({flax_pipe_dir!r}); pipe.set_progress_bar_config(disable=True)
    pixels = np.random.default_rng(2).uniform(0, 1, (3, 128, 96, 3)).astype(np.float32)
    kw = dict(prompt="a cat", image=pixels, num_inference_steps=2, guidance_scale=0.0, rng=3,
              output_type="np")
    calls, run_tile = [], vae_module._run
    def spy_run(graphdef, state, x, *args, **kwargs):
        out = run_tile(graphdef, state, x, *args, **kwargs)
        calls.append((kwargs["part"], x.shape[0], len(out.sharding.device_set), out.dtype))
        return out
    vae_module._run = spy_run
    res = {{}}
    pipe.enable_vae_tiling(tile_sample_size=64)
    res["single"] = pipe(devices=jax.devices()[:1], **kw).images
    assert {{c[0] for c in calls}} == {{"encode", "decode"}}, calls
    assert all(c[1:3] == (3, 1) for c in calls), calls
    def one_vae_copy(mesh):
        shared = jax.tree.leaves(pipe._replicated[mesh]["vae"])
        placed = jax.tree.leaves(nnx.split(pipe._vae_placed[(id(pipe.vae), mesh)])[1])
        assert len(shared) == len(placed) and all(a is b for a, b in zip(shared, placed))
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    for path, extra in (("pmap", dict(use_pmap=True)), ("sharded", {{}})):
        calls.clear()
        res[path] = pipe(**extra, **kw).images
        assert {{c[0] for c in calls}} == {{"encode", "decode"}}, (path, calls)
        assert all(c[1:3] == (4, 4) for c in calls), (path, calls)
        one_vae_copy(mesh)
    assert len(pipe._replicated) == 1
    # a mesh whose data axis is 1 runs the VAE work on its devices, with the program's copy
    mesh12 = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("data", "model"))
    assert P._vae_placement(list(mesh12.devices.flat), None, mesh12) is mesh12
    pipe._params_on_mesh(mesh12)
    pipe._placed_vae(pipe.vae, mesh12)
    one_vae_copy(mesh12)
    assert list(pipe._replicated) == [mesh12]
    # the float16 retry of an overflowing (tiled) decode runs over the devices too
    pipe16 = P.from_pretrained({flax_pipe_dir!r}, dtype=jnp.float16)
    pipe16.enable_vae_tiling(tile_sample_size=64)
    latents = np.random.default_rng(4).standard_normal((3, 32, 24, 4)).astype(np.float32)
    latents[1] *= 1e5
    calls.clear()
    res["retry"] = pipe16._finish_images({{"latents": latents}}, mesh)
    decodes = [(c[1:3], str(c[3])) for c in calls if c[0] == "decode"]
    assert decodes[0] == ((4, 4), "float16") and decodes[-1] == ((4, 4), "float32"), calls
    res["retry_want"] = pipe._decode(pipe.vae, latents[1:2])
    # the VAE alone: an input whose batch is split over the devices that hold the weights
    # splits its tiles; with the weights elsewhere, the tiles run where the weights are
    z = jnp.asarray(latents[:, :20, :12] / 1e3)
    calls.clear()
    res["vae_one"] = pipe.vae.decode(z, tiled=True, tile_sample_size=64)
    assert calls and all(c[2] == 1 for c in calls), calls
    z4 = jax.device_put(np.concatenate([z, z[:1]]), NamedSharding(mesh, PartitionSpec("data")))
    graphdef, state = nnx.split(pipe.vae)
    vae4 = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
    for name, vae, devices in (("vae_split", vae4, 4), ("vae_elsewhere", pipe.vae, 1)):
        calls.clear()
        res[name] = vae.decode(z4, tiled=True, tile_sample_size=64)[:3]
        assert calls and all(c[2] == devices for c in calls), (name, calls)
    """
    res = results_on_devices(code, 4, out_file)
    assert res["single"].shape == (3, 256, 192, 3)
    for path in ("sharded", "pmap"):
        err = np.max(np.abs(res[path] - res["single"]))
        assert err <= 1e-5, f"{path}: max abs difference {err:.3g} from one device"
    assert np.isfinite(res["retry"]).all()
    np.testing.assert_allclose(res["retry"][1:2], res["retry_want"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(res["vae_split"], res["vae_one"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(res["vae_elsewhere"], res["vae_one"], rtol=0, atol=1e-5)


@pytest.mark.heavy
def test_callback_and_step_bar_on_several_devices(flax_pipe_dir, tmp_path):
    """The step bar and ``callback`` work on the sharded-jit and pmap paths: every step once,
    in order, with the whole batch's latents (the padding of an odd batch cut), as on one
    device. Run with every 3x3 convolution as Winograd (conv_config("fast")): the
    transformed kernels are copied to the devices once, both paths use that copy, and all
    agree."""
    out_file = tmp_path / "cb.npz"
    code = f"""
    import io, jax, numpy as np
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P, conv_config
    assert jax.device_count() == 2, jax.devices()
    pipe = P.from_pretrained({flax_pipe_dir!r})
    low = np.random.default_rng(1).standard_normal((3, 8, 8, 4)).astype(np.float32)
    res = {{}}
    kernels = []
    for path, extra in (("single", dict(devices=jax.devices()[:1])), ("sharded", {{}}),
                        ("sharded", {{}}), ("pmap", dict(use_pmap=True))):
        bar = io.StringIO()
        pipe.set_progress_bar_config(file=bar, ascii=True)
        seen = []
        with conv_config("fast"):
            out = pipe(prompt="a cat", image=low, num_inference_steps=3, guidance_scale=6.0,
                       rng=7, output_type="latent", callback_steps=1,
                       callback=lambda i, t, x: seen.append((i, t, x.copy())), **extra).images
        if path != "single":
            (on_mesh,) = pipe._winograd_on_mesh.values()
            kernels.append(jax.tree.leaves(on_mesh))
        last = bar.getvalue().replace(chr(13), chr(10)).strip().splitlines()[-1]
        assert "3/3" in last, (path, bar.getvalue())
        res[path + "_steps"] = np.array([(i, t) for i, t, _ in seen])
        res[path + "_latents"] = np.stack([x for _, _, x in seen])
        res[path + "_out"] = out
    # the first sharded call copied the kernels to both devices; the later calls used that copy
    assert len(kernels[0]) >= 16 and all(len(k.sharding.device_set) == 2 for k in kernels[0])
    for later in kernels[1:]:
        assert all(a is b for a, b in zip(kernels[0], later, strict=True))

    # a callback that raises (to stop, or by mistake): the call raises it, on every path, and
    # the pipeline goes on working (before, two devices waited for each other until XLA
    # aborted the process, and one device raised an opaque runtime error)
    class Stop(Exception):
        pass

    def stop(i, t, x):
        if i == 1:
            raise Stop("enough")

    for extra in (dict(devices=jax.devices()[:1]), {{}}, dict(use_pmap=True)):
        try:
            pipe(prompt="a cat", image=low, num_inference_steps=3, guidance_scale=6.0, rng=7,
                 output_type="latent", callback=stop, **extra)
            raise AssertionError("no error")
        except Stop as e:
            assert str(e) == "enough", e
    with conv_config("fast"):
        again = pipe(prompt="a cat", image=low, num_inference_steps=3, guidance_scale=6.0,
                     rng=7, output_type="latent").images
    np.testing.assert_array_equal(again, res["sharded_out"])
    """
    res = results_on_devices(code, 2, out_file)
    steps = res["single_steps"]
    assert steps[:, 0].tolist() == [0, 1, 2]
    assert res["single_latents"].shape == (3, 3, 16, 16, 4)
    np.testing.assert_allclose(res["single_latents"][-1], res["single_out"], atol=0)
    for path in ("sharded", "pmap"):
        np.testing.assert_array_equal(res[path + "_steps"], steps)
        assert res[path + "_latents"].shape == res["single_latents"].shape
        err = np.max(np.abs(res[path + "_latents"] - res["single_latents"]))
        assert err <= 1e-5, f"{path}: callback latents differ from one device's by {err:.3g}"


def test_pmap_upscale_takes_either_replicated_layout(flax_pipe_dir, tmp_path):
    """``parallel.pmap_upscale`` on a core batch: weights given in ``replicate``'s layout (a
    leading device axis), as ``replicate_on_mesh`` copies them (what the pipeline passes), or
    on the host give the same latents as the pipeline's pmap call; with weights already
    copied, a call copies nothing between devices. Weights replicated over the call's devices
    in another order are refused by name."""
    out_file = tmp_path / "layouts.npz"
    code = f"""
    import jax, numpy as np
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P, parallel
    assert jax.device_count() == 2, jax.devices()
    pipe = P.from_pretrained({flax_pipe_dir!r}); pipe.set_progress_bar_config(disable=True)
    low = np.random.default_rng(1).standard_normal((3, 8, 8, 4)).astype(np.float32)
    seen, pmap_upscale = [], parallel.pmap_upscale
    parallel.pmap_upscale = lambda *a, **k: seen.append((a, k)) or pmap_upscale(*a, **k)
    res = {{}}
    res["pipe"] = pipe(prompt="a cat", image=low, num_inference_steps=2, guidance_scale=6.0,
                       rng=7, output_type="latent", use_pmap=True).images
    parallel.pmap_upscale = pmap_upscale
    ((graphdefs, params, batch, options, devices), kwargs), = seen
    assert kwargs["replicated"] and {{a for a in params}} >= {{"unet", "vae", "text_encoder"}}
    host = {{k: v for k, v in pipe.params.items()}}
    devices = jax.devices()
    layouts = {{
        "pmap_layout": (parallel.replicate(host, devices), True),
        "mesh_layout": (parallel.replicate_on_mesh(host, parallel.make_mesh(devices)), True),
        "host": (host, False),
    }}
    for name, (weights, replicated) in layouts.items():
        out = pmap_upscale(graphdefs, weights, batch, options, devices, replicated=replicated)
        if replicated:  # weights already copied: nothing is put on the devices again
            puts, device_put = [], jax.device_put
            jax.device_put = lambda *a, **k: puts.append(1) or device_put(*a, **k)
            try:
                with jax.transfer_guard_device_to_device("disallow"):
                    out = pmap_upscale(graphdefs, weights, batch, options, devices, replicated=True)
            finally:
                jax.device_put = device_put
            assert not puts, (name, len(puts))
        res[name] = out["latents"]
    # one device: replicate()'s layout (a leading axis of 1) is not mistaken for a copy
    one = parallel.replicate(host, devices[:1])
    res["one_device"] = pmap_upscale(graphdefs, one, batch, options, devices[:1],
                                     replicated=True)["latents"]
    # either layout over the devices in another order (before, replicate()'s was taken, its
    # weights copied again on every call, and the second call crashed the process)
    for other in (parallel.replicate_on_mesh(host, parallel.make_mesh(devices[::-1])),
                  parallel.replicate(host, devices[::-1])):
        try:
            pmap_upscale(graphdefs, other, batch, options, devices, replicated=True)
            raise AssertionError("no error")
        except ValueError as e:
            assert "over the 2 devices this call runs on, in their order" in str(e), e
    # a mesh that lists a device twice
    from jax.sharding import Mesh
    twice = Mesh(np.asarray([devices[0], devices[0]]), ("data",))
    try:
        pipe(prompt="a cat", image=low, num_inference_steps=2, mesh=twice)
        raise AssertionError("no error")
    except ValueError as e:
        assert str(e).startswith("mesh.devices lists a device more than once"), e
    """
    res = results_on_devices(code, 2, out_file)
    assert res["pipe"].shape == (3, 16, 16, 4)
    for name in ("pmap_layout", "mesh_layout", "host"):
        err = np.max(np.abs(res[name] - res["pipe"]))
        assert err <= 1e-6, f"{name}: max abs difference {err:.3g} from the pipeline's call"
    # the whole batch on one device: float32 rounding of another split (as test_eight_devices)
    err = np.max(np.abs(res["one_device"] - res["pipe"]))
    assert err <= 1e-5, f"one device: max abs difference {err:.3g} from two devices'"


def test_process_share_covers_the_list():
    items = list(range(11))
    for count in (1, 2, 3, 4, 11, 13):
        shares = [process_share(items, i, count) for i in range(count)]
        assert sum(shares, []) == items
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        process_share(items, 3, 3)


@pytest.mark.heavy
def test_two_processes_split_the_work(flax_pipe_dir, tmp_path):
    """Two local processes with jax.distributed each upscale their share of 6 inputs; the
    union equals one process upscaling all 6."""
    rng = np.random.default_rng(5)
    low = rng.standard_normal((6, 8, 8, 4)).astype(np.float32)
    np.save(tmp_path / "low.npy", low)
    seeds = [1000 + i for i in range(6)]
    head = textwrap.dedent(
        """
        import json, jax, numpy as np
        from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline as P
        from flax_latentup import parallel
        """
    )
    body = textwrap.dedent(
        f"""
        low = np.load({str(tmp_path / "low.npy")!r})
        seeds = {seeds!r}
        work = list(range(6))
        pipe = P.from_pretrained({flax_pipe_dir!r}); pipe.set_progress_bar_config(disable=True)
        """
    )
    share = textwrap.dedent(
        f"""
        # the other process's devices are refused before anything runs (before, the call ran
        # and failed fetching its result, or waited for the other process to join it)
        for where in (dict(devices=jax.devices()), dict(mesh=parallel.make_mesh(jax.devices()))):
            try:
                pipe(prompt="a cat", image=low[:1], num_inference_steps=2, **where)
                raise AssertionError("no error")
            except ValueError as e:
                assert f"belongs to process {{1 - jax.process_index()}}, not to this one" in str(e)
        # every process's values, exact in every dtype (64-bit ones are not narrowed)
        def values(p):
            return [np.int64(2**40 + 7 * p), np.array([[2**62 + p, -1]], np.int64),
                    np.array([1 / 3 + p, 2.0**60], np.float64), np.array([p == 1, True]),
                    np.uint16(65535 - p), np.zeros((0, 3), np.int64)]
        for v, v0, v1 in zip(values(jax.process_index()), values(0), values(1)):
            got, want = parallel.all_processes(v), np.stack([v0, v1])
            assert got.dtype == want.dtype and np.array_equal(got, want), (got, want)
        mine = parallel.process_share(work)
        imgs = pipe(prompt="a cat", image=low[mine], rng=[seeds[i] for i in mine],
                    num_inference_steps=2, guidance_scale=0.0, output_type="np").images
        np.savez({str(tmp_path)!r} + f"/part{{jax.process_index()}}.npz", idx=np.array(mine), imgs=imgs)
        print(json.dumps(dict(index=jax.process_index(), count=jax.process_count(), mine=mine)))
        """
    )
    # jax.distributed must start before anything touches the XLA backend
    worker = head + "parallel.initialize_distributed()\n" + body + share
    port = free_port()
    procs = [
        run_python(
            worker,
            env={
                "FLAX_LATENTUP_COORDINATOR": f"127.0.0.1:{port}",
                "FLAX_LATENTUP_NUM_PROCESSES": "2",
                "FLAX_LATENTUP_PROCESS_ID": str(i),
            },
        )
        for i in range(2)
    ]
    infos = [json.loads(finish(p).strip().splitlines()[-1]) for p in procs]
    assert sorted(i["index"] for i in infos) == [0, 1] and all(i["count"] == 2 for i in infos)
    single = (
        head
        + body
        + textwrap.dedent(
            f"""
        imgs = pipe(prompt="a cat", image=low, rng=seeds, num_inference_steps=2,
                    guidance_scale=0.0, output_type="np").images
        np.save({str(tmp_path / "single.npy")!r}, imgs)
        print("ok")
        """
        )
    )
    finish(run_python(single))
    ref = np.load(tmp_path / "single.npy")
    got = np.zeros_like(ref)
    seen = []
    for i in range(2):
        part = np.load(tmp_path / f"part{i}.npz")
        got[part["idx"]] = part["imgs"]
        seen += list(part["idx"])
    assert sorted(seen) == list(range(6)), "the shares overlap or leave a gap"
    err = np.max(np.abs(got - ref))
    assert err <= 1e-5, f"multi-process union differs from one process by {err:.3g}"

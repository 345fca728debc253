"""Shared fixtures: tiny seeded torch checkpoints written as real folders, once per session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# Keep XLA and torch from fighting over the two cores, and JAX on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


# On the CPU, XLA compiles quickly rather than well for the session (this process, the
# pytest-xdist workers and the subprocesses, which extend XLA_FLAGS with helpers.xla_flags):
# LLVM optimisation level 0, each program generated as one piece (no parallel split, which
# only adds work on two cores shared by two workers) and, on jaxlib 0.10 and older, the older
# loop emitters in place of the fusion emitters (jaxlib 0.11 has no such flag and would stop at
# it). The same operations, compiled in about half the time and run somewhat slower, which is
# what a suite of many small compiles wants. A flag already set in XLA_FLAGS wins.
def _fast_compile_flags() -> list[str]:
    from importlib.metadata import version

    flags = ["--xla_backend_optimization_level=0", "--xla_cpu_parallel_codegen_split_count=1"]
    if tuple(int(p) for p in version("jaxlib").split(".")[:2]) < (0, 11):
        flags.append("--xla_cpu_use_fusion_emitters=false")
    return flags


if os.environ["JAX_PLATFORMS"] == "cpu":
    _set = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = " ".join(
        [_set] + [f for f in _fast_compile_flags() if f.split("=")[0] not in _set]
    ).strip()

# One persistent compilation cache for the session: this process, the pytest-xdist workers
# and the subprocesses they start (all inherit the environment). Many tests compile the same
# tiny programs (each batch-command run, each fake-device process). Tests that check what
# compiles count lowerings, which a cache hit does not skip. The process that made the
# folder removes it at the end of the session.
if "FLAX_LATENTUP_TESTS_COMPILE_CACHE" not in os.environ:
    os.environ["FLAX_LATENTUP_TESTS_COMPILE_CACHE"] = tempfile.mkdtemp(
        prefix="flax-latentup-tests-jax-cache-"
    )
    atexit.register(
        shutil.rmtree, os.environ["FLAX_LATENTUP_TESTS_COMPILE_CACHE"], ignore_errors=True
    )
_COMPILE_CACHE = os.environ["FLAX_LATENTUP_TESTS_COMPILE_CACHE"]
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
if "jax" in sys.modules:  # imported by a plugin before the environment was set
    import jax

    jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

from tests import helpers  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """The tests marked heavy run first: with workers (pytest-xdist) they are spread over
    them from the start, instead of one worker being left alone with a long test at the end.
    The order is otherwise kept."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    return helpers.write_clip_tokenizer(str(tmp_path_factory.mktemp("tokenizer")))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return helpers.load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """(torch model, folder) of a tiny CLIPTextModel with the legacy eos rule (eos id 2)."""
    model = helpers.make_clip_text_model(seed=0, eos_token_id=2, **helpers.TINY_CLIP)
    folder = helpers.save_clip_text_model(model, str(tmp_path_factory.mktemp("tiny_clip")))
    return model, folder


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """(torch model, folder) of a tiny seeded diffusers AutoencoderKL (downsample factor 2)."""
    model = helpers.make_vae(seed=0, **helpers.TINY_VAE)
    folder = helpers.save_vae(model, str(tmp_path_factory.mktemp("tiny_vae")))
    return model, folder


@pytest.fixture(scope="session")
def torch_pipe_dir(tokenizer_dir, tmp_path_factory) -> str:
    """A tiny seeded torch pipeline saved by diffusers (safetensors)."""
    torch_dir = str(tmp_path_factory.mktemp("torch_pipe"))
    helpers.make_torch_pipeline(seed=1, tokenizer_dir=tokenizer_dir).save_pretrained(torch_dir)
    return torch_dir


@pytest.fixture(scope="session")
def flax_pipe_dir(torch_pipe_dir, tmp_path_factory) -> str:
    """The same pipeline saved in the Flax format (loads fast, also in subprocesses)."""
    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline

    torch_dir = torch_pipe_dir
    flax_dir = str(tmp_path_factory.mktemp("flax_pipe") / "pipe")
    FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(torch_dir).save_pretrained(flax_dir)
    return flax_dir

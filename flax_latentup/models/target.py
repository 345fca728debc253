"""The device a program is being traced for.

Some automatic choices depend on the hardware a program will run on: cuDNN's fused attention
(NVIDIA GPUs from compute capability 8.0), the rewritten convolutions (the CPU backend). JAX
does not tell a traced function where it will run, so callers that know say it with
:func:`compiling_for`; otherwise the first local device (the default backend's) is assumed.
The work of a call that names its own devices or mesh runs :func:`outside_context_mesh` of
the caller's (``jax.set_mesh``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import jax

_TARGET: list[Any] = []  # a stack: the innermost compiling_for block's device last


@contextlib.contextmanager
def compiling_for(device: Any) -> Iterator[None]:
    """Inside the block, automatic choices are made for ``device`` (a ``jax.Device``)."""
    _TARGET.append(device)
    try:
        yield
    finally:
        _TARGET.pop()


def target_device() -> Any:
    """The device being compiled for: the innermost :func:`compiling_for`'s, else the first
    local device."""
    return _TARGET[-1] if _TARGET else jax.local_devices()[0]


def target_platform() -> str:
    """``"cpu"``, ``"gpu"`` or ``"tpu"`` of :func:`target_device` (JAX's platform names; a
    ``"cuda"``/``"rocm"`` platform counts as ``"gpu"``)."""
    platform = str(getattr(target_device(), "platform", jax.default_backend())).lower()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def target_key() -> tuple[str, str]:
    """A hashable summary of the target (platform and, for GPUs, compute capability) for
    compile caches."""
    device = target_device()
    return target_platform(), str(getattr(device, "compute_capability", ""))


@contextlib.contextmanager
def outside_context_mesh() -> Iterator[None]:
    """Inside: no mesh set by ``jax.set_mesh`` (the caller's, restored after), so that a call
    given its own devices or mesh runs there, as it does outside the caller's context."""
    cleared: contextlib.AbstractContextManager = contextlib.nullcontext()
    current = getattr(jax.sharding, "get_abstract_mesh", None)
    # only where a mesh is set: the context is part of the compilation caches' keys, so it is
    # left as it is otherwise (the programs compiled in and out of calls stay shared)
    if current is not None and not getattr(current(), "empty", True):
        try:
            cleared = jax.set_mesh(None)
        except (AttributeError, TypeError, ValueError):  # no jax.set_mesh, or under a trace
            pass
    with cleared:
        yield

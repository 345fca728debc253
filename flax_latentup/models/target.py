"""The device a program is being traced for.

Some automatic choices depend on the hardware a program will run on: cuDNN's fused attention
(NVIDIA GPUs from compute capability 8.0), the rewritten convolutions (the CPU backend). JAX
does not tell a traced function where it will run, so callers that know say it with
:func:`compiling_for`; otherwise the first local device (the default backend's) is assumed.
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

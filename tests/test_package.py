"""Package-level checks: the runtime never needs torch or diffusers; the CLI entry works."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import flax_latentup

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "diffusers"):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, _Block())
    """
)


def test_runtime_imports_without_torch(tiny_clip):
    """Import every module of the package with torch and diffusers unimportable, and run the
    text encoder from a checkpoint folder."""
    _, folder = tiny_clip
    code = BLOCKER + textwrap.dedent(
        f"""
        import importlib, pkgutil
        import jax.numpy as jnp
        import flax_latentup
        for info in pkgutil.walk_packages(flax_latentup.__path__, "flax_latentup."):
            importlib.import_module(info.name)
        assert "torch" not in sys.modules and "diffusers" not in sys.modules
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker did not block torch")
        model = flax_latentup.FlaxCLIPTextModel.from_pretrained({folder!r})
        out = model(jnp.zeros((1, 77), jnp.int32))
        assert out.last_hidden_state.shape == (1, 77, 32)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_cli_version():
    proc = subprocess.run(
        [sys.executable, "-m", "flax_latentup.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"flax-latentup {flax_latentup.__version__}"


def test_staged_entries_keep_old_entries_when_putting_them_back_fails(tmp_path, monkeypatch):
    """A save whose swap fails and whose undo fails too: the old entries not yet back in place
    are kept on disk, under a name no later save removes, and the error says where."""
    import os

    import pytest

    from flax_latentup import files

    root = tmp_path / "pipe"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "f").write_text(f"old {name}")
    replace, calls = os.replace, []

    def flaky(src, dst):  # the 4th rename (b into place) and the 5th (old b back) fail
        calls.append((src, dst))
        if len(calls) in (4, 5):
            raise OSError(5, "Input/output error")
        replace(src, dst)

    with pytest.raises(OSError, match=r"putting back its old entries failed too .* kept in "):
        with files.staged_entries(str(root), ["a", "b"]) as staging:
            for name in ("a", "b"):
                os.mkdir(os.path.join(staging, name))
                with open(os.path.join(staging, name, "f"), "w") as f:
                    f.write(f"new {name}")
            monkeypatch.setattr(os, "replace", flaky)
    monkeypatch.undo()
    (kept,) = [p for p in root.iterdir() if p.name.startswith("flax-latentup-old-entries-")]
    # "b" could not go back; "a", swapped before it, still did
    assert (kept / "b" / "f").read_text() == "old b" and not (kept / "a").exists()
    assert (root / "a" / "f").read_text() == "old a"
    files.remove_stale_temporaries(str(root), own=True)  # what the next save does first
    assert kept.exists() and (kept / "b" / "f").read_text() == "old b"

"""Resolve a local folder or a Hugging Face Hub repo id to a local folder.

Hub downloads go through ``huggingface_hub.snapshot_download`` and so honour ``HF_HUB_OFFLINE``,
``HF_HOME``/``HF_HUB_CACHE`` and tokens. Only the files the port needs are fetched
(safetensors weights, configs, tokenizer files), never torch pickles, and weight variants such as
``*.fp16.safetensors`` only when asked for (``variant="fp16"``, in place of the plain files).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

# What the Flax pipeline needs from a diffusers-layout repo.
# A pipeline repo's files that describe it (what is checked before any weights are fetched)
PIPELINE_CONFIG_PATTERNS = (
    "model_index.json",
    "*/config.json",
    "*/scheduler_config.json",
    "tokenizer/*",
)
PIPELINE_PATTERNS = (*PIPELINE_CONFIG_PATTERNS, "*/*.safetensors", "*/*.safetensors.index.json")
# Weight variants ("NAME.fp16.safetensors", "NAME.fp16-00001-of-00002.safetensors", ...): the
# plain files are the ones loaded, so variants are never fetched.
VARIANT_PATTERNS = ("*.*.safetensors", "*.*.bin", "*.index.*.json")
# Weights file names tried in order: this package's own format, then the torch ones.
MODEL_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json")
_VARIANT = re.compile(r"[A-Za-z0-9_]+")


def check_variant(variant: str | None) -> str | None:
    """``variant`` (e.g. ``"fp16"``), or a ValueError: letters, digits and ``_`` only."""
    if variant is not None and (not isinstance(variant, str) or not _VARIANT.fullmatch(variant)):
        raise ValueError(
            f"variant must be a weights variant name such as 'fp16' (letters, digits, _), "
            f"got {variant!r}"
        )
    return variant


def with_variant(
    patterns: Sequence[str], variant: str | None
) -> tuple[list[str], list[str] | None]:
    """``(allow, ignore)`` download patterns: ``patterns`` less weight variants, or, for a
    ``variant``, with its weights files (``NAME.fp16.safetensors``, its shards and index) in
    place of the plain ones."""
    if variant is None:
        return list(patterns), list(VARIANT_PATTERNS)
    out = []
    for p in patterns:
        if p.endswith(".safetensors.index.json"):
            out.append(p[: -len("json")] + f"{variant}.json")
        elif p.endswith(".safetensors"):
            stem = p[: -len(".safetensors")]
            out += [f"{stem}.{variant}.safetensors", f"{stem}.{variant}-*.safetensors"]
        else:
            out.append(p)
    return out, None


def pipeline_patterns(
    variant: str | None = None, skip: Sequence[str] = ()
) -> tuple[list[str], list[str] | None]:
    """``(allow, ignore)`` download patterns for a pipeline repo: :data:`PIPELINE_PATTERNS` with
    the weights of ``variant`` (see :func:`with_variant`), less the subfolders in ``skip``
    (components given otherwise, e.g. a fine-tuned UNet)."""
    allow, ignore = with_variant(PIPELINE_PATTERNS, variant)
    if skip:
        ignore = [*(ignore or ()), *(f"{part}/*" for part in skip)]
    return allow, ignore


def below_patterns(patterns: Sequence[str]) -> str:
    """The ignore pattern for the files in deeper folders than any of ``patterns`` reaches.

    A pattern's ``*`` matches ``/`` too, so ``"*.safetensors"`` alone would fetch, with a model
    at a repo's root, the weights of every model in its subfolders (``unet/``, ``unet_ema/``),
    and ``"*/*.safetensors"`` those of any folder nested in a pipeline's components.
    """
    depth = max((p.count("/") for p in patterns), default=0)
    return "/".join(["*"] * (depth + 2))


def snapshot_commit(folder: str) -> str | None:
    """The commit of a Hugging Face cache snapshot (``.../snapshots/<sha>``, as
    :func:`resolve` gives a hub repo), else ``None``: a second fetch from the same repo pinned
    to it sees the same files, whatever was pushed in between."""
    name = os.path.basename(os.path.normpath(folder))
    parent = os.path.basename(os.path.dirname(os.path.normpath(folder)))
    return name if parent == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", name) else None


# How the Python API names a model's subfolder, in messages (the batch command names its flag)
SUBFOLDER_HINT = "subfolder=..."


class HubError(OSError):
    """A model folder or hub repo that cannot be found or fetched."""


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "owner/name"; anything else is meant as a path.
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


def resolve(
    path_or_repo_id: str | os.PathLike,
    *,
    subfolder: str | None = None,
    allow_patterns: Sequence[str] | None = None,
    ignore_patterns: Sequence[str] | None = VARIANT_PATTERNS,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    token: str | bool | None = None,
) -> str:
    """The local folder for ``path_or_repo_id`` (joined with ``subfolder``).

    A path to an existing folder is used as is. Anything else is taken as a hub repo id and
    fetched (or found in the HF cache) with only ``allow_patterns``, less ``ignore_patterns``
    (weight variants by default) and less the files in folders deeper than any pattern names
    (see :func:`below_patterns`). Raises :class:`HubError`
    with a readable message when the folder does not exist, the repo cannot be found, or the
    hub is unreachable and nothing is cached.
    """
    name = os.fspath(path_or_repo_id)
    if not name:
        raise HubError("path_or_repo_id is empty: give a local folder or a hub repo id")
    if subfolder:  # "unet/" names the same folder as "unet", on the hub too
        subfolder = subfolder.rstrip("/") or subfolder
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        folder = os.path.join(expanded, subfolder) if subfolder else expanded
        if not os.path.isdir(folder):
            raise HubError(f"subfolder {subfolder!r} not found in {expanded}")
        return folder
    if _looks_like_path(name) or os.path.exists(expanded):
        raise HubError(f"model folder not found: {name!r} (not a directory)")

    from huggingface_hub import errors as hf_errors
    from huggingface_hub import snapshot_download

    patterns = list(allow_patterns or MODEL_PATTERNS)
    ignore = list(ignore_patterns or ())
    if subfolder:
        # the ignore patterns too: their "*" also matches "/", so an unprefixed "*.*.safetensors"
        # (a variant) would match every file under a subfolder with a dot ("v1.0/unet/...")
        patterns = [f"{subfolder}/{p}" for p in patterns]
        ignore = [f"{subfolder}/{p}" for p in ignore]
    ignore.append(below_patterns(patterns))
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        root = snapshot_download(
            name,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=bool(local_files_only),
            allow_patterns=patterns,
            ignore_patterns=ignore or None,
            token=token,
        )
    except hf_errors.HFValidationError as e:
        raise HubError(
            f"{name!r} is neither an existing folder nor a valid hub repo id ({e})"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(
            f"hub repo {name!r} not found (or it is private/gated and no token was given)"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"revision {revision!r} not found in hub repo {name!r}") from None
    except getattr(hf_errors, "IncompleteSnapshotError", ()) as e:  # huggingface_hub >= 1.0
        raise HubError(
            f"cannot load {name!r}: the Hugging Face cache holds only part of what is needed "
            f"(a download cut short?) and the hub cannot be reached to complete it: {e}"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        why = (
            "HF_HUB_OFFLINE is set"
            if offline_env
            else "local_files_only=True"
            if local_files_only
            else "the hub could not be reached"
        )
        how = (
            "unset HF_HUB_OFFLINE and connect to the internet once to download it"
            if offline_env
            else "connect to the internet once to download it"
        )
        at = f" at revision {revision!r}" if revision else ""
        raise HubError(
            f"cannot load {name!r}{at}: {why} and it is not in the Hugging Face cache"
            f"{' at ' + os.fspath(cache_dir) if cache_dir else ''}; {how}, or pass a local "
            f"folder (there is no folder {name!r} here)"
        ) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise HubError(f"cannot fetch {name!r} from the hub: {e}") from None
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder) and subfolder:
        raise HubError(f"hub repo {name!r} has no subfolder {subfolder!r}")
    if not os.path.isdir(folder):  # nothing matched
        raise HubError(
            f"hub repo {name!r} holds none of {', '.join(patterns)} at its root: a model in a "
            f"subfolder (a pipeline's unet/ or vae/) loads with {SUBFOLDER_HINT}, or with its "
            "pipeline"
        )
    return folder


class PushToHubMixin:
    """``push_to_hub`` for a class with ``save_pretrained(folder, torch_layout=..., variant=...)``,
    ``_hub_replace_patterns(variant)`` (the repo files an upload replaces: its own entries) and
    ``_hub_kept_patterns()`` (the repo files a variant is saved beside: configs and the like)."""

    def _hub_replace_patterns(self, variant: str | None) -> list[str]:
        raise NotImplementedError

    def _hub_kept_patterns(self) -> list[str]:
        raise NotImplementedError

    def push_to_hub(
        self,
        repo_id: str,
        *,
        torch_layout: bool = False,
        variant: str | None = None,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str = "Upload with flax_latentup",
        revision: str | None = None,
        create_pr: bool = False,
    ) -> Any:
        """Upload what :meth:`save_pretrained` writes (``torch_layout`` too) to the hub repo
        ``repo_id``, created if needed, in one commit that also deletes the repo's own entries
        of this object that the upload does not bring (an earlier upload's weights in another
        layout, say) and keeps the repo's other files (a README). Returns huggingface_hub's
        ``CommitInfo``.

        With ``variant`` (e.g. ``"fp16"``) the weights go up as that variant, beside what the
        repo holds: its configs are read first and must describe these models, as for
        ``save_pretrained(folder, variant=...)``; only this variant's older weights files are
        replaced.

        ``repo_id`` is checked before anything is written, and the repo is created before the
        (slow) save, so a missing token or a wrong name fails first.
        """
        import shutil
        import tempfile

        from huggingface_hub import HfApi
        from huggingface_hub import errors as hf_errors
        from huggingface_hub.utils import validate_repo_id

        if not isinstance(repo_id, str):
            raise ValueError(
                f"repo_id must be a hub repo id such as 'me/my-upscaler', got {repo_id!r}"
            )
        try:
            validate_repo_id(repo_id)
        except hf_errors.HFValidationError as e:
            raise ValueError(f"repo_id {repo_id!r} is not a valid hub repo id: {e}") from None
        variant = check_variant(variant)
        api = HfApi(token=token)
        try:
            repo = api.create_repo(repo_id, private=private, exist_ok=True)
        except (hf_errors.HfHubHTTPError, OSError) as e:
            raise HubError(f"cannot create hub repo {repo_id!r}: {e}") from None
        with tempfile.TemporaryDirectory(prefix="flax-latentup-push-") as folder:
            if variant is not None:
                kept = self._hub_kept_patterns()
                try:
                    there = api.snapshot_download(
                        repo_id=repo.repo_id, revision=revision, allow_patterns=kept
                    )
                except (hf_errors.HfHubHTTPError, OSError) as e:
                    raise HubError(f"cannot read hub repo {repo.repo_id!r}: {e}") from None
                # the cached snapshot may hold more of the repo (its weights, fetched before):
                # only the kept files are copied
                from huggingface_hub.utils import filter_repo_objects

                names = [
                    os.path.relpath(os.path.join(d, f), there)
                    for d, _, files in os.walk(there)
                    for f in files
                ]
                for name in filter_repo_objects(names, allow_patterns=kept):
                    target = os.path.join(folder, name)
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(os.path.join(there, name), target)
            try:
                self.save_pretrained(folder, torch_layout=torch_layout, variant=variant)  # type: ignore[attr-defined]
            except (ValueError, FileExistsError) as e:  # the repo's files refuse the variant
                message = str(e)
                for name in (os.path.realpath(folder), folder):
                    message = message.replace(name, f"hub repo {repo.repo_id}")
                raise type(e)(message) from None
            try:
                return api.upload_folder(
                    repo_id=repo.repo_id,
                    folder_path=folder,
                    commit_message=commit_message,
                    revision=revision,
                    create_pr=create_pr,
                    delete_patterns=self._hub_replace_patterns(variant),
                )
            except (hf_errors.HfHubHTTPError, OSError) as e:
                raise HubError(f"cannot upload to hub repo {repo.repo_id!r}: {e}") from None

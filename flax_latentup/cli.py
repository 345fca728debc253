"""The ``flax-latentup`` command: batch upscaling of folders, conversion, version.

``flax-latentup upscale -i INPUT [INPUT ...] -o OUTDIR [options]`` upscales pictures (PNG,
JPEG, WebP) and ``.npy`` low-res latents 2x. Outputs mirror the input names, are written
atomically (temporary file, then rename) and are skipped when they exist, so a killed run
continues where it stopped when started again. A corrupt input is reported and skipped;
the exit code is 1 when anything failed, 2 for bad usage, 130 when interrupted (Ctrl-C; 143 for
SIGTERM).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import functools
import glob
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

from flax_latentup import __version__, files
from flax_latentup.files import TMP_PREFIX, temporary_prefix  # noqa: F401 (re-exported)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
IMAGE_KINDS = "PNG/JPEG/WebP/BMP/TIFF/GIF"  # IMAGE_EXTS, as messages name them
LATENT_EXTS = (".npy",)
OUT_EXTS = ("png", "jpg", "webp")
ALPHA_EXTS = ("png", "webp")  # output formats that hold transparency
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("auto", "default", "high", "highest")
DEFAULT_MODEL = "stabilityai/sd-x2-latent-upscaler"
REPORT_NAME = "flax-latentup-report.json"
# What --unet-subfolder / --vae-subfolder typically name
SUBFOLDER_EXAMPLES = {
    "unet": "unet_ema of a fine-tuning checkpoint pushed to the hub whole",
    "vae": "vae of a whole pipeline's repo",
}


class UsageError(Exception):
    """A bad command line, found before any model is loaded."""


# --------------------------------------------------------------------------------------------
# Work items
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    """One input file and where its output goes."""

    src: str
    rel: str  # relative output name without extension (folder structure kept)
    out: str = ""
    prompt: str | None = None
    seed: int = 0
    note: str | None = None
    kind: str = ""  # "pixels" or "latents", from the file's header
    shape: tuple[int, ...] = ()  # the array's shape once fitted
    alpha: Any = None  # a picture's transparency at the output size (uint8), until written
    icc: bytes | None = None  # a picture's RGB colour profile, until written
    key: Any = None  # what the input file is (:func:`_file_key`), as listed


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_latentup", "jax_compilation_cache")


def _is_input(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS + LATENT_EXTS)


def shown(path: str) -> str:
    """``path`` as printed: bytes of a file name that are not UTF-8 (kept by Python as lone
    surrogates, which cannot be printed) as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def say(text: str) -> None:
    """Print ``text`` to standard output, characters its encoding cannot hold (a console
    that is not UTF-8) written as escapes rather than failing the print."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.encode(encoding, "backslashreplace").decode(encoding, "replace")
    except LookupError:  # an encoding Python does not know: print as it is
        pass
    print(text)


def _folder_files(folder: str, recursive: bool, failed: list[dict] | None = None) -> Iterable[str]:
    """The files in ``folder`` (and, recursively, its sub-folders), hidden ones left out as
    ``glob`` leaves them out, broken links kept (so that reading them fails by name). Links to
    folders are not followed: a link back up the tree would otherwise repeat it without end.
    A sub-folder that cannot be listed goes to ``failed``."""

    def unlisted(e: OSError) -> None:
        if failed is not None:
            failed.append({"input": e.filename or folder, "reason": f"cannot list: {e}"})

    for root, dirs, names in os.walk(folder, onerror=unlisted):
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not os.path.islink(os.path.join(root, d))
        )
        for name in names:
            path = os.path.join(root, name)
            if not name.startswith(".") and (os.path.isfile(path) or _is_broken_link(path)):
                yield path
        if not recursive:
            return


def glob_inputs(pattern: str, recursive: bool) -> list[str]:
    """``glob.glob(pattern, recursive=recursive)``, except that below a ``**`` nothing goes
    into links to folders (as an input folder's walk does not): a link back up the tree would
    repeat it without end. Sorted, each path once."""
    if not recursive or "**" not in pattern:
        return sorted(glob.glob(pattern, recursive=recursive))
    seps = os.sep + (os.altsep or "")
    drive, rest = os.path.splitdrive(pattern)
    anchor = drive + rest[: len(rest) - len(rest.lstrip(seps))]  # "/", "C:\\" or ""
    parts = [p for p in re.split(f"[{re.escape(seps)}]+", rest) if p]
    found: set[str] = set()

    def entries(folder: str) -> list[os.DirEntry]:
        try:
            with os.scandir(folder or os.curdir) as it:
                return list(it)
        except OSError:  # glob too passes over what it cannot list
            return []

    def match(folder: str, i: int, below: bool) -> None:
        # below: under a "**", where no link to a folder is gone into
        if i == len(parts):
            if folder and os.path.lexists(folder):
                found.add(folder)
            return
        part, last = parts[i], i == len(parts) - 1
        if part == "**":
            match(folder, i + 1, True)  # no folders at all
            for e in entries(folder):
                if e.name.startswith("."):
                    continue
                path = os.path.join(folder, e.name) if folder else e.name
                if last:
                    found.add(path)
                if e.is_dir(follow_symlinks=False):
                    match(path, i, True)
        elif glob.has_magic(part):
            for e in entries(folder):
                if e.name.startswith(".") and not part.startswith("."):
                    continue
                if fnmatch.fnmatch(e.name, part):
                    path = os.path.join(folder, e.name) if folder else e.name
                    if last:
                        found.add(path)
                    elif e.is_dir(follow_symlinks=not below):
                        match(path, i + 1, below)
        else:
            path = os.path.join(folder, part) if folder else part
            if last or (os.path.isdir(path) and not (below and os.path.islink(path))):
                match(path, i + 1, below)

    match(anchor, 0, False)
    if rest.endswith(tuple(seps)):  # "in/**/": folders only, as glob gives them
        return sorted(p + os.sep for p in found if os.path.isdir(p))
    return sorted(found)


def _is_broken_link(path: str) -> bool:
    return os.path.islink(path) and not os.path.exists(path)


def _file_key(path: str) -> Any:
    """What tells one file from another: its device and inode (two names of one file, such as
    a link or, where the file system ignores case, ``a.png`` and ``A.png``, have the same);
    a broken link's real path."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    if not st.st_ino:  # a file system without inode numbers
        return os.path.realpath(path)
    return (st.st_dev, st.st_ino)


def collect_inputs(
    inputs: Sequence[str], recursive: bool, report: dict[str, list] | None = None
) -> list[Item]:
    """Expand files, folders and glob patterns into work items (sorted, de-duplicated).

    A file listed twice (also through a link) is one item, named after the file itself
    rather than a link to it; with ``report``, each name left out goes to its ``"skipped"``
    and each sub-folder that cannot be listed to its ``"failed"``."""
    items: dict[str, Item] = {}
    failed: list[dict] = []

    def add(path: str, rel: str) -> None:
        key = _file_key(path)
        there = items.get(key)
        if there is None:
            items[key] = Item(src=path, rel=rel, key=key)
        elif os.path.islink(there.src) and not os.path.islink(path):
            items[key] = Item(src=path, rel=rel, key=key)  # the file's own name before a link's
            aliases.append((there.src, path))
        elif there.src != path:
            aliases.append((path, there.src))

    aliases: list[tuple[str, str]] = []
    for spec in inputs:
        if os.path.isdir(spec):
            found = sorted(p for p in _folder_files(spec, recursive, failed) if _is_input(p))
            if not found:
                hint = "" if recursive else " (use -r to search sub-folders)"
                raise UsageError(f"input folder {spec!r} holds no {IMAGE_KINDS}/.npy files{hint}")
            for p in found:
                add(p, os.path.splitext(os.path.relpath(p, spec))[0])
        elif os.path.isfile(spec):
            if not _is_input(spec):
                raise UsageError(
                    f"input {spec!r} is not a {IMAGE_KINDS} picture or .npy latents file"
                )
            add(spec, os.path.splitext(os.path.basename(spec))[0])
        elif glob.has_magic(spec):
            found = [
                p
                for p in glob_inputs(spec, recursive)
                if (os.path.isfile(p) or _is_broken_link(p)) and _is_input(p)
            ]
            if not found:
                raise UsageError(f"pattern {spec!r} matches no {IMAGE_KINDS}/.npy files")
            for p in found:
                add(p, os.path.splitext(os.path.basename(p))[0])
        elif _is_broken_link(spec):
            raise UsageError(f"input {spec!r} is a broken link")
        else:
            raise UsageError(f"input not found: {spec!r}")
    if report is not None:
        report["failed"] += failed
        report["skipped"] += [
            {"input": alias, "reason": f"the same file as {kept}"} for alias, kept in aliases
        ]
    return list(items.values())


def check_output_names(items: Sequence[Item], fold_case: bool = False) -> None:
    """A UsageError if two items would write the same output name (with ``fold_case``, for an
    output folder whose file system ignores case: the same but for case), or one would write
    a file where another's output needs a folder."""
    names: dict[str, Item] = {}
    for item in items:
        key = item.rel.lower() if fold_case else item.rel
        other = names.get(key)
        if other is not None:
            why = ""
            if other.rel != item.rel:
                why = f" (and {other.rel!r}: the output folder's file system ignores case)"
            raise UsageError(
                f"inputs {other.src!r} and {item.src!r} would both write output {item.rel!r}"
                f"{why}; rename one of them"
            )
        names[key] = item
    # one output's name as the folder of another's (x.jpg -> x.png, x.png/y.png -> x.png/y.png)
    outs = {(item.out.lower() if fold_case else item.out): item for item in items if item.out}
    for item in items:
        folder = item.out
        for _ in range(item.rel.count(os.sep) if item.out else 0):
            folder = os.path.dirname(folder)
            other = outs.get(folder.lower() if fold_case else folder)
            if other is not None:
                raise UsageError(
                    f"the output for {other.src!r} would be a file where the output for "
                    f"{item.src!r} needs a folder ({shown(folder)}); rename one of them (or "
                    "give another --suffix)"
                )


def _entry_key(path: str, fold_case: bool = False, folders: dict | None = None) -> Any:
    """What tells one name in a folder from another: its folder as that folder is
    (:func:`_file_key`; one folder reached by two paths is one) and the name in it (with
    ``fold_case``, in lower case), a link to a file followed. ``folders`` caches the folders'
    keys (one look at each folder, not one at each of its files)."""
    if os.path.islink(path):
        path = os.path.realpath(path)
    folder, name = os.path.split(path)
    folder = folder or os.curdir
    if folders is None:
        key = _file_key(folder)
    else:
        key = folders.get(folder)
        if key is None:
            key = folders[folder] = _file_key(folder)
    return key, name.lower() if fold_case else name


def plan_outputs(
    items: list[Item], outdir: str, suffix: str, ext: str, overwrite: bool
) -> tuple[list[Item], list[dict]]:
    """Set each item's output path; returns ``(items to upscale, skipped entries)``.

    An input found where another input's output goes (the output of an earlier run into the
    same folder, or of the same names) is left out, so that outputs are never read back as
    inputs; with ``overwrite`` that would replace an input, so it is a UsageError, as is an
    output that would be its own input or two inputs with one output name. A name is told
    by its folder, as that folder is (:func:`_file_key`), and the name in it: one folder
    reached by two paths (a bind mount, a folder mounted twice in a container) is one folder
    here, while two hard links to one file are two names (writing one leaves the other)."""
    # on a file system that ignores case, names that differ only in case are one file
    fold_case = files.ignores_case(outdir)

    folders: dict[str, Any] = {}

    def key(path: str) -> Any:
        return _entry_key(path, fold_case, folders)

    for item in items:
        item.out = os.path.join(outdir, item.rel + suffix + "." + ext)
    writers: dict[Any, list[Item]] = collections.defaultdict(list)  # output -> who writes it
    for item in items:
        writers[key(item.out)].append(item)
    kept, skipped = [], []
    for item in items:
        found = writers.get(key(item.src), [])
        others = [w for w in found if w is not item]
        if others and overwrite:
            raise UsageError(
                f"--overwrite would replace input {item.src!r} by the output for "
                f"{others[0].src!r}: choose an output folder apart from the inputs (or another "
                "--suffix)"
            )
        if others:  # an earlier run's output: left out, whether or not it would write itself
            why = f"it is where the output of {others[0].src} goes (an earlier run's?)"
            skipped.append({"input": item.src, "reason": why})
        elif found:
            raise UsageError(
                f"the output for {item.src!r} would be the input itself: choose another "
                "output folder (or a --suffix / --ext that differs)"
            )
        else:
            kept.append(item)
    check_output_names(kept, fold_case)
    return kept, skipped


def item_seed(seed: int, rel: str) -> int:
    """A per-image seed from ``--seed`` and the image's relative path (stable across runs; a
    name's bytes as stored, also where they are not UTF-8)."""
    digest = hashlib.sha256(f"{seed}:".encode() + os.fsencode(rel)).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _folder_and_parents(path: str) -> list[Any]:
    """What (:func:`_file_key`) the folder ``path`` (or, not made yet, its nearest existing
    parent) and each of its parents up to the root are."""
    keys, at = [], os.path.realpath(files.nearest_existing(path))
    while True:
        keys.append(_file_key(at))
        parent = os.path.dirname(at)
        if parent == at:
            return keys
        at = parent


def check_output_dir(outdir: str, inputs: Sequence[str], recursive: bool) -> None:
    """Refuse an output folder inside a recursed input folder (also where one of them is
    reached by another path, a bind mount); make sure it is writable."""
    if recursive:
        out = _folder_and_parents(outdir)
        for spec in inputs:
            if os.path.isdir(spec) and _file_key(spec) in out:
                raise UsageError(
                    f"output folder {outdir!r} is inside input folder {spec!r}: with -r its "
                    "outputs would be read back as inputs; choose another output folder"
                )
    try:
        files.probe_writable(outdir, create=False)  # made once every check has passed
    except OSError as e:
        raise UsageError(f"output folder {outdir!r} is not writable: {e}") from None


def report_path_for(path: str, process: tuple[int, int]) -> str:
    """The report path of this process: ``path`` itself for a single process, else with
    ``.process-I-of-N`` before the extension (each process reports its own share)."""
    index, count = process
    if count == 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}.process-{index}-of-{count}{ext}"


def remove_stale_temporaries(outdir: str, process_count: int = 1) -> int:
    """Delete temporary files a killed run left behind (:func:`files.is_stale_temporary`);
    returns how many this process removed.

    With several processes (``--distributed``, ``process_count > 1``) each cleans its output
    folder, shared or not, and all wait until every one has cleaned before any of them writes."""
    n = files.remove_stale_temporaries(outdir)
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("flax-latentup: stale temporaries removed")
    return n


def atomic_save(image, path: str, ext: str, icc: bytes | None = None) -> None:
    """Write a PIL image to ``path`` atomically (:func:`atomic_write`), with the ICC colour
    profile ``icc`` if given."""
    fmt = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
    kwargs: dict[str, Any] = {"quality": 95} if ext in ("jpg", "webp") else {}
    if icc:
        kwargs["icc_profile"] = icc
    files.atomic_write(path, lambda f: image.save(f, format=fmt, **kwargs))


# --------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------


def _latent_shape(shape: tuple[int, ...], dtype, nchw: bool, latent_channels: int):
    """The ``[h, w, C]`` shape of latents stored with ``shape``/``dtype``; ValueError if unusable."""
    import numpy as np

    if len(shape) == 4:
        if shape[0] != 1:
            raise ValueError(f"latents file holds a batch of {shape[0]}; expected one")
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(
            f"latents must be [h, w, {latent_channels}] or [1, h, w, {latent_channels}], "
            f"got {tuple(shape)}"
        )
    stored = tuple(shape)
    if nchw:
        shape = (shape[1], shape[2], shape[0])
    if shape[-1] != latent_channels:
        if nchw:  # as --nchw reads them: channels first
            hint = (
                " (stored channels last? leave out --nchw)" if stored[-1] == latent_channels else ""
            )
            raise ValueError(
                f"latents must have {latent_channels} channels first with --nchw, got shape "
                f"{stored}{hint}"
            )
        hint = " (saved from torch? pass --nchw)" if stored[0] == latent_channels else ""
        raise ValueError(
            f"latents must have {latent_channels} channels last, got shape {stored}{hint}"
        )
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"latents must be floating-point values, got {np.dtype(dtype).name}")
    return tuple(int(v) for v in shape)


# EXIF orientations 2-8 and the transposition that shows the picture upright (as
# PIL.ImageOps.exif_transpose, which diffusers' load_image applies).
_ORIENT = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE"}
_ORIENT.update({6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"})


@functools.cache
def _pillow_tiff_orientation() -> tuple[bool, bool]:
    """``(turns, sized)``: whether this Pillow turns a TIFF upright by its orientation tag
    itself as it decodes it (newer ones do), and whether the size it gives before decoding is
    then the upright one already (newer still). Told from a 2x1 picture stored on its side."""
    import io

    import PIL.Image

    buf = io.BytesIO()
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # on its side
    PIL.Image.new("L", (2, 1)).save(buf, "TIFF", exif=exif)
    with PIL.Image.open(buf) as im:
        sized = im.size == (1, 2)
        im.load()
        turns = im.size == (1, 2)
    return turns, turns and sized


def _declared_orientation(im) -> int:
    """The EXIF orientation (1-8) an opened picture declares before its pixels, 1 if none.

    A PNG's eXIf chunk counts only when it comes before the pixel data (PIL would decode the
    picture to look further), so that the size known from the header is the size read."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    try:
        value = int(im.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block: show the picture as stored
        return 1
    return value if value in _ORIENT else 1


def _orientation(im) -> int:
    """The EXIF orientation still to apply to an opened picture's decoded pixels: the one it
    declares (:func:`_declared_orientation`), 1 for a TIFF this Pillow turns itself."""
    if im.format == "TIFF" and _pillow_tiff_orientation()[0]:
        return 1
    return _declared_orientation(im)


def open_picture(path: str):
    """``PIL.Image.open(path)``; a TIFF stored on its side from its bytes in memory where
    this Pillow gives its upright size before decoding: Pillow 13 decodes an uncompressed
    grey or RGBA one wrongly when it reads it from a file (the stored size with the upright
    one's rows)."""
    import io

    import PIL.Image

    im = PIL.Image.open(path)
    if not (
        im.format == "TIFF"
        and _pillow_tiff_orientation() == (True, True)
        and _declared_orientation(im) >= 5
    ):
        return im
    im.close()
    with open(path, "rb") as f:
        return PIL.Image.open(io.BytesIO(f.read()))


def upright_transpose(im):
    """The ``PIL.Image.Transpose`` that shows the opened picture ``im`` upright by its EXIF
    orientation (see :func:`_orientation`), ``None`` for one stored upright."""
    import PIL.Image

    name = _ORIENT.get(_orientation(im))
    return getattr(PIL.Image.Transpose, name) if name else None


def read_text(path: str) -> str:
    """A prompt file's text (UTF-8, a byte-order mark allowed), stripped."""
    with open(path, encoding="utf-8-sig") as f:
        return f.read().strip()


def probe_input(
    path: str, nchw: bool, latent_channels: int = 4
) -> tuple[str, tuple[int, ...], int]:
    """``(kind, shape, frames)`` of an input from its header only (the pixels are not
    decoded): ``("pixels", (H, W, 3), frames)`` (an animation's or a multi-page file's
    ``frames``: the first is the one upscaled) or ``("latents", (h, w, C), 1)``. Raises for
    unreadable files and pictures :func:`~flax_latentup.pipeline.pil_to_rgb` refuses."""
    import numpy as np

    if path.lower().endswith(LATENT_EXTS):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return "latents", _latent_shape(arr.shape, arr.dtype, nchw, latent_channels), 1
    import PIL.Image

    from flax_latentup.pipeline import check_picture_mode

    with PIL.Image.open(path) as im:
        check_picture_mode(im)
        w, h = im.size
        sized = im.format == "TIFF" and _pillow_tiff_orientation()[1]  # upright already
        if not sized and _declared_orientation(im) >= 5:  # stored on its side
            w, h = h, w
        frames = getattr(im, "n_frames", 1)
    return "pixels", (h, w, 3), frames


@dataclasses.dataclass
class Input:
    """An input file's content, as :func:`read_input` reads it."""

    array: Any  # uint8 [H, W, 3] pixels, upright; or float32 [h, w, C] latents
    kind: str  # "pixels" or "latents"
    alpha: Any = None  # a picture's transparency (uint8 [H', W'] at the size asked), if any
    icc: bytes | None = None  # a picture's ICC profile of RGB colours, if any


def read_input(
    path: str,
    nchw: bool,
    latent_channels: int = 4,
    *,
    alpha_size: tuple[int, int] | None = None,
) -> Input:
    """Read a picture (turned upright by its EXIF orientation) or latents, decoding it once.

    A picture's embedded ICC profile comes with it where it describes RGB colours (the
    upscale's colours are the input's, so they keep it; a grey or CMYK one no longer fits
    them). With ``alpha_size`` (``(height, width)``), its transparency — an alpha channel, or
    a palette entry or colour marked transparent — comes too, turned upright as the colours
    and resized bicubic to that size: the model upscales colour only, this goes beside it."""
    import numpy as np

    if path.lower().endswith(LATENT_EXTS):
        arr = np.load(path, allow_pickle=False)
        _latent_shape(arr.shape, arr.dtype, nchw, latent_channels)
        if arr.ndim == 4:
            arr = arr[0]
        if nchw:
            arr = arr.transpose(1, 2, 0)
        with np.errstate(over="ignore"):  # beyond float32's range: caught just below
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError("latents contain NaN or infinite values (in float32)")
        return Input(arr, "latents")
    import PIL.Image

    from flax_latentup.pipeline import pil_to_rgb

    with open_picture(path) as im:
        transpose = upright_transpose(im)
        icc = im.info.get("icc_profile")
        # a 16-bit colour PNG: Pillow keeps the high bytes of its colours, the tRNS key whole
        wide = im.mode == "RGB" and any("16" in str(t[3]) for t in im.tile)  # (.., args)
        im.load()
        rgb = pil_to_rgb(im)  # 16-bit grey scaled, not clipped
        alpha = _alpha_channel(im, wide) if alpha_size is not None else None
    # an ICC header names its colour space in bytes 16-19
    icc = icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None
    if transpose is not None:  # upright, as the EXIF orientation says it is shown
        rgb = rgb.transpose(transpose)
    if alpha is not None:
        if transpose is not None:
            alpha = alpha.transpose(transpose)
        if alpha.size != (alpha_size[1], alpha_size[0]):
            alpha = alpha.resize((alpha_size[1], alpha_size[0]), PIL.Image.BICUBIC)
        alpha = np.asarray(alpha, dtype=np.uint8)
    return Input(np.asarray(rgb, dtype=np.uint8), "pixels", alpha, icc)


def _alpha_channel(im, wide: bool = False):
    """An opened picture's transparency as an 8-bit PIL image, ``None`` if it has none.
    ``wide``: ``im`` holds the high bytes of a 16-bit colour picture (a 48-bit PNG)."""
    import numpy as np
    import PIL.Image

    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
        return None
    if im.mode.startswith("I"):  # 16-bit grey with one value marked transparent:
        # Pillow's RGBA conversion clips to 8 bits first and loses the value
        opaque = np.asarray(im) != im.info["transparency"]
        return PIL.Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8))
    if wide and isinstance(im.info["transparency"], tuple):
        # the colour marked transparent is 16-bit and Pillow compares it with 8-bit colours
        # (so nothing would be): compared here by high bytes, as far as the colours are kept
        key = np.array([v >> 8 for v in im.info["transparency"]], np.uint8)
        opaque = (np.asarray(im.convert("RGB")) != key).any(axis=-1)
        return PIL.Image.fromarray(np.where(opaque, 255, 0).astype(np.uint8))
    return im.convert("RGBA").getchannel("A")


def fitted_size(h: int, w: int, kind: str) -> tuple[int, int]:
    """The size an input of ``h`` x ``w`` is upscaled at: pictures whose sides are not
    multiples of 32 go down to the nearest multiples (bicubic, as diffusers' image processor
    resizes to its multiple); latents must already fit. ValueError for what cannot be used."""
    if kind == "latents":
        if h % 4 or w % 4 or h < 8 or w < 8:
            raise ValueError(
                f"latents size {w}x{h} is not supported: sides must be multiples of 4, at least 8"
            )
        return h, w
    if h < 64 or w < 64:
        raise ValueError(f"picture size {w}x{h} is too small: sides must be at least 64")
    return h // 32 * 32, w // 32 * 32


def fit_size(arr, kind: str):
    """``arr`` brought to :func:`fitted_size` (pictures resized bicubic)."""
    import numpy as np

    h, w = arr.shape[:2]
    nh, nw = fitted_size(h, w, kind)
    if (nh, nw) == (h, w):
        return arr
    import PIL.Image

    resized = PIL.Image.fromarray(arr).resize((nw, nh), PIL.Image.BICUBIC)
    return np.asarray(resized, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# The upscale command
# --------------------------------------------------------------------------------------------


def add_upscale_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-i",
        "--input",
        nargs="+",
        action="extend",
        required=True,
        metavar="INPUT",
        help="picture/.npy files, folders or glob patterns (-i may be given more than once)",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument(
        "-r", "--recursive", action="store_true", help="search input folders recursively"
    )
    p.add_argument(
        "-n",
        "--model",
        default=DEFAULT_MODEL,
        help="hub repo id or local folder (default: %(default)s)",
    )
    p.add_argument(
        "--variant",
        default=None,
        help="weights variant of --model to load, e.g. fp16 (NAME.fp16.safetensors; a model "
        "that has none loads its plain weights, with a warning; default: the plain weights)",
    )
    p.add_argument(
        "--unet",
        default=None,
        metavar="MODEL",
        help="a UNet to run in place of --model's: a folder holding config.json and its weights "
        "(e.g. a fine-tuning checkpoint's unet_ema/) or a hub repo id",
    )
    p.add_argument(
        "--vae",
        default=None,
        metavar="MODEL",
        help="a VAE to run in place of --model's (folder or hub repo id, as --unet)",
    )
    for part in ("unet", "vae"):
        p.add_argument(
            f"--{part}-subfolder",
            default=None,
            metavar="DIR",
            help=f"the subfolder of --{part} that holds the model (e.g. {SUBFOLDER_EXAMPLES[part]})",
        )
    p.add_argument(
        "--prompt", default="", help="text prompt for every image (a sidecar NAME.txt overrides it)"
    )
    p.add_argument("--prompt-file", help="file whose text is the prompt for every image")
    p.add_argument(
        "--negative-prompt", default=None, help="negative prompt (used when --guidance > 1)"
    )
    p.add_argument("--steps", type=int, default=20, help="Euler steps (default: %(default)s)")
    p.add_argument(
        "--guidance", type=float, default=0.0, help="guidance scale; 0 ignores the prompt (default)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; each image's seed derives from it and its path",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per call, split over this host's devices (default: one per device)",
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default=None,
        help="compute dtype (default auto: bfloat16 on TPUs and GPUs from Ampere on, float16 on older GPUs, float32 on CPUs)",
    )
    p.add_argument("--fp32", action="store_true", help="same as --dtype float32")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="float32 matmul/convolution precision on TPUs and GPUs, where JAX's default runs "
        "bfloat16 passes (TPU) or TF32 (NVIDIA from Ampere on); default auto: highest (true "
        "float32) when the dtype is float32, else JAX's default. No effect on CPUs",
    )
    p.add_argument(
        "--tile",
        action="store_true",
        help="tiled VAE encode and decode (large pictures, less memory)",
    )
    p.add_argument(
        "--ext", choices=OUT_EXTS, default="png", help="output format (default: %(default)s)"
    )
    p.add_argument(
        "--alpha",
        choices=("keep", "drop"),
        default="keep",
        help="pictures with transparency: keep it (resized bicubic to the output size beside "
        "the upscaled colours; PNG and WebP outputs, JPEG has none) or drop it as diffusers "
        "does (default: %(default)s)",
    )
    p.add_argument("--suffix", default="", help="appended to output names, e.g. _x2")
    p.add_argument("--overwrite", action="store_true", help="redo images whose output exists")
    p.add_argument(
        "--nchw",
        action="store_true",
        help=".npy latents are [4, h, w] / [1, 4, h, w] (torch layout)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: call jax.distributed.initialize and upscale this host's share",
    )
    p.add_argument(
        "--compile-cache",
        default=None,
        metavar="DIR",
        help="JAX persistent compilation cache (default: a user cache folder)",
    )
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not turn on this command's compilation cache (JAX's own settings, such as "
        "JAX_COMPILATION_CACHE_DIR, still apply)",
    )
    p.add_argument(
        "--report", default=None, help=f"JSON report path (default: OUTDIR/{REPORT_NAME})"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def validate_upscale_args(args: argparse.Namespace) -> None:
    if not args.output:
        raise UsageError("-o/--output is empty: give the folder the outputs go to")
    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        raise UsageError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.prompt_file is not None and args.prompt:
        raise UsageError("give either --prompt or --prompt-file, not both")
    for flag in ("--prompt", "--negative-prompt"):
        text = getattr(args, flag[2:].replace("-", "_"))
        try:
            if text is not None:
                text.encode("utf-8")
        except UnicodeEncodeError:  # bytes of another encoding, kept by Python as escapes
            raise UsageError(
                f'{flag} is not UTF-8 text ("{shown(text)}"): give it in UTF-8'
            ) from None
    if os.sep in args.suffix or (os.altsep and os.altsep in args.suffix):
        raise UsageError(f"--suffix must not contain a path separator, got {args.suffix!r}")
    if args.compile_cache is not None and args.no_compile_cache:
        raise UsageError("give either --compile-cache or --no-compile-cache, not both")
    if args.fp32 and args.dtype is not None:
        raise UsageError("give either --dtype or --fp32 (the same as --dtype float32), not both")
    args.dtype = "float32" if args.fp32 else args.dtype or "auto"
    for part in ("unet", "vae"):
        sub = getattr(args, f"{part}_subfolder")
        if sub is None:
            continue
        if getattr(args, part) is None:
            raise UsageError(f"--{part}-subfolder needs --{part} (the folder or repo it is in)")
        sub = sub.replace("\\", "/")
        sub = sub.rstrip("/") or sub
        setattr(args, f"{part}_subfolder", sub)
        parts = sub.split("/")
        if not sub or os.path.isabs(sub) or any(q in ("", ".", "..") for q in parts):
            raise UsageError(
                f"--{part}-subfolder must be a relative path inside --{part}, such as "
                f"{SUBFOLDER_EXAMPLES[part].split()[0]}, got {sub!r}"
            )


def unused_prompt_notes(args: argparse.Namespace) -> list[str]:
    """What the run will not use of the prompts it was given: all of them at --guidance 0
    (sidecar prompts are then not read), the negative prompt at --guidance <= 1."""
    notes = []
    if args.guidance == 0 and args.prompt:
        given = "--prompt-file" if args.prompt_file is not None else "--prompt"
        notes.append(
            f"{given} is not used at --guidance 0 (the default), where the upscaler ignores "
            "the text (sidecar prompts are not read either); give --guidance > 0 (e.g. 6) for "
            "the prompt to count"
        )
    if args.guidance <= 1 and args.negative_prompt:
        notes.append("--negative-prompt is used only with classifier-free guidance, --guidance > 1")
    return notes


def read_upscale_files(args: argparse.Namespace) -> None:
    """The checks of ``upscale``'s arguments that read this machine's files: ``--prompt-file``
    (read into ``args.prompt``) and ``--compile-cache``."""
    if args.prompt_file is not None:
        if not os.path.isfile(args.prompt_file):
            raise UsageError(f"--prompt-file {args.prompt_file!r} is not a file")
        try:
            args.prompt = read_text(args.prompt_file)
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--prompt-file {args.prompt_file!r}: {e}") from None
    if args.compile_cache is not None:
        try:
            files.probe_writable(args.compile_cache, create=False)
        except OSError as e:
            raise UsageError(
                f"--compile-cache {args.compile_cache!r} cannot be used: {e}"
            ) from None


def check_report_path(
    path: str,
    flag: str = "--report",
    inputs: Sequence[Item] = (),
    outputs: Sequence[Item] = (),
    prompt_file: str | None = None,
    outdir: str | None = None,
) -> None:
    """Refuse a report path (``--report``, or the default one in the output folder) that
    could not be written, or that is an input (also by another name: a link, a hard link),
    an input's sidecar prompt, the prompt file, where an output goes (``outputs``' ``out``,
    in ``outdir``), below an output's name or a folder outputs go in, before any work is
    done."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file path")
    try:
        files.probe_writable(os.path.dirname(path) or ".", create=False)
    except OSError as e:
        raise UsageError(f"{flag} {path!r} cannot be written: {e}") from None
    fold_case = files.ignores_case(os.path.dirname(path) or ".")

    def fold(name: str) -> str:
        return name.lower() if fold_case else name

    def refuse(what: str) -> None:
        raise UsageError(f"{flag} {path!r} is {what}; give another path")

    folders: dict[str, Any] = {}
    mine = _entry_key(path, fold_case, folders)
    # an input is found by what it is; the names a report could take by name first, so
    # that a million inputs cost no more than a look at their names
    if os.path.exists(path):
        key = _file_key(path)
        for item in inputs:
            if item.key == key:
                refuse(f"the input {item.src!r}")

    def may_be(name_path: str) -> bool:  # the report's name, or a link that may lead to it
        return fold(os.path.basename(name_path)) == mine[1] or os.path.islink(name_path)

    for item in inputs:
        sidecar = os.path.splitext(item.src)[0] + ".txt"
        if may_be(sidecar) and _entry_key(sidecar, fold_case, folders) == mine:
            refuse(f"the prompt file of {item.src!r}")
    if prompt_file is not None and _entry_key(prompt_file, fold_case) == mine:
        refuse("the --prompt-file")
    # outputs: one of them, or a folder outputs go in, or one below an output's name; paths
    # compared as the folders really are (the output folder looked up once)
    real = os.path.realpath(path)
    parents, parent = set(), os.path.dirname(real)
    while parent != os.path.dirname(parent):
        parents.add(fold(parent))
        parent = os.path.dirname(parent)
    real_outdir = os.path.realpath(outdir) if outdir else None
    for item in outputs:
        if may_be(item.out) and _entry_key(item.out, fold_case, folders) == mine:
            refuse(f"where the output of {item.src!r} goes")
        out = fold(
            os.path.join(real_outdir, os.path.relpath(item.out, outdir))
            if real_outdir
            else os.path.realpath(item.out)
        )
        if out in parents:
            refuse(f"below where the output of {item.src!r} goes, a file")
        if out.startswith(fold(real) + os.sep):
            refuse(f"a folder the output of {item.src!r} goes in")


def resolve_model(model: str, variant: str | None = None, skip: Sequence[str] = ()) -> str:
    """The local folder of ``--model`` (fetched from the hub if needed, with the weights of
    ``variant``, without the components in ``skip``); a UsageError if unknown."""
    from flax_latentup import hub
    from flax_latentup.pipeline import fetch_pipeline_weights

    try:
        hub.check_variant(variant)
    except ValueError as e:
        raise UsageError(f"--variant: {e}") from None
    try:
        folder = fetch_pipeline_weights(model, variant, skip=skip)
    except hub.HubError as e:
        raise UsageError(f"--model: {e}") from None
    check_model_folder(folder, variant, skip)
    return folder


def check_model_folder(folder: str, variant: str | None, skip: Sequence[str] = ()) -> None:
    """A UsageError unless ``folder`` is a pipeline folder whose models (but those in
    ``skip``) have configs and weights (of ``variant``, where a model has it: see
    :func:`~flax_latentup.pipeline.model_variants`) and whose tokenizer loads; reads file
    names, the index, the weights files' headers and the tokenizer, no weights."""
    from flax_latentup.pipeline import (
        MODEL_CLASSES,
        check_pipeline_folder,
        load_tokenizer,
        model_variants,
        read_pipeline_index,
    )
    from flax_latentup.weights import WeightsError, open_weights

    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise UsageError(
            f"--model: {folder!r} is not a pipeline folder (it has no model_index.json)"
        )
    try:
        read_pipeline_index(folder)
        check_pipeline_folder(folder, skip=tuple(skip))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    try:
        variants = model_variants(folder, variant, skip, warn=False)  # loading warns
    except WeightsError as e:
        raise UsageError(f"--variant: {e}") from None
    for part, part_variant in variants.items():  # the models loaded from the folder
        where = os.path.join(folder, part)
        if not os.path.isfile(os.path.join(where, "config.json")):
            raise UsageError(f"--model: {where} has no config.json")
        try:
            open_weights(where, MODEL_CLASSES[part].weights_names(), part_variant)
        except WeightsError as e:
            raise UsageError(f"{'--variant' if part_variant else '--model'}: {e}") from None
    try:  # small files, read in well under a second
        load_tokenizer(os.path.join(folder, "tokenizer"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None


def resolve_component(flag: str, name: str, subfolder: str | None = None) -> str:
    """The local folder of a ``--unet``/``--vae`` model (its ``subfolder``; fetched from the
    hub if needed); a UsageError if unknown or if it holds no ``config.json`` (naming the
    subfolders that do, as a fine-tuning checkpoint's ``unet/`` and ``unet_ema/``)."""
    from flax_latentup import hub
    from flax_latentup.models.base import missing_config_message

    try:
        folder = hub.resolve(name, subfolder=subfolder, allow_patterns=hub.MODEL_PATTERNS)
    except hub.HubError as e:
        message = str(e).replace(hub.SUBFOLDER_HINT, f"{flag}-subfolder")
        raise UsageError(f"{flag}: {message}") from None
    if not os.path.isfile(os.path.join(folder, "config.json")):
        how = "" if subfolder else f" (or its name to {flag}-subfolder)"
        raise UsageError(f"{flag}: {missing_config_message(folder, how)}")
    return folder


def check_components_fit(model_dir: str, given: dict[str, str]) -> None:
    """A UsageError unless the components of ``model_dir`` and those ``given`` (``{"unet":
    folder, ...}``) can be used and fit together, from their configs alone (no weights are
    read): a value this port cannot use is named with its file."""
    from flax_latentup.configs import (
        AutoencoderKLConfig,
        CLIPTextConfig,
        UNet2DConditionConfig,
        check_components,
    )
    from flax_latentup.models.base import read_config
    from flax_latentup.sampling import EulerSchedulerConfig

    classes = {
        "text_encoder": CLIPTextConfig,
        "vae": AutoencoderKLConfig,
        "unet": UNet2DConditionConfig,
    }
    configs = {}
    for part, cls in classes.items():
        folder = given.get(part, os.path.join(model_dir, part))
        where = f"--{part}" if part in given else "--model"
        try:
            configs[part] = read_config(cls, os.path.join(folder, "config.json"))
        except (OSError, ValueError) as e:
            raise UsageError(f"{where}: {e}") from None
    try:
        read_config(
            EulerSchedulerConfig, os.path.join(model_dir, "scheduler", "scheduler_config.json")
        )
    except (OSError, ValueError) as e:
        raise UsageError(f"--model: {e}") from None
    try:
        check_components(configs["text_encoder"], configs["vae"], configs["unet"])
    except ValueError as e:
        if not given:
            raise UsageError(f"--model: its components do not fit together: {e}") from None
        flags = " and ".join(f"--{part}" for part in given)
        verb = "does" if len(given) == 1 else "do"
        raise UsageError(f"{flags} {verb} not fit --model: {e}") from None


def vae_downsample_factor(model_dir: str, given: dict[str, str]) -> int:
    """The downsample factor of the VAE the run uses (``--vae``'s, else ``--model``'s)."""
    from flax_latentup.configs import AutoencoderKLConfig
    from flax_latentup.models.base import read_config

    folder = given.get("vae", os.path.join(model_dir, "vae"))
    return read_config(AutoencoderKLConfig, os.path.join(folder, "config.json")).downsample_factor


def enable_compile_cache(path: str, given: bool = True) -> str | None:
    """Turn on JAX's persistent compilation cache in ``path``; returns ``path``. Where the
    default folder (not ``given``) cannot be made, a note says so and the run goes on without
    (``None``)."""
    import jax

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if given:
            raise UsageError(f"--compile-cache {path!r} cannot be made: {e}") from None
        print(f"note: no compilation cache: {e}", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    return path


def resolve_precision(name: str, dtype: str) -> str:
    """The matmul precision for ``--precision name``: ``auto`` is ``highest`` for float32 (the
    only reason to choose float32 over bfloat16 on an accelerator is accuracy), else
    ``default``."""
    if name != "auto":
        return name
    return "highest" if dtype == "float32" else "default"


def precision_scope(precision: str):
    """A context in which JAX's matmuls and convolutions run at ``precision``."""
    if precision == "default":
        return contextlib.nullcontext()
    import jax

    return jax.default_matmul_precision(precision)


def _batches(items: list[Item], size: int) -> Iterable[list[Item]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def resolve_dtype(name: str, device: Any) -> str:
    """The compute dtype for ``--dtype name`` on ``device``; ``auto`` is
    :func:`flax_latentup.preferred_dtype` (bfloat16 on TPUs and recent GPUs, float16 on older
    GPUs, float32 on CPUs)."""
    if name != "auto":
        return name
    from flax_latentup.pipeline import preferred_dtype

    return preferred_dtype(device).name


def plan_batch(requested: int | None, n_devices: int) -> tuple[int, str | None]:
    """``(images per call, note)`` for ``--batch-size requested`` over ``n_devices`` local
    devices: one image per device by default. A size that does not divide over the devices is
    kept (the calls are padded with copies) and the note says what that costs."""
    size = requested or n_devices
    if size % n_devices == 0:
        return size, None
    padded = -(-size // n_devices) * n_devices
    return size, (
        f"--batch-size {size} does not divide over {n_devices} devices: each call computes "
        f"{padded} images (padded with copies); a multiple of {n_devices} wastes nothing"
    )


# The largest side each output format holds (WebP's format limit; libjpeg's).
MAX_SIDE = {"webp": 16383, "jpg": 65500}


def scan_inputs(
    items: list[Item],
    nchw: bool,
    prompt: str,
    ext: str = "png",
    vae_factor: int = 8,
    sidecars: bool = True,
) -> tuple[dict, list[dict]]:
    """Group ``items`` by (kind, fitted shape) from their headers only, so that memory does not
    grow with the number of inputs; reads sidecar prompts (with ``sidecars``: not where the
    prompts go unused, at guidance 0). An output too large for ``ext`` fails its input here,
    before any upscaling (latents are decoded ``vae_factor`` times larger). Returns
    ``(groups, failures)``."""
    groups: dict[tuple, list[Item]] = {}
    failed: list[dict] = []
    for item in items:
        try:
            kind, shape, frames = probe_input(item.src, nchw)
        except Exception as e:  # unreadable or corrupt input: report and go on
            failed.append({"input": item.src, "reason": f"cannot read: {e}"})
            continue
        h, w = shape[:2]
        try:
            nh, nw = fitted_size(h, w, kind)
        except ValueError as e:
            failed.append({"input": item.src, "reason": str(e)})
            continue
        scale = 2 * (vae_factor if kind == "latents" else 1)
        if ext in MAX_SIDE and max(nh, nw) * scale > MAX_SIDE[ext]:
            failed.append(
                {
                    "input": item.src,
                    "reason": f"its output, {nw * scale}x{nh * scale}, is larger than "
                    f"{ext.upper()} holds ({MAX_SIDE[ext]} pixels a side): use --ext png",
                }
            )
            continue
        item.kind, item.shape = kind, (nh, nw, shape[2])
        notes = [f"the first of {frames} frames"] if frames > 1 else []
        if (nh, nw) != (h, w):
            notes.append(f"resized from {w}x{h} to {nw}x{nh}")
        item.note = "; ".join(notes) or None
        sidecar = os.path.splitext(item.src)[0] + ".txt"
        item.prompt = prompt
        if sidecars and os.path.isfile(sidecar):
            try:
                item.prompt = read_text(sidecar)
            except (OSError, UnicodeDecodeError) as e:
                failed.append({"input": item.src, "reason": f"cannot read its prompt: {e}"})
                continue
        groups.setdefault((kind, item.shape), []).append(item)
    return groups, failed


def load_item(item: Item, nchw: bool, alpha: bool = False):
    """The fitted array of a scanned item; ValueError if it no longer matches its header.
    A picture's RGB colour profile goes to ``item.icc``, and with ``alpha`` its transparency
    at the output size to ``item.alpha``."""
    out_size = (2 * item.shape[0], 2 * item.shape[1])
    got = read_input(item.src, nchw, alpha_size=out_size if alpha else None)
    arr = fit_size(got.array, got.kind)
    if (got.kind, arr.shape) != (item.kind, item.shape):
        raise ValueError(f"file changed while running: now {got.kind} of shape {arr.shape}")
    item.alpha, item.icc = got.alpha, got.icc
    return arr


def _load_chunk(chunk: list[Item], nchw: bool, alpha: bool) -> list[tuple[Item, Any]]:
    """``(item, array or the exception that reading it raised)`` for each item."""
    loaded = []
    for item in chunk:
        try:
            loaded.append((item, load_item(item, nchw, alpha)))
        except Exception as e:
            loaded.append((item, e))
    return loaded


def upscale_failure(error: Exception, batch: int, n_devices: int, tiled: bool) -> str:
    """The report's reason for the pictures of a call of ``batch`` images over ``n_devices``
    that raised ``error``; where a device ran out of memory, it names the settings that need
    less."""
    reason = f"upscaling failed: {error}"
    text = str(error)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        fixes = []
        if batch > n_devices:
            fixes.append(
                f"a --batch-size under {batch} (the call ran {batch} on {n_devices} device(s))"
            )
        if not tiled:
            fixes.append("--tile (the VAE in tiles, for large pictures)")
        if fixes:
            reason += f" [out of device memory: try {' or '.join(fixes)}]"
    return reason


def prepare_upscale(
    args: argparse.Namespace, process: tuple[int, int] = (0, 1)
) -> tuple[list[Item], dict[str, list], str, dict]:
    """Everything the ``upscale`` command checks before it loads a model: ``(items, listed,
    model_dir, components)``, the work list (every process's), what listing the inputs left
    out, the model folder and the ``--unet``/``--vae`` folders; ``process`` is this one's
    ``(index, count)``. Writes nothing (:func:`make_upscale_folders` makes the output folder)."""
    read_upscale_files(args)
    listed: dict[str, list] = {"skipped": [], "failed": []}
    items = collect_inputs(args.input, args.recursive, listed)
    check_output_dir(args.output, args.input, args.recursive)
    # never write over an input, nor read an output back as one
    found = items
    items, left_out = plan_outputs(found, args.output, args.suffix, args.ext, args.overwrite)
    listed["skipped"] += left_out
    report = report_path_for(args.report or os.path.join(args.output, REPORT_NAME), process)
    flag = "--report" if args.report else "the report"
    check_report_path(report, flag, found, items, args.prompt_file, args.output)
    components = {part: getattr(args, part) for part in ("unet", "vae")}
    components = {part: name for part, name in components.items() if name is not None}
    model_dir = resolve_model(args.model, args.variant, skip=tuple(components))
    components = {
        part: resolve_component(f"--{part}", n, getattr(args, f"{part}_subfolder"))
        for part, n in components.items()
    }
    check_components_fit(model_dir, components)
    return items, listed, model_dir, components


def make_upscale_folders(args: argparse.Namespace) -> list[str]:
    """Make the output folder and ``--report``'s; returns the folders made (see
    :func:`files.remove_made_folders`). A UsageError if one cannot be made (none is left
    made then)."""
    made: list[str] = []
    for folder, flag in (
        (args.output, "output"),
        (os.path.dirname(args.report or ""), "--report"),
    ):
        try:
            if folder:
                made += files.make_folders(folder)
        except OSError as e:
            files.remove_made_folders(made)
            raise UsageError(f"{flag} folder {folder!r} cannot be made: {e}") from None
    return made


# a weights file's fingerprint reads this many blocks of this size, spread evenly over it
_BLOCKS, _BLOCK = 32, 1 << 16


def model_fingerprints(
    model_dir: str, components: dict[str, str], variant: str | None = None
) -> dict[str, bytes]:
    """What a run's models are, by flag (``--model``, ``--unet``, ``--vae``), to compare across
    processes whose paths differ (each host its own copy or cache): the configs as parsed
    (bookkeeping keys, ``_name_or_path`` and the like, left out), the tokenizer's files, and
    the weights files that load, by name, size and 2 MiB read evenly across each (a model
    trained on has other bytes throughout)."""
    import hashlib
    import json

    from flax_latentup.models.base import read_json
    from flax_latentup.pipeline import MODEL_CLASSES, model_variants
    from flax_latentup.weights import open_weights

    def config(h: Any, path: str) -> None:
        data = {k: v for k, v in read_json(path).items() if not k.startswith("_")}
        h.update(json.dumps(data, sort_keys=True).encode())

    def sample(h: Any, path: str, whole: bool = False) -> None:
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}\0{size}\0".encode())
        with open(path, "rb") as f:
            if whole or size <= _BLOCKS * _BLOCK:
                h.update(f.read())
                return
            for i in range(_BLOCKS):
                f.seek((size - _BLOCK) * i // (_BLOCKS - 1))
                h.update(f.read(_BLOCK))

    def model(h: Any, part: str, folder: str, variant: str | None) -> None:
        h.update(part.encode() + b"\0")
        config(h, os.path.join(folder, "config.json"))
        for path in open_weights(folder, MODEL_CLASSES[part].weights_names(), variant).paths:
            sample(h, path)

    whole = hashlib.sha256()
    config(whole, os.path.join(model_dir, "scheduler", "scheduler_config.json"))
    tokenizer = os.path.join(model_dir, "tokenizer")
    for name in sorted(os.listdir(tokenizer)):
        if os.path.isfile(os.path.join(tokenizer, name)) and not name.startswith("."):
            sample(whole, os.path.join(tokenizer, name), whole=True)
    variants = model_variants(model_dir, variant, skip=tuple(components), warn=False)
    for part, part_variant in variants.items():
        model(whole, part, os.path.join(model_dir, part), part_variant)
    prints = {"--model": whole.digest()}
    for part in ("unet", "vae"):
        h = hashlib.sha256()
        if part in components:
            model(h, part, components[part], None)
        prints[f"--{part}"] = h.digest()
    return prints


# What every process of a --distributed run must have alike (each upscales its share of one
# list, with one set of settings), by flag; the inputs are compared by their names.
_AGREED = ("--prompt", "--negative-prompt", "--steps", "--guidance", "--seed", "--suffix", "--ext")
_AGREED += ("--alpha", "--nchw", "--dtype", "--precision", "--tile", "--variant")
# ... and the models, by what they are rather than by their paths
_FINGERPRINTED = ("--model", "--unet", "--vae")


def agree_across_processes(
    failure: Exception | None,
    items: list[Item],
    args: argparse.Namespace,
    fingerprints: dict[str, bytes] | None = None,
) -> None:
    """With ``--distributed``, after every process's checks (a collective: all call it):
    ``failure`` (this process's, raised here) or a UsageError in every process if another
    failed its checks, or if they do not list the same inputs, were given other settings, or
    load other models (``fingerprints``, see :func:`model_fingerprints`). Nothing has been
    upscaled then."""
    import hashlib

    import jax
    import numpy as np

    from flax_latentup.parallel import all_processes

    def digest(data: bytes) -> int:  # 31 bits of a hash, an int32
        return int.from_bytes(hashlib.sha256(data).digest()[:4], "little") >> 1

    names = b"\0".join(os.fsencode(item.rel) for item in items)
    settings = [repr(getattr(args, f[2:].replace("-", "_"))).encode() for f in _AGREED]
    fingerprints = fingerprints or {}
    settings += [fingerprints.get(flag, b"") for flag in _FINGERPRINTED]
    mine = np.array(
        [failure is not None, len(items), digest(names), *map(digest, settings)], np.int32
    )
    every = all_processes(mine)
    if failure is not None:
        raise failure
    failing = [i for i, row in enumerate(every) if row[0]]
    if failing:
        which = ", ".join(map(str, failing))
        raise UsageError(
            f"--distributed: process(es) {which} of {len(every)} stopped at their checks (their "
            "own messages say why); nothing was upscaled"
        )
    differ = [j for j in range(1, mine.size) if (every[:, j] != every[0, j]).any()]
    if differ:
        what = []
        if 1 in differ or 2 in differ:
            counts = ", ".join(f"process {i}: {row[1]}" for i, row in enumerate(every))
            what.append(f"the inputs ({counts})")
        what += [(_AGREED + _FINGERPRINTED)[j - 3] for j in differ if j >= 3]
        raise UsageError(
            f"--distributed: the processes differ in {', '.join(what)} (process "
            f"{jax.process_index()} is this one): give every process the same inputs (e.g. on "
            "a file system they share), settings and model files (configs and weights), since "
            "each upscales its share of one list"
        )


def share_remaining_work(
    items: list[Item], overwrite: bool, process: tuple[int, int]
) -> tuple[list[Item], list[dict]]:
    """With ``--distributed``, after :func:`agree_across_processes` (a collective: all call
    it): this process's share of the inputs whose output no process sees yet (all of them with
    ``overwrite``), so that a rerun after a stop splits what is left evenly rather than by the
    first run's shares; and the report's entries for those done before (process 0's; none for
    the others). Every process looks before any writes: the shares match."""
    import numpy as np

    from flax_latentup import parallel

    already: list[dict] = []
    if items and not overwrite:  # (the same count in every process: agreed)
        mine = np.array([os.path.isfile(item.out) for item in items], np.uint8)
        seen = parallel.all_processes(mine).any(axis=0)
        if process[0] == 0:
            already = [
                {"input": item.src, "output": item.out, "reason": "output exists"}
                for item, done in zip(items, seen, strict=True)
                if done
            ]
        items = [item for item, done in zip(items, seen, strict=True) if not done]
    return parallel.process_share(items, *process), already


class Stopped(KeyboardInterrupt):
    """A stop asked for by a signal: :attr:`exit_code` is the shell's code for it (128 + the
    signal's number: 130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_code = 128 + signum


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (``timeout``, ``docker stop``, a batch scheduler) as a
    request to stop, while in use: each raises :class:`Stopped` where the run is, and is
    kept, so that one swallowed where Python cannot raise it (inside a garbage-collection
    callback of XLA's) still stops the run at its next :meth:`check`. :attr:`exit_code` is
    the shell's for the signal (130, 143)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        raise Stopped(self.signum)

    def check(self) -> None:
        """:class:`Stopped` if a stop was asked for."""
        if self.signum is not None:
            raise Stopped(self.signum)

    @property
    def exit_code(self) -> int:
        import signal

        return 128 + (self.signum or signal.SIGINT)


def run_upscale(args: argparse.Namespace) -> int:
    """The ``upscale`` command; returns the exit code."""
    with StopSignals() as stop:
        return _run_upscale(args, stop)


def _run_upscale(args: argparse.Namespace, stop: StopSignals) -> int:
    validate_upscale_args(args)
    files.new_file_mode()  # read while no other thread runs
    process = (0, 1)  # (index, count) among the processes sharing the work
    if args.distributed:
        # first, so that a process failing its checks stops the others at once (they would
        # otherwise wait for it in jax.distributed.initialize until its timeout)
        import jax

        from flax_latentup import parallel

        try:
            parallel.initialize_distributed()
        except ValueError as e:
            raise UsageError(f"--distributed: {e}") from None
        process = (jax.process_index(), jax.process_count())
    if process[1] > 1:
        made: list[str] = []
        try:
            items, listed, model_dir, components = prepare_upscale(args, process)
            fingerprints = model_fingerprints(model_dir, components, args.variant)
            made = make_upscale_folders(args)
            failure = None
        except Exception as e:  # whatever stops this process stops the others with it
            items, fingerprints, failure = [], {}, e
        try:
            agree_across_processes(failure, items, args, fingerprints)
        except BaseException:  # nothing is upscaled: no folder is left made for nothing
            files.remove_made_folders(made)
            raise
        items, already = share_remaining_work(items, args.overwrite, process)
    else:
        items, listed, model_dir, components = prepare_upscale(args)
        made = make_upscale_folders(args)
        already = []
    cache = None if args.no_compile_cache else (args.compile_cache or default_cache_dir())
    if cache:
        cache = enable_compile_cache(cache, given=args.compile_cache is not None)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm.auto import tqdm

    from flax_latentup import FlaxStableDiffusionLatentUpscalePipeline

    n_devices = jax.local_device_count()
    batch_size, note = plan_batch(args.batch_size, n_devices)
    if note:
        print(f"note: {note}", file=sys.stderr)
    for note in unused_prompt_notes(args):
        print(f"note: {note}", file=sys.stderr)
    dtype = resolve_dtype(args.dtype, jax.local_devices()[0])
    precision = resolve_precision(args.precision, dtype)

    stale = remove_stale_temporaries(args.output, process[1])
    started = time.perf_counter()
    report: dict[str, Any] = {
        "version": __version__,
        "model": args.model,
        "variant": args.variant,
        "unet": args.unet,
        "unet_subfolder": args.unet_subfolder,
        "vae": args.vae,
        "vae_subfolder": args.vae_subfolder,
        "settings": {
            "steps": args.steps,
            "guidance": args.guidance,
            "seed": args.seed,
            "dtype": dtype,
            "precision": precision,
            "batch_size": batch_size,
            "devices": n_devices,
            "tile": args.tile,
            "ext": args.ext,
            "alpha": args.alpha,
        },
        "process": {"index": process[0], "count": process[1]},
        "done": [],
        # what listing the inputs found is reported once, by the first process
        "skipped": (listed["skipped"] + already) if process[0] == 0 else [],
        "failed": listed["failed"] if process[0] == 0 else [],
        "stale_temporaries_removed": stale,
    }
    todo: list[Item] = []
    for item in items:
        item.seed = item_seed(args.seed, item.rel)
        if os.path.isdir(item.out):
            report["failed"].append(
                {"input": item.src, "reason": f"cannot write {item.out}: a folder is in its place"}
            )
        elif os.path.exists(item.out) and not args.overwrite:
            report["skipped"].append(
                {"input": item.src, "output": item.out, "reason": "output exists"}
            )
        else:
            todo.append(item)

    # Headers only: each size compiles once, and pixels are read one batch ahead.
    groups, failed = scan_inputs(
        todo,
        args.nchw,
        args.prompt,
        args.ext,
        vae_downsample_factor(model_dir, components),
        sidecars=args.guidance != 0,
    )
    report["failed"] += failed

    compile_seconds = [0.0]

    def on_event(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)

    pipe = None
    if groups:
        from flax_latentup import ConfigError, HubError, WeightsError
        from flax_latentup.pipeline import MODEL_CLASSES

        try:
            given = {
                part: MODEL_CLASSES[part].from_pretrained(folder, dtype=jnp.dtype(dtype))
                for part, folder in components.items()
            }
            pipe = FlaxStableDiffusionLatentUpscalePipeline.from_pretrained(
                model_dir, dtype=jnp.dtype(dtype), variant=args.variant, **given
            )
        except (ConfigError, HubError, WeightsError) as e:  # weights that do not fit, ...
            files.remove_made_folders(made)  # nothing was upscaled: no folder made for nothing
            which = " / ".join(["--model", *(f"--{part}" for part in components)])
            raise UsageError(f"cannot load the model ({which}): {e}") from None
        pipe.set_progress_bar_config(disable=True)
        if args.tile:
            pipe.enable_vae_tiling()
    load_seconds = time.perf_counter() - started

    # (images, the batch they are padded to): a group smaller than the batch size is not
    # padded beyond its own size
    chunks = [
        (c, min(batch_size, len(members)))
        for members in groups.values()
        for c in _batches(members, batch_size)
    ]
    total = sum(len(c) for c, _ in chunks)
    bar = tqdm(total=total, unit="img", disable=args.quiet or total == 0, dynamic_ncols=True)
    run_started = time.perf_counter()

    def save(item: Item, image) -> dict:
        entry = {"input": item.src, "output": item.out, "seed": item.seed}
        (alpha, item.alpha), (icc, item.icc) = (item.alpha, None), (item.icc, None)
        if alpha is not None and args.ext in ALPHA_EXTS:
            import PIL.Image

            image.putalpha(PIL.Image.fromarray(alpha))
            entry["alpha"] = "kept"
        elif alpha is not None:
            entry["alpha"] = f"dropped: {args.ext.upper()} holds no transparency"
        atomic_save(image, item.out, args.ext, icc)
        if item.note:
            entry["note"] = item.note
        return entry

    # The device works on one batch while a thread reads the next and others encode and write
    # the previous ones; at most a few batches are held in memory at any time.
    pending: collections.deque = collections.deque()  # (item, future of its save), in order

    failures: dict[Any, dict] = {}  # a failed write's report entry, by its future

    def finish(keep: int) -> None:
        # a write leaves the queue once reported: Ctrl-C while waiting for one leaves it there
        # for the interrupted run's report (the write itself finishes)
        while len(pending) > keep:
            item, future = pending[0]
            if future.cancelled():  # dropped by an interrupt, never written
                pending.popleft()
                continue
            try:
                entry, outcome = future.result(), "done"
            except Exception as e:  # a full disk, a vanished folder: report and go on
                reason = f"cannot write {item.out}: {e}"
                entry = failures.setdefault(future, {"input": item.src, "reason": reason})
                outcome = "failed"
            if not (report[outcome] and report[outcome][-1] is entry):  # once, if cut here
                report[outcome].append(entry)
            pending.popleft()
            failures.pop(future, None)  # (its traceback holds the picture)
            bar.update(1)

    reader = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="flax-latentup-read")
    writer = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="flax-latentup-write")
    interrupted = False
    try:
        keep_alpha = args.alpha == "keep"
        ahead = reader.submit(_load_chunk, chunks[0][0], args.nchw, keep_alpha) if chunks else None
        for i in range(len(chunks)):
            stop.check()
            loaded, padded_size = ahead.result(), chunks[i][1]
            if i + 1 < len(chunks):
                ahead = reader.submit(_load_chunk, chunks[i + 1][0], args.nchw, keep_alpha)
            good = [(it, a) for it, a in loaded if not isinstance(a, BaseException)]
            for it, e in loaded:
                if isinstance(e, BaseException):
                    report["failed"].append({"input": it.src, "reason": f"cannot read: {e}"})
                    bar.update(1)
            if not good:
                continue
            arrays = [a for _, a in good]
            seeds = [it.seed for it, _ in good]
            prompts = [it.prompt for it, _ in good]
            # pad to the batch size so every batch of this group has one compiled shape
            while len(arrays) < padded_size:
                arrays.append(arrays[-1])
                seeds.append(seeds[-1])
                prompts.append(prompts[-1])
            try:
                with precision_scope(precision):
                    images = pipe(
                        prompt=prompts,
                        image=np.stack(arrays),
                        num_inference_steps=args.steps,
                        guidance_scale=args.guidance,
                        negative_prompt=args.negative_prompt,
                        rng=seeds,
                        output_type="pil",
                    ).images[: len(good)]
            except Exception as e:
                reason = upscale_failure(e, padded_size, n_devices, args.tile)
                for it, _ in good:
                    it.alpha = it.icc = None
                    report["failed"].append({"input": it.src, "reason": reason})
                    bar.update(1)
                continue
            del arrays
            for (it, _), im in zip(good, images, strict=True):
                pending.append((it, writer.submit(save, it, im)))
            finish(keep=2 * batch_size)  # bounded: older writes must be done by now
        finish(keep=0)
        stop.check()  # one asked for during the last batch
    except KeyboardInterrupt:
        interrupted = True
    finally:
        # An interrupted run leaves only whole files: queued writes are dropped, the ones
        # under way finish their rename or remove their temporary.
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if interrupted:  # the report holds what was written; a rerun does the rest
        finish(keep=0)
        report["interrupted"] = True
    run_seconds = time.perf_counter() - run_started
    done = len(report["done"])
    report["timing"] = {
        "load_seconds": round(load_seconds, 3),
        "compile_seconds": round(compile_seconds[0], 3),
        "run_seconds_including_compile": round(run_seconds, 3),
        "images_per_second_excluding_compile": round(
            done / max(run_seconds - compile_seconds[0], 1e-9), 4
        )
        if done
        else 0.0,
        "compile_cache": cache,
    }
    report_path = report_path_for(args.report or os.path.join(args.output, REPORT_NAME), process)
    try:  # a full disk: what was done is still said below
        files.atomic_write(report_path, lambda f: json.dump(report, f, indent=2), text=True)
        unwritten = None
    except OSError as e:
        unwritten = e

    say(
        f"{'interrupted: ' if interrupted else ''}done {done}, skipped "
        f"{len(report['skipped'])}, failed {len(report['failed'])} (compile "
        f"{compile_seconds[0]:.1f}s, run {run_seconds:.1f}s); report: "
        f"{'not written' if unwritten else shown(report_path)}"
    )
    for f in report["failed"]:
        say(f"  failed: {shown(f['input'])}: {shown(f['reason'])}")
    if unwritten is not None:
        print(f"error: cannot write the report {shown(report_path)}: {unwritten}", file=sys.stderr)
    if interrupted:
        print("interrupted: run the same command again to do the rest", file=sys.stderr)
        return stop.exit_code
    return 1 if report["failed"] or unwritten is not None else 0


def run_selftest(outdir: str) -> int:
    """Upscale a generated picture with a freshly built tiny model; 0 when the output is right."""
    import numpy as np
    import PIL.Image

    from flax_latentup.tiny import make_tiny_pipeline

    check_output_dir(outdir, [], recursive=False)  # before the model is built
    with tempfile.TemporaryDirectory(prefix="flax-latentup-selftest-") as tmp:
        model = os.path.join(tmp, "tiny-model")
        make_tiny_pipeline(model)
        y, x = np.mgrid[0:64, 0:64]
        picture = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
        src = os.path.join(tmp, "gradient.png")
        PIL.Image.fromarray(picture).save(src)
        args = build_parser().parse_args(
            [
                "upscale",
                "-i",
                src,
                "-o",
                outdir,
                "-n",
                model,
                "--steps",
                "4",
                "--no-compile-cache",
                "--overwrite",
                "--quiet",
            ]
        )
        code = run_upscale(args)
    out = os.path.join(outdir, "gradient.png")
    if code != 0 or not os.path.isfile(out):
        print("selftest FAILED", file=sys.stderr)
        return 1
    with PIL.Image.open(out) as im:
        size = im.size
    ok = size == (128, 128)
    say(f"selftest {'passed' if ok else 'FAILED'}: {shown(out)} ({size[0]}x{size[1]})")
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-latentup",
        description="JAX/Flax Stable Diffusion x2 latent upscaler.",
    )
    parser.add_argument("--version", action="version", version=f"flax-latentup {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    up = sub.add_parser(
        "upscale",
        help="upscale pictures or latents 2x",
        description=f"Upscale pictures ({IMAGE_KINDS}) or .npy low-res latents 2x.",
    )
    add_upscale_args(up)
    sub.add_parser(
        "convert", help="convert a pipeline between torch and Flax folders", add_help=False
    )
    st = sub.add_parser(
        "selftest",
        help="check this install offline: upscale a generated picture with a tiny random model",
        description="Build a tiny random-weight pipeline folder (no download), upscale a "
        "generated 64x64 picture through the full pipeline and write the result.",
    )
    st.add_argument("-o", "--output", default="flax-latentup-selftest", help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flax-latentup`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "convert":
        try:
            from flax_latentup_convert import main as convert_main
        except ImportError:
            print(
                "error: `flax-latentup convert` needs the converter and torch: "
                "pip install 'flax_latentup[torch]'",
                file=sys.stderr,
            )
            return 2
        return convert_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"selftest": lambda: run_selftest(args.output), "upscale": lambda: run_upscale(args)}
    if args.command in commands:
        try:
            return commands[args.command]()
        except UsageError as e:
            print(f"flax-latentup {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # before the run's own handling (e.g. while loading)
            print(f"flax-latentup {args.command}: interrupted", file=sys.stderr)
            return getattr(e, "exit_code", 130)
    parser.print_help(sys.stderr)
    return 2


def console_main() -> None:
    """The ``flax-latentup`` command: :func:`main`, ended at once once it was interrupted
    (its report and messages written), rather than through the interpreter's teardown, which
    would wait for a compilation the interrupt left running and can crash in it."""
    code = main()
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    console_main()

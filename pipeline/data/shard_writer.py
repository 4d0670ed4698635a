"""Image folder -> hash-checked webdataset shards (the `shard` stage).

Input is an ImageNet-layout folder ``root/train/<class>/*`` and
``root/val/<class>/*``. Classes are sorted by name (torchvision ImageFolder
order, hidden ``.folders`` skipped); files are every entry below a class
folder that is not a folder, sorted by relative path (symlinks, FIFOs and the
like are rejected with a reason, never read blocking and never left uncounted).

Choices made here (also in the manifest's ``policy``):

- **Checks.** Every file is fully decoded (``verify()`` then, on a fresh
  handle, ``load()`` and the reader's RGB conversion) under a pixel limit
  checked from the header, so bombs are rejected without allocating them.
  JPEG (and MPO, a JPEG container) is kept as ``.jpg``, PNG as ``.png``, with
  the ORIGINAL bytes whatever the file is named. Other decodable formats (GIF,
  BMP, WEBP, TIFF, ...) are rejected as "unsupported format X": re-encoding
  would break "shards hold the original bytes" and GIF/TIFF may hold several
  frames. Every rejected file is listed with its reason in the manifest.
- **Subset.** ``per_class`` / ``percent`` pick, of each class's *decodable*
  train files sorted by path, the first N of a seeded permutation
  (``subset="seeded"``) or simply the first N (``subset="first"``, the official
  code's ``--subset``: the paper's 20% ImageNet is ``per_class=260``),
  so adding, removing or breaking an undecodable file never changes which
  images are chosen. Val is always complete.
- **Order.** Train samples are written in a seeded permutation (shards mix
  classes); val in ImageFolder order. Tar headers have a fixed mtime, owner
  and mode, so the same folder and params give byte-identical shards.
- **Atomic output.** Everything is written into a temporary sibling folder that
  replaces the output folder by rename at the end.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline.core.config import SYNTHETIC_ROOT, DataConfig
from pipeline.core.errors import UserError
from pipeline.core.files import remove_stale_temporaries, replace_dir, restore_moved_aside, sha256_file, write_error
from pipeline.core.seeding import make_generator

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
SPLITS = ("train", "val")
DEFAULT_MAX_PIXELS = 40_000_000
# Fixed tar header fields: TarWriter would otherwise stamp time.time() into every member.
TAR_MTIME = 0  # an int: a float mtime makes tarfile add a PAX header to every member
TAR_USER = "attmask"
TAR_MODE = 0o444
# PIL format name -> shard extension. MPO is the multi-picture JPEG some cameras write.
KEPT_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}
_INLINE_CHECK_BELOW = 64  # a process pool costs more than it saves on tiny folders

T = TypeVar("T")


class DatasetError(UserError, ValueError):
    """The image folder is unusable; the message names the path and what was expected."""


@dataclass(frozen=True)
class SourceFile:
    """One candidate file: ``rel`` is its POSIX path relative to the data root."""

    split: str
    class_name: str
    label: int
    rel: str
    path: Path


@dataclass(frozen=True)
class ImageCheck:
    """Outcome of :func:`check_image`: ``ext`` ("jpg" | "png") when kept, else ``reason``."""

    ext: str | None
    reason: str | None
    sha256: str
    width: int = 0
    height: int = 0
    mode: str = ""

    @property
    def ok(self) -> bool:
        return self.ext is not None


@dataclass(frozen=True)
class FolderScan:
    """Classes (index order) and candidate files per split, each list sorted by ``rel``."""

    root: Path
    classes: list[str]
    files: dict[str, dict[str, list[SourceFile]]]  # split -> class -> files

    def all_files(self) -> list[SourceFile]:
        return [f for split in SPLITS for name in self.files[split] for f in self.files[split][name]]


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_shards` did: the manifest it wrote and how long it took."""

    out_dir: Path
    manifest: dict[str, Any]
    seconds: float

    def summary(self) -> dict[str, Any]:
        """Totals per split, shard count and throughput (images read per second)."""
        totals = self.manifest["totals"]
        files = sum(t["files_in"] for t in totals.values())
        return {
            "out_dir": str(self.out_dir),
            "totals": totals,
            "shards": len(self.manifest["shards"]),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(files / max(self.seconds, 1e-9), 1),
        }

    def summary_line(self) -> str:
        s = self.summary()
        parts = [
            f"{split} {t['selected']} sharded / {t['kept']} kept / {t['rejected']} rejected"
            for split, t in s["totals"].items()
        ]
        return f"shard: {', '.join(parts)}; {s['shards']} shards in {s['out_dir']}, {s['images_per_second']:.0f} images/s"


# ---------------------------------------------------------------------- scanning
def resolve_root(config: DataConfig) -> Path:
    """The image folder ``config`` points at (the generator's output for ``synthetic``)."""
    return Path(SYNTHETIC_ROOT if config.source == "synthetic" else config.root)


def scan_folder(root: str | Path) -> FolderScan:
    """List classes and candidate files; check the layout before anything is read.

    Raises:
        DatasetError: root, ``train/`` or ``val/`` missing, no class folders,
            empty class folders, or a val class absent from train.
    """
    root = Path(root)
    layout = "a folder with train/<class>/<image> and val/<class>/<image>"
    if not root.is_dir():
        raise DatasetError(f"{root}: data root not found; expected {layout}")
    problems: list[str] = []
    per_split: dict[str, dict[str, list[str]]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DatasetError(f"{folder}: no {split}/ folder; expected {split}/<class>/<image> under {root}")
        names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DatasetError(f"{folder}: no class folders; expected {split}/<class>/<image>")
        per_split[split] = {}
        for name in names:
            rels = _candidate_files(root, folder / name)
            if not rels:
                problems.append(f"{folder / name}: empty class folder; expected at least one image file")
            per_split[split][name] = rels
    classes = sorted(per_split["train"])
    for name in per_split["val"]:
        if name not in per_split["train"]:
            problems.append(
                f"{root / 'val' / name}: class {name!r} is in val but not in train; "
                f"expected every val class to have a folder in {root / 'train'}"
            )
    if problems:
        raise DatasetError("\n".join(problems))
    label = {name: i for i, name in enumerate(classes)}
    files = {
        split: {
            name: [SourceFile(split, name, label[name], rel, root / rel) for rel in rels]
            for name, rels in per_split[split].items()
        }
        for split in SPLITS
    }
    return FolderScan(root, classes, files)


def _candidate_files(root: Path, folder: Path) -> list[str]:
    """Every entry below ``folder`` that is not a real folder, relative to root, sorted.

    Symlinks (dangling or to a folder), FIFOs and sockets are listed too, so
    :func:`check_file` rejects them with a reason instead of their vanishing
    from the counts. Symlinked folders are not descended into (no loops).
    """
    return sorted(
        p.relative_to(root).as_posix() for p in folder.rglob("*") if p.is_symlink() or not p.is_dir()
    )


# ------------------------------------------------------------------ image checks
def to_rgb(image: Image.Image) -> Image.Image:
    """RGB view of any decoded PIL image (what the reader feeds the transforms).

    16-bit/32-bit integer images are scaled from 0..65535 to 0..255 (PIL's own
    ``convert("RGB")`` would clip them to white); alpha is dropped, like
    torchvision's ImageFolder loader.
    """
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            pixels = pixels / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # via RGBA: PIL warns when palette transparency is dropped directly
    return image.convert("RGB")


def check_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """Decide whether ``data`` is a JPEG or PNG we can fully decode.

    The size is read from the header and compared to ``max_pixels`` before any
    pixel is decoded. Returns an :class:`ImageCheck` (never raises for bad data).
    """
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageCheck(None, "empty file (0 bytes)", digest)
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. corrupt EXIF: harmless, the pixels decode
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height), mode = image.format or fmt, image.size, image.mode
                if width * height > max_pixels:
                    return ImageCheck(None, _too_large(width, height, max_pixels), digest, width, height, mode)
                ext = KEPT_FORMATS.get(fmt)
                if ext is None:
                    return ImageCheck(
                        None, f"unsupported format {fmt} (only JPEG and PNG are sharded; convert it to PNG)",
                        digest, width, height, mode,
                    )
                image.verify()
            with Image.open(io.BytesIO(data)) as image:  # verify() leaves the handle unusable
                image.load()
                to_rgb(image)
    except Image.DecompressionBombError as error:
        return ImageCheck(None, f"too large (decompression bomb guard): {error}", digest)
    except UnidentifiedImageError:
        return ImageCheck(None, f"not a decodable image: unknown format (starts with {data[:8]!r})", digest)
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        return ImageCheck(None, f"undecodable {fmt}: {type(error).__name__}: {error}", digest)
    return ImageCheck(ext, None, digest, width, height, mode)


def _too_large(width: int, height: int, max_pixels: int) -> str:
    return f"too large: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}"


def check_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    """:func:`check_image` on a file; an unreadable or non-regular file is rejected, not raised."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer (the stage would hang)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if path.is_symlink() and not path.exists():
            return ImageCheck(None, f"broken symbolic link to {os.readlink(path)!r} ({error.strerror})", "")
        return ImageCheck(None, f"unreadable: {type(error).__name__}: {error}", "")
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            return ImageCheck(None, f"not a regular file ({_FILE_KINDS.get(kind, 'special file')})", "")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read()
    except OSError as error:
        return ImageCheck(None, f"unreadable: {type(error).__name__}: {error}", "")
    finally:
        os.close(fd)
    return check_image(data, max_pixels)


_FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _check_job(job: tuple[str, int]) -> ImageCheck:
    return check_file(*job)


def check_files(
    files: Sequence[SourceFile], max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 0, progress: bool = True
) -> list[ImageCheck]:
    """Check every file (in a process pool when ``workers > 1``); results in input order."""
    jobs = [(str(f.path), max_pixels) for f in files]
    bar = tqdm(total=len(jobs), desc="check images", unit="img", disable=not progress)
    results: list[ImageCheck] = []
    with bar:
        if workers > 1 and len(jobs) >= _INLINE_CHECK_BELOW:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for result in pool.map(_check_job, jobs, chunksize=16):
                    results.append(result)
                    bar.update()
        else:
            for job in jobs:
                results.append(_check_job(job))
                bar.update()
    return results


# ------------------------------------------------------------------------ subset
def subset_count(n: int, per_class: int | None = None, percent: float | None = None) -> int:
    """How many of a class's ``n`` decodable train files to keep.

    ``per_class``: min(N, n); ``percent``: max(1, floor(P/100 * n)) computed on
    the decimal value of P (so 10% of 30 is exactly 3); neither: n.
    """
    if per_class is not None and percent is not None:
        raise ValueError("set either per_class or percent, not both")
    if n == 0:
        return 0
    if per_class is not None:
        return min(per_class, n)
    if percent is not None:
        return min(n, max(1, math.floor(Fraction(repr(float(percent))) * n / 100)))
    return n


def select_subset(
    items: Sequence[T], seed: int, class_name: str, per_class: int | None = None, percent: float | None = None,
    subset: str = "seeded",
) -> list[T]:
    """``subset_count`` of ``items``: the first of a permutation seeded by (seed, "subset", class_name),
    or with ``subset="first"`` the first ones (the official code's ``--subset``).

    ``items`` must already be in a canonical order (sorted by path); the chosen
    items are returned in that order.
    """
    count = subset_count(len(items), per_class, percent)
    if count == len(items):
        return list(items)
    if subset == "first":
        return list(items[:count])
    order = torch.randperm(len(items), generator=make_generator(seed, "subset", class_name))
    return [items[i] for i in sorted(order[:count].tolist())]


def seeded_order(n: int, seed: int, *tag: str | int) -> list[int]:
    """A permutation of range(n) from a generator seeded by (seed, *tag)."""
    return torch.randperm(n, generator=make_generator(seed, *tag)).tolist()


# ----------------------------------------------------------------------- writing
def write_shards(
    root: str | Path,
    out_dir: str | Path,
    *,
    seed: int,
    per_class: int | None = None,
    percent: float | None = None,
    subset: str = "seeded",
    shard_size: int = 500,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    source: str = "imagefolder",
    workers: int = 0,
    progress: bool = True,
) -> WriteResult:
    """Check, subset and write ``root`` as webdataset shards + ``manifest.json`` into ``out_dir``.

    Shards: ``{split}-{k:06d}.tar`` of ``shard_size`` samples, each sample
    ``<key>.jpg|png`` (original bytes), ``<key>.cls`` (class index) and
    ``<key>.json`` (path, class, split). The output folder is replaced
    atomically; ``workers > 1`` checks images in a process pool (same result).

    Raises:
        DatasetError: bad layout, a train class without one decodable image, a
            val split without one, or an output folder that is not ours.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    started = time.perf_counter()
    out_dir = Path(out_dir)
    restore_moved_aside(out_dir)  # a killed earlier run may have left the previous shards aside
    _check_replaceable(out_dir)
    scan = scan_folder(root)
    files = scan.all_files()
    checks = dict(zip(files, check_files(files, max_pixels, workers, progress)))
    if subset not in ("seeded", "first"):
        raise ValueError(f"subset must be 'seeded' or 'first', got {subset!r}")
    chosen, counts, rejected = _select(scan, checks, seed, per_class, percent, subset)
    plan = _plan_shards(chosen, seed, shard_size)
    manifest = {
        "format": MANIFEST_FORMAT,
        "source": source,
        "root": str(root),
        "seed": seed,
        "subset": {"per_class": per_class, "percent": percent, "order": subset},
        "shard_size": shard_size,
        "max_pixels": max_pixels,
        "policy": {
            "subset": ("first N of each class's decodable train files in path order" if subset == "first" else
                       "first N of a seeded permutation of each class's decodable train files") + "; val complete",
            "formats": "JPEG/MPO kept as .jpg, PNG as .png, original bytes; other formats rejected",
            "train_order": "seeded permutation across classes; val in class then path order",
        },
        "classes": scan.classes,
        "counts": counts,
        "totals": {split: _sum_counts(counts[split].values()) for split in SPLITS},
        "shards": [],
        "rejected": rejected,
    }
    remove_stale_temporaries(out_dir, ".tmp-*")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        total = sum(len(samples) for _, samples in plan)
        with tqdm(total=total, desc="write shards", unit="img", disable=not progress) as bar:
            for name, samples in plan:
                manifest["shards"].append(_write_one_shard(tmp / name, samples, checks, bar))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    except OSError as error:  # disk full, file too large, ...: say which folder and that the old one is intact
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(error, out_dir, "shard folder") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = WriteResult(out_dir, manifest, time.perf_counter() - started)
    if progress:
        print(result.summary_line())
    return result


def build_shards(
    config: DataConfig, seed: int, out_dir: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 0, progress: bool = True,
) -> WriteResult:
    """:func:`write_shards` driven by the ``data`` section of the params."""
    root = resolve_root(config)
    if config.source == "synthetic" and not root.is_dir():
        raise DatasetError(f"{root}: synthetic images not found; run `python -m stages.generate` first")
    return write_shards(
        root, out_dir, seed=seed, per_class=config.per_class, percent=config.percent, subset=config.subset,
        shard_size=config.shard_size, max_pixels=max_pixels, source=config.source,
        workers=workers, progress=progress,
    )


def _select(
    scan: FolderScan, checks: dict[SourceFile, ImageCheck], seed: int, per_class: int | None, percent: float | None,
    subset: str = "seeded",
) -> tuple[dict[str, list[SourceFile]], dict[str, dict[str, dict[str, int]]], list[dict[str, str]]]:
    """Kept/rejected bookkeeping and the train subset; fails if a train class has nothing decodable."""
    chosen: dict[str, list[SourceFile]] = {split: [] for split in SPLITS}
    counts: dict[str, dict[str, dict[str, int]]] = {split: {} for split in SPLITS}
    rejected: list[dict[str, str]] = []
    problems: list[str] = []
    for split in SPLITS:
        for name, candidates in scan.files[split].items():
            kept = [f for f in candidates if checks[f].ok]
            rejected += [
                {"split": split, "class": name, "path": f.rel, "reason": checks[f].reason or ""}
                for f in candidates if not checks[f].ok
            ]
            selected = select_subset(kept, seed, name, per_class, percent, subset) if split == "train" else kept
            counts[split][name] = {
                "files_in": len(candidates), "kept": len(kept),
                "rejected": len(candidates) - len(kept), "selected": len(selected),
            }
            if split == "train" and not kept:
                problems.append(
                    f"{scan.root / 'train' / name}: none of its {len(candidates)} files is a decodable "
                    "JPEG or PNG; expected at least one. First files:"
                    + "".join(f"\n  {f.rel}: {checks[f].reason}" for f in candidates[:5])
                )
            chosen[split] += selected
    if not chosen["val"] and not problems:
        problems.append(f"{scan.root / 'val'}: no decodable JPEG or PNG; expected at least one val image")
    if problems:
        raise DatasetError("\n".join(problems))
    return chosen, counts, rejected


def _sum_counts(rows: Iterable[dict[str, int]]) -> dict[str, int]:
    total = {"files_in": 0, "kept": 0, "rejected": 0, "selected": 0}
    for row in rows:
        for key in total:
            total[key] += row[key]
    return total


def _plan_shards(
    chosen: dict[str, list[SourceFile]], seed: int, shard_size: int
) -> list[tuple[str, list[tuple[str, SourceFile]]]]:
    """[(shard name, [(key, file), ...]), ...]: train seeded-permuted, val in scan order."""
    plan = []
    for split in SPLITS:
        files = chosen[split]
        if split == "train":
            files = [files[i] for i in seeded_order(len(files), seed, "shard_order")]
        keyed = [(f"{split}_{i:06d}", f) for i, f in enumerate(files)]
        for k, start in enumerate(range(0, len(keyed), shard_size)):
            plan.append((f"{split}-{k:06d}.tar", keyed[start:start + shard_size]))
    return plan


def _write_one_shard(
    path: Path, samples: list[tuple[str, SourceFile]], checks: dict[SourceFile, ImageCheck], bar: tqdm
) -> dict[str, Any]:
    with open(path, "wb") as stream:
        writer = wds.TarWriter(stream, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, mtime=TAR_MTIME)
        with writer:
            for key, source in samples:
                data = source.path.read_bytes()
                check = checks[source]
                if hashlib.sha256(data).hexdigest() != check.sha256:
                    raise DatasetError(f"{source.path}: changed while sharding; expected the checked bytes")
                meta = {"path": source.rel, "class": source.class_name, "split": source.split}
                writer.write({
                    "__key__": key,
                    check.ext: data,
                    "cls": str(source.label),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                })
                bar.update()
    return {
        "name": path.name,
        "split": samples[0][1].split,
        "count": len(samples),
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def _check_replaceable(out_dir: Path) -> None:
    """Only an empty folder or a previous shard folder may be replaced (never a user's folder)."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise DatasetError(f"{out_dir}: exists and is not a folder; expected a shard output folder")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST_NAME).is_file():
            raise DatasetError(
                f"{out_dir}: not empty and holds no {MANIFEST_NAME}; refusing to replace a folder this "
                "stage did not write"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)



"""Reading the shards written by :mod:`pipeline.data.shard_writer`: verified, indexed, deterministic.

:func:`open_split` checks every shard of a split against the manifest and
indexes its tar headers, so that sample ``i`` is one positioned read. How much
it checks is ``verify`` (``params.yaml``'s ``data.verify``): ``index`` reads
only the headers and labels in place, ``full`` also hashes every byte. :class:`ShardDataset` iterates a split in an order that is a
pure function of (seed, epoch), split across ranks and DataLoader workers so
that the batches are the same for any worker count and after a resume.

Batch layout (``B`` = per-rank batch, ``W`` = world size, ``G = B * W``): the
epoch's global order is cut into global batches of ``G``; rank ``r`` takes rows
``r*B .. (r+1)*B`` of each. So N ranks see, step by step, exactly the global
batch one process with batch ``G`` would see.

- ``drop_last=True`` (training): ``n // G`` steps for every rank; the last
  ``n % G`` samples of the epoch's order are not seen this epoch (a different
  remainder each epoch, since the order changes).
- ``drop_last=False`` (evaluation): the remainder forms one more, partial,
  global batch, shared out in chunks of ``B`` from rank 0: every sample is
  yielded exactly once in total; ranks differ by at most one (partial) batch.

Plain webdataset readers work on the same files, e.g.
``webdataset.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls")``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import re
import tarfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.core.errors import UserError
from pipeline.core.seeding import derive_seed, make_generator
from pipeline.data.shard_writer import DEFAULT_MAX_PIXELS, MANIFEST_FORMAT, MANIFEST_NAME, SPLITS, to_rgb

IMAGE_EXTS = ("jpg", "png")
VERIFY_LEVELS = ("index", "full")
MAX_OPEN_SHARDS = 64  # per process; well under the usual 1024 open-file limit
_MEMBER_EXTS = {"jpg", "png", "cls", "json"}
# what pipeline.data.shard_writer writes ("train_000042", "val-000000.tar"); anything else could be a path
_SAFE_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_SAFE_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.tar")


class ShardIntegrityError(UserError, RuntimeError):
    """A shard is missing, tampered with or malformed; the message names it."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    name: str
    split: str
    count: int
    size: int
    sha256: str


def read_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a shard folder.

    Raises:
        FileNotFoundError: no manifest (the shard stage has not run).
        ShardIntegrityError: unreadable or of an unknown format.
    """
    path = Path(shard_dir) / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest; run `python -m stages.shard` first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ShardIntegrityError(f"{path}: unreadable manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ShardIntegrityError(f"{path}: manifest format {found!r}, expected {MANIFEST_FORMAT}")
    _check_manifest(manifest, path)
    return manifest


def _check_manifest(manifest: dict[str, Any], path: Path) -> None:
    """The fields the reader relies on have the right types, and shard names stay inside the folder.

    A manifest travels with the shards, so it is input like them: a name such
    as ``../../x.tar`` or ``/etc/x.tar`` would otherwise make the reader open a
    file outside the shard folder.
    """
    classes = manifest.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise ShardIntegrityError(f"{path}: manifest 'classes' must be a non-empty list of class names")
    max_pixels = manifest.get("max_pixels")
    if max_pixels is not None and (not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1):
        raise ShardIntegrityError(f"{path}: manifest 'max_pixels' must be a positive integer, got {max_pixels!r}")
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ShardIntegrityError(f"{path}: manifest 'shards' must be a list")
    fields = {f.name for f in dataclasses.fields(ShardEntry)}
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or set(entry) != fields:
            raise ShardIntegrityError(f"{path}: manifest shards[{i}] must have exactly the fields {sorted(fields)}")
        name = entry["name"]
        if not isinstance(name, str) or not _SAFE_SHARD_NAME.fullmatch(name):
            raise ShardIntegrityError(
                f"{path}: manifest shards[{i}] name {name!r} is not a plain .tar file name in the shard folder"
            )
        bad = [k for k in ("count", "size") if not isinstance(entry[k], int) or isinstance(entry[k], bool) or entry[k] < 0]
        if entry["split"] not in SPLITS or bad or not isinstance(entry["sha256"], str):
            raise ShardIntegrityError(f"{path}: manifest shards[{i}] ({name}) has a bad split, count, size or sha256")


def shard_entries(manifest: dict[str, Any], split: str) -> list[ShardEntry]:
    """The manifest's shards of ``split``, in order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return [ShardEntry(**s) for s in manifest["shards"] if s["split"] == split]


def webdataset_urls(shard_dir: str | Path, split: str) -> list[str]:
    """Shard paths of ``split`` for a plain ``webdataset.WebDataset``."""
    return [str(Path(shard_dir) / e.name) for e in shard_entries(read_manifest(shard_dir), split)]


class ShardSplit:
    """One verified, indexed split: ``len(split)`` samples, random access by index.

    Sample ``i`` is the i-th sample in shard order. Reads use ``os.pread`` on
    descriptors opened lazily per process (at most ``MAX_OPEN_SHARDS``, least
    recently used closed first), so the object is safe to share with forked or
    spawned DataLoader workers and stays under the open-file limit on
    thousands of shards.
    """

    def __init__(self, shard_dir: Path, split: str, manifest: dict[str, Any], entries: list[ShardEntry],
                 index: dict[str, np.ndarray]):
        self.shard_dir = shard_dir
        self.split = split
        self.manifest = manifest
        self.classes: list[str] = list(manifest["classes"])
        self.entries = entries
        self.paths: list[Path] = [shard_dir / e.name for e in entries]
        self._shard = index["shard"]
        self._offset = index["offset"]
        self._size = index["size"]
        self._ext = index["ext"]
        self._meta_offset = index["meta_offset"]
        self._meta_size = index["meta_size"]
        self.labels: np.ndarray = index["label"]  # (n,) int64
        self.max_pixels: int = manifest.get("max_pixels") or DEFAULT_MAX_PIXELS
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def read_bytes(self, i: int) -> tuple[bytes, str]:
        """The stored (original) image bytes of sample ``i`` and their extension."""
        data = self._read(int(self._shard[i]), int(self._offset[i]), int(self._size[i]))
        return data, IMAGE_EXTS[int(self._ext[i])]

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def metadata(self, i: int) -> dict[str, Any]:
        """The sample's ``.json``: source ``path`` (relative to the data root), ``class``, ``split``."""
        offset = int(self._meta_offset[i])
        try:
            return json.loads(self._read(int(self._shard[i]), offset, int(self._meta_size[i])))
        except ValueError as error:
            raise ShardIntegrityError(f"{self._member(i, offset)}: not valid JSON ({error})") from error

    def image(self, i: int) -> Image.Image:
        """Sample ``i`` decoded to an RGB PIL image.

        Raises:
            ShardIntegrityError: naming the shard and member when the bytes are not
                a decodable image within the manifest's pixel limit. The shard
                stage only writes images that pass this, so it means a shard
                made elsewhere (with a matching manifest); checked here and not
                on open because decoding every image there would be slow.
        """
        data, _ = self.read_bytes(i)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > self.max_pixels:  # before decoding: a bomb is never allocated
                    raise ValueError(f"{image.width}x{image.height} exceeds the shards' limit of {self.max_pixels} pixels")
                image.load()
                return to_rgb(image)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
            raise ShardIntegrityError(
                f"{self._member(i, int(self._offset[i]))}: not a decodable image ({type(error).__name__}: {error})"
            ) from error

    def _member(self, i: int, offset: int) -> str:
        """``<shard>: member '<name>'`` holding the bytes at ``offset`` of sample i's shard (error messages only)."""
        path = self.paths[int(self._shard[i])]
        for name, data_offset, _ in _tar_members(path.read_bytes(), path):
            if data_offset == offset:
                return f"{path}: member {name!r}"
        return f"{path}: sample {i}"

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return self.image(i), self.label(i)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._fd(shard)
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(fd, size - done, offset + done)
            if not chunk:
                raise ShardIntegrityError(
                    f"{self.paths[shard]}: ends before byte {offset + size}; the shard changed after it was opened"
                )
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: close its copies, open its own
            self.close()
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is not None:
            self._fds.move_to_end(shard)
            return fd
        while len(self._fds) >= MAX_OPEN_SHARDS:
            os.close(self._fds.popitem(last=False)[1])
        fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close this process's descriptors (reads reopen them as needed)."""
        fds, self._fds = self._fds, OrderedDict()
        for fd in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


def open_split(shard_dir: str | Path, split: str, verify: str = "index") -> ShardSplit:
    """Check the shards of ``split`` in ``shard_dir`` against the manifest and index them.

    ``verify="index"`` (the default) checks each shard's size, then reads its
    tar headers and ``.cls`` members in place (about 2 KB per sample, not the
    images): every member well-formed and named, every sample complete, the
    count and the labels as the manifest says. A truncated, extended, renamed
    or restructured shard fails here; a same-size change inside an image does
    not (DVC's own hashes of ``data/shards`` catch it, as does ``full``).
    ``verify="full"`` also reads every shard whole once and checks its SHA-256,
    then indexes the same bytes.

    Raises:
        FileNotFoundError: no manifest.
        ShardIntegrityError: naming the shard that is missing, altered or malformed.
    """
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}")
    shard_dir = Path(shard_dir)
    manifest = read_manifest(shard_dir)
    entries = shard_entries(manifest, split)
    columns: dict[str, list[int]] = {k: [] for k in ("shard", "offset", "size", "ext", "label", "meta_offset", "meta_size")}
    for number, entry in enumerate(entries):
        path = shard_dir / entry.name
        samples = _check_and_index(path, entry, verify, len(manifest["classes"]))
        if len(samples) != entry.count:
            raise ShardIntegrityError(f"{path}: shard {entry.name} has {len(samples)} samples, manifest says {entry.count}")
        for sample in samples:
            columns["shard"].append(number)
            for key in ("offset", "size", "ext", "label", "meta_offset", "meta_size"):
                columns[key].append(sample[key])
    index = {k: np.asarray(v, dtype=np.int64) for k, v in columns.items()}
    return ShardSplit(shard_dir, split, manifest, entries, index)


class _FileBytes:
    """A shard read in place: ``len`` and ``[a:b]`` as on its bytes, each slice one positioned read."""

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop = part.start or 0, min(part.stop, self.size)
        return os.pread(self.fd, max(stop - start, 0), start)


def _check_and_index(path: Path, entry: ShardEntry, verify: str, num_classes: int) -> list[dict[str, int]]:
    """One shard: its size (and with ``full`` its SHA-256) against ``entry``, then its samples' index."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ShardIntegrityError(f"{path}: shard {entry.name} listed in the manifest is missing") from None
    try:
        size = os.fstat(fd).st_size
        if size != entry.size:
            raise ShardIntegrityError(f"{path}: shard {entry.name} has {size} bytes, manifest says {entry.size}")
        if verify == "index":
            return _index_tar(_FileBytes(fd, size), path, num_classes)
        content = b"".join(iter(lambda: os.read(fd, 1 << 24), b""))
    finally:
        os.close(fd)
    digest = hashlib.sha256(content).hexdigest()
    if len(content) != entry.size or digest != entry.sha256:
        raise ShardIntegrityError(f"{path}: shard {entry.name} sha256 {digest} does not match the manifest's {entry.sha256}")
    return _index_tar(content, path, num_classes)


def _index_tar(content: bytes | _FileBytes, path: Path, num_classes: int) -> list[dict[str, int]]:
    """Data offsets of each sample's image and json, and its label, from the tar headers.

    Every member must be ``<key>.<ext>`` with a plain key (no folders, no
    ``..``, not absolute) and each sample has each part once: a shard from
    elsewhere is refused, naming the member, rather than half-read.
    """
    samples: dict[str, dict[str, int]] = {}
    for name, offset, size in _tar_members(content, path):
        key, _, ext = name.partition(".")
        if not _SAFE_KEY.fullmatch(key):
            raise ShardIntegrityError(
                f"{path}: member {name!r} has an unsafe name; expected <key>.<ext> with a key of letters, digits, _ and -"
            )
        if ext not in _MEMBER_EXTS:
            raise ShardIntegrityError(f"{path}: unexpected member {name!r}")
        sample = samples.setdefault(key, {})
        part = "offset" if ext in IMAGE_EXTS else "label" if ext == "cls" else "meta_offset"
        if part in sample:
            raise ShardIntegrityError(f"{path}: member {name!r} duplicates a part of sample {key!r}")
        if ext == "cls":
            try:
                sample["label"] = int(content[offset:offset + size])
            except ValueError:
                raise ShardIntegrityError(f"{path}: {name} is not an integer class index") from None
        elif ext == "json":
            sample["meta_offset"], sample["meta_size"] = offset, size
        else:
            sample["offset"], sample["size"], sample["ext"] = offset, size, IMAGE_EXTS.index(ext)
    for key, sample in samples.items():
        if set(sample) != {"offset", "size", "ext", "label", "meta_offset", "meta_size"}:
            missing = [p for p, k in (("image", "offset"), (".cls", "label"), (".json", "meta_offset")) if k not in sample]
            raise ShardIntegrityError(f"{path}: sample {key!r} lacks its {' and '.join(missing)} member")
        if not 0 <= sample["label"] < num_classes:
            raise ShardIntegrityError(f"{path}: sample {key!r} has label {sample['label']} outside [0, {num_classes})")
    return list(samples.values())


class _NotPlainUstar(Exception):
    """A header the fast parser does not handle (PAX, GNU long names, ...): use tarfile."""


def _tar_members(content: bytes | _FileBytes, path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file in a tar, in memory or read in place."""
    try:
        return _ustar_members(content)
    except _NotPlainUstar:
        pass
    try:
        source = io.BytesIO(content) if isinstance(content, bytes) else open(path, "rb")
        with source, tarfile.open(fileobj=source, mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as error:
        raise ShardIntegrityError(f"{path}: malformed shard: {error}") from error
    for member in members:
        if not member.isfile():
            raise ShardIntegrityError(f"{path}: unexpected member {member.name!r} (not a regular file)")
        if member.offset_data + member.size > len(content):
            raise ShardIntegrityError(f"{path}: member {member.name!r} runs past the end of the shard (truncated)")
    return [(m.name, m.offset_data, m.size) for m in members]


_BLOCK = 512


def _ustar_members(content: bytes | _FileBytes) -> list[tuple[str, int, int]]:
    """Plain USTAR/v7 headers parsed directly (tarfile is ~20x slower per member).

    Raises:
        _NotPlainUstar: on anything else, including a bad checksum or truncation,
            so tarfile produces the error message.
    """
    members, pos, end = [], 0, len(content)
    while pos + _BLOCK <= end:
        header = content[pos:pos + _BLOCK]
        if header.count(0) == _BLOCK:
            return members  # end-of-archive marker
        if header[156:157] not in (b"0", b"\0"):
            raise _NotPlainUstar
        try:
            checksum = int(header[148:156].rstrip(b" \0") or b"0", 8)
            size = int(header[124:136].rstrip(b" \0") or b"0", 8)
        except ValueError:
            raise _NotPlainUstar from None
        if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
            raise _NotPlainUstar
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        data = pos + _BLOCK
        if data + size > end:
            raise _NotPlainUstar
        members.append((name.decode("utf-8"), data, size))
        pos = data + (size + _BLOCK - 1) // _BLOCK * _BLOCK
    raise _NotPlainUstar  # no end-of-archive marker: truncated


# ----------------------------------------------------------------------- order
def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """(n,) int64 global order of an epoch: a permutation from (seed, "order", epoch), or identity."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=make_generator(seed, "order", epoch))


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's CPU, ``random``'s and numpy's global generators for one transform.

    torch and ``random`` are restored afterwards, so the main process's RNG
    stream is the same whether transforms ran there (``num_workers=0``) or in
    workers. numpy is seeded but not restored (its get/set_state costs ~0.1 ms
    per sample); it is left in a state that depends only on the last sample.
    """
    states = torch.get_rng_state(), random.getstate()
    # the CPU generator only: torch.manual_seed also queues lazy CUDA seeding, which
    # records a stack trace per call (~0.4 ms); transforms run on the CPU anyway
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])


class ShardDataset(IterableDataset):
    """This rank's samples of one epoch, as ``(transform(image), label, index)``.

    ``index`` is the sample's index in the split; the transform runs with the
    global generators seeded from ``derive_seed(seed, "augment", epoch, index)``,
    so augmentations do not depend on rank, worker count or resume point.

    With ``per_step``, each sample is ``(transform(image), label, index, row)``:
    ``per_step(step)`` is called once per batch, in the process that loads it
    (a worker), with the batch's step in the epoch, and returns a tensor over
    the rows of the step's *global* batch (first dimension ``G``); a sample
    gets row ``rank * B + j`` for its place ``j`` in this rank's batch. Draws
    that depend only on (seed, epoch, step), such as the masks of
    :class:`pipeline.method.masking.StepMasks`, are so made off the training
    loop, the same for any worker count, rank split or resume point.

    Use with ``DataLoader(ds, batch_size=ds.batch_size, num_workers=W)``: each
    worker yields whole batches round-robin (worker w: batches w, w+W, ...), so
    the loader returns identical batches for any W. Build a new dataset per
    epoch (the epoch is fixed at construction; persistent workers keep a copy).

    Args:
        split: from :func:`open_split`.
        batch_size: per-rank batch size B (must equal the DataLoader's).
        transform: applied to the RGB PIL image; ``None`` yields the image.
        seed, epoch: the order and augmentations are a function of these.
        rank, world_size: this process's place in the job.
        start_step: skip this rank's first ``start_step`` batches (resume).
        shuffle: permute (training) or keep the split's order (evaluation).
        drop_last: equal full batches on every rank (training) or every sample
            exactly once (evaluation); see the module docstring.
        global_batch_size: optional check that it equals ``batch_size * world_size``.
        per_step: see above; must be picklable when workers are spawned.
    """

    def __init__(
        self,
        split: ShardSplit,
        *,
        batch_size: int,
        transform: Callable[[Image.Image], Any] | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        global_batch_size: int | None = None,
        per_step: Callable[[int], torch.Tensor] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if global_batch_size is not None and global_batch_size != batch_size * world_size:
            raise ValueError(
                f"global_batch_size {global_batch_size} != batch_size {batch_size} x world_size {world_size}"
            )
        self.split = split
        self.batch_size = batch_size
        self.transform = transform
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.per_step = per_step
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside [0, steps_per_epoch={self.steps_per_epoch}]")
        self.start_step = start_step

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """This rank's batches in a whole epoch (start_step ignored)."""
        n, g, b = len(self.split), self.global_batch_size, self.batch_size
        full = n // g
        if self.drop_last:
            return full
        return full + int(n - full * g > self.rank * b)

    @property
    def num_steps(self) -> int:
        """Batches this dataset yields: ``steps_per_epoch - start_step``."""
        return self.steps_per_epoch - self.start_step

    def __len__(self) -> int:
        """Samples this dataset yields, so ``len(DataLoader(ds, batch_size=B)) == num_steps``."""
        n, g, b = len(self.split), self.global_batch_size, self.batch_size
        full = n // g
        count = max(0, full - self.start_step) * b
        if self.steps_per_epoch > full and self.start_step <= full:  # this rank's partial last batch
            count += min(b, n - full * g - self.rank * b)
        return count

    def batches(self) -> list[list[int]]:
        """This rank's batches from ``start_step`` on, as lists of sample indices."""
        order = epoch_order(len(self.split), self.seed, self.epoch, self.shuffle).tolist()
        g, b = self.global_batch_size, self.batch_size
        rows = range(self.start_step, self.steps_per_epoch)
        return [order[s * g + self.rank * b: min(len(order), s * g + (self.rank + 1) * b)] for s in rows]

    def __iter__(self) -> Iterator[tuple[Any, int, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batches = self.batches()
        for k in range(worker, len(batches), workers):
            if self.per_step is None:
                for index in batches[k]:
                    yield self.item(index)
                continue
            rows = self.per_step(self.start_step + k)
            first = self.rank * self.batch_size
            for j, index in enumerate(batches[k]):
                yield (*self.item(index), rows[first + j])

    def item(self, index: int) -> tuple[Any, int, int]:
        """``(transform(image), label, index)`` for one sample, augmentation seeded as documented."""
        image = self.split.image(index)
        if self.transform is not None:
            with seeded_global_rng(derive_seed(self.seed, "augment", self.epoch, index)):
                image = self.transform(image)
        return image, self.split.label(index), index

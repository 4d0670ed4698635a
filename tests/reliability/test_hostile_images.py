"""Hostile or broken image files: the shard stage never crashes, never hangs, and accounts for every file.

A corpus of broken and odd files (one case each) and hypothesis-fuzzed
mutations of valid JPEG and PNG files, both through the real shard writer.
"""
from __future__ import annotations

import io
import json
import os
import socket
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from pipeline.data.shard_reader import open_split
from pipeline.data.shard_writer import DatasetError, check_image, to_rgb, write_shards
from tests.data.test_shard_writer import encode, make_folder, png_header_only, random_rgb
from tests.reliability.support import hang_guard

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose SOF0 header claims ``width x height`` (the data stays that of a tiny image)."""
    at = jpeg.find(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


@dataclass(frozen=True)
class Expect:
    """``ext`` when the file must be kept (as .jpg / .png), else a piece of the rejection reason."""

    ext: str | None = None
    reason: str = ""


RGB = random_rgb(7, (20, 16))
JPEG = encode(RGB, "JPEG")
PNG = encode(RGB, "PNG")
PALETTE = RGB.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)

# name -> (content, expectation); content None: a special file made by make_special()
CORPUS: dict[str, tuple[bytes | None, Expect]] = {
    "zero_bytes.JPEG": (b"", Expect(reason="empty file (0 bytes)")),
    "truncated.JPEG": (JPEG[: len(JPEG) // 2], Expect(reason="truncated")),
    "truncated.png": (PNG[: len(PNG) // 2], Expect(reason="undecodable PNG")),
    "text.JPEG": (b"this is a text file, not a JPEG\n", Expect(reason="not a decodable image")),
    "random_bytes.JPEG": (np.random.default_rng(3).bytes(4096), Expect(reason="not a decodable image")),
    "wrong_extension_png.JPEG": (PNG, Expect(ext="png")),
    "wrong_extension_jpeg.png": (JPEG, Expect(ext="jpg")),
    "cmyk.JPEG": (encode(RGB.convert("CMYK"), "JPEG"), Expect(ext="jpg")),
    "sixteen_bit.png": (encode(Image.fromarray(np.arange(320, dtype=np.uint16).reshape(16, 20) * 200), "PNG"), Expect(ext="png")),
    "palette_transparency.png": (encode(PALETTE, "PNG", transparency=0), Expect(ext="png")),
    "bomb_png_100000x100000.png": (png_header_only(100_000, 100_000), Expect(reason="too large")),
    "bomb_png_8000x8000.png": (png_header_only(8_000, 8_000), Expect(reason="too large: 8000x8000")),
    "bomb_jpeg_65000x65000.JPEG": (jpeg_with_size(JPEG, 65_000, 65_000), Expect(reason="too large")),
    "bomb_png_text_chunk.png": (PNG[:33] + png_chunk(b"zTXt", b"c\0\0" + zlib.compress(b"\0" * (64 << 20), 9)) + PNG[33:],
                                Expect(reason="Decompressed data too large")),
    "animation.gif": (encode(RGB, "GIF"), Expect(reason="unsupported format GIF")),
    ".DS_Store": (b"\0\0\0\1Bud1" + bytes(64), Expect(reason="not a decodable image")),
    os.fsdecode(b"non_utf8_\xe9.png"): (PNG, Expect(ext="png")),
    "nested/deeper/good.png": (PNG, Expect(ext="png")),
    "good.JPEG": (JPEG, Expect(ext="jpg")),
    "fifo.JPEG": (None, Expect(reason="not a regular file (a FIFO)")),
    "socket.JPEG": (None, Expect(reason="unreadable")),
    "dangling_symlink.JPEG": (None, Expect(reason="broken symbolic link")),
    "symlink_loop.JPEG": (None, Expect(reason="broken symbolic link")),
    "symlink_to_folder.JPEG": (None, Expect(reason="not a regular file (a folder)")),
}


def make_special(path: Path, sockets: list[socket.socket]) -> None:
    name = path.name
    if name.startswith("fifo"):
        os.mkfifo(path)  # reading it would block forever: the stage must not open it for reading
    elif name.startswith("socket"):
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        sockets.append(server)
    elif name.startswith("dangling"):
        path.symlink_to(path.parent / "does-not-exist.JPEG")
    elif name.startswith("symlink_loop"):
        path.symlink_to(path.name)
    elif name.startswith("symlink_to_folder"):
        path.symlink_to(path.parent / "nested")


@pytest.fixture(scope="module")
def corpus_shards(tmp_path_factory):
    """(image root, shard folder, manifest) for the corpus in train/mixed beside clean classes."""
    tmp = tmp_path_factory.mktemp("hostile_images")
    root = make_folder(tmp / "images", {"clean": 3}, {"clean": 1})
    folder = root / "train" / "mixed"
    sockets: list[socket.socket] = []
    for name, (content, _) in sorted(CORPUS.items(), key=lambda item: item[1][0] is None):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            make_special(path, sockets)
        else:
            path.write_bytes(content)
    try:
        with hang_guard(120, "sharding the hostile corpus"):
            result = write_shards(root, tmp / "shards", seed=0, shard_size=4, progress=False)
    finally:
        for server in sockets:
            server.close()
    return root, tmp / "shards", result.manifest


def sharded_paths(shard_dir: Path) -> dict[str, tuple[str, bytes]]:
    """source path -> (stored extension, stored bytes) for every sample, through the reader."""
    found = {}
    for split in ("train", "val"):
        reader = open_split(shard_dir, split)
        for i in range(len(reader)):
            data, ext = reader.read_bytes(i)
            found[reader.metadata(i)["path"]] = (ext, data)
            assert reader.image(i).mode == "RGB"  # every kept file decodes for training
    return found


@pytest.mark.parametrize("name", sorted(CORPUS))
@pytest.mark.fault_case("images", "broken or odd file")
def test_each_corpus_file_is_kept_or_rejected_with_its_reason(name, corpus_shards):
    root, shard_dir, manifest = corpus_shards
    expect = CORPUS[name][1]
    rel = f"train/mixed/{name}"
    rejected = {r["path"]: r["reason"] for r in manifest["rejected"]}
    if expect.ext is None:
        assert expect.reason.lower() in rejected.get(rel, "<not rejected>").lower(), rejected.get(rel)
    else:
        assert rel not in rejected, rejected[rel]
        ext, data = sharded_paths(shard_dir)[rel]
        assert (ext, data) == (expect.ext, (root / rel).read_bytes())  # original bytes, real format


@pytest.mark.fault_case("images", "every file of the corpus accounted for: files in = kept + rejected, each named")
def test_every_corpus_file_is_accounted_for(corpus_shards):
    root, shard_dir, manifest = corpus_shards
    on_disk = sorted(
        (Path(dirpath) / name).relative_to(root).as_posix()
        for dirpath, dirnames, filenames in os.walk(root)
        for name in filenames + [d for d in dirnames if os.path.islink(Path(dirpath) / d)]
    )
    listed = sorted([r["path"] for r in manifest["rejected"]] + list(sharded_paths(shard_dir)))
    assert listed == on_disk
    for split in ("train", "val"):
        for row in manifest["counts"][split].values():
            assert row["files_in"] == row["kept"] + row["rejected"] == row["selected"] + row["rejected"]
    assert manifest["counts"]["train"]["mixed"]["files_in"] == len(CORPUS)
    json.dumps(manifest)  # the manifest (odd names included) is valid JSON


# ------------------------------------------------------------------- fuzzing
def _seed_images() -> list[bytes]:
    gray = RGB.convert("L")
    return [JPEG, PNG, encode(gray, "JPEG", progressive=True), encode(PALETTE, "PNG", transparency=0),
            encode(RGB.convert("RGBA"), "PNG"), encode(Image.fromarray(np.arange(320, dtype=np.uint16).reshape(16, 20) * 200), "PNG")]


SEEDS = _seed_images()


@st.composite
def mutated_image(draw) -> bytes:
    """A valid JPEG/PNG with 1-4 mutations: byte flips, overwrites, insertions, deletions, truncation, header sizes."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate", "size"]))
        # mostly past the 8-byte signature: a file PIL cannot even identify tests little
        last = max(0, len(data) - 1)
        at = draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else min(8, last), last))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 64))]
        elif kind == "truncate":
            del data[at:]
        elif kind == "size":
            width, height = draw(st.integers(0, 70_000)), draw(st.integers(0, 70_000))
            if data[:4] == b"\x89PNG" and len(data) >= 24:
                data[16:24] = struct.pack(">II", width, height)
            elif (sof := data.find(b"\xff\xc0")) >= 0 and len(data) >= sof + 9:
                data[sof + 5:sof + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    return bytes(data)


@pytest.mark.fault_case("images", "fuzzed mutations of valid JPEG/PNG (hypothesis, 300 examples): checked, never raised, never hung")
@settings(FUZZ, max_examples=300)
@given(data=mutated_image())
def test_fuzzed_images_are_kept_decodable_or_rejected_with_a_reason(data):
    with hang_guard(30, "checking one fuzzed image"):
        check = check_image(data, max_pixels=4_000_000)
        if check.ok:
            with Image.open(io.BytesIO(data)) as image:  # what the shard reader does with kept bytes
                image.load()
                assert to_rgb(image).mode == "RGB"
            assert check.ext == {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}[Image.open(io.BytesIO(data)).format]
        else:
            assert isinstance(check.reason, str) and check.reason


@pytest.mark.fault_case("images", "fuzzed folders through the shard writer (hypothesis, 12 examples): every file accounted for")
@settings(FUZZ, max_examples=12)
@given(files=st.lists(mutated_image(), min_size=1, max_size=6))
def test_fuzzed_folders_are_sharded_with_every_file_accounted_for(files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    root = make_folder(tmp / "images", {"clean": 1}, {"clean": 1})
    for i, data in enumerate(files):
        path = root / "train" / "fuzzed" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with hang_guard(60, "sharding a fuzzed folder"):
        try:
            manifest = write_shards(root, tmp / "shards", seed=0, shard_size=3, max_pixels=4_000_000, progress=False).manifest
        except DatasetError as error:  # the one allowed failure: a class with nothing decodable, named
            assert "train/fuzzed: none of its" in str(error), error
            return
    counts = manifest["counts"]["train"]["fuzzed"]
    assert counts["files_in"] == len(files) == counts["kept"] + counts["rejected"]
    rejected = {r["path"] for r in manifest["rejected"]}
    kept = {p for p in sharded_paths(tmp / "shards") if p.startswith("train/fuzzed/")}
    assert rejected | kept == {f"train/fuzzed/{i}.JPEG" for i in range(len(files))} and not rejected & kept

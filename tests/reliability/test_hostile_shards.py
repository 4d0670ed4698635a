"""Hostile or broken shards: refused with an error naming the shard and member; nothing written anywhere.

Most cases assume the worst: whoever crafted the shard also rewrote the
manifest so that its size, SHA-256 and count match, so only the reader's
structural checks stand between the file and training.
"""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.data.shard_reader import ShardIntegrityError, open_split
from tests.data.test_shard_writer import encode, png_header_only, random_rgb
from tests.reliability.support import snapshot

PNG = encode(random_rgb(5, (12, 10)), "PNG")
SHARD = "train-000000.tar"


def sample(key: str, label: str = "0", image: bytes = PNG, ext: str = "png") -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", image), (f"{key}.cls", label.encode()), (f"{key}.json", b'{"path": "x", "class": "c"}')]


def tar_bytes(members: list[tuple[str, bytes] | tarfile.TarInfo], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def install(shard_dir: Path, content: bytes, count: int | None, consistent: bool = True) -> Path:
    """Replace the first train shard by ``content``; with ``consistent`` also fix its manifest entry."""
    path = shard_dir / SHARD
    path.write_bytes(content)
    if consistent:
        manifest = json.loads((shard_dir / "manifest.json").read_text())
        entry = next(e for e in manifest["shards"] if e["name"] == SHARD)
        entry.update(size=len(content), sha256=hashlib.sha256(content).hexdigest(), count=count)
        (shard_dir / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture
def shards(tiny_shards: Path, tmp_path: Path) -> Path:
    """A private copy of valid shards, two folders below tmp_path (room for ``../../`` to land inside it)."""
    target = tmp_path / "project" / "data" / "shards"
    shutil.copytree(tiny_shards, target)
    return target


def refused(shard_dir: Path, integrity, match: str, verify: str = "index") -> str:
    """open_split refuses the split with a message containing the shard's path and ``match``; nothing written."""
    around = shard_dir.parents[1]
    before = snapshot(around)
    with pytest.raises(ShardIntegrityError) as error:
        open_split(shard_dir, "train", verify=verify)
    message = str(error.value)
    assert match in message, message
    integrity.assert_intact("every file around the shards (nothing written or changed)", around, before)
    return message


CRAFTED = {
    "member named ../../x": ([("../../x.png", PNG)] + sample("train_000001"), "'../../x.png' has an unsafe name"),
    "absolute member name": ([("/tmp/attmask_x.png", PNG), ("/tmp/attmask_x.cls", b"0"), ("/tmp/attmask_x.json", b"{}")],
                             "'/tmp/attmask_x.png' has an unsafe name"),
    "member in a folder": (sample("sub/train_000000"), "'sub/train_000000.png' has an unsafe name"),
    "symlink member": (sample("train_000001") + [link("train_000000.png", "/etc/passwd", tarfile.SYMTYPE)],
                       "'train_000000.png' (not a regular file)"),
    "hard link member": (sample("train_000001") + [link("train_000000.png", "train_000001.png", tarfile.LNKTYPE)],
                         "'train_000000.png' (not a regular file)"),
    "folder member": (sample("train_000001") + [link("train_000000.png", "", tarfile.DIRTYPE)], "(not a regular file)"),
    "missing .cls": (sample("train_000000")[::2], "sample 'train_000000' lacks its .cls member"),
    "missing image": (sample("train_000000")[1:], "sample 'train_000000' lacks its image member"),
    "label outside the class map": (sample("train_000000", label="99"), "label 99 outside [0, 3)"),
    "negative label": (sample("train_000000", label="-1"), "label -1 outside [0, 3)"),
    "label not a number": (sample("train_000000", label="cat"), "train_000000.cls is not an integer class index"),
    "duplicate member": (sample("train_000000") + [("train_000000.cls", b"1")], "'train_000000.cls' duplicates a part"),
    "second image for one sample": (sample("train_000000") + [("train_000000.jpg", PNG)], "'train_000000.jpg' duplicates a part"),
    "unexpected extension": (sample("train_000000") + [("train_000000.py", b"import os")], "unexpected member 'train_000000.py'"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
@pytest.mark.fault_case("shards", "crafted shard with a matching manifest")
def test_crafted_shard_is_refused_naming_shard_and_member(case, shards, integrity):
    members, match = CRAFTED[case]
    count = len({(m.name if isinstance(m, tarfile.TarInfo) else m[0]).partition(".")[0] for m in members})
    install(shards, tar_bytes(members), count)
    message = refused(shards, integrity, match)
    assert str(shards / SHARD) in message
    assert not (shards.parents[1] / "x.png").exists() and not Path("/tmp/attmask_x.png").exists()


@pytest.mark.fault_case("shards", "tampered byte, manifest untouched")
def test_tampered_byte_is_refused_naming_the_shard(shards, integrity):
    """A same-size change takes data.verify: full (the cheap default reads headers and labels only)."""
    content = bytearray((shards / SHARD).read_bytes())
    content[700] ^= 0x01
    install(shards, bytes(content), None, consistent=False)
    refused(shards, integrity, f"shard {SHARD} sha256", verify="full")


@pytest.mark.parametrize("consistent", [False, True], ids=["manifest untouched", "manifest matching"])
@pytest.mark.fault_case("shards", "truncated tar")
def test_truncated_tar_is_refused_naming_the_shard(consistent, shards, integrity):
    content = (shards / SHARD).read_bytes()
    install(shards, content[: len(content) // 2 + 100], 10, consistent=consistent)
    message = refused(shards, integrity, str(shards / SHARD))
    assert ("manifest says" in message) if not consistent else ("malformed" in message or "truncated" in message)


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/outside.tar", ".hidden.tar"])
@pytest.mark.fault_case("shards", "manifest naming a shard outside the folder")
def test_manifest_shard_names_must_stay_inside_the_folder(name, shards, integrity):
    outside = shards.parent / "outside.tar"
    outside.write_bytes((shards / SHARD).read_bytes())  # a real, matching tar: only the name check can refuse it
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (shards / "manifest.json").write_text(json.dumps(manifest))
    refused(shards, integrity, f"name {name!r} is not a plain .tar file name")


@pytest.mark.parametrize("damage", ["classes not a list", "shards not a list", "entry missing a field",
                                    "count is a string", "manifest is a list", "max_pixels is a string"])
@pytest.mark.fault_case("shards", "malformed manifest")
def test_malformed_manifest_is_a_clear_error(damage, shards, integrity):
    manifest = json.loads((shards / "manifest.json").read_text())
    if damage == "classes not a list":
        manifest["classes"] = "cats"
    elif damage == "shards not a list":
        manifest["shards"] = {"a": 1}
    elif damage == "entry missing a field":
        del manifest["shards"][0]["sha256"]
    elif damage == "count is a string":
        manifest["shards"][0]["count"] = "10"
    elif damage == "max_pixels is a string":
        manifest["max_pixels"] = "lots"
    else:
        manifest = [manifest]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    refused(shards, integrity, "manifest")


@pytest.mark.parametrize("image", ["decompression bomb", "not an image"])
@pytest.mark.fault_case("shards", "undecodable image inside a matching shard: refused on read, naming shard and member")
def test_bad_image_in_a_matching_shard_is_refused_when_read(image, shards):
    data = png_header_only(100_000, 100_000) if image == "decompression bomb" else b"#!/bin/sh\nrm -rf /\n"
    install(shards, tar_bytes(sample("train_000000", image=data)), 1)
    split = open_split(shards, "train")  # structure and hashes are fine
    index = next(i for i in range(len(split)) if split._shard[i] == 0)
    with pytest.raises(ShardIntegrityError) as error:
        split.image(index)
    assert f"{shards / SHARD}: member 'train_000000.png': not a decodable image" in str(error.value)

"""Atomic writes, deterministic JSON, folder swaps and hashes (pipeline/core/files.py)."""
from __future__ import annotations

import hashlib
import os

import pytest

from pipeline.core.files import (
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temporaries,
    replace_dir,
    restore_moved_aside,
    sha256_file,
    write_json,
)


def test_write_json_is_rounded_and_sorted(tmp_path):
    write_json({"b": 1 / 3, "a": [2 / 3, 1]}, tmp_path / "out" / "x.json", decimals=4)
    assert (tmp_path / "out" / "x.json").read_text() == '{\n  "a": [\n    0.6667,\n    1\n  ],\n  "b": 0.3333\n}\n'


def test_write_json_keeps_floats_exact_unless_asked(tmp_path):
    write_json({"x": 1 / 3}, tmp_path / "exact.json")
    assert (tmp_path / "exact.json").read_text() == '{\n  "x": 0.3333333333333333\n}\n'


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"old")

    class Boom(Exception):
        pass

    from pipeline.core import files

    with pytest.raises(Boom):
        with files.atomic_file(target) as handle:
            handle.write(b"half")
            raise Boom
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new"


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 5)  # more than one read chunk
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_replace_dir_swaps_folders_and_replaces_a_symlink_not_its_target(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("user data")
    target = tmp_path / "out"
    for content in ("first", "second"):
        new = tmp_path / f".out.tmp-{content}"
        new.mkdir()
        (new / "a.txt").write_text(content)
        replace_dir(new, target)
        assert (target / "a.txt").read_text() == content and not new.exists()
    target_link = tmp_path / "linked"
    target_link.symlink_to(elsewhere, target_is_directory=True)
    new = tmp_path / ".linked.tmp"
    new.mkdir()
    replace_dir(new, target_link)
    assert target_link.is_dir() and not target_link.is_symlink()
    assert (elsewhere / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "linked", "out"]


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    target = tmp_path / "shards"
    aside = tmp_path / ".shards.old-abc"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    assert restore_moved_aside(target) == target  # the previous folder comes back
    assert (target / "manifest.json").is_file() and not aside.exists()
    (tmp_path / ".shards.tmp-1").mkdir()
    remove_stale_temporaries(target, ".tmp-*")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]

"""Image folder -> shards: layout errors, image checks, subset, byte-identical output, the stage."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import pipeline.data.shard_writer as data
from pipeline.core.config import params_from_dict
from pipeline.data.shard_writer import DatasetError, check_image, scan_folder, select_subset, subset_count, write_shards

REPO = Path(__file__).resolve().parents[2]


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def random_rgb(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_folder(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    """root/{train,val}/<class>/<i>.JPEG, alternating real JPEG and PNG bytes."""
    seed = 0
    for split, classes in (("train", train), ("val", val)):
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                seed += 1
                fmt = "JPEG" if i % 2 == 0 else "PNG"
                (folder / f"img_{i:03d}.JPEG").write_bytes(encode(random_rgb(seed), fmt))
    return root


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming ``width x height`` and a tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def write(root: Path, out: Path, **kwargs) -> data.WriteResult:
    kwargs.setdefault("seed", 0)
    kwargs.setdefault("shard_size", 4)
    return write_shards(root, out, progress=False, **kwargs)


# ------------------------------------------------------------------ layout errors
@pytest.mark.parametrize(
    "breakage, where, expected",
    [
        ("no_root", "", "data root not found"),
        ("no_train", "train", "no train/ folder"),
        ("no_val", "val", "no val/ folder"),
        ("empty_class", "train/b", "empty class folder"),
        ("empty_val_class", "val/a", "empty class folder"),
        ("val_only_class", "val/zebra", "is in val but not in train"),
        ("no_classes", "train", "no class folders"),
    ],
)
def test_bad_layout_is_a_clear_error_before_any_shard(tmp_path, breakage, where, expected):
    root = tmp_path / "images"
    make_folder(root, {"a": 2, "b": 2}, {"a": 1})

    if breakage == "no_root":
        shutil.rmtree(root)
    elif breakage in ("no_train", "no_val"):
        shutil.rmtree(root / where)
    elif breakage == "empty_class":
        shutil.rmtree(root / "train" / "b")
        (root / "train" / "b").mkdir()
    elif breakage == "empty_val_class":
        for f in (root / "val" / "a").iterdir():
            f.unlink()
    elif breakage == "val_only_class":
        make_folder(tmp_path / "extra", {}, {"zebra": 1})
        shutil.move(tmp_path / "extra" / "val" / "zebra", root / "val" / "zebra")
    elif breakage == "no_classes":
        shutil.rmtree(root / "train")
        (root / "train").mkdir()
    out = tmp_path / "shards"
    with pytest.raises(DatasetError) as error:
        write(root, out)
    assert expected in str(error.value)
    assert str(root / where).rstrip("/") in str(error.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_train_class_without_any_decodable_image_is_an_error(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 2}, {"a": 1})
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "x.JPEG").write_text("not an image")
    with pytest.raises(DatasetError, match="none of its 1 files"):
        write(root, tmp_path / "shards")


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 2}, {"a": 1})
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="refusing to replace"):
        write(root, out)
    assert (out / "precious.txt").read_text() == "keep me"


# ------------------------------------------------------------------- image checks
def broken_corpus(folder: Path) -> dict[str, str | None]:
    """Write the corpus into ``folder``; returns name -> expected ext (None: rejected)."""
    rgb = random_rgb(7, (20, 16))
    jpeg = encode(rgb, "JPEG")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files: dict[str, tuple[bytes, str | None]] = {
        "zero_bytes.JPEG": (b"", None),
        "truncated.JPEG": (jpeg[: len(jpeg) // 2], None),
        "text.JPEG": (b"this is a text file, not a JPEG\n", None),
        "random.JPEG": (np.random.default_rng(3).bytes(2048), None),
        "huge.png": (png_header_only(100_000, 100_000), None),
        "bomb_below_pil_limit.png": (png_header_only(8_000, 8_000), None),
        "animation.gif": (encode(rgb, "GIF"), None),
        "png_named.JPEG": (encode(rgb, "PNG"), "png"),
        "cmyk.JPEG": (encode(rgb.convert("CMYK"), "JPEG"), "jpg"),
        "gray.JPEG": (encode(rgb.convert("L"), "JPEG"), "jpg"),
        "sixteen_bit.png": (encode(Image.fromarray(np.arange(320, dtype=np.uint16).reshape(16, 20) * 200), "PNG"), "png"),
        "palette_alpha.png": (encode(palette, "PNG", transparency=0), "png"),
        "good.JPEG": (jpeg, "jpg"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    return {name: ext for name, (_, ext) in files.items()}


def test_broken_file_corpus(tmp_path):
    root = make_folder(tmp_path / "images", {"clean": 3}, {"clean": 1})
    expected = broken_corpus(root / "train" / "mixed")
    result = write(root, tmp_path / "shards")
    manifest = result.manifest
    counts = manifest["counts"]["train"]["mixed"]
    n_kept = sum(ext is not None for ext in expected.values())
    assert counts == {"files_in": len(expected), "kept": n_kept, "rejected": len(expected) - n_kept, "selected": n_kept}
    for split in ("train", "val"):
        for row in manifest["counts"][split].values():
            assert row["files_in"] == row["kept"] + row["rejected"]
    rejected = {Path(r["path"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {name for name, ext in expected.items() if ext is None}
    assert rejected["zero_bytes.JPEG"] == "empty file (0 bytes)"
    assert "truncated" in rejected["truncated.JPEG"].lower()
    assert "not a decodable image" in rejected["text.JPEG"]
    assert rejected["huge.png"].startswith("too large")
    assert rejected["bomb_below_pil_limit.png"].startswith("too large: 8000x8000")
    assert rejected["animation.gif"].startswith("unsupported format GIF")
    # kept files: stored with the extension of their real format and their original bytes
    stored = {}
    for shard in sorted((tmp_path / "shards").glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name, content in members.items():
            if name.endswith(".json"):
                meta = json.loads(content)
                key = name.split(".")[0]
                ext = "jpg" if f"{key}.jpg" in members else "png"
                stored[Path(meta["path"]).name] = (ext, members[f"{key}.{ext}"])
    for name, ext in expected.items():
        if ext is not None:
            assert stored[name] == (ext, (root / "train" / "mixed" / name).read_bytes())


def test_pixel_limit_is_configurable():
    png = encode(random_rgb(1, (100, 100)), "PNG")
    assert check_image(png).ok
    check = check_image(png, max_pixels=5_000)
    assert not check.ok and check.reason.startswith("too large: 100x100 = 10000 pixels")


# ------------------------------------------------------------------------- subset
def test_subset_count_rules():
    assert subset_count(10, per_class=3) == 3
    assert subset_count(2, per_class=3) == 2
    assert subset_count(30, percent=10) == 3
    assert subset_count(10, percent=70) == 7  # 0.7 * 10 is 7.000000000000001 in floats; exact here
    assert subset_count(29, percent=10) == 2
    assert subset_count(5, percent=1) == 1  # never an empty class
    assert subset_count(7, percent=100) == 7
    assert subset_count(7) == 7
    with pytest.raises(ValueError):
        subset_count(7, per_class=1, percent=5)


def test_subset_counts_at_imagenet_scale():
    """The rehearsal's question, answered: the paper's shares round per class, never to an empty class."""
    assert subset_count(1300, per_class=260) == 260 and subset_count(732, per_class=260) == 260  # the 20% preset
    assert subset_count(1300, percent=20) == 260  # 20% of a full class is the official --subset 260
    assert [subset_count(n, percent=5) for n in (732, 1300)] == [36, 65]  # share-5: the smallest and largest class
    assert [subset_count(n, percent=10) for n in (732, 1300)] == [73, 130]
    assert subset_count(5, percent=5) == 1 and subset_count(5, per_class=260) == 5  # a rehearsal's 5 per class


def test_subset_is_deterministic_and_seeded():
    items = [f"f{i:02d}" for i in range(40)]
    first = select_subset(items, seed=0, class_name="a", per_class=10)
    assert first == select_subset(items, seed=0, class_name="a", per_class=10)
    assert len(first) == 10 and first == sorted(first) and len(set(first)) == 10
    assert first != select_subset(items, seed=1, class_name="a", per_class=10)
    assert first != select_subset(items, seed=0, class_name="b", per_class=10)
    assert select_subset(items, seed=0, class_name="a", percent=25) == first  # 25% of 40 = 10, same permutation


def test_first_subset_is_the_official_first_n_in_path_order(tmp_path):
    items = [f"f{i:02d}" for i in range(40)]
    assert select_subset(items, seed=0, class_name="a", per_class=10, subset="first") == items[:10]
    assert select_subset(items, seed=7, class_name="b", percent=25, subset="first") == items[:10]  # no seed involved
    root = make_folder(tmp_path / "images", {"a": 9, "b": 8}, {"a": 2, "b": 1})
    manifest = write(root, tmp_path / "s", per_class=3, subset="first").manifest
    assert manifest["subset"] == {"per_class": 3, "percent": None, "order": "first"}
    paths = []
    for shard in sorted((tmp_path / "s").glob("train-*.tar")):
        with tarfile.open(shard) as tar:
            paths += [json.loads(tar.extractfile(m).read())["path"] for m in tar if m.name.endswith(".json")]
    assert sorted(paths) == [f"train/{c}/img_{i:03d}.JPEG" for c in "ab" for i in range(3)]
    with pytest.raises(ValueError, match="subset"):
        write(root, tmp_path / "bad", per_class=3, subset="last")


@pytest.mark.parametrize("subset", [{"per_class": 4}, {"percent": 50.0}])
def test_subset_counts_in_shards_and_broken_files_do_not_shift_it(tmp_path, subset):
    root = make_folder(tmp_path / "images", {"a": 9, "b": 8}, {"a": 2, "b": 1})
    clean = write(root, tmp_path / "s1", **subset).manifest
    expected = {"a": 4, "b": 4}
    assert {c: row["selected"] for c, row in clean["counts"]["train"].items()} == expected
    assert clean["totals"]["val"]["selected"] == 3  # val is always complete
    (root / "train" / "a" / "img_004_broken.JPEG").write_bytes(b"\xff\xd8\xff garbage")
    (root / "train" / "b" / "aaa_empty.JPEG").write_bytes(b"")
    dirty = write(root, tmp_path / "s2", **subset).manifest

    def chosen(shard_dir: Path) -> list[str]:
        paths = []
        for shard in sorted(shard_dir.glob("train-*.tar")):
            with tarfile.open(shard) as tar:
                paths += [json.loads(tar.extractfile(m).read())["path"] for m in tar if m.name.endswith(".json")]
        return sorted(paths)

    assert chosen(tmp_path / "s1") == chosen(tmp_path / "s2")
    assert dirty["totals"]["train"]["rejected"] == 2


# ---------------------------------------------------------------- shards on disk
def test_round_trip_hashes_and_byte_identity(tmp_path):
    root = make_folder(tmp_path / "images", {"b_cls": 5, "a_cls": 6}, {"a_cls": 2, "b_cls": 3})
    first = write(root, tmp_path / "one", shard_size=4)
    write(root, tmp_path / "two", shard_size=4)  # the same input again: its files must equal the first's
    manifest = first.manifest
    assert manifest["classes"] == ["a_cls", "b_cls"]
    names = [s["name"] for s in manifest["shards"]]
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar", "val-000001.tar"]
    assert [s["count"] for s in manifest["shards"]] == [4, 4, 3, 4, 1]
    for shard in manifest["shards"]:
        content = (tmp_path / "one" / shard["name"]).read_bytes()
        assert shard["size"] == len(content)
        assert shard["sha256"] == hashlib.sha256(content).hexdigest()
        assert content == (tmp_path / "two" / shard["name"]).read_bytes()
    assert (tmp_path / "one" / "manifest.json").read_text() == (tmp_path / "two" / "manifest.json").read_text()

    samples, keys, train_labels = {}, set(), []
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "one" / shard["name"]) as tar:
            assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
            members = {m.name: tar.extractfile(m).read() for m in tar}
        for name in members:
            key, _, ext = name.partition(".")
            assert "/" not in key and "." not in key
            if ext != "json":
                continue
            assert key not in keys
            keys.add(key)
            meta = json.loads(members[name])
            label = int(members[f"{key}.cls"])
            image = members.get(f"{key}.jpg", members.get(f"{key}.png"))
            assert image == (root / meta["path"]).read_bytes()
            assert meta["class"] == manifest["classes"][label] == Path(meta["path"]).parent.name
            assert meta["split"] == shard["split"]
            samples[meta["path"]] = label
            if shard["split"] == "train":
                train_labels.append(label)
    assert len(samples) == 16
    assert train_labels != sorted(train_labels)  # train shards mix classes


def test_check_pool_gives_the_same_shards(tmp_path):
    root = make_folder(tmp_path / "images", {"a": 40, "b": 30}, {"a": 2})
    (root / "train" / "a" / "broken.JPEG").write_bytes(b"\xff\xd8\xff")
    inline = write(root, tmp_path / "inline", shard_size=16, workers=0).manifest
    pooled = write(root, tmp_path / "pooled", shard_size=16, workers=2).manifest
    assert pooled == inline and pooled["totals"]["train"]["rejected"] == 1


def test_failed_write_keeps_the_previous_output(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "images", {"a": 6}, {"a": 2})
    out = tmp_path / "shards"
    before = write(root, out).manifest
    original = data._write_one_shard
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "_write_one_shard", crash_on_second)
    (root / "train" / "a" / "new.JPEG").write_bytes(encode(random_rgb(99), "JPEG"))
    with pytest.raises(OSError, match="disk full"):
        write(root, out)
    assert json.loads((out / "manifest.json").read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "shards"]  # no temp folder left


# -------------------------------------------------------------------------- stage
def test_stage_main_on_tiny_params(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `stages` is not an installed package
    from stages import shard as stage

    folder = make_folder(tmp_path / "images", {"x": 4, "y": 3}, {"x": 1, "y": 2})
    monkeypatch.chdir(tmp_path)
    params = params_from_dict({"data": {"source": "imagefolder", "root": str(folder), "shard_size": 5}})
    summary = stage.main(params, progress_bar=False)
    assert summary["totals"]["train"] == {"files_in": 7, "kept": 7, "rejected": 0, "selected": 7}
    assert summary["totals"]["val"]["selected"] == 3
    assert summary["shards"] == 3
    manifest = json.loads((tmp_path / "data" / "shards" / "manifest.json").read_text())
    assert manifest["source"] == "imagefolder" and manifest["root"] == str(folder) and manifest["shard_size"] == 5
    assert sorted(p.name for p in (tmp_path / "data" / "shards").iterdir()) == [
        "manifest.json", "train-000000.tar", "train-000001.tar", "val-000000.tar",
    ]


def test_scan_orders_classes_and_files_like_imagefolder(tmp_path):
    root = make_folder(tmp_path / "images", {"b": 2, "a": 3}, {"b": 1})
    (root / "train" / ".hidden").mkdir()
    scan = scan_folder(root)
    assert scan.classes == ["a", "b"]
    assert [f.rel for f in scan.files["train"]["a"]] == [f"train/a/img_{i:03d}.JPEG" for i in range(3)]
    assert [f.label for f in scan.files["val"]["b"]] == [1]



"""Shard reader: integrity checks, random access, deterministic order across ranks, workers and resume."""
from __future__ import annotations

import io
import os
import pickle
import random
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.data.shard_writer import to_rgb, write_shards
from pipeline.data.shard_reader import (
    ShardDataset,
    ShardIntegrityError,
    _NotPlainUstar,
    _tar_members,
    _ustar_members,
    epoch_order,
    open_split,
    webdataset_urls,
)

N_TRAIN = 23  # prime: every batch / rank / worker combination has a remainder
CLASSES = ("ant", "bee", "cow")


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """23 train images (JPEG and PNG, one 16-bit PNG) in 3 classes, 6 val; shards of 5."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    counts = {"train": (8, 8, 6), "val": (2, 2, 2)}  # + one 16-bit PNG in cow
    for split, per_class in counts.items():
        for name, count in zip(CLASSES, per_class):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = Image.fromarray(rng.integers(0, 256, (8 + i, 10, 3), dtype=np.uint8))
                (folder / f"{i:02d}.JPEG").write_bytes(encode(image, "PNG" if i % 3 == 0 else "JPEG"))
    sixteen = Image.fromarray((np.arange(80, dtype=np.uint16).reshape(8, 10) * 800))
    (root / "train" / "cow" / "99_sixteen.png").write_bytes(encode(sixteen, "PNG"))
    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(root, out, seed=3, shard_size=5, progress=False)
    return out


@pytest.fixture(scope="module")
def train(shard_dir):
    return open_split(shard_dir, "train")


def mean_and_noise(image: Image.Image) -> torch.Tensor:
    """A cheap 'augmentation' that also draws from torch's and python's global generators."""
    return torch.tensor([float(np.asarray(image).mean()), torch.rand(()).item(), random.random()])


def collect(dataset: ShardDataset, num_workers: int) -> list[tuple[list[int], torch.Tensor]]:
    loader = DataLoader(dataset, batch_size=dataset.batch_size, num_workers=num_workers)
    batches = [(indices.tolist(), images) for images, _labels, indices in loader]
    assert len(loader) == len(batches) == dataset.num_steps
    assert len(dataset) == sum(len(indices) for indices, _ in batches)
    return batches


# --------------------------------------------------------------------- reading
def test_random_access_matches_source_files(shard_dir, train):
    root = Path(train.manifest["root"])
    assert len(train) == N_TRAIN
    assert train.classes == list(CLASSES)
    for i in range(len(train)):
        meta = train.metadata(i)
        data, ext = train.read_bytes(i)
        source = root / meta["path"]
        assert data == source.read_bytes()
        assert train.label(i) == CLASSES.index(meta["class"])
        with Image.open(source) as expected:
            assert ext == {"JPEG": "jpg", "PNG": "png"}[expected.format]
            image = train.image(i)
            assert image.mode == "RGB" and image.size == expected.size
            assert np.array_equal(np.asarray(image), np.asarray(to_rgb(expected)))
    val = open_split(shard_dir, "val")
    assert [val.metadata(i)["path"] for i in range(len(val))] == sorted(
        f"val/{c}/{i:02d}.JPEG" for c in CLASSES for i in range(2)
    )


def test_descriptor_cap_and_pickling_keep_reads_correct(train, monkeypatch):
    import pipeline.data.shard_reader as shards

    expected = [train.read_bytes(i) for i in range(len(train))]
    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
    train.close()
    copy = pickle.loads(pickle.dumps(train))  # as a spawned DataLoader worker receives it
    for split in (train, copy):
        assert [split.read_bytes(i) for i in reversed(range(len(split)))] == expected[::-1]
        assert len(split._fds) <= 2
    copy.close()


def test_sixteen_bit_png_is_scaled_not_clipped(train):
    index = next(i for i in range(len(train)) if train.metadata(i)["path"].endswith("sixteen.png"))
    pixels = np.asarray(train.image(index))[..., 0].astype(int)
    expected = np.rint(np.arange(80).reshape(8, 10) * 800 / 257).astype(int)
    assert np.array_equal(pixels, expected)


def test_plain_webdataset_reads_the_shards(shard_dir, train):
    urls = webdataset_urls(shard_dir, "train")
    pipeline = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls", "__key__")
    rows = list(pipeline)
    assert len(rows) == len(train)
    for i, (image, label, key) in enumerate(rows):
        assert key == f"train_{i:06d}"
        assert label == train.label(i)
        assert image.size == train.image(i).size


def damaged_copy(shard_dir: Path, tmp_path: Path, damage: str) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    victim = copy / "train-000002.tar"
    if damage == "delete":
        victim.unlink()
        return copy
    content = bytearray(victim.read_bytes())
    if damage == "append":
        content += b"\0"
    else:  # flip one byte of the first member's header, or of the first image's data (same size either way)
        members = _ustar_members(bytes(content))
        image = next(offset for name, offset, _ in members if name.endswith((".png", ".jpg")))
        content[100 if damage == "flip_header" else image + 40] ^= 0xFF
    victim.write_bytes(bytes(content))
    return copy


@pytest.mark.parametrize("verify", ["index", "full"])
@pytest.mark.parametrize("damage", ["flip_header", "append", "delete"])
def test_tampered_or_missing_shard_is_refused_by_name(shard_dir, tmp_path, damage, verify):
    copy = damaged_copy(shard_dir, tmp_path, damage)
    with pytest.raises(ShardIntegrityError, match="train-000002.tar"):
        open_split(copy, "train", verify=verify)
    open_split(copy, "val", verify=verify)  # the other split is untouched


def test_a_same_size_change_inside_an_image_takes_full_verification(shard_dir, tmp_path):
    """What each level catches (README, "Your own data"): index reads headers and labels, not the images."""
    copy = damaged_copy(shard_dir, tmp_path, "flip_image")
    assert len(open_split(copy, "train", verify="index")) == len(open_split(shard_dir, "train"))
    with pytest.raises(ShardIntegrityError, match="train-000002.tar: shard train-000002.tar sha256"):
        open_split(copy, "train", verify="full")


def test_both_levels_give_the_same_index(shard_dir):
    """data.verify changes what is checked, never what is read: no stage output can depend on it."""
    for split in ("train", "val"):
        index, full = open_split(shard_dir, split, verify="index"), open_split(shard_dir, split, verify="full")
        assert len(index) == len(full) > 0
        assert np.array_equal(index.labels, full.labels)
        assert all(index.read_bytes(i) == full.read_bytes(i) and index.metadata(i) == full.metadata(i)
                   for i in range(len(index)))
    with pytest.raises(ValueError, match="verify must be one of index, full"):
        open_split(shard_dir, "train", verify="sha")


def test_index_level_reads_headers_and_labels_not_images(shard_dir, monkeypatch):
    """The cheap level's cost: positioned reads of ~2 KB per sample, against every byte for full."""
    import pipeline.data.shard_reader as reader

    read = []
    original = os.pread
    monkeypatch.setattr(reader.os, "pread", lambda fd, n, offset: read.append(n) or original(fd, n, offset))
    split = open_split(shard_dir, "train", verify="index")
    total = sum(entry.size for entry in split.entries)
    assert 0 < sum(read) <= 4 * 512 * len(split) < total


def test_fast_tar_index_agrees_with_tarfile(shard_dir):
    content = (shard_dir / "train-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(content)) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar]
    assert _ustar_members(content) == expected
    # other writers' PAX headers (here from a float mtime) go through tarfile instead
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, body in (("k_0.cls", b"1"), ("k_0.png", b"\x89PNG"), ("k_0.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(body), 1.5
            tar.addfile(info, io.BytesIO(body))
    pax = buffer.getvalue()
    with pytest.raises(_NotPlainUstar):
        _ustar_members(pax)
    members = _tar_members(pax, Path("pax.tar"))
    assert [(name, pax[offset:offset + size]) for name, offset, size in members] == [
        ("k_0.cls", b"1"), ("k_0.png", b"\x89PNG"), ("k_0.json", b"{}"),
    ]
    with pytest.raises(ShardIntegrityError, match="truncated.tar"):
        _tar_members(content[:700], Path("truncated.tar"))


def test_missing_manifest_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="stages.shard"):
        open_split(tmp_path, "train")


# ----------------------------------------------------------------------- order
def test_order_is_a_function_of_seed_and_epoch(train):
    def indices(seed: int, epoch: int) -> list[int]:
        dataset = ShardDataset(train, batch_size=4, seed=seed, epoch=epoch, drop_last=False)
        return [i for batch in dataset.batches() for i in batch]

    assert indices(0, 0) == indices(0, 0)
    assert indices(0, 0) != indices(0, 1)
    assert indices(0, 0) != indices(1, 0)
    assert sorted(indices(0, 1)) == list(range(len(train)))
    eval_order = ShardDataset(train, batch_size=4, shuffle=False, drop_last=False).batches()
    assert [i for b in eval_order for i in b] == list(range(len(train)))
    assert epoch_order(5, 0, 0, shuffle=False).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_and_workers_split_exactly(train, world_size, drop_last):
    batch, n = 3, len(train)
    per_workers = {}
    for workers in (0, 1, 2):
        ranks = []
        for rank in range(world_size):
            dataset = ShardDataset(
                train, batch_size=batch, transform=mean_and_noise, seed=5, epoch=2,
                rank=rank, world_size=world_size, drop_last=drop_last,
            )
            ranks.append(collect(dataset, workers))
        per_workers[workers] = ranks
    reference = per_workers[0]
    for workers in (1, 2):  # same batches, same order, same augmentation draws for any worker count
        for got, want in zip(per_workers[workers], reference):
            assert [b[0] for b in got] == [b[0] for b in want]
            assert all(torch.equal(g[1], w[1]) for g, w in zip(got, want))
    seen = [i for rank in reference for indices, _ in rank for i in indices]
    assert len(seen) == len(set(seen))  # no duplicates
    steps = [len(rank) for rank in reference]
    global_batch = batch * world_size
    order = epoch_order(n, 5, 2).tolist()
    if drop_last:
        assert steps == [n // global_batch] * world_size
        assert all(len(indices) == batch for rank in reference for indices, _ in rank)
        assert sorted(seen) == sorted(order[: n // global_batch * global_batch])
    else:
        assert sorted(seen) == list(range(n))  # nothing lost
        assert max(steps) - min(steps) <= 1
    # step s of N ranks is the global batch s of one process with batch N * B
    single = ShardDataset(train, batch_size=global_batch, seed=5, epoch=2, drop_last=drop_last).batches()
    for s, global_rows in enumerate(single):
        stitched = [i for rank in reference if s < len(rank) for i in rank[s][0]]
        assert stitched == global_rows


@pytest.mark.parametrize("drop_last", [True, False])
def test_start_step_resume_is_the_tail_of_the_epoch(train, drop_last):
    def run(start_step: int, workers: int) -> list[tuple[list[int], torch.Tensor]]:
        dataset = ShardDataset(
            train, batch_size=2, transform=mean_and_noise, seed=1, epoch=4, rank=1, world_size=2,
            start_step=start_step, drop_last=drop_last,
        )
        return collect(dataset, workers)

    full = run(0, 0)
    assert len(full) == len(train) // 4 + (0 if drop_last else 1)  # 23 = 5 x 4 + 3: rank 1 gets 1 of the 3
    for start, workers in ((2, 0), (3, 2), (len(full), 0)):
        tail = run(start, workers)
        assert [b[0] for b in tail] == [b[0] for b in full[start:]]
        assert all(torch.equal(t[1], f[1]) for t, f in zip(tail, full[start:]))
    with pytest.raises(ValueError, match="start_step"):
        ShardDataset(train, batch_size=2, start_step=len(train))


def test_lengths_and_argument_checks(train):
    dataset = ShardDataset(train, batch_size=4, world_size=2, rank=1, drop_last=True, start_step=1)
    assert dataset.steps_per_epoch == len(train) // 8
    assert dataset.num_steps == dataset.steps_per_epoch - 1
    assert len(dataset) == 4 * dataset.num_steps
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(train, batch_size=4, world_size=2, rank=2)
    with pytest.raises(ValueError, match="global_batch_size"):
        ShardDataset(train, batch_size=4, world_size=2, global_batch_size=4)


def test_augmentation_leaves_the_callers_rng_alone(train):
    torch.manual_seed(123)
    random.seed(123)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(123)
    random.seed(123)
    list(ShardDataset(train, batch_size=4, transform=mean_and_noise, drop_last=False))
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


class StepAndRow:
    """A per_step that says which (step, global row) it was asked for; module-level, so workers can unpickle it."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch

    def __call__(self, step: int) -> torch.Tensor:
        return torch.stack([torch.full((self.global_batch,), step), torch.arange(self.global_batch)], dim=1)


@pytest.mark.parametrize("workers", [0, 2])
def test_per_step_rows_come_with_their_samples_for_any_rank_worker_count_and_resume(train, workers):
    batch, world = 2, 2
    for rank in range(world):
        plain = ShardDataset(train, batch_size=batch, transform=mean_and_noise, seed=3, epoch=1,
                             rank=rank, world_size=world, start_step=1)
        rows = ShardDataset(train, batch_size=batch, transform=mean_and_noise, seed=3, epoch=1,
                            rank=rank, world_size=world, start_step=1, per_step=StepAndRow(batch * world))
        want = collect(plain, 0)
        got = list(DataLoader(rows, batch_size=batch, num_workers=workers))
        assert len(got) == len(want) == plain.num_steps
        for k, ((images, _labels, indices, step_rows), (want_indices, want_images)) in enumerate(zip(got, want)):
            assert indices.tolist() == want_indices and torch.equal(images, want_images)  # the samples are untouched
            # step start_step + k of the epoch; this rank's rows rank * B .. (rank + 1) * B of the global batch
            assert step_rows.tolist() == [[1 + k, rank * batch + j] for j in range(batch)]

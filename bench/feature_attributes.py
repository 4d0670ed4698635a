"""What the embedded default's features encode: the class, or the colours two crops of one image share?

Run: ``.venv/bin/python -m bench.feature_attributes`` after ``make repro``;
writes ``reports/bench/feature_attributes.json`` (about 20 s on 2 cores).

Two readings of the same pipeline outputs, each against the embedded
generator's class-independent draws (:func:`pipeline.data.synthetic.scene`):

- **k-NN read-out.** The pipeline's weighted k-NN (``knn.temperature``,
  k = 20) on the ``extract`` stage's features (``data/features``), asked to
  predict the class, the object's palette colour and the background's palette
  colour of each val image. A feature space whose neighbours share colours
  reads colours well and the class badly.
- **Teacher clusters.** The pre-trained teacher's [CLS] prototype assignment
  (argmax over ``model.out_dim``) on the train images, and its normalised
  mutual information (NMI) with the class, each colour and the (object,
  background) colour pair; the same for a randomly initialised network, and
  the NMI a random relabelling with the same cluster sizes gets (chance).

Only for ``data.source: synthetic`` (the attributes come from the generator).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from tqdm import tqdm

from bench.machine import machine_info
from pipeline.core.config import Params, load_params
from pipeline.core.seeding import derive_seed
from pipeline.data.shard_reader import ShardSplit, open_split
from pipeline.data.synthetic import PALETTE, image_identity, palette_index, scene
from pipeline.evaluation.extract import extract_split
from pipeline.evaluation.feature_files import load_variant
from pipeline.evaluation.knn import weighted_knn
from pipeline.method.backbone_export import random_backbone_state
from pipeline.method.checkpoint import load_checkpoint
from pipeline.method.model import IBOTNetwork, build_network

OUTPUT = Path("reports/bench/feature_attributes.json")
ATTRIBUTES = ("class", "object_colour", "background_colour")
VARIANTS = ("pretrained", "random_init", "pixels")
K = 20
CHANCE_DRAWS = 20


def split_attributes(split: ShardSplit, seed: int, image_size: int, progress: bool = True) -> dict[str, np.ndarray]:
    """``{attribute: (N,) int64}`` for every image of a synthetic split, in split order.

    ``colour_pair`` is ``object_colour * P + background_colour`` (P palette colours).
    """
    rows = []
    for i in tqdm(range(len(split)), desc=f"attributes {split.split}", unit="img", disable=not progress):
        name, class_index, image_index = image_identity(split.metadata(i)["path"])
        drawn = scene(seed, name, class_index, image_index, image_size)
        rows.append((class_index, palette_index(drawn["object_colour"]), palette_index(drawn["background_colour"])))
    table = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    out = dict(zip(ATTRIBUTES, table.T))
    out["colour_pair"] = out["object_colour"] * len(PALETTE) + out["background_colour"]
    return out


def knn_readout(train: np.ndarray, val: np.ndarray, train_attrs: dict[str, np.ndarray],
                val_attrs: dict[str, np.ndarray], temperature: float) -> dict[str, float]:
    """Weighted k-NN@20 top-1 (%) of each attribute, from one feature space."""
    return {name: weighted_knn(train, train_attrs[name], val, val_attrs[name], [K], temperature=temperature)["top1"][str(K)]
            for name in ATTRIBUTES}


def majority_share(values: np.ndarray) -> float:
    """The most frequent value's share (%): what always guessing it scores."""
    return 100.0 * float(np.bincount(values).max()) / len(values)


def cluster_nmi(clusters: np.ndarray, attrs: dict[str, np.ndarray]) -> dict[str, float]:
    """NMI of a clustering with each attribute (and the colour pair)."""
    return {name: float(normalized_mutual_info_score(attrs[name], clusters))
            for name in (*ATTRIBUTES, "colour_pair")}


def chance_nmi(clusters: np.ndarray, attrs: dict[str, np.ndarray], seed: int) -> dict[str, float]:
    """Mean NMI of random relabellings with the same cluster sizes: the floor a finite sample gives."""
    rng = np.random.default_rng(seed)
    draws = [cluster_nmi(rng.permutation(clusters), attrs) for _ in range(CHANCE_DRAWS)]
    return {name: float(np.mean([d[name] for d in draws])) for name in draws[0]}


def random_network(params: Params) -> IBOTNetwork:
    """The ``random_init`` baseline's backbone under a seeded random head (the global generator is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(params.seed, "random_init"))
        network = build_network(params.model, drop_path_rate=0.0)
    network.backbone.vit.load_state_dict(random_backbone_state(params.model, params.seed), strict=True)
    return network


def teacher_network(params: Params, checkpoint: Path) -> IBOTNetwork:
    """The pre-trained teacher (backbone + head) from a pre-training checkpoint."""
    network = build_network(params.model, drop_path_rate=0.0)
    network.load_state_dict(load_checkpoint(checkpoint)["teacher"])
    return network


def prototype_assignments(networks: dict[str, IBOTNetwork], split: ShardSplit, params: Params,
                          progress: bool = True) -> dict[str, np.ndarray]:
    """``{name: (N,) int64}``: each network's argmax [CLS] prototype on the split's eval-transformed images."""
    def assign(network: IBOTNetwork):
        network.eval()
        return lambda images: network(images)["cls"].argmax(dim=1, keepdim=True).float()

    sets = extract_split(split, {name: assign(net) for name, net in networks.items()}, image_size=params.extract_image_size(),
                         batch_size=params.extract.batch_size, device=torch.device("cpu"), progress_bar=progress,
                         desc=f"prototypes {split.split}")
    assert sets is not None
    return {name: fs.features[:, 0].astype(np.int64) for name, fs in sets.items()}


def measure(params: Params, shards: Path, features: Path, checkpoint: Path, progress: bool = True) -> dict[str, Any]:
    """The k-NN read-out per feature variant and the teacher-cluster NMI (module docstring)."""
    if params.data.source != "synthetic":
        raise SystemExit("bench.feature_attributes needs data.source: synthetic (the attributes come from the generator)")
    size = params.data.synthetic.image_size
    splits = {name: open_split(shards, name, verify="index") for name in ("train", "val")}
    attrs = {name: split_attributes(split, params.seed, size, progress) for name, split in splits.items()}
    readout = {}
    for variant in VARIANTS:
        train, val = load_variant(features, variant)
        readout[variant] = knn_readout(train.features, val.features, attrs["train"], attrs["val"], params.knn.temperature)
    networks = {"pretrained_teacher": teacher_network(params, checkpoint), "random_init": random_network(params)}
    clusters = prototype_assignments(networks, splits["train"], params, progress)
    return {
        "k": K,
        "seed": params.seed,
        "num_train": len(splits["train"]),
        "num_val": len(splits["val"]),
        "knn": readout,
        "majority": {name: majority_share(attrs["val"][name]) for name in ATTRIBUTES},
        "clusters": {name: {"used": int(len(np.unique(c))), "nmi": cluster_nmi(c, attrs["train"]),
                            "chance_nmi": chance_nmi(c, attrs["train"], params.seed)}
                     for name, c in clusters.items()},
        "out_dim": params.model.out_dim,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--features", default="data/features")
    parser.add_argument("--checkpoint", default="models/pretrain/checkpoint.pt")
    parser.add_argument("--out", default=str(OUTPUT))
    args = parser.parse_args(argv)
    params = load_params(args.params)
    torch.set_num_threads(params.threads)
    result = measure(params, Path(args.shards), Path(args.features), Path(args.checkpoint))
    result["machine"] = machine_info()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"knn": result["knn"], "clusters": result["clusters"]}, indent=1))
    return result


if __name__ == "__main__":
    main()

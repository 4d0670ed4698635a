"""The exported backbone: a plain timm ViT (``num_classes=0``) and its safetensors file.

Pre-training exports the teacher's ViT (``models/pretrain/backbone.safetensors``);
extraction, fine-tuning and the report load it back strictly into
``timm.create_model(arch, num_classes=0, dynamic_img_size=True, **shape)``.
The ``random_init`` baseline is the same architecture under a derived seed.
This module is the one place that creates, writes and reads such a backbone.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import timm.models
import torch
from torch import Tensor

from pipeline.core.config import ModelConfig
from pipeline.core.files import atomic_write_bytes, replace_dir
from pipeline.core.seeding import derive_seed
from pipeline.data.augment import IMAGENET_MEAN, IMAGENET_STD
from pipeline.method.checkpoint import CheckpointError


class BackboneNotFoundError(FileNotFoundError):
    """The backbone export is missing; the message names the file and the stage that writes it."""


# ------------------------------------------------------------------ backbones
def create_backbone(config: ModelConfig) -> timm.models.vision_transformer.VisionTransformer:
    """A randomly initialised timm ViT (``num_classes=0``) of the export's shape, any crop size."""
    return timm.create_model(config.arch, pretrained=False, num_classes=0, dynamic_img_size=True, **config.timm_shape())


def save_backbone_safetensors(
    state_dict: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a backbone state dict as safetensors, atomically (temp file + rename)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(Path(path), safetensors.torch.save(tensors, metadata=metadata))


def load_backbone_state(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a backbone export (safetensors).

    Raises:
        BackboneNotFoundError: naming ``path`` when it does not exist.
        CheckpointError: naming ``path`` when it is truncated or not safetensors.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneNotFoundError(
            f"{path}: backbone export not found; run `python -m stages.pretrain` first (it writes this file)"
        )
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as error:  # safetensors' own error names neither the file nor what to do
        raise CheckpointError(
            f"{path}: not a readable safetensors backbone export ({type(error).__name__}: {error}); "
            "rerun `python -m stages.pretrain`"
        ) from error


def load_backbone(config: ModelConfig, path: str | Path) -> torch.nn.Module:
    """The exported backbone loaded with ``strict=True`` (a shape mismatch is an error)."""
    state = load_backbone_state(path)
    vit = create_backbone(config)
    try:
        vit.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise RuntimeError(f"{path}: does not match model {config.arch} {config.timm_shape()}: {error}") from error
    return vit


def random_backbone_state(config: ModelConfig, seed: int) -> dict[str, Tensor]:
    """Weights of the ``random_init`` baseline: timm's init under ``derive_seed(seed, "random_init")``.

    The global generator is restored afterwards, so calling this changes nothing else.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "random_init"))
        vit = create_backbone(config)
    return {k: v.detach().clone() for k, v in vit.state_dict().items()}


def random_backbone(config: ModelConfig, seed: int) -> torch.nn.Module:
    vit = create_backbone(config)
    vit.load_state_dict(random_backbone_state(config, seed), strict=True)
    return vit


def save_timm_folder(state: dict[str, Tensor], config: ModelConfig, image_size: int, folder: str | Path) -> None:
    """``folder/config.json`` + ``folder/model.safetensors``, as timm writes a model for the Hub.

    ``timm.create_model("local-dir:<folder>", pretrained=True)`` then builds and
    loads the backbone by name, with its shape and preprocessing (image size,
    ImageNet mean / std, bicubic, centre crop 0.875) from ``config.json``. The
    folder is written beside its target and swapped in whole.
    """
    folder = Path(folder)
    vit = create_backbone(config)
    vit.load_state_dict(state, strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        timm.models.save_for_hf(
            vit, str(staging), safe_serialization=True,
            model_config={"pretrained_cfg": {"tag": "attmask", "license": "unspecified"}},
            data_config={"input_size": (3, image_size, image_size), "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                         "crop_pct": 0.875, "interpolation": "bicubic"},
        )
        replace_dir(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

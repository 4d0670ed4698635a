"""The exported backbone: a plain timm ViT (``num_classes=0``) and its safetensors file.

Pre-training exports the teacher's ViT (``models/pretrain/backbone.safetensors``);
extraction, fine-tuning and the report load it back strictly into
``timm.create_model(arch, num_classes=0, dynamic_img_size=True, **shape)``.
The ``random_init`` baseline is the same architecture under a derived seed.
This module is the one place that creates, writes and reads such a backbone.
"""
from __future__ import annotations

from pathlib import Path

import safetensors.torch
import timm
import torch
from torch import Tensor

from pipeline.core.config import ModelConfig
from pipeline.core.files import atomic_write_bytes
from pipeline.core.seeding import derive_seed
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

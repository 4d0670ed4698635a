"""CUDA-determinism audit, run on the CPU: no torch stage dispatches an op that raises on CUDA in deterministic mode.

Every torch stage runs under ``torch.use_deterministic_algorithms(True)``
(:func:`pipeline.core.seeding.configure_determinism`). On CUDA some ops then
raise ``RuntimeError`` instead of running (they only have an atomicAdd kernel);
on the CPU the same ops run fine, so a CPU test suite never notices. This test
records, with a ``TorchDispatchMode``, every aten op of one step of each torch
stage on tiny configs, and fails on any op of :data:`RAISES_ON_CUDA`.

Ops that the mode switches to a deterministic kernel (the docstring's first list:
``index_put``, ``scatter_add_``, ``index_add``, ``cumsum``, convolutions...) are
allowed: they run, deterministically, because the mode is on.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.evaluation import finetune as finetune_module
from pipeline.method import model as model_module
from bench.stage_steps import (PRETRAIN_CASES, extract_step, finetune_step, knn_step, linear_sgd_step,
                               pretrain_step)
from tests.conftest import tiny_params_dict

# Source: the docstring of torch.use_deterministic_algorithms (torch 2.14), its list "The following
# normally-nondeterministic operations will throw a RuntimeError when mode=True", each entry mapped to
# the aten overload packets it dispatches to (names without a trailing "_": in-place variants match too).
# Conservative: an entry's condition ("on a CUDA tensor", "when attempting to differentiate", "with
# indices output", "when weights is given", reduce="prod") is dropped; the op alone fails the audit.
# Left out, with reason: nn.NLLLoss maps to nll_loss2d only (the 1-D class-index nll_loss has no CUDA
# alert; CrossEntropyLoss on (B, C) logits uses it); Tensor.resize_ is listed for quantized tensors only.
RAISES_ON_CUDA: dict[str, str] = {
    "avg_pool3d_backward": "torch.nn.AvgPool3d, differentiated",
    "_adaptive_avg_pool2d_backward": "torch.nn.AdaptiveAvgPool2d, differentiated",
    "_adaptive_avg_pool3d_backward": "torch.nn.AdaptiveAvgPool3d, differentiated",
    "adaptive_avg_pool3d_backward": "torch.nn.AdaptiveAvgPool3d, differentiated",
    "adaptive_max_pool2d_backward": "torch.nn.AdaptiveMaxPool2d, differentiated",
    "fractional_max_pool2d_backward": "torch.nn.FractionalMaxPool2d, differentiated",
    "fractional_max_pool3d_backward": "torch.nn.FractionalMaxPool3d, differentiated",
    "max_unpool2d": "torch.nn.MaxUnpool1d / MaxUnpool2d",
    "max_unpool3d": "torch.nn.MaxUnpool3d",
    "upsample_linear1d_backward": "F.interpolate linear, differentiated",
    "upsample_bilinear2d_backward": "F.interpolate bilinear, differentiated",
    "_upsample_bilinear2d_aa_backward": "F.interpolate bilinear (antialias), differentiated",
    "upsample_bicubic2d_backward": "F.interpolate bicubic, differentiated",
    "_upsample_bicubic2d_aa_backward": "F.interpolate bicubic (antialias), differentiated",
    "upsample_trilinear3d_backward": "F.interpolate trilinear, differentiated",
    "reflection_pad1d_backward": "torch.nn.ReflectionPad1d, differentiated",
    "reflection_pad2d_backward": "torch.nn.ReflectionPad2d, differentiated",
    "reflection_pad3d_backward": "torch.nn.ReflectionPad3d, differentiated",
    "nll_loss2d_forward": "torch.nn.NLLLoss (spatial targets)",
    "nll_loss2d": "torch.nn.NLLLoss (spatial targets)",
    "_ctc_loss_backward": "torch.nn.CTCLoss, differentiated",
    "cudnn_ctc_loss": "torch.nn.CTCLoss, differentiated (cuDNN computes the gradient in the forward)",
    "_embedding_bag_backward": "torch.nn.EmbeddingBag mode='max', differentiated",
    "_embedding_bag_dense_backward": "torch.nn.EmbeddingBag mode='max', differentiated",
    "put": "torch.Tensor.put_ (either accumulate)",
    "histc": "torch.histc",
    "bincount": "torch.bincount with weights",
    "median": "torch.median with indices output",
    "nanmedian": "torch.median with indices output (nanmedian shares its CUDA kernel)",
    "grid_sampler_2d_backward": "F.grid_sample, differentiated",
    "grid_sampler_3d_backward": "F.grid_sample, differentiated",
    "cudnn_grid_sampler_backward": "F.grid_sample, differentiated",
    "scatter_reduce": "torch.Tensor.scatter_reduce reduce='prod'",
}


class OpRecorder(TorchDispatchMode):
    """Collects the aten overload-packet name of every op dispatched while active (backward included)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: tuple[type, ...], args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        self.names.add(func.overloadpacket.__name__.rstrip("_"))
        return func(*args, **(kwargs or {}))


def recorded_ops(step: Callable[[], Any]) -> set[str]:
    """The aten ops of ``step()``, run in deterministic mode as the stages run (CPU-side raises surface too)."""
    was_on = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with OpRecorder() as recorder:
            step()
    finally:
        torch.use_deterministic_algorithms(was_on)
    return recorder.names


def assert_no_raising_op(names: set[str], stage: str) -> None:
    found = {name: RAISES_ON_CUDA[name] for name in sorted(names & RAISES_ON_CUDA.keys())}
    assert not found, f"{stage}: ops that raise on CUDA under torch.use_deterministic_algorithms(True): {found}"


# --------------------------------------------------------------------------- stages
# The steps (bench/stage_steps.py, shared with the GPU harness's alert pass) on the tests' tiny config:
# 16 px globals and 8 px locals on a 16 px, patch-4 model, so every local crop resizes pos_embed (4x4 -> 2x2),
# and 20 px eval crops (a 5 x 5 grid against the model's 4 x 4), so fine-tuning differentiates through the resize.


@pytest.mark.parametrize("case", list(PRETRAIN_CASES))
def test_pretrain_step(case, tiny_folder, tiny_shards, tmp_path):
    names = recorded_ops(pretrain_step(tiny_params_dict(tiny_folder, **PRETRAIN_CASES[case]), tiny_shards, tmp_path))
    # the backward, the EMA and the local crops' pos_embed resize were all seen
    assert {"native_layer_norm_backward", "_foreach_add", "_upsample_bicubic2d_aa"} <= names
    assert_no_raising_op(names, f"pretrain ({case})")


def test_finetune_step(tiny_folder, tiny_shards):
    names = recorded_ops(finetune_step(tiny_params_dict(tiny_folder), tiny_shards))
    assert {"native_layer_norm_backward", "_upsample_bicubic2d_aa"} <= names  # differentiated through the resize
    assert_no_raising_op(names, "finetune")


def test_feature_extraction(tiny_folder, tiny_shards):
    names = recorded_ops(extract_step(tiny_params_dict(tiny_folder), tiny_shards))
    assert "_upsample_bicubic2d_aa" in names  # the resize ran (forward only: deterministic)
    assert_no_raising_op(names, "extract")


def test_linear_sgd_probe(tiny_folder, tiny_shards, tmp_path):
    names = recorded_ops(linear_sgd_step(tiny_params_dict(tiny_folder), tiny_shards, tmp_path))
    assert "addmm" in names or "mm" in names
    assert_no_raising_op(names, "linear_sgd")


def test_knn_and_fewshot():
    names = recorded_ops(knn_step())
    assert "topk" in names
    assert_no_raising_op(names, "knn")


# --------------------------------------------------------------------------- the audit detects


def test_audit_fails_with_timms_pos_embed_resize(tiny_folder, tiny_shards, tmp_path, monkeypatch):
    """The code before pipeline/method/pos_embed.py: timm's own _pos_embed in the pre-training and fine-tuning models."""
    monkeypatch.setattr(model_module, "pos_embed", lambda vit, x: vit._pos_embed(x))
    monkeypatch.setattr(finetune_module, "use_deterministic_pos_embed", lambda model: model)
    steps = {
        "pretrain": pretrain_step(tiny_params_dict(tiny_folder, **PRETRAIN_CASES["attmask_high"]), tiny_shards, tmp_path),
        "finetune": finetune_step(tiny_params_dict(tiny_folder), tiny_shards),
    }
    for stage, step in steps.items():
        names = recorded_ops(step)
        with pytest.raises(AssertionError, match="_upsample_bicubic2d_aa_backward"):
            assert_no_raising_op(names, stage)

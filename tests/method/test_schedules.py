"""Learning-rate, weight-decay, momentum and teacher-temperature schedules."""
import math

import numpy as np
import pytest

from pipeline.core.config import PretrainConfig
import torch

from pipeline.method.schedules import TrainingSchedules, cosine_schedule, stretch_to_min_steps, teacher_temperature_schedule


def test_cosine_without_warmup_hits_both_endpoints_exactly():
    s = cosine_schedule(1.0, 0.1, epochs=3, steps_per_epoch=4)
    assert s.shape == (12,) and s.dtype == np.float64
    assert s[0] == 1.0
    assert s[-1] == 0.1
    # step j of N: final + (base - final) * (1 + cos(pi * j / (N - 1))) / 2
    assert s[5] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 5 / 11)) / 2, abs=1e-15)
    assert np.all(np.diff(s) < 0)


def test_cosine_increasing_when_final_above_base():
    s = cosine_schedule(0.04, 0.4, epochs=2, steps_per_epoch=5)
    assert s[0] == 0.04 and s[-1] == 0.4
    assert np.all(np.diff(s) > 0)


def test_linear_warmup_then_cosine():
    s = cosine_schedule(2.0, 0.5, epochs=5, steps_per_epoch=4, warmup_epochs=2, warmup_start=1.0)
    assert s.shape == (20,)
    warmup = 8
    np.testing.assert_allclose(s[:warmup], 1.0 + (2.0 - 1.0) * np.arange(warmup) / warmup, rtol=0, atol=1e-15)
    assert s[0] == 1.0
    assert s[warmup - 1] < 2.0  # the peak is not repeated at the end of the warm-up
    assert s[warmup] == 2.0 and s.max() == 2.0
    assert s[-1] == 0.5
    assert np.all(np.diff(s[:warmup + 1]) > 0) and np.all(np.diff(s[warmup:]) < 0)


def test_cosine_degenerate_lengths():
    np.testing.assert_array_equal(cosine_schedule(3.0, 1.0, epochs=1, steps_per_epoch=1), [3.0])
    # one cosine step after the warm-up: it is the base value
    np.testing.assert_array_equal(cosine_schedule(3.0, 1.0, 2, 1, warmup_epochs=1, warmup_start=0.0), [0.0, 3.0])
    # warm-up over the whole run: never reaches the cosine part
    np.testing.assert_allclose(cosine_schedule(4.0, 1.0, 2, 2, warmup_epochs=2), [0.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "kwargs", [dict(epochs=0), dict(steps_per_epoch=0), dict(warmup_epochs=4), dict(warmup_epochs=-1)]
)
def test_cosine_rejects_bad_lengths(kwargs):
    args = dict(base=1.0, final=0.0, epochs=3, steps_per_epoch=2) | kwargs
    with pytest.raises(ValueError):
        cosine_schedule(**args)


def test_teacher_temperature_warmup_then_constant():
    t = teacher_temperature_schedule(0.04, 0.07, warmup_epochs=4, epochs=6)
    assert t.shape == (6,) and t.dtype == np.float64
    np.testing.assert_allclose(t, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07], rtol=0, atol=1e-15)
    assert t[0] == 0.04 and t[3] == 0.07


def test_teacher_temperature_edge_cases():
    np.testing.assert_array_equal(teacher_temperature_schedule(0.04, 0.07, 0, 3), [0.07] * 3)
    np.testing.assert_array_equal(teacher_temperature_schedule(0.04, 0.07, 1, 3), [0.04, 0.07, 0.07])
    # a warm-up longer than the run is cut, keeping the same slope
    long = teacher_temperature_schedule(0.04, 0.07, 30, 5)
    np.testing.assert_allclose(long, 0.04 + 0.03 * np.arange(5) / 29, rtol=0, atol=1e-15)


def test_training_schedules_from_config():
    config = PretrainConfig(
        epochs=10, lr=5e-4, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.99, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3,
    )
    s = TrainingSchedules.from_config(config, steps_per_epoch=7, batch_size_total=512)
    assert s.total_steps == 70
    for array in (s.lr, s.weight_decay, s.momentum):
        assert array.shape == (70,) and array.dtype == np.float64
    assert s.base_lr == pytest.approx(1e-3)  # 5e-4 * 512 / 256
    assert s.lr[0] == 0.0
    assert s.lr[14] == s.base_lr == s.lr.max()
    assert s.lr[13] == pytest.approx(s.base_lr * 13 / 14)
    assert s.lr[-1] == 1e-6
    assert s.weight_decay[0] == 0.04 and s.weight_decay[-1] == 0.4
    assert s.momentum[0] == 0.99 and s.momentum[-1] == 1.0
    assert np.all(s.momentum <= 1.0)
    np.testing.assert_allclose(s.teacher_temp, [0.04, 0.055, 0.07] + [0.07] * 7, rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        s.lr[0] = 1.0  # read-only: the loop and the loss share these arrays


def test_lr_scales_linearly_with_global_batch():
    config = PretrainConfig(epochs=4, warmup_epochs=1, min_lr=0.0)
    small = TrainingSchedules.from_config(config, steps_per_epoch=3, batch_size_total=64)
    large = TrainingSchedules.from_config(config, steps_per_epoch=3, batch_size_total=256)
    assert large.base_lr == config.lr
    np.testing.assert_allclose(large.lr, 4 * small.lr, rtol=1e-15)
    with pytest.raises(ValueError):
        TrainingSchedules.from_config(config, steps_per_epoch=3, batch_size_total=0)


def test_min_steps_leaves_a_budget_that_already_reaches_it_alone():
    config = PretrainConfig(epochs=4, min_steps=150)
    assert stretch_to_min_steps(config, steps_per_epoch=39) is config  # the embedded default: 156 steps


def test_min_steps_raises_the_epochs_and_stretches_the_epoch_valued_schedules():
    config = PretrainConfig(epochs=4, min_steps=150, warmup_epochs=1, warmup_teacher_temp_epochs=3, freeze_last_layer=1)
    stretched = stretch_to_min_steps(config, steps_per_epoch=10)
    assert stretched.epochs == 15  # ceil(150 / 10)
    # x 15/4, rounded half up
    assert (stretched.warmup_epochs, stretched.warmup_teacher_temp_epochs, stretched.freeze_last_layer) == (4, 11, 4)
    assert (stretched.eval_every, stretched.checkpoint_every) == (config.eval_every, config.checkpoint_every)
    assert stretch_to_min_steps(PretrainConfig(epochs=4, min_steps=0), steps_per_epoch=1).epochs == 4


def test_a_1400_image_folder_trains_at_least_min_steps(tmp_path):
    """1,400 train images at batch 128: 10 steps per epoch, so the default 4 epochs would be 40 steps."""
    from pipeline.core.config import params_from_dict
    from pipeline.core.distributed import DistContext
    from pipeline.data.shard_writer import build_shards
    from pipeline.method.training import PretrainPaths, Pretrainer
    from tests.conftest import tiny_params_dict, write_tiny_folder

    folder = write_tiny_folder(tmp_path / "folder", classes=10, train=140, val=1, size=8)
    params = params_from_dict(tiny_params_dict(folder, data={"shard_size": 1000},
                                               pretrain={"epochs": 4, "min_steps": 150, "batch_size": 128}))
    build_shards(params.data, params.seed, tmp_path / "shards", workers=1, progress=False)
    trainer = Pretrainer(params, PretrainPaths.under(tmp_path / "shards", tmp_path / "models", tmp_path / "reports"),
                         torch.device("cpu"), DistContext(), progress_bar=False)
    try:
        assert trainer.steps_per_epoch == 10 and trainer.config.epochs == 15
        assert trainer.schedules.lr.shape == (150,) and trainer.schedules.teacher_temp.shape == (15,)
    finally:
        trainer.split.close()

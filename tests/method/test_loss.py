"""iBOT loss: values against hand-written formulas, masking, centres, gradients.

Expected values are computed with plain Python / numpy loops written from the
paper's definition, never by calling the code under test.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.method.loss import IBOTLoss

STUDENT_TEMP = 0.1


# ---------------------------------------------------------------- references
def softmax(logits, temp):
    z = [x / temp for x in logits]
    top = max(z)
    exps = [math.exp(x - top) for x in z]
    return [e / sum(exps) for e in exps]


def log_softmax(logits, temp):
    z = [x / temp for x in logits]
    top = max(z)
    log_norm = top + math.log(sum(math.exp(x - top) for x in z))
    return [x - log_norm for x in z]


def cross_entropy(teacher_logits, center, teacher_temp, student_logits):
    """sum_k -softmax((t - c) / T_t)_k * log_softmax(s / T_s)_k"""
    t = softmax([a - c for a, c in zip(teacher_logits, center)], teacher_temp)
    s = log_softmax(student_logits, STUDENT_TEMP)
    return -sum(p * q for p, q in zip(t, s))


def reference_loss(s_cls, s_patch, t_cls, t_patch, masks, n_global, temp, center, center_patch):
    """Loop-by-loop iBOT loss on numpy arrays with the crop-major layout."""
    n_crops = s_cls.shape[0] // (t_cls.shape[0] // n_global)
    batch = t_cls.shape[0] // n_global
    cls_terms = []
    for q in range(n_global):
        for v in range(n_crops):
            if v != q:
                cls_terms.append(np.mean([
                    cross_entropy(t_cls[q * batch + b], center, temp, s_cls[v * batch + b]) for b in range(batch)
                ]))
    patch_terms = []
    for q in range(n_global):
        per_image = []
        for b in range(batch):
            row = q * batch + b
            flat = masks[row].reshape(-1)
            total = sum(
                cross_entropy(t_patch[row, p], center_patch, temp, s_patch[row, p]) for p in range(len(flat)) if flat[p]
            )
            per_image.append(total / max(1, int(flat.sum())))
        patch_terms.append(np.mean(per_image))
    return float(np.mean(cls_terms)), float(np.mean(patch_terms))


def make_loss(out_dim=3, n_global=2, n_local=1, temps=(0.04, 0.07), lambda1=1.0, lambda2=1.0, momentum=0.9):
    return IBOTLoss(out_dim, n_global, n_local, STUDENT_TEMP, list(temps), momentum, lambda1, lambda2)


def random_inputs(batch, n_global=2, n_local=3, k=5, grid=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    p = grid[0] * grid[1]
    s_cls = torch.randn((n_global + n_local) * batch, k, generator=g)
    s_patch = torch.randn(n_global * batch, p, k, generator=g)
    t_cls = torch.randn(n_global * batch, k, generator=g)
    t_patch = torch.randn(n_global * batch, p, k, generator=g)
    masks = torch.rand(n_global * batch, *grid, generator=g) < 0.5
    return s_cls, s_patch, t_cls, t_patch, masks


# ---------------------------------------------------------------------- tests
def test_hand_computed_small_case():
    """K=3, B=1, 2 globals + 1 local, P=2 (grid 1x2), non-zero centres, epoch 1."""
    s_cls = [[1.0, 0.0, -1.0], [0.5, 0.2, 0.1], [-0.3, 0.8, 0.0]]  # g0, g1, l0
    t_cls = [[0.2, 0.1, 0.0], [0.0, 0.3, -0.1]]  # g0, g1
    s_patch = [[[0.1, 0.4, -0.2], [2.0, 2.0, 2.0]], [[0.0, -0.5, 0.3], [0.6, 0.1, 0.2]]]
    t_patch = [[[0.05, 0.0, 0.1], [0.3, 0.3, 0.3]], [[-0.1, 0.2, 0.0], [0.1, 0.0, 0.02]]]
    masks = [[[True, False]], [[True, True]]]
    center, center_patch = [0.01, -0.02, 0.03], [0.0, 0.05, -0.05]
    temp = 0.07  # schedule (0.04, 0.07) at epoch 1

    ce = lambda t, c, s: cross_entropy(t, c, temp, s)  # noqa: E731
    expected_cls = (
        ce(t_cls[0], center, s_cls[1]) + ce(t_cls[0], center, s_cls[2])
        + ce(t_cls[1], center, s_cls[0]) + ce(t_cls[1], center, s_cls[2])
    ) / 4
    expected_patch = (
        ce(t_patch[0][0], center_patch, s_patch[0][0]) / 1  # global 0: token 0 only
        + (ce(t_patch[1][0], center_patch, s_patch[1][0]) + ce(t_patch[1][1], center_patch, s_patch[1][1])) / 2
    ) / 2

    loss = make_loss(lambda1=0.5, lambda2=2.0)
    loss.center.copy_(torch.tensor([center]))
    loss.center_patch.copy_(torch.tensor([[center_patch]]))
    out = loss(torch.tensor(s_cls), torch.tensor(s_patch), torch.tensor(t_cls), torch.tensor(t_patch),
               torch.tensor(masks), epoch=1)
    assert set(out) == {"cls", "patch", "total"}
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.values())
    assert out["cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(expected_patch, rel=1e-5)
    assert out["total"].item() == pytest.approx(0.5 * expected_cls + 2.0 * expected_patch, rel=1e-5)


@pytest.mark.parametrize("n_local", [0, 3])
def test_matches_loop_reference_with_a_batch(n_local):
    """B=3 checks the crop-major row layout (row c * B + b) on top of the formulas."""
    batch, k = 3, 5
    s_cls, s_patch, t_cls, t_patch, masks = random_inputs(batch, n_local=n_local, k=k)
    loss = make_loss(out_dim=k, n_local=n_local, temps=(0.04, 0.05, 0.06))
    loss.center.copy_(torch.linspace(-0.2, 0.2, k).view(1, k))
    loss.center_patch.copy_(torch.linspace(0.3, -0.1, k).view(1, 1, k))
    out = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=2)
    want_cls, want_patch = reference_loss(
        s_cls.double().numpy(), s_patch.double().numpy(), t_cls.double().numpy(), t_patch.double().numpy(),
        masks.numpy(), 2, 0.06, loss.center[0].double().tolist(), loss.center_patch[0, 0].double().tolist(),
    )
    assert out["cls"].item() == pytest.approx(want_cls, rel=1e-5)
    assert out["patch"].item() == pytest.approx(want_patch, rel=1e-5)


def test_patch_term_only_sees_masked_tokens():
    s_cls, s_patch, t_cls, t_patch, masks = random_inputs(batch=2)
    masks[:] = False
    masks[0, 0, 1] = masks[1, 1, 2] = masks[3, 0, 0] = True
    loss = make_loss(out_dim=5, n_local=3)
    base = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=0)

    changed = s_patch.clone()
    changed[~masks.flatten(1)] += torch.randn_like(changed[~masks.flatten(1)]) * 5  # unmasked tokens
    same = loss(s_cls, changed, t_cls, t_patch, masks, epoch=0)
    assert torch.equal(same["patch"], base["patch"]) and torch.equal(same["total"], base["total"])

    changed = s_patch.clone()
    changed[0, 1] += torch.tensor([3.0, -1.0, 0.0, 2.0, 0.5])  # the masked token (0, 1) of row 0
    assert not torch.isclose(loss(s_cls, changed, t_cls, t_patch, masks, epoch=0)["patch"], base["patch"])
    # the [CLS] term does not depend on patch outputs at all
    assert torch.equal(loss(s_cls, changed, t_cls, t_patch, masks, epoch=0)["cls"], base["cls"])


def test_image_without_masked_tokens_contributes_zero():
    """It still counts in the mean over images (as the official code), with value 0."""
    s_cls, s_patch, t_cls, t_patch, masks = random_inputs(batch=2, n_global=2)
    masks[0] = True   # crop 0, image 0: all masked
    masks[1] = False  # crop 0, image 1: nothing masked
    masks[2] = True   # crop 1, image 0
    masks[3] = False  # crop 1, image 1
    loss = make_loss(out_dim=5, n_local=3)
    full = loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=0)["patch"]

    t = torch.softmax(t_patch / 0.04, dim=-1)
    s = torch.log_softmax(s_patch / STUDENT_TEMP, dim=-1)
    per_token = -(t * s).sum(-1)
    expected = ((per_token[0].mean() + 0.0) / 2 + (per_token[2].mean() + 0.0) / 2) / 2
    assert full.item() == pytest.approx(expected.item(), rel=1e-6)

    masks[:] = False
    assert loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=0)["patch"].item() == 0.0


def test_teacher_temperature_follows_the_epoch():
    s_cls, s_patch, t_cls, t_patch, masks = random_inputs(batch=2, k=5)
    loss = make_loss(out_dim=5, n_local=3, temps=(0.04, 0.055, 0.07))
    values = [loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=e)["total"].item() for e in range(3)]
    assert len(set(values)) == 3
    for epoch, temp in enumerate((0.04, 0.055, 0.07)):
        want_cls, want_patch = reference_loss(
            s_cls.double().numpy(), s_patch.double().numpy(), t_cls.double().numpy(), t_patch.double().numpy(),
            masks.numpy(), 2, temp, [0.0] * 5, [0.0] * 5,
        )
        assert values[epoch] == pytest.approx(want_cls + want_patch, rel=1e-5)
    assert loss.teacher_temp(1) == 0.055
    with pytest.raises(IndexError):
        loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=3)


def test_center_update_two_steps():
    loss = make_loss(out_dim=2, momentum=0.9)
    t_cls = torch.tensor([[1.0, 2.0], [3.0, -2.0]])  # mean (2, 0)
    t_patch = torch.tensor([[[1.0, 1.0], [3.0, 1.0]], [[0.0, 4.0], [0.0, -2.0]]])  # mean (1, 1)
    loss.update_center(t_cls, t_patch)
    torch.testing.assert_close(loss.center, torch.tensor([[0.2, 0.0]]))
    torch.testing.assert_close(loss.center_patch, torch.tensor([[[0.1, 0.1]]]))
    assert loss.center.shape == (1, 2) and loss.center_patch.shape == (1, 1, 2)

    t_cls2 = torch.tensor([[4.0, 4.0], [0.0, 2.0]])  # mean (2, 3)
    t_patch2 = torch.full((2, 2, 2), -1.0)  # mean (-1, -1)
    loss.update_center(t_cls2, t_patch2)
    # 0.9 * (0.2, 0) + 0.1 * (2, 3) = (0.38, 0.3); 0.9 * (0.1, 0.1) + 0.1 * (-1, -1) = (-0.01, -0.01)
    torch.testing.assert_close(loss.center, torch.tensor([[0.38, 0.3]]))
    torch.testing.assert_close(loss.center_patch, torch.tensor([[[-0.01, -0.01]]]))
    # the centres are checkpointed with the module
    assert set(loss.state_dict()) == {"center", "center_patch"}


def test_forward_does_not_touch_the_centres():
    s_cls, s_patch, t_cls, t_patch, masks = random_inputs(batch=2)
    loss = make_loss(out_dim=5, n_local=3)
    loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=0)
    assert torch.count_nonzero(loss.center) == 0 and torch.count_nonzero(loss.center_patch) == 0


def test_gradients_reach_student_inputs_only():
    inputs = [x.requires_grad_() if x.is_floating_point() else x for x in random_inputs(batch=2)]
    s_cls, s_patch, t_cls, t_patch, masks = inputs
    loss = make_loss(out_dim=5, n_local=3)
    loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=0)["total"].backward()
    assert s_cls.grad is not None and torch.isfinite(s_cls.grad).all() and s_cls.grad.abs().sum() > 0
    assert s_patch.grad is not None and torch.isfinite(s_patch.grad).all()
    assert t_cls.grad is None and t_patch.grad is None
    # no gradient through unmasked patch tokens
    assert torch.count_nonzero(s_patch.grad[~masks.flatten(1)]) == 0
    assert loss.center.grad is None


def test_bfloat16_inputs_are_computed_in_float32():
    inputs = random_inputs(batch=2)
    low = [x.bfloat16() if x.is_floating_point() else x for x in inputs]
    loss = make_loss(out_dim=5, n_local=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(*low, epoch=0)
    ref = loss(*[x.float() if x.is_floating_point() else x for x in low], epoch=0)
    assert out["total"].dtype == torch.float32
    torch.testing.assert_close(out["total"], ref["total"], rtol=1e-6, atol=1e-6)
    loss.update_center(low[2], low[3])
    assert loss.center.dtype == torch.float32 and loss.center_patch.dtype == torch.float32


def test_shape_mismatches_are_errors():
    s_cls, s_patch, t_cls, t_patch, masks = random_inputs(batch=2, n_local=3)
    loss = make_loss(out_dim=5, n_local=2)  # one local crop fewer than given
    with pytest.raises(ValueError, match="student_cls"):
        loss(s_cls, s_patch, t_cls, t_patch, masks, epoch=0)
    loss = make_loss(out_dim=5, n_local=3)
    with pytest.raises(ValueError, match="student_masks"):
        loss(s_cls, s_patch, t_cls, t_patch, masks[:, :1], epoch=0)
    with pytest.raises(ValueError):
        make_loss(n_global=1, n_local=0)


def _distributed_worker(rank: int, world_size: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss = make_loss(out_dim=2, momentum=0.5)
        t_cls = torch.full((2, 2), float(rank))  # rank 0: zeros, rank 1: ones -> global mean 0.5
        t_patch = torch.full((2, 3, 2), 2.0 * rank)  # global mean 1.0
        loss.update_center(t_cls, t_patch)
        results[rank] = (loss.center.flatten().tolist(), loss.center_patch.flatten().tolist())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_center_is_averaged_over_ranks(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
        for rank in range(2):
            center, center_patch = results[rank]
            assert center == pytest.approx([0.25, 0.25])  # 0.5 * 0 + 0.5 * 0.5
            assert center_patch == pytest.approx([0.5, 0.5])


# ------------------------------------------------------------ Sinkhorn-Knopp and KoLeo
def test_sinkhorn_balances_prototypes_and_keeps_rows_normalised():
    from pipeline.method.loss import sinkhorn_knopp

    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.9, 0.1, 0.0, 0.0], [1.8, 0.0, 0.2, 0.0], [1.7, 0.0, 0.0, 0.3]])
    q = sinkhorn_knopp(logits, temp=0.5, iterations=50)
    assert torch.allclose(q.sum(dim=1), torch.ones(4), atol=1e-5)  # each row is a distribution
    # every prototype gets the same mass (N / K = 1 here), although all rows prefer prototype 0
    assert torch.allclose(q.sum(dim=0), torch.ones(4), atol=1e-3)
    assert torch.argmax(F.softmax(logits / 0.5, dim=-1), dim=1).tolist() == [0, 0, 0, 0]
    assert sorted(torch.argmax(q, dim=1).tolist()) == [0, 1, 2, 3]


def test_sinkhorn_hand_computed_two_by_two():
    from pipeline.method.loss import sinkhorn_knopp

    # exp(logits / 1) = [[e, 1], [1, 1]]; one column then row normalisation, by hand:
    e = math.e
    q = torch.tensor([[e, 1.0], [1.0, 1.0]]).t() / (e + 3)  # (K, N)
    q = q / q.sum(dim=1, keepdim=True) / 2
    q = q / q.sum(dim=0, keepdim=True) / 2
    expected = (q * 2).t()
    got = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), temp=1.0, iterations=1)
    assert torch.allclose(got, expected, atol=1e-6)


def test_koleo_hand_computed():
    from pipeline.method.loss import koleo_loss

    # three unit vectors at 0, 90 and 180 degrees: nearest neighbours at distance sqrt(2) for all three
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert koleo_loss(x).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    # moving two points together lowers their nearest-neighbour distance: the loss rises
    y = torch.tensor([[1.0, 0.0], [0.99, 0.141], [-1.0, 0.0]])
    assert koleo_loss(y).item() > koleo_loss(x).item()


def test_sinkhorn_centering_ignores_the_ema_centre():
    from pipeline.method.loss import IBOTLoss

    kwargs = dict(out_dim=8, num_global_crops=2, num_local_crops=0, student_temp=0.1, teacher_temps=[0.04])
    loss = IBOTLoss(**kwargs, centering="sinkhorn")
    generator = torch.Generator().manual_seed(0)
    t_cls, t_patch = torch.randn(6, 8, generator=generator), torch.randn(6, 4, 8, generator=generator)
    before = loss.teacher_targets(t_cls, t_patch, 0.04)
    loss.center.fill_(5.0)
    after = loss.teacher_targets(t_cls, t_patch, 0.04)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="centering"):
        IBOTLoss(**kwargs, centering="median")

"""data2vec objective: targets, loss, EMA teacher against hand computations; a short training run."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from d2v_train.models import Data2Vec, EMAConfig, ObjectiveConfig, ema_tau, load_config
from d2v_train.models.loss import (
    effective_rank,
    masked_std,
    regression_loss,
    std_from_stats,
    std_stats,
)
from d2v_train.models.speech import conv_output_lengths
from d2v_train.models.targets import build_targets, instance_norm, select_masked
from pipelines.masking import compute_span_masks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = load_config(CONFIGS / "speech_tiny.yaml")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hand_instance_norm(y, valid):
    """Per channel over the first ``valid`` frames; numpy float64."""
    out = np.zeros_like(y)
    seg = y[:valid]
    out[:valid] = (seg - seg.mean(0)) / np.sqrt(seg.var(0) + 1e-5)
    return out


def _hand_layer_norm(y):
    return (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5)


# -- targets ------------------------------------------------------------------------------------

def test_instance_norm_excludes_padding():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 11, 5, generator=g) * 3 + 1
    valid = [11, 7, 4]
    pad = torch.arange(11) >= torch.tensor(valid)[:, None]
    got = instance_norm(y, pad).double().numpy()
    for b, v in enumerate(valid):
        np.testing.assert_allclose(got[b], _hand_instance_norm(y[b].double().numpy(), v), atol=1e-5)
    # padded frames do not move a row's targets
    y2 = y.clone()
    y2[pad] = 100.0
    assert torch.allclose(instance_norm(y2, pad), instance_norm(y, pad))
    # without padding it is torch's instance norm over time
    assert torch.allclose(instance_norm(y, None), instance_norm(y, torch.zeros(3, 11, dtype=torch.bool)), atol=1e-5)


@pytest.mark.parametrize("layer_norm_targets,final_norm", [(False, "none"), (True, "layer"), (False, "instance")])
def test_targets_match_hand_computation(layer_norm_targets, final_norm):
    cfg = ObjectiveConfig(top_k=3, instance_norm_targets=True, layer_norm_targets=layer_norm_targets,
                          final_norm=final_norm)
    g = torch.Generator().manual_seed(1)
    layers = [torch.randn(2, 9, 6, generator=g) * (k + 1) for k in range(3)]
    valid = [9, 5]
    pad = torch.arange(9) >= torch.tensor(valid)[:, None]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, [1, 2, 8]] = True
    mask[1, [0, 4]] = True
    got = select_masked(build_targets(layers, pad, cfg), mask).double().numpy()
    want = []
    for b, v in enumerate(valid):
        acc = 0
        for y in layers:
            y = _hand_instance_norm(y[b].double().numpy(), v)
            acc = acc + (_hand_layer_norm(y) if layer_norm_targets else y)
        avg = acc / 3
        if final_norm == "layer":
            avg = _hand_layer_norm(avg)
        elif final_norm == "instance":
            avg = _hand_instance_norm(avg, v)
        want.append(avg[mask[b].numpy()])
    np.testing.assert_allclose(got, np.concatenate(want), atol=1e-5)


# -- loss and collapse statistics ---------------------------------------------------------------

def test_loss_sum_and_count_match_hand_computation():
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g) * 3
    s, n = regression_loss(p, t, ObjectiveConfig())
    assert n.item() == 7
    assert math.isclose(s.item(), ((p - t) ** 2).sum().item() / 4.0, rel_tol=1e-6)  # 1/sqrt(16)
    d = (p - t).abs()
    beta = 2.0
    hand = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta).sum().item()
    s, _ = regression_loss(p, t, ObjectiveConfig(loss="smooth_l1", loss_beta=beta, loss_scale=1.0))
    assert math.isclose(s.item(), hand, rel_tol=1e-6)
    # a rank with nothing masked contributes 0 / 0, not NaN
    s, n = regression_loss(p[:0], t[:0], ObjectiveConfig())
    assert s.item() == 0 and n.item() == 0


def test_std_statistics_are_all_reducible():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(50, 8, generator=g) * torch.arange(1, 9)
    hand = torch.sqrt(y.double().var(0) + 1e-6).mean()
    assert math.isclose(masked_std(y).item(), hand.item(), rel_tol=1e-6)
    # two "ranks" summed = the whole
    merged = std_stats(y[:13]) + std_stats(y[13:])
    assert math.isclose(std_from_stats(merged).item(), hand.item(), rel_tol=1e-6)


def test_effective_rank_sees_channels_collapsing_onto_one_direction():
    g = torch.Generator().manual_seed(4)
    spread = torch.randn(4000, 8, generator=g)
    assert 7.8 < effective_rank(spread).item() <= 8.0
    basis = torch.linalg.qr(torch.randn(8, 4, generator=g)).Q.T  # 4 orthonormal directions of 8
    assert 3.8 < effective_rank(spread[:, :4] @ basis).item() <= 4.0
    # every channel a scaled copy of one signal: unit std per channel (as after instance norm),
    # so the std statistic sees nothing wrong; the effective rank does
    copies = torch.randn(4000, 1, generator=g) * torch.linspace(1, 2, 8) + 1e-3 * torch.randn(4000, 8, generator=g)
    copies = (copies - copies.mean(0)) / copies.std(0)
    assert masked_std(copies).item() > 0.99 and effective_rank(copies).item() < 1.01
    # subsampled rows (every k-th) for long inputs, and undefined below two rows
    assert abs(effective_rank(spread, max_rows=1000).item() - effective_rank(spread[::4]).item()) < 1e-4
    assert math.isnan(effective_rank(spread[:1]).item())
    assert math.isnan(effective_rank(torch.cat([spread, torch.full((1, 8), float("inf"))])).item())
    assert math.isclose(effective_rank(spread * 1e30).item(), effective_rank(spread).item(), rel_tol=1e-4)


# -- EMA ----------------------------------------------------------------------------------------

def test_ema_tau_schedule():
    cfg = EMAConfig(tau0=0.999, tau_e=0.9999, tau_n=30_000)
    assert ema_tau(0, cfg) == 0.999
    assert math.isclose(ema_tau(15_000, cfg), 0.99945, rel_tol=0, abs_tol=1e-12)
    assert ema_tau(30_000, cfg) == 0.9999
    assert ema_tau(400_000, cfg) == 0.9999
    assert ema_tau(5, EMAConfig(tau0=0.9998, tau_e=0.9998, tau_n=0)) == 0.9998


def test_ema_update_averages_copies_and_skips():
    torch.manual_seed(0)
    model = Data2Vec(TINY)
    teacher = model.make_teacher()
    names = dict(teacher.module.named_parameters())
    # the CNN, projection and mask embedding are the student's own: not in the teacher
    assert not any(n.startswith(("frontend.feature_extractor", "frontend.feature_projection")) for n in names)
    assert "frontend.mask_emb" not in names
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in names.values())
    before = {n: p.clone() for n, p in names.items()}
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    student = dict(model.student.named_parameters())
    teacher.update(model.student, 0.9)
    for n, p in teacher.module.named_parameters():
        if n.startswith("frontend.pos_conv."):
            assert torch.equal(p, student[n]), n  # copied, not averaged
        else:
            assert torch.allclose(p, 0.9 * before[n] + 0.1 * student[n], atol=1e-6), n
    # eval whatever the trainer does; a bf16 student still updates fp32 masters
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    model.to(torch.bfloat16)
    teacher.update(model.student, 0.5)
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


# -- the objective ------------------------------------------------------------------------------

def _batch(B=3, L=8000, seed=0, pad_last=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((B, L)).astype(np.float32))
    pad = torch.zeros(B, L, dtype=torch.bool)
    if pad_last:
        pad[-1, L - pad_last:] = True
        x[pad] = 0
    T = int(conv_output_lengths(L, TINY.frontend.conv_layers))
    mask = torch.from_numpy(compute_span_masks(np.full(B, T), 0.65, 5, rng))
    return {"source": x, "padding_mask": pad, "mask": mask}


def test_objective_matches_hand_computation():
    torch.manual_seed(0)
    model = Data2Vec(TINY).eval()
    teacher = model.make_teacher()
    with torch.no_grad():  # a teacher that differs from the student
        for p in teacher.parameters():
            p.mul_(1.1)
    batch = _batch(pad_last=2000)
    batch["mask"][-1, -3:] = True  # masked but padded: must not be regressed
    out = model(batch, teacher)

    obj = TINY.objective
    x, pad = model.student.embed(batch)
    mask = batch["mask"] & ~pad
    assert pad[-1].any() and (batch["mask"] & pad).any()  # padded frames were masked in the input
    layers = teacher(x, pad, return_from=TINY.encoder.layers - obj.top_k, target=obj.target).layers
    assert len(layers) == obj.top_k
    y = np.concatenate([
        (sum(_hand_instance_norm(l[b].double().numpy(), int((~pad[b]).sum())) for l in layers) / len(layers))
        [mask[b].numpy()] for b in range(3)])
    pred = model.head(model.student(x, pad, mask).x_BTD[mask]).double().detach().numpy()
    hand = ((pred - y) ** 2).sum() / math.sqrt(TINY.encoder.dim)
    assert out.count.item() == mask.sum().item()
    assert math.isclose(out.loss_sum.item(), hand, rel_tol=1e-4)
    assert math.isclose(out.target_std.item(), masked_std(torch.from_numpy(y)).item(), rel_tol=1e-4)
    assert math.isclose(out.target_rank.item(), effective_rank(torch.from_numpy(y)).item(), rel_tol=1e-3)

    out.loss_sum.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert model.student.frontend.feature_extractor.conv_layers[0].conv.weight.grad is not None
    assert model.student.frontend.mask_emb.grad is not None

    with pytest.raises(ValueError, match="mask"):
        model({**batch, "mask": batch["mask"][:, :-1]}, teacher)


def test_tiny_model_learns_without_collapse():
    """A few hundred steps on generated voiced signals with span masks: the loss falls, targets
    keep their variance (the reference aborts below 0.1)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = load_config(CONFIGS / "speech_tiny.yaml", {"ema": {"tau0": 0.99, "tau_e": 0.999, "tau_n": 100}})
    model = Data2Vec(cfg)
    teacher = model.make_teacher()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    B, L = 4, 8000
    T = int(conv_output_lengths(L, cfg.frontend.conv_layers))
    t = np.arange(L) / 16000
    losses, target_std = [], []
    for step in range(200):
        f0 = rng.uniform(90, 300, (B, 1)) * (1 + 0.2 * np.sin(2 * np.pi * rng.uniform(0.5, 3, (B, 1)) * t))
        phase = 2 * np.pi * np.cumsum(f0, axis=1) / 16000
        env = 1.2 + np.sin(2 * np.pi * rng.uniform(1, 4, (B, 1)) * t)
        x = env * sum(np.sin(k * phase) / k for k in range(1, 6)) + 0.1 * rng.standard_normal((B, L))
        x = (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)
        batch = {"source": torch.from_numpy(x.astype(np.float32)),
                 "padding_mask": torch.zeros(B, L, dtype=torch.bool),
                 "mask": torch.from_numpy(compute_span_masks(np.full(B, T), 0.65, 10, rng))}
        out = model(batch, teacher)
        loss = out.loss_sum / out.count
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.update(model.student, ema_tau(step, cfg.ema))
        losses.append(loss.item())
        target_std.append(out.target_std.item())
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    assert min(target_std[-50:]) > 0.1

"""Learning-rate schedules: pure functions of the step, checked against hand values."""
from __future__ import annotations

import math

import pytest

from d2v_train.config import OptimConfig
from d2v_train.schedules import lr_scale


def _curve(max_steps: int, **options) -> list[float]:
    cfg = OptimConfig(**options)
    return [lr_scale(step, max_steps, cfg) for step in range(max_steps + 1)]


def test_tri_stage_warms_up_linearly_holds_then_decays_exponentially_to_the_final_scale():
    curve = _curve(100, schedule="tri_stage", warmup=0.1, hold=0.4, final_lr_scale=0.05)
    assert curve[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert curve[10:50] == [1.0] * 40
    decay = curve[50:]
    ratios = [b / a for a, b in zip(decay, decay[1:])]
    assert ratios == pytest.approx([0.05 ** (1 / 50)] * 50)  # geometric: exp(log(final) * progress)
    assert curve[100] == pytest.approx(0.05)
    assert lr_scale(1000, 100, OptimConfig(schedule="tri_stage", warmup=0.1, hold=0.4)) == pytest.approx(0.05)


def test_cosine_goes_from_one_to_the_final_scale_after_warm_up():
    curve = _curve(110, schedule="cosine", warmup=10 / 110, final_lr_scale=0.1)
    assert curve[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert curve[10] == pytest.approx(1.0)
    assert curve[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert curve[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(curve[10:], curve[11:]))


def test_constant_and_no_warm_up():
    assert _curve(20, schedule="constant", warmup=0.0) == [1.0] * 21
    assert _curve(20, schedule="constant", warmup=0.2)[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])
    assert _curve(10, schedule="tri_stage", warmup=0.0, hold=0.5)[0] == 1.0


@pytest.mark.parametrize("schedule", ["tri_stage", "cosine", "constant"])
def test_short_runs_stay_finite_and_within_bounds(schedule):
    for max_steps in (1, 2, 3):
        curve = _curve(max_steps, schedule=schedule, warmup=0.5, hold=0.9, final_lr_scale=0.0)
        assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in curve)

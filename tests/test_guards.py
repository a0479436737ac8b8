"""The collapse guard as a pure rule: armed only after collapse_after, std floors first, then the
targets' effective rank when a floor for it is set."""
from __future__ import annotations

from d2v_train.config import GuardConfig
from d2v_train.guards import collapse


def test_the_guard_waits_for_collapse_after_then_names_what_fell_below_its_floor():
    guard = GuardConfig(collapse_after=10, min_target_std=0.1, min_pred_std=0.01)
    assert collapse(10, 0.0, 0.0, 1.0, guard, 64) is None  # not armed yet
    assert collapse(11, 0.5, 0.5, 1.0, guard, 64) is None  # healthy; no rank floor set
    why = collapse(11, 0.05, 0.5, 30.0, guard, 64)
    assert why == ("representation collapse at step 11: target std 0.0500 (min 0.1), prediction std 0.5000 "
                   "(min 0.01)")
    assert "prediction std 0.0050" in collapse(11, 0.5, 0.005, 30.0, guard, 64)


def test_the_rank_floor_applies_only_when_set_and_nan_never_trips_it():
    guard = GuardConfig(collapse_after=0, min_target_rank=4.0)
    assert collapse(1, 1.0, 1.0, 4.0, guard, 64) is None
    assert collapse(1, 1.0, 1.0, float("nan"), guard, 64) is None  # no rank measured this step
    assert collapse(1, 1.0, 1.0, 2.5, guard, 64) == (
        "representation collapse at step 1: the targets' effective rank is 2.50 (min 4.0): they vary along "
        "that many of their 64 directions")

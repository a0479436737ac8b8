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


def test_the_step_guard_stops_or_skips_a_nonfinite_step_and_names_the_last_good_checkpoint():
    import pytest

    from d2v_train.guards import StepGuard, TrainingStopped

    asked = []

    def last_good():
        asked.append(1)
        return "run/checkpoints/step-00000004"

    stop = StepGuard(GuardConfig(nonfinite="stop"), 64, last_good)
    assert stop.skips(5, 1.0, 2.0, masked=10) is False and not asked  # a good step asks for nothing
    assert stop.skips(5, 1.0, 2.0, masked=0) is True  # every batch of the step lost to bad shards
    with pytest.raises(TrainingStopped, match=r"non-finite loss \(nan\) .* at step 5; the last good checkpoint "
                                              r"is run/checkpoints/step-00000004"):
        stop.skips(5, float("nan"), 2.0, masked=10)
    skip = StepGuard(GuardConfig(nonfinite="skip"), 64, lambda: None)
    assert skip.skips(5, 1.0, float("inf"), masked=10) is True
    # a cap on skips in a row: a good step resets the count, one past the cap stops the run
    capped = StepGuard(GuardConfig(nonfinite="skip", max_skipped_steps=3), 64, last_good)
    assert [capped.skips(s, float("nan"), 1.0, masked=10) for s in (1, 2, 3)] == [True] * 3
    assert capped.skips(4, 1.0, 1.0, masked=10) is False
    assert [capped.skips(s, 1.0, 1.0, masked=0) for s in (5, 6, 7)] == [True] * 3
    with pytest.raises(TrainingStopped, match=r"4 steps in a row skipped up to step 8 \(no masked position.*more than "
                                              r"guard.max_skipped_steps=3; the last good checkpoint is run/checkpoints"):
        capped.skips(8, 1.0, 1.0, masked=0)
    uncapped = StepGuard(GuardConfig(nonfinite="skip", max_skipped_steps=None), 64, lambda: None)
    assert all(uncapped.skips(s, float("nan"), 1.0, masked=1) for s in range(1000))
    collapsing = StepGuard(GuardConfig(collapse_after=0), 64, lambda: None)
    collapsing.check_collapse(1, 1.0, 1.0, 30.0)
    with pytest.raises(TrainingStopped, match="representation collapse at step 1.*the last good checkpoint is none"):
        collapsing.check_collapse(1, 0.0, 1.0, 30.0)

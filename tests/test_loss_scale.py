"""fp16's dynamic loss scale and the step-time line: the rules, without a model."""
import pytest
import torch

from d2v_train.config import LossScaleConfig
from d2v_train.guards import TrainingStopped
from d2v_train.loss_scale import LossScaler
from d2v_train.metrics import progress_line
from d2v_train.steptime import StepClock


def test_overflows_halve_the_scale_clean_windows_double_it_and_the_state_round_trips():
    scaler = LossScaler(LossScaleConfig(init=64, window=3, min=1))
    for overflow in (True, True, False, False, False, False):
        scaler.update(overflow, step=1)
    assert (scaler.scale, scaler.overflows, scaler.clean_in_a_row) == (32.0, 2, 4)  # 64 / 4 * 2
    again = LossScaler(LossScaleConfig(init=64, window=3, min=1))
    again.load(scaler.state())
    assert (again.scale, again.overflows, again.clean_in_a_row) == (32.0, 2, 4)
    again.update(False, step=7)
    again.update(False, step=8)  # the window counts on from the saved state: 6 clean in a row
    assert again.scale == 64.0


def test_a_scale_below_the_minimum_stops_the_run_with_what_to_do():
    scaler = LossScaler(LossScaleConfig(init=2, min=1))
    scaler.update(True, step=3)
    with pytest.raises(TrainingStopped, match=r"below train.loss_scale.min=1.0 at step 4 .*train.dtype=bf16"):
        scaler.update(True, step=4)


def test_the_clock_splits_a_step_into_its_phases():
    clock = StepClock(torch.device("cpu"))
    for phase in ("data", "forward_backward", "optimizer"):
        clock.lap(phase)
    record = clock.record()
    assert set(record) == {"time/data", "time/forward_backward", "time/optimizer", "time/checkpoint",
                           "time/logging", "time/step", "time/other"}
    assert record["time/step"] >= sum(v for k, v in record.items() if k not in ("time/step", "time/other"))
    assert clock.record()["time/forward_backward"] == 0.0  # a new window


def test_the_progress_line_shows_the_breakdown_mfu_and_the_scale():
    record = {"step": 5, "loss": 1.0, "lr": 1e-4, "tau": 0.999, "target_std": 1.0, "pred_std": 0.5,
              "samples_per_s": 10.0, "time/step": 0.5, "time/data": 0.05, "time/forward_backward": 0.4,
              "time/optimizer": 0.05, "mfu": 0.412, "loss_scale": 256.0, "overflows": 3}
    line = progress_line(record)
    assert "step 0.50s: data 10% fwd/bwd 80% opt 10% ckpt 0% log 0% other 0%" in line
    assert "mfu 41.2%" in line and "loss scale 256 (3 overflows)" in line
    without_peak = {k: v for k, v in record.items() if k != "mfu"} | {"flops_per_s": 2e9}
    assert "2.00 GFLOP/s" in progress_line(without_peak)

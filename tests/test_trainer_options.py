"""The trainer's opt-in options: activation checkpointing, per-block compile, async checkpoints.

Trainers run inside the test process as a group of one (FSDP2 over a single gloo rank): no
start-up cost. Dropout is off, so a recompute or a compiled graph draws nothing different.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_trainer import CONFIG, checkpoint_state, dataset, metrics, torchrun, train  # noqa: F401  (fixture)

COMMON = ["data.max_tokens=64000", "data.workers=1", "data.shuffle_block=4", "train.max_steps=20",
          "model.encoder.dropout=0", "model.encoder.attention_dropout=0", "optim.warmup=0.25", "optim.hold=0.5",
          "model.ema.tau0=0.99", "model.ema.tau_n=8", "optim.clip_norm=5"]


@pytest.fixture
def group(monkeypatch):
    """A one-process group for in-process trainers, torn down afterwards."""
    from d2v_train.distributed import close_world

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # no RANK: init_world makes its group of one; what it sets in the environment is undone afterwards
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "GLOO_SOCKET_IFNAME"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    yield
    close_world()
    torch.use_deterministic_algorithms(False)


def _trainer(data: Path, run_dir: Path, *overrides: str):
    from d2v_train.config import load_train_config
    from d2v_train.trainer import Trainer

    return Trainer(load_train_config(CONFIG, [*COMMON, f"data.url={data}", f"run_dir={run_dir}", *overrides]))


def _losses(trainer, steps: int) -> list[float]:
    try:
        return [trainer._train_step().record["loss"] for _ in range(steps)]
    finally:
        trainer._close_epoch()
        trainer.loader.close()
        trainer.metrics.close()


def test_activation_checkpointing_recomputes_and_trains_alike(dataset, group, tmp_path):  # noqa: F811
    steps, runs = 3, {}
    for ac in (False, True):
        trainer = _trainer(dataset, tmp_path / str(ac), f"train.activation_checkpointing={ac}",
                           "train.grad_accum=2")
        calls = []
        for block in trainer.model.student.transformer.blocks:
            block.attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        runs[ac] = _losses(trainer, steps), len(calls)
    (eager, eager_calls), (ac, ac_calls) = runs[False], runs[True]
    # 2 blocks x 2 micro-batches x steps forwards; checkpointing runs each again in backward
    assert eager_calls == 2 * 2 * steps and ac_calls == 2 * eager_calls
    assert ac == pytest.approx(eager, rel=1e-6) and eager[-1] != eager[0]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(dataset, group, tmp_path):  # noqa: F811
    """Two steps (compiling the student's and the teacher's blocks is the cost: ~20-40 s on 2 cores).
    Inductor fuses and reorders fp32 arithmetic (~1e-7 relative per op), so losses agree closely
    but not bitwise (measured 2e-7 relative); 1e-5 is far below what a wrong graph gives (step 2's
    loss moves by 2e-2 relative)."""
    eager = _losses(_trainer(dataset, tmp_path / "eager"), 2)
    compiled = _trainer(dataset, tmp_path / "compiled", "train.compile=true", "train.activation_checkpointing=true")
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in compiled.model.student.transformer.blocks)
    assert _losses(compiled, 2) == pytest.approx(eager, rel=1e-5)
    assert abs(eager[1] - eager[0]) > 1e-3  # the comparison says something


def _train(data: Path, run_dir: Path, *overrides: str) -> None:
    trainer = _trainer(data, run_dir, "train.deterministic=true", "checkpoint.every_steps=2", "checkpoint.keep=10",
                       *overrides)
    trainer.resume()
    assert trainer.train() == 0


def test_async_checkpoints_equal_sync_ones_and_resume(dataset, group, tmp_path, monkeypatch):  # noqa: F811
    from d2v_train import checkpoint

    _train(dataset, tmp_path / "sync", "train.max_steps=6")
    # async: stop at 4, then resume from that (async) checkpoint to 6
    waits = []
    monkeypatch.setattr(checkpoint.PendingSave, "wait",
                        lambda self, _wait=checkpoint.PendingSave.wait: waits.append(self.folder) or _wait(self))
    _train(dataset, tmp_path / "async", "train.max_steps=4", "checkpoint.async_save=true")
    assert [Path(f).name for f in waits] == ["step-00000002", "step-00000004"]  # before the next save, at exit
    _train(dataset, tmp_path / "async", "train.max_steps=6", "checkpoint.async_save=true")

    assert [r["loss"] for r in metrics(tmp_path / "async")] == [r["loss"] for r in metrics(tmp_path / "sync")]
    for step in (2, 4, 6):
        name = f"step-{step:08d}"
        _assert_same_checkpoint(tmp_path / "async" / "checkpoints" / name, tmp_path / "sync" / "checkpoints" / name,
                                tmp_path)
        assert (tmp_path / "async" / "checkpoints" / name / checkpoint.CONFIG_FILE).exists()


def _assert_same_checkpoint(a_folder: Path, s_folder: Path, tmp: Path) -> None:
    a, s = checkpoint_state(a_folder, tmp / "a.pt"), checkpoint_state(s_folder, tmp / "s.pt")
    flat_a, flat_s = _flatten(a), _flatten(s)
    assert sorted(flat_a) == sorted(flat_s)
    for key, value in flat_s.items():
        assert torch.equal(flat_a[key], value) if torch.is_tensor(value) else flat_a[key] == value, key


@torchrun
def test_async_checkpoints_at_two_ranks_equal_sync_ones(dataset, tmp_path):  # noqa: F811
    """Each rank's shards are written by a background thread whose collectives use a gloo group of
    their own, while the training thread's FSDP collectives go on."""
    for mode in ("sync", "async"):
        train(tmp_path / mode, str(dataset), "train.max_steps=6", f"checkpoint.async_save={mode == 'async'}")
    timed = ("_per_s", "memory_mb", "elapsed_s")  # timings and memory differ; everything computed may not
    assert metrics(tmp_path / "async") == [{**r, **{k: a[k] for k in a if k.endswith(timed) or k.startswith("time/")}}
                                           for r, a in zip(metrics(tmp_path / "sync"), metrics(tmp_path / "async"))]
    for step in (2, 4, 6):
        name = f"checkpoints/step-{step:08d}"
        _assert_same_checkpoint(tmp_path / "async" / name, tmp_path / "sync" / name, tmp_path)


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix: tree}

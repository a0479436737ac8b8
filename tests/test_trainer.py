"""The FSDP2 trainer end to end under torchrun (CPU, gloo, the tiny speech model).

One uninterrupted 2-rank run of STEPS steps is the yardstick: a 1-rank run with grad_accum 2
(the same global batches), a plain single-process reference without FSDP, killed, terminated and
elastically resumed runs, and a run with shards and checkpoints on S3 must all reproduce it.
Dropout is off so that 1 and 2 ranks draw alike; deterministic mode makes restarts bit-identical.
The dataset plans 11 global batches per epoch: 2 ranks drop the odd one (the loader's tail) and
1 rank with grad_accum 2 leaves it out too (a step never straddles epochs), 5 steps per epoch.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from d2v_train.data.loader import StreamingLoader
from d2v_train.data.plan import BatchPolicy
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.faultproxy import FaultProxy, Hold
from tests.helpers import REPO, kill_when_held

SPLIT = "train-clean-100"
CONFIG = str(REPO / "configs" / "train_speech_tiny.yaml")
STEPS = 20
COMMON = [
    f"train.max_steps={STEPS}", "train.deterministic=true", "train.log_keys=true",
    "data.max_tokens=64000", "data.workers=1", "data.shuffle_block=4",
    "model.encoder.dropout=0", "model.encoder.attention_dropout=0",
    "optim.warmup=0.25", "optim.hold=0.5",  # warm-up, hold and decay all inside the 20 steps
    "model.ema.tau0=0.99", "model.ema.tau_n=8",  # a fast teacher: a stale one shows
    "optim.clip_norm=5",  # clips most steps (gradient norms start near 12)
    "checkpoint.every_steps=2", "checkpoint.keep=10",
]
POLICY = BatchPolicy(max_tokens=64000, min_sample_size=16000, max_sample_size=48000, shuffle_block=4)
BATCHES_PER_EPOCH, STEPS_PER_EPOCH = 11, 5
# what the runs compute (timings and memory left out)
COMPUTED = ("loss", "grad_norm", "lr", "tau", "target_std", "pred_std", "target_rank", "masked", "skipped", "epoch")


def torchrun(test):
    """Starts training processes (torchrun with 2 ranks, or one process): seconds each."""
    return pytest.mark.torchrun(pytest.mark.slow(test))


# -- running the trainer ----------------------------------------------------------------------
def _command(ranks: int, overrides: list[str], entry: list[str] | None = None) -> list[str]:
    entry = entry or ["d2v_train/main.py", "--config", CONFIG]
    if ranks == 1:  # no torchrun: the trainer makes a group of one
        return [sys.executable, *entry, *overrides]
    return [sys.executable, "-m", "d2v_train.launch", "--standalone", f"--nproc_per_node={ranks}",
            *entry, *overrides]


def _env(extra: dict | None = None) -> dict:
    # one intra-op thread per process, as torchrun sets it (two cores, loader threads besides)
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def train(run_dir: Path, data: str, *overrides: str, ranks: int = 2, env: dict | None = None,
          entry: list[str] | None = None, expect: int = 0) -> subprocess.CompletedProcess:
    args = [*COMMON, f"data.url={data}", f"run_dir={run_dir}", *overrides]
    result = subprocess.run(_command(ranks, args, entry), cwd=REPO, env=_env(env), capture_output=True,
                            text=True, timeout=300)
    if result.returncode != expect:
        raise AssertionError(f"exit {result.returncode}, expected {expect}\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_until(run_dir: Path, data: str, step: int, sig: int, *overrides: str, ranks: int = 2,
                env: dict | None = None, listening: set | None = None) -> tuple[int, str]:
    """Start a run; once its metrics reach `step`, send `sig` to its process group (torchrun, or
    the single process). No process of the run may outlive it: torchrun's workers have sessions of
    their own, so a SIGKILL of torchrun's group reaches them only through the trainer's death signal.
    `listening` receives the addresses the run's processes listen on at that moment."""
    import psutil  # a dependency of dask.distributed

    args = [*COMMON, f"data.url={data}", f"run_dir={run_dir}", *overrides]
    launched = time.time_ns()
    proc = subprocess.Popen(_command(ranks, args), cwd=REPO, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    children = []
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if max(_steps_logged(run_dir, since=launched), default=0) >= step:
                children = psutil.Process(proc.pid).children(recursive=True)
                if listening is not None:
                    for process in (psutil.Process(proc.pid), *children):
                        listening |= {c.laddr for c in process.net_connections(kind="inet")
                                      if c.status == psutil.CONN_LISTEN}
                os.killpg(proc.pid, sig)
                break
            time.sleep(0.02)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _, alive = psutil.wait_procs(children, timeout=3)  # a death signal acts at once
    for orphan in alive:
        orphan.kill()
    assert not alive, f"{len(alive)} worker(s) outlived the run"
    return proc.returncode, out


def _steps_logged(run_dir: Path, since: int = 0) -> list[int]:
    """Steps in the metrics; none if the file was last written before `since` (ns): a restarted
    run first truncates what its predecessor logged after the checkpoint."""
    path = run_dir / "metrics.jsonl"
    if not path.exists() or path.stat().st_mtime_ns < since:
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except json.JSONDecodeError:
            pass  # being written
    return steps


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def keys_by_epoch(run_dir: Path) -> dict[int, Counter]:
    """Every rank's logged keys, counted per epoch."""
    seen: dict[int, Counter] = {}
    for path in run_dir.glob("keys-rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            seen.setdefault(record["epoch"], Counter()).update(record["keys"])
    return seen


def checkpoint_state(folder: Path | str, out: Path) -> dict:
    """A DCP checkpoint read back whole, offline (no process group, no sharding)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(out))
    return torch.load(out, weights_only=False)


def assert_same_metrics(run: list[dict], reference: list[dict], *, rel: float = 0.0, steps=None) -> None:
    by_step = {r["step"]: r for r in reference}
    steps = steps or sorted(by_step)
    got = {r["step"]: r for r in run}
    assert [r["step"] for r in run] == sorted(by_step), "steps logged, each once"
    for step in steps:
        for name in COMPUTED:
            a, b = got[step][name], by_step[step][name]
            if rel and isinstance(b, float):
                assert a == pytest.approx(b, rel=rel, abs=1e-12), f"step {step} {name}"
            else:
                assert a == b, f"step {step} {name}: {a} != {b}"


def assert_equal_trees(a, b, where: str = "") -> None:
    if isinstance(b, dict):
        assert sorted(a) == sorted(b), where
        for key in b:
            assert_equal_trees(a[key], b[key], f"{where}.{key}")
    elif isinstance(b, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_trees(x, y, f"{where}[{i}]")
    elif torch.is_tensor(b):
        assert torch.is_tensor(a) and a.dtype == b.dtype and torch.equal(a, b), where
    else:
        assert a == b, where


# -- shared runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speech")
    spec = synthetic.make_librispeech(str(root / "corpus"), {SPLIT: 22}, seed=8, seconds=(1.0, 2.0))
    build_dataset(LibriSpeechSource(Location(spec.source), (SPLIT,)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("5"), 3, 0), workers=0, echo=lambda *_: None)
    return root / "data"


@pytest.fixture(scope="module")
def planned(dataset) -> dict[int, list[list[str]]]:
    """epoch -> the keys of each planned global batch."""
    loader = StreamingLoader(str(dataset), SPLIT, POLICY, seed=0, workers=1)
    keys = loader.index.columns["key"]
    plans = {epoch: [[keys[i] for i in batch.samples] for batch in loader.plan(epoch)] for epoch in range(4)}
    loader.close()
    assert all(len(plan) == BATCHES_PER_EPOCH for plan in plans.values())
    return plans


@pytest.fixture(scope="module")
def two_ranks(dataset, tmp_path_factory) -> Path:
    """The yardstick: 2 ranks, grad_accum 1, uninterrupted."""
    run_dir = tmp_path_factory.mktemp("two_ranks")
    train(run_dir, str(dataset))
    return run_dir


@pytest.fixture(scope="module")
def one_rank(dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_rank")
    train(run_dir, str(dataset), "train.grad_accum=2", ranks=1)
    return run_dir


def assert_each_sample_once(run_dir: Path, planned: dict, steps: int = STEPS) -> None:
    """Epoch by epoch, the logged keys are the planned batches that the steps consume, each once."""
    seen = keys_by_epoch(run_dir)
    expected = {}
    for step in range(steps):
        epoch, k = divmod(step, STEPS_PER_EPOCH)
        for batch in planned[epoch][2 * k: 2 * k + 2]:
            expected.setdefault(epoch, Counter()).update(batch)
    assert seen == expected
    assert all(count == 1 for counter in seen.values() for count in counter.values())


# -- 1. ranks -----------------------------------------------------------------------------------
@torchrun
def test_one_and_two_ranks_with_the_same_global_batch_train_alike(two_ranks, one_rank, planned):
    reference = metrics(two_ranks)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert [r["epoch"] for r in reference] == [s // STEPS_PER_EPOCH for s in range(STEPS)]
    assert_same_metrics(metrics(one_rank), reference, rel=1e-5)
    assert reference[-1]["loss"] < reference[0]["loss"]
    lrs = [r["lr"] for r in reference]
    assert lrs[0] < lrs[4] == lrs[14] > lrs[-1]  # tri-stage: warm-up, hold, decay
    assert_each_sample_once(two_ranks, planned)
    assert_each_sample_once(one_rank, planned)
    assert (two_ranks / "encoder.safetensors").exists() and (two_ranks / "training.png").exists()


# -- 5. the EMA teacher against a plain single process ------------------------------------------
def _reference_training(dataset: Path, steps: int):
    """The same training without FSDP or a process group: Data2Vec, EMATeacher and AdamW by hand."""
    from d2v_train.config import load_train_config
    from d2v_train.models.data2vec import Data2Vec
    from d2v_train.models.ema import ema_tau
    from d2v_train.schedules import lr_scale
    from d2v_train.trainer import param_groups

    cfg = load_train_config(CONFIG, [*COMMON, f"data.url={dataset}"])
    torch.manual_seed(cfg.train.seed)
    model = Data2Vec(cfg.model)
    teacher = model.make_teacher()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=cfg.optim.betas, eps=cfg.optim.eps)
    loader = StreamingLoader(str(dataset), SPLIT, POLICY, seed=cfg.train.seed, workers=1)
    pairs = []
    while len(pairs) < steps:
        epoch = list(loader)
        pairs += [epoch[i:i + 2] for i in range(0, len(epoch) - 1, 2)]
    loader.close()
    losses = []
    for step in range(steps):
        model.train()
        loss_sum = count = 0.0
        for batch in pairs[step]:
            out = model(batch, teacher)
            out.loss_sum.backward()
            loss_sum, count = loss_sum + out.loss_sum.item(), count + out.count.item()
        for param in model.parameters():
            if param.grad is not None:
                param.grad.div_(count)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
        for group in optimizer.param_groups:
            group["lr"] = cfg.optim.lr * lr_scale(step, cfg.train.max_steps, cfg.optim)
        optimizer.step()
        optimizer.zero_grad()
        teacher.update(model.student, ema_tau(step, cfg.model.ema))
        losses.append(loss_sum / count)
    return model, teacher, losses


@torchrun
def test_teacher_equals_a_single_process_ema_reference(dataset, two_ranks, one_rank, tmp_path):
    """Also catches a teacher root left unsharded after its no_grad forward (notes/training.md):
    the EMA then never reaches the weights that the teacher's forward uses. At 1 rank that is
    silent (losses off by ~1e-2 within 10 steps); at 2 ranks the EMA meets unsharded shapes."""
    steps = 10
    model, teacher, losses = _reference_training(dataset, steps)
    for run_dir in (two_ranks, one_rank):
        assert [r["loss"] for r in metrics(run_dir)[:steps]] == pytest.approx(losses, rel=1e-6)
        saved = checkpoint_state(run_dir / "checkpoints" / f"step-{steps:08d}", tmp_path / "state.pt")
        for name, value in teacher.state_dict().items():
            assert torch.allclose(saved["teacher"][name], value, rtol=0, atol=1e-6), name
        for name, value in model.state_dict().items():
            assert torch.allclose(saved["model"][name], value, rtol=0, atol=1e-6), name
    _, initial, _ = _reference_training(dataset, 0)
    moved = max((teacher.state_dict()[n] - v).abs().max().item() for n, v in initial.state_dict().items())
    assert moved > 1e-3  # the teacher did move: the comparison says something


# -- 2. kill, terminate, restart ------------------------------------------------------------------
@torchrun
def test_killed_and_terminated_runs_resume_bit_identically(dataset, two_ranks, planned, tmp_path):
    """Also a security check: the launcher's rendezvous stores and both ranks' gloo sockets listen on
    127.0.0.1 only (torchrun's own stores would listen on every interface)."""
    run_dir = tmp_path / "run"
    listening: set = set()
    code, out = train_until(run_dir, str(dataset), 5, signal.SIGKILL, "checkpoint.keep=2", listening=listening)
    assert code == -signal.SIGKILL and max(_steps_logged(run_dir)) < STEPS, out[-3000:]
    assert len(listening) >= 3, listening  # the launcher's store(s) and a gloo socket per rank
    assert {address.ip for address in listening} == {"127.0.0.1"}, listening

    code, out = train_until(run_dir, str(dataset), 13, signal.SIGTERM, "checkpoint.keep=2")
    # pre-empted, not failed: the launcher exits 143 like the trainer's ranks (torchrun alone: 1)
    assert "resumed from" in out and code == 143, out[-3000:]
    saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved")]
    assert saved, out[-3000:]
    stopped_at = int(saved[0].rsplit("at step ", 1)[1].split(";")[0])
    assert 13 <= stopped_at < STEPS and max(_steps_logged(run_dir)) == stopped_at
    assert (run_dir / "checkpoints" / f"step-{stopped_at:08d}" / ".metadata").exists()

    result = train(run_dir, str(dataset), "checkpoint.keep=2")
    assert f"step-{stopped_at:08d} at step {stopped_at} " in result.stdout
    assert_same_metrics(metrics(run_dir), metrics(two_ranks))  # bit-identical
    assert_each_sample_once(run_dir, planned)
    for rank in (0, 1):
        name = f"keys-rank{rank}.jsonl"
        assert (run_dir / name).read_text() == (two_ranks / name).read_text()
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == [f"step-{STEPS - 2:08d}", f"step-{STEPS:08d}"]  # keep=2, no half-written leftovers


# -- 3. elastic: 2 ranks -> 1 rank ---------------------------------------------------------------------
def _resume_dump_and_train(out: str, argv: list[str]) -> int:
    """`python -m tests.test_trainer OUT --config FILE key=value...`: resume as main.py does, save
    the loaded state in full (rank 0), then train on."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    from d2v_train.config import load_train_config
    from d2v_train.distributed import close_world
    from d2v_train.trainer import Trainer

    assert argv[0] == "--config"
    cfg = load_train_config(argv[1], argv[2:])
    trainer = Trainer(cfg)
    trainer.resume()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = {"model": get_model_state_dict(trainer.model, options=full),
             "teacher": get_model_state_dict(trainer.teacher, options=full),
             "optimizer": get_optimizer_state_dict(trainer.model, trainer.optimizer, options=full),
             "step": trainer.step, "loader": trainer.loader.state_dict()}
    if trainer.world.main:
        torch.save(state, out)
    try:
        return trainer.train()
    finally:
        close_world()


def _copy_run(source: Path, target: Path, step: int) -> None:
    """A run folder as a 2-rank run left it, with only the checkpoint of `step`."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    folder = f"checkpoints/step-{step:08d}"
    shutil.copytree(source / folder, target / folder)


@torchrun
def test_elastic_resume_from_two_ranks_on_one_rank(dataset, two_ranks, planned, tmp_path):
    run_dir, step = tmp_path / "run", 8
    _copy_run(two_ranks, run_dir, step)
    dump = tmp_path / "loaded.pt"
    result = train(run_dir, str(dataset), "train.grad_accum=2", ranks=1,
                   entry=["-m", "tests.test_trainer", str(dump), "--config", CONFIG])
    assert f"step-{step:08d} at step {step} on 1 rank(s)" in result.stdout

    loaded = torch.load(dump, weights_only=False)
    saved = checkpoint_state(two_ranks / "checkpoints" / f"step-{step:08d}", tmp_path / "saved.pt")
    assert loaded["step"] == step and int(saved["progress"][0]) == step
    for part in ("model", "teacher", "optimizer"):
        assert_equal_trees(loaded[part], saved[part], part)
    assert loaded["loader"]["epoch"] == 1 and loaded["loader"]["global_batches_done"] == 6

    ran = metrics(run_dir)
    assert [r["step"] for r in ran] == list(range(1, STEPS + 1))
    assert_same_metrics(ran, metrics(two_ranks), rel=1e-5)
    assert_each_sample_once(run_dir, planned)


# -- 6. faults ------------------------------------------------------------------------------------
def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@torchrun
def test_a_nonfinite_loss_stops_naming_the_last_good_checkpoint(dataset, two_ranks, tmp_path):
    run_dir, step = tmp_path / "run", 8
    _copy_run(two_ranks, run_dir, step)
    good = run_dir / "checkpoints" / f"step-{step:08d}"
    before = _digest(good)
    # an overflowing learning rate: step 9 is computed from good weights and wrecks them
    result = train(run_dir, str(dataset), "optim.lr=1e30", "train.grad_accum=2", ranks=1, expect=1)
    assert "non-finite loss" in result.stderr and "step 10;" in result.stderr
    assert f"the last good checkpoint is {good}" in result.stderr
    assert _digest(good) == before
    assert sorted(p.name for p in good.parent.iterdir()) == [good.name]
    assert max(_steps_logged(run_dir)) == 9
    # the effective-rank guard: the tiny model's targets never spread evenly over all 64 directions
    ranks = [r["target_rank"] for r in metrics(run_dir)]
    assert all(1.0 < rank < 64.0 for rank in ranks), ranks
    result = train(run_dir, str(dataset), "guard.collapse_after=0", "guard.min_target_rank=64", ranks=1, expect=1)
    assert "representation collapse at step 9: the targets' effective rank is" in result.stderr
    assert "(min 64.0)" in result.stderr and f"the last good checkpoint is {good}" in result.stderr


@torchrun
def test_skipping_nonfinite_steps_and_sigterm_saving_before_exit_143(dataset, two_ranks, tmp_path):
    run_dir, step = tmp_path / "run", 8
    _copy_run(two_ranks, run_dir, step)
    code, out = train_until(run_dir, str(dataset), 13, signal.SIGTERM, "optim.lr=1e30", "guard.nonfinite=skip",
                            "train.grad_accum=2", ranks=1)
    assert code == 143, out[-3000:]
    records = {r["step"]: r for r in metrics(run_dir)}
    last = max(records)
    assert 13 <= last < STEPS and "SIGTERM: saved" in out and f"at step {last};" in out
    assert not records[9]["skipped"] and all(records[s]["skipped"] for s in range(10, last + 1))
    folders = run_dir / "checkpoints"
    first = checkpoint_state(folders / f"step-{10:08d}", tmp_path / "a.pt")
    final = checkpoint_state(folders / f"step-{last:08d}", tmp_path / "b.pt")
    for part in ("model", "teacher", "optimizer"):  # skipped steps change nothing
        assert_equal_trees(final[part], first[part], part)
    # the step counter and the loader moved on: (step, epoch, global batches done in it)
    assert final["progress"][:3].tolist() > first["progress"][:3].tolist() and int(final["progress"][0]) == last


@torchrun
def test_skipping_a_bad_shard_keeps_the_ranks_in_step(dataset, planned, tmp_path):
    """With shard 1 gone, some global batches lose every sample (epoch 0's batch 4 on rank 0 alone;
    epoch 3's batches 8 and 9, both ranks' batches of step 20): the ranks still step together, an
    all-lost step changes no weight, and every other sample is trained on once."""
    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    index = StreamingLoader(str(copy), SPLIT, POLICY, workers=1)
    shard_of = dict(zip(index.index.columns["key"], index.index.columns["shard"]))
    index.close()
    lost = {key for key, shard in shard_of.items() if int(shard) == 1}
    assert [shard_of[k] for k in planned[0][4]] == [1] * len(planned[0][4])
    assert all(shard_of[k] == 1 for k in planned[3][8] + planned[3][9])
    (copy / json.loads((copy / "dataset.json").read_text())["shards"][1]["name"]).unlink()

    run_dir = tmp_path / "run"
    result = train(run_dir, str(copy), "data.skip_bad_shards=true", "checkpoint.every_steps=19")
    assert "skipping bad" in result.stderr
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert [r["skipped"] for r in records] == [False] * (STEPS - 1) + [True]
    assert records[-1]["masked"] == 0 and all(r["masked"] > 0 for r in records[:-1])
    expected = {}
    for step in range(STEPS):
        epoch, k = divmod(step, STEPS_PER_EPOCH)
        for batch in planned[epoch][2 * k: 2 * k + 2]:
            expected.setdefault(epoch, Counter()).update(key for key in batch if key not in lost)
    assert keys_by_epoch(run_dir) == expected
    planned_lost = sum(key in lost for epoch in range(4) for batch in planned[epoch][:10] for key in batch)
    assert sum(r["skipped_samples"] for r in records) == planned_lost > 0
    # the all-lost last step left the weights as step 19 had them
    final = checkpoint_state(run_dir / "checkpoints" / f"step-{STEPS:08d}", tmp_path / "b.pt")
    before = checkpoint_state(run_dir / "checkpoints" / f"step-{19:08d}", tmp_path / "a.pt")
    for part in ("model", "teacher"):
        assert_equal_trees(final[part], before[part], part)


@pytest.mark.parametrize("override, field", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("data.max_tokens=-1", "data.max_tokens"),
    ("model.encoder.dropout=2", "model.encoder.dropout"),
    ("guard.nonfinite=ignore", "guard.nonfinite"),
    ("data.crop_scale=[0.5,0.2]", "data.crop_scale"),
    ("data.hflip=1.5", "data.hflip"),
])
def test_a_wrong_config_exits_2_naming_the_field(override, field, capsys):
    from d2v_train.main import main

    assert main(["--config", CONFIG, "data.url=/nowhere", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration") and f"\n{field}: " in err


@pytest.mark.parametrize("overrides, says", [
    (["data.max_sample_size=100"], "data.max_sample_size (100) must be at least data.min_sample_size (16000)"),
    (["data.min_sample_size=100", "data.max_sample_size=200"],
     "data.max_sample_size (200) is shorter than one frame of the model's feature encoder (400 samples)"),
    (["train.max_steps=[1"], "override 'train.max_steps=[1': not valid YAML at line 1"),
])
def test_config_errors_caught_before_training(overrides, says, capsys, tmp_path):
    from d2v_train.main import main

    assert main(["--config", CONFIG, "data.url=/nowhere", *overrides]) == 2
    assert says in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: speech_tiny\ndata: [unclosed\n")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: invalid configuration: {bad}: not valid YAML at line 3") and "Traceback" not in err


@torchrun
def test_an_epoch_too_short_for_one_step_exits_2(dataset, tmp_path):
    result = train(tmp_path / "run", str(dataset), "train.grad_accum=12", ranks=1, expect=2)
    assert "fewer than train.grad_accum=12" in result.stderr and "epoch 0" in result.stderr
    result = train(tmp_path / "run", str(dataset), "data.split=train-other", ranks=1, expect=2)
    assert f"split 'train-other' not in dataset (has: {SPLIT})" in result.stderr
    assert "Traceback" not in result.stderr


# -- 4. the elastic resume with shards and checkpoints on S3 ----------------------------------------
@torchrun
@pytest.mark.s3
def test_resume_with_shards_and_checkpoints_on_s3(dataset, two_ranks, planned, s3_server, tmp_path):
    bucket = s3_server.make_bucket()
    fs = s3_server.filesystem()
    try:
        for path in dataset.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{bucket}/data/{path.relative_to(dataset)}", path.read_bytes())
        run_dir, remote = tmp_path / "run", [f"checkpoint.url=s3://{bucket}/run/checkpoints"]
        code, out = train_until(run_dir, f"s3://{bucket}/data", 5, signal.SIGTERM, *remote, env=s3_server.env())
        saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved")]
        assert saved and f"s3://{bucket}/run/checkpoints/step-" in saved[0], out[-3000:]
        stopped_at = max(_steps_logged(run_dir))
        result = train(run_dir, f"s3://{bucket}/data", *remote, "train.grad_accum=2", ranks=1, env=s3_server.env())
        assert f"resumed from s3://{bucket}/run/checkpoints/step-{stopped_at:08d}" in result.stdout
        assert_same_metrics(metrics(run_dir), metrics(two_ranks), rel=1e-5)
        assert_each_sample_once(run_dir, planned)
        fs.invalidate_cache()
        assert f"{bucket}/run/checkpoints/step-{STEPS:08d}/.metadata" in fs.find(f"{bucket}/run/checkpoints")
    finally:
        s3_server.remove_bucket(bucket)



@torchrun
@pytest.mark.s3
def test_killed_at_the_worst_moments_of_an_s3_checkpoint_upload_resumes_bit_identically(dataset, one_rank,
                                                                                          s3_server, tmp_path):
    """SIGKILL with storage frozen at each step of completing a save: half-way through the upload
    of `.metadata.tmp` (the server receives half the body, then the connection drops); after the
    tensors are stored but before the copy to `.metadata` (DCP's rename); just after that copy
    (before the temporary file's removal and the pruning). Each restart
    resumes from the newest complete save, never from a cut one, and the last run ends exactly
    where the uninterrupted run does."""
    from d2v_train import checkpoint

    bucket = s3_server.make_bucket()
    url, env = f"s3://{bucket}/run/checkpoints", s3_server.env()
    run_dir, args = tmp_path / "run", [*COMMON, f"data.url={dataset}", "train.grad_accum=2"]
    command = _command(1, [*args, f"run_dir={tmp_path / 'run'}", f"checkpoint.url={url}"])
    try:
        moments = [  # (the request storage freezes at, the newest complete save after the kill)
            (Hold("PUT", "/step-00000008/.metadata.tmp$", "partway"), 6),
            (Hold("PUT", "/step-00000012/.metadata$", "before"), 10),
            (Hold("PUT", "/step-00000016/.metadata$", "after"), 16),
        ]
        resumed_from = None
        for hold, newest in moments:
            with FaultProxy(s3_server.endpoint_url, hold=hold) as proxy:
                out = kill_when_held(command, proxy, {**env, "OMP_NUM_THREADS": "1"})
            assert resumed_from is None or f"resumed from {url}/step-{resumed_from:08d}" in out, out[-3000:]
            with _env_set(env):
                assert checkpoint.complete_steps(url)[-1] == newest
            resumed_from = newest
        result = train(run_dir, str(dataset), "train.grad_accum=2", f"checkpoint.url={url}", ranks=1, env=env)
        assert f"resumed from {url}/step-00000016" in result.stdout
        assert_same_metrics(metrics(run_dir), metrics(one_rank))  # bit-identical
        assert (run_dir / "keys-rank0.jsonl").read_text() == (one_rank / "keys-rank0.jsonl").read_text()
        fs = s3_server.filesystem()
        final = f"{bucket}/run/checkpoints/step-{STEPS:08d}/__0_0.distcp"
        assert fs.cat_file(final) == (one_rank / "checkpoints" / f"step-{STEPS:08d}" / "__0_0.distcp").read_bytes()
        with _env_set(env):
            assert checkpoint.complete_steps(url) == list(range(2, STEPS + 1, 2))
        assert not fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads")
    finally:
        s3_server.remove_bucket(bucket)


def _env_set(values: dict):
    import unittest.mock

    return unittest.mock.patch.dict(os.environ, values)

if __name__ == "__main__":
    sys.exit(_resume_dump_and_train(sys.argv[1], sys.argv[2:]))


# -- 7. data2vec 2.0: the same trainer, checkpoints and resume ---------------------------------------
V2 = ["model.variant=data2vec2", "model.frontend.alibi=true",
      "model.data2vec2={clones: 4, decoder: {dim: 32, layers: 2, groups: 16}}",
      "train.max_steps=6", "checkpoint.every_steps=2"]


@torchrun
def test_data2vec2_under_fsdp_resumes_bit_identically_and_evaluates(dataset, tmp_path):
    """One config switch on the same shards: 2 ranks train v2; a run killed after step 3 resumes
    from step 2 and logs exactly the uninterrupted run's metrics; its checkpoint is a backbone."""
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    train(reference, str(dataset), *V2)
    ran = metrics(reference)
    assert [r["step"] for r in ran] == list(range(1, 7)) and ran[-1]["loss"] < ran[0]["loss"]
    # 4 clones of every sample, about half of each one's frames masked
    assert all(r["masked"] > 0 for r in ran)

    code, out = train_until(run_dir, str(dataset), 3, signal.SIGKILL, *V2)
    assert code == -signal.SIGKILL and max(_steps_logged(run_dir)) < 6, out[-3000:]
    result = train(run_dir, str(dataset), *V2)
    assert "resumed from" in result.stdout
    assert_same_metrics(metrics(run_dir), ran)  # bit-identical: masks, noise and dropout redrawn alike

    from d2v_train.eval.backbone import load_backbone

    backbone = load_backbone(str(run_dir / "checkpoints"))
    assert backbone.model.variant == "data2vec2" and backbone.ref.step == 6
    source = torch.randn(2, 16000)
    with torch.no_grad():
        out = backbone.encoder({"source": source})
    assert out.x_BTD.shape == (2, 49, 64) and torch.isfinite(out.x_BTD).all()

"""The Prefect flow `pretrain` on a tiny speech corpus: in-process against a temporary Prefect
server, and as the served deployment `pretrain/speech` triggered by `prefect deployment run`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines import synthetic
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.prefect]

TINY = {"max_steps": 4, "shard_size": "20", "mask_variants": 2, "build_workers": 0, "eval_steps": 5,
        "eval_budgets": ["all"], "eval_seeds": 1}
ON_DASK = {**TINY, "build_workers": 2}  # the build on a local Dask cluster through DaskTaskRunner
QUIET = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("flow-corpus")
    spec = synthetic.make_librispeech(str(root), {"train-clean-100": 24, "dev-clean": 6}, seed=0, spoken=True,
                                      words=(2, 4), faults=True)
    return spec.source


@pytest.fixture(scope="module")
def prefect_api():
    """One temporary Prefect server for the module's in-process flow runs."""
    saved = {k: os.environ.get(k) for k in QUIET}
    os.environ.update(QUIET)
    from prefect.testing.utilities import prefect_test_harness  # slow import: only when used

    with prefect_test_harness(server_startup_timeout=90):
        yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _assert_outputs(out: Path, step: int) -> None:
    assert (out / "dataset" / "dataset.json").exists()
    assert list((out / "dataset" / "shards").glob("*.tar"))
    assert (out / "run" / "checkpoints" / f"step-{step:08d}").is_dir()
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in records] == list(range(1, step + 1))
    for name in ("pretrained", "random"):
        assert json.loads((out / "eval" / f"{name}-all-seed0.json").read_text())["task"] == "speech-ctc"
    report = (out / "report" / "report.md").read_text()
    assert "speech-ctc" in report and (out / "report" / "curve.png").exists()
    # the pre-training section: the run's plot beside the report, where the step time went
    assert "## Pre-training" in report and "![" in report and (out / "report" / "training.png").exists()
    assert "| fwd/bwd |" in report and "GFLOP/s" in report


def _logged_messages(flow_run_id=None) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    only = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])) if flow_run_id else None
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=only, limit=200)]


def test_flow_builds_trains_evaluates_reports_then_skips_the_build_and_resumes(prefect_api, corpus, tmp_path):
    from prefect.artifacts import Artifact

    from flows.pretrain import pretrain

    out = tmp_path / "out"
    state = pretrain(modality="speech", source=corpus, output=str(out), **ON_DASK, return_state=True)
    assert state.is_completed(), state
    first = state.result()
    assert first["dataset"]["skipped"] is False and first["dataset"]["rejected"] > 0
    assert any("on 2 worker(s)" in message for message in _logged_messages())  # the build ran on Dask
    assert first["training"]["step"] == 4
    _assert_outputs(out, 4)
    for key, kind in [("speech-shards", "table"), ("speech-rejects", "table"), ("speech-training-curve", "table"),
                      ("speech-eval-metrics", "table"), ("speech-report", "markdown"),
                      ("speech-label-efficiency", "table"),
                      ("speech-pretrain-progress", "progress")]:
        artifact = Artifact.get(key)
        assert artifact is not None and artifact.type == kind, key
    shards_json = (out / "dataset" / "dataset.json").stat().st_mtime_ns

    # Pre-empted: a scheduler's SIGTERM reaches the trainer; it saves and exits 143, and the run
    # ends Cancelled (not Failed), naming the save. The next run resumes from it and finishes.
    preempt = threading.Thread(target=_sigterm_trainer_at_step, args=(out, 6), daemon=True)
    preempt.start()
    state = pretrain(modality="speech", source=corpus, output=str(out), **{**ON_DASK, "max_steps": 12},
                     return_state=True)
    preempt.join(timeout=10)
    assert state.is_cancelled() and not state.is_failed(), state
    assert "pre-empted (SIGTERM, exit 143): SIGTERM: saved" in state.message, state.message
    saved_at = int(state.message.split(" at step ")[1].split(";")[0])
    assert 6 <= saved_at < 12 and (out / "run" / "checkpoints" / f"step-{saved_at:08d}" / ".metadata").exists()

    state = pretrain(modality="speech", source=corpus, output=str(out), **{**ON_DASK, "max_steps": 12},
                     return_state=True)
    assert state.is_completed(), state
    second = state.result()
    assert second["dataset"]["skipped"] is True
    assert (out / "dataset" / "dataset.json").stat().st_mtime_ns == shards_json
    assert any(f"resumed from {out}/run/checkpoints/step-{saved_at:08d}" in message
               for message in _logged_messages(state.state_details.flow_run_id))
    assert second["training"]["step"] == 12
    _assert_outputs(out, 12)
    assert json.loads((out / "eval" / "pretrained-all-seed0.json").read_text())["checkpoint"]["step"] == 12


def _sigterm_trainer_at_step(out: Path, step: int) -> None:
    """SIGTERM the trainer's process group once its metrics reach `step` (as a scheduler pre-empts)."""
    metrics, deadline = out / "run" / "metrics.jsonl", time.monotonic() + 180
    while time.monotonic() < deadline:
        last = (metrics.read_text().splitlines() or [""])[-1] if metrics.exists() else ""
        if last.endswith("}") and json.loads(last)["step"] >= step:
            for process in _trainers(out):
                try:
                    os.killpg(os.getpgid(process.pid), signal.SIGTERM)
                except ProcessLookupError:
                    pass
                return
        time.sleep(0.02)


@pytest.mark.parametrize("modality", ["vision", "text"])
def test_vision_and_text_runs_build_for_the_preset_and_evaluate(prefect_api, modality, tmp_path):
    from flows.pretrain import pretrain

    if modality == "vision":  # shards for the preset's 64 px / 8 px grid, probed on the built val split;
        # pre-trained in the data2vec 2.0 mode: one flow parameter
        source = synthetic.make_imagenet(tmp_path / "corpus", classes=4, train_per_class=12, val_per_class=4,
                                         seed=0, faults=True).source
        extra = {"variant": "data2vec2"}
    else:  # GLUE-format SST-2 for the classification fine-tune, with the pre-training tokenizer
        source = synthetic.make_text_corpus(tmp_path / "corpus", files=2, docs_per_file=20, seed=0, faults=True).source
        synthetic.make_glue_task(tmp_path / "glue", "SST-2", train=40, dev=10)
        extra = {"vocab_size": 500, "eval_data": str(tmp_path / "glue" / "SST-2")}
    out = tmp_path / "out"
    state = pretrain(modality=modality, source=source, output=str(out), **{**TINY, "max_steps": 3}, **extra,
                     return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["training"]["step"] == 3
    task = {"vision": "image-probe", "text": "text-cls"}[modality]
    assert json.loads((out / "eval" / "pretrained-all-seed0.json").read_text())["task"] == task
    assert task in (out / "report" / "report.md").read_text()
    trained = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert trained["step"] == 3 and trained["masked"] > 0
    if modality == "vision":
        assert "data2vec2 vision tiny" in (out / "report" / "report.md").read_text()
        from d2v_train.eval.backbone import load_backbone

        assert load_backbone(str(out / "run" / "checkpoints")).model.variant == "data2vec2"


def test_shard_builders_run_on_an_existing_dask_scheduler_given_by_address(prefect_api, tmp_path):
    from distributed import LocalCluster

    from flows.pretrain import pretrain

    source = synthetic.make_imagenet(tmp_path / "corpus", classes=3, train_per_class=8, val_per_class=2, seed=1).source
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        state = pretrain(modality="vision", source=source, output=str(tmp_path / "out"),
                         **{**TINY, "build_workers": None, "dask_address": cluster.scheduler_address, "max_steps": 2},
                         return_state=True)
        assert state.is_completed(), state.message
        assert "build_shard" in cluster.scheduler.task_prefixes  # one task per shard ran on this scheduler
        assert cluster.scheduler.task_prefixes["build_shard"].all_durations["compute"] > 0
    assert (tmp_path / "out" / "dataset" / "dataset.json").exists()
    assert state.result()["dataset"]["skipped"] is False
    # or a cluster class by its dotted name (dask_jobqueue.SLURMCluster on a cluster), started for the build
    state = pretrain(modality="vision", source=source, output=str(tmp_path / "out2"),
                     **{**TINY, "build_workers": None, "max_steps": 1, "dask_cluster_class": "distributed.LocalCluster",
                        "dask_cluster_kwargs": {"n_workers": 3, "threads_per_worker": 1, "processes": False,
                                                "dashboard_address": None}}, return_state=True)
    assert state.is_completed(), state.message
    assert any("on 3 worker(s)" in message for message in _logged_messages())


def test_a_build_on_a_local_cluster_of_one_worker_finishes(prefect_api, corpus, tmp_path):
    """The task driving the build holds a worker thread: with one worker it must not wait for itself."""
    import threading

    from flows.pretrain import pretrain

    outcome = {}
    run = threading.Thread(target=lambda: outcome.update(state=pretrain(
        modality="speech", source=corpus, output=str(tmp_path / "out"),
        **{**TINY, "build_workers": 1, "max_steps": 1, "eval_steps": 1}, return_state=True)), daemon=True)
    run.start()
    run.join(timeout=240)
    assert not run.is_alive(), "the flow with build_workers=1 did not finish in 4 minutes"
    assert outcome["state"].is_completed(), outcome["state"].message
    assert any("on 1 worker(s)" in message for message in _logged_messages())


def test_a_training_failure_fails_the_run_with_the_trainers_error(prefect_api, corpus, tmp_path):
    from flows.launch import ProcessFailed
    from flows.pretrain import pretrain

    state = pretrain(modality="speech", source=corpus, output=str(tmp_path / "out"),
                     **{**TINY, "train_overrides": ["data.split=no-such-split"]}, return_state=True)
    assert state.is_failed(), state
    with pytest.raises(ProcessFailed) as failure:
        state.result()
    assert failure.value.returncode != 0
    assert "no-such-split" in str(failure.value)  # the trainer's own message, from its output


def test_a_wrong_parameter_is_an_error_naming_it(prefect_api, corpus, tmp_path):
    from flows.pretrain import pretrain

    state = pretrain(modality="speech", source=corpus, output=str(tmp_path / "out"),
                     **{**TINY, "shard_size": "lots"}, return_state=True)
    assert state.is_failed()
    assert "shard_size" in state.message and "lots" in state.message
    assert not (tmp_path / "out").exists()  # refused before any stage ran
    state = pretrain(modality="speech", source=corpus, output=str(tmp_path / "out"),
                     **{**TINY, "preset": "large", "variant": "data2vec2"}, return_state=True)
    assert state.is_failed() and "no data2vec2 large preset for speech" in state.message
    for wrong, named in (({"labelled_split": "train-other-500"}, "labelled_split"),
                         ({"eval_budgets": ["10m", "lots"]}, "eval_budgets")):
        state = pretrain(modality="speech", source=corpus, output=str(tmp_path / "out"), **{**TINY, **wrong},
                         return_state=True)
        assert state.is_failed() and named in state.message, state.message


def test_the_split_roles_pre_train_fine_tune_and_score_default_from_the_splits_built():
    from flows.pretrain import PretrainRequest

    three = PretrainRequest(modality="speech", source="/c", output="/o",
                            splits=["train-other-500", "train-clean-100", "dev-clean"])
    assert (three.train_split, three.finetune_split, three.scored_split) == (
        "train-other-500", "train-clean-100", "dev-clean")
    assert three.budgets == ["10m", "all"] and three.eval_seeds == 3
    two = PretrainRequest(modality="speech", source="/c", output="/o")
    assert (two.train_split, two.finetune_split, two.scored_split) == ("train-clean-100", "train-clean-100",
                                                                        "dev-clean")
    chosen = PretrainRequest(modality="speech", source="/c", output="/o", splits=["a", "b", "c"],
                             pretrain_split="b", labelled_split="a", eval_split="c", eval_budgets=["5m", "20m"])
    assert (chosen.train_split, chosen.finetune_split, chosen.scored_split) == ("b", "a", "c")
    assert "data.split=b" in chosen.trainer_overrides()
    from flows.pretrain import eval_command

    command = eval_command(chosen)
    assert command[command.index("--budgets") + 1] == "5m,20m"
    assert command[command.index("--train-split") + 1] == "a" and command[command.index("--eval-split") + 1] == "c"
    # LibriSpeech 960 h: three subsets pre-trained on as one mix, the trainer's data.splits
    mixed = PretrainRequest(modality="speech", source="/c", output="/o", splits=["a", "b", "c", "d"],
                            pretrain_splits=["a", "b", "c"])
    overrides = mixed.trainer_overrides()
    assert "data.splits=[a,b,c]" in overrides and not any(o.startswith("data.split=") for o in overrides)
    from d2v_train.config import load_train_config

    assert load_train_config(None, overrides).data.mix()[2].split == "c"
    for wrong, message in (({"pretrain_split": "a"}, "not both"), ({"pretrain_splits": ["a", "x"]}, "'x' is not among")):
        with pytest.raises(ValueError, match=message):
            PretrainRequest(modality="speech", source="/c", output="/o", splits=["a", "b"],
                            **{"pretrain_splits": ["a"], **wrong})


# -- a real server, the served deployments, the Prefect CLI ------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`prefect server start` on 127.0.0.1 and `d2v serve`; yields the environment for the CLI."""
    from flows.local_server import serving_locally

    with serving_locally(tmp_path_factory.mktemp("prefect-home"), extra_env=QUIET) as env:
        yield env


def _prefect(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, cwd=REPO, capture_output=True, check=False,
                          text=True, timeout=timeout)


def test_prefect_deployment_run_pretrain_speech_watch(served, corpus, tmp_path):
    out = tmp_path / "out"
    params = {**ON_DASK, "source": corpus, "output": str(out)}
    result = _prefect(served, "deployment", "run", "pretrain/speech", "--params", json.dumps(params), "--watch")
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_outputs(out, 4)
    for key in ("speech-shards", "speech-rejects", "speech-training-curve", "speech-eval-metrics", "speech-report"):
        recorded = _prefect(served, "artifact", "inspect", key)
        assert recorded.returncode == 0 and key in recorded.stdout, recorded.stdout + recorded.stderr


def _trainers(out: Path) -> list:
    import psutil

    marker = f"run_dir={out}/run"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if marker in (process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            pass
    return found


@pytest.mark.torchrun
def test_cancelling_the_run_kills_torchrun_and_its_workers(served, corpus, tmp_path):
    import psutil

    out = tmp_path / "out"
    params = {**TINY, "max_steps": 100_000, "nproc": 2, "source": corpus, "output": str(out)}
    started = _prefect(served, "deployment", "run", "pretrain/speech", "--params", json.dumps(params))
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
    deadline = time.monotonic() + 120
    while not (out / "run" / "metrics.jsonl").exists():  # the trainer is past its first step
        assert time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.5)
    trainers = _trainers(out)
    assert len(trainers) >= 3, [p.cmdline() for p in trainers]  # torchrun and its two ranks

    cancel = _prefect(served, "flow-run", "cancel", run_id)
    assert cancel.returncode == 0, cancel.stdout + cancel.stderr
    _, alive = psutil.wait_procs(trainers, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    deadline = time.monotonic() + 60
    while True:
        state = _prefect(served, "flow-run", "inspect", run_id).stdout
        if "CANCELLED" in state:
            break
        assert time.monotonic() < deadline, state
        time.sleep(1)


def test_a_failed_training_fails_the_deployment_run_with_the_trainers_error_in_its_logs(served, corpus, tmp_path):
    params = {**TINY, "source": corpus, "output": str(tmp_path / "out"), "train_overrides": ["data.split=no-such-split"]}
    result = _prefect(served, "deployment", "run", "pretrain/speech", "--params", json.dumps(params), "--watch")
    assert result.returncode == 1, result.stdout + result.stderr
    run_id = next(line.split()[-1] for line in result.stdout.splitlines() if "UUID" in line)
    logs = _prefect(served, "flow-run", "logs", run_id)
    assert "split 'no-such-split' not in dataset" in logs.stdout, logs.stdout[-3000:]


def test_a_terminated_demo_leaves_no_server_or_worker_behind(tmp_path):
    """SIGTERM to `d2v demo`: its temporary Prefect server and Dask workers end with it."""
    psutil = pytest.importorskip("psutil")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET, PREFECT_HOME=str(tmp_path / "prefect-home"))
    demo = subprocess.Popen([sys.executable, "-m", "flows.cli", "demo", "text", "--out", str(tmp_path / "demo")],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list = []
    try:
        deadline = time.monotonic() + 120
        while not any("uvicorn" in " ".join(c.cmdline()) for c in children):  # the temporary server is up
            assert demo.poll() is None and time.monotonic() < deadline, "the demo did not start its server"
            time.sleep(0.5)
            try:
                children = psutil.Process(demo.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
        time.sleep(3)  # into the flow: the build's Dask workers too
        children = psutil.Process(demo.pid).children(recursive=True)
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=60)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
    finally:
        if demo.poll() is None:
            demo.kill()
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


def test_the_flow_takes_exactly_the_requests_parameters_with_its_defaults():
    """The flow's signature (what a deployment offers) and PretrainRequest (what is checked) are one
    list: the same names, the same defaults (None standing for an empty list or dict)."""
    import inspect

    from flows.pretrain import PretrainRequest, pretrain

    parameters = inspect.signature(pretrain.fn).parameters
    fields = PretrainRequest.model_fields
    assert list(parameters) and set(parameters) == set(fields)
    for name, parameter in parameters.items():
        if parameter.default is inspect.Parameter.empty:
            assert fields[name].is_required(), name
        elif parameter.default is None and fields[name].default in ([], {}):
            request = PretrainRequest(modality="speech", source="s", output="o", **{name: None})
            assert getattr(request, name) == fields[name].default, name
        else:
            assert parameter.default == fields[name].default, name

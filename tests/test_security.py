"""Security tests: files users download or are sent (checkpoints, datasets) run no code and touch
nothing outside their own folders."""
from __future__ import annotations

import os
import pickle

import pytest

from d2v_train import checkpoint
from d2v_train.config import load_train_config
from d2v_train.models.objectives import build_model
from tests.helpers import REPO, run_d2v

TINY = str(REPO / "configs" / "train_speech_tiny.yaml")


class _RunsACommand:
    """A pickle that, once loaded, creates `path`: what a crafted `.metadata` would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> str:
    """A real tiny speech checkpoint (untrained weights), as the trainer writes it."""
    cfg = load_train_config(TINY, ["data.url=/nowhere"])
    model = build_model(cfg.model)
    url = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
    return checkpoint.save({"model": model.state_dict()}, url, 1, keep=1, config_json=cfg.model_dump_json())


def test_security_a_genuine_checkpoint_still_loads(saved):
    from d2v_train.export import load_model

    cfg, model, folder = load_model(saved)
    assert folder == saved and cfg.model.modality == "speech"


@pytest.mark.parametrize("payload", ["command", "not-metadata", "truncated"])
def test_security_crafted_checkpoint_metadata_runs_nothing(saved, tmp_path, payload):
    import shutil

    crafted = tmp_path / "checkpoints" / "step-00000001"
    shutil.copytree(saved, crafted)
    marker = tmp_path / "pwned"
    meta = crafted / ".metadata"
    if payload == "command":
        meta.write_bytes(pickle.dumps(_RunsACommand(str(marker))))
    elif payload == "not-metadata":
        meta.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    else:
        meta.write_bytes(meta.read_bytes()[:40])
    from d2v_train.export import load_model

    with pytest.raises(checkpoint.UnsafeCheckpointError, match=r"\.metadata"):
        load_model(str(crafted))
    assert not marker.exists()
    # every command that loads a checkpoint goes through the same reader: one line, exit 2
    result = run_d2v("export-hf", str(tmp_path / "checkpoints"), str(tmp_path / "hf"), check=False)
    assert result.returncode == 2 and not marker.exists(), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and ".metadata" in result.stderr
    state = {"model": build_model(load_train_config(TINY, []).model).state_dict()}
    with pytest.raises(checkpoint.UnsafeCheckpointError):
        checkpoint.load(state, str(crafted))  # the trainer's resume
    assert not marker.exists()


def _crafted(dataset: str, tmp_path, edit) -> str:
    """A copy of `dataset` whose dataset.json `edit(doc)` changed."""
    import json
    import shutil

    copy = tmp_path / "crafted"
    shutil.copytree(dataset, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    edit(doc)
    (copy / "dataset.json").write_text(json.dumps(doc))
    return str(copy)


def _set_first_shard(key: str, value: str):
    def edit(doc):
        doc["shards"][0][key] = value
    return edit


@pytest.mark.parametrize("key,value", [
    ("name", "../../../../etc/hostname"), ("name", "/etc/hostname"), ("name", "file:///etc/hostname"),
    ("index", "../outside.parquet"), ("name", "shards/./x.tar"), ("sha256", "../victim/important"),
    ("sha256", "A" * 64)])
def test_security_dataset_json_paths_stay_inside_the_dataset(speech_dataset, tmp_path, key, value):
    crafted = _crafted(speech_dataset, tmp_path, _set_first_shard(key, value))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.tar").write_bytes(b"keep me")
    cache = tmp_path / "cache"
    for args in (["verify", crafted], ["stream", crafted, "--split", "train-clean-100", "--batch-size", "2",
                                         "--max-batches", "1", "--cache-dir", str(cache)]):
        result = run_d2v("data", *args, check=False)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and repr(value) in result.stderr, result.stderr
    assert (victim / "important.tar").read_bytes() == b"keep me"


def test_security_the_reader_refuses_shards_outside_the_root_and_odd_digests():
    from d2v_train.data.reader import ShardReader
    from pipelines.storage import Location

    good = "0" * 64
    for shard in (("../x.tar", good, 1), ("/abs/x.tar", good, 1), ("x.tar", "../../x", 1)):
        with pytest.raises(ValueError, match="inside the dataset root|is not a sha256"):
            ShardReader(Location("/tmp"), [shard], data_suffix="flac")


def test_split_totals_in_dataset_json_are_checked(speech_dataset, tmp_path):
    def edit(doc):
        doc["splits"]["train-clean-100"]["samples"] += 1
        doc["samples"] += 1
        doc["source_items"] += 1
        doc["shards"][0]["samples"] += 1

    crafted = _crafted(speech_dataset, tmp_path, edit)
    ok = run_d2v("data", "inspect", crafted, check=False)
    assert ok.returncode == 0, ok.stderr  # shards and splits still agree
    crafted2 = _crafted(crafted, tmp_path / "again", lambda doc: doc["splits"]["train-clean-100"].update(bytes=1))
    result = run_d2v("data", "inspect", crafted2, check=False)
    assert result.returncode == 2 and "splits.train-clean-100.bytes is 1" in result.stderr, result.stderr


def test_security_single_process_training_listens_on_loopback_only(speech_dataset, tmp_path):
    """What `ss -ltnp` shows for the trainer's processes while it trains: 127.0.0.1 or nothing."""
    import subprocess
    import sys

    psutil = pytest.importorskip("psutil")
    from tests.helpers import REPO

    trainer = subprocess.Popen(
        [sys.executable, "d2v_train/main.py", "--config", TINY, f"data.url={speech_dataset}", f"run_dir={tmp_path / 'run'}",
         "train.max_steps=60", "checkpoint.every_steps=1000", "data.workers=1"],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, steps = set(), 0
    try:
        for line in trainer.stdout:
            if line.startswith("step "):
                steps += 1
                procs = [psutil.Process(trainer.pid), *psutil.Process(trainer.pid).children(recursive=True)]
                for proc in procs:
                    try:
                        seen |= {c.laddr for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
                    except psutil.NoSuchProcess:
                        pass
                if steps >= 5:
                    break
    finally:
        trainer.kill()
        trainer.wait(timeout=30)
    assert steps >= 5, "the trainer did not train"
    assert seen, "gloo always listens somewhere: the probe saw no socket at all"
    assert {addr.ip for addr in seen} <= {"127.0.0.1", "::1"}, seen


def test_security_credentials_never_appear_in_messages():
    import subprocess
    import sys

    from pipelines.storage import redact_text
    from tests.helpers import REPO

    assert redact_text('cannot read s3://AK:SEC/RET@b/x: bad name "AK:SECRET@b"') == \
        'cannot read s3://***@b/x: bad name "***@b"'
    assert redact_text("at 12:30, x@y.org, ratio 1:2") == "at 12:30, x@y.org, ratio 1:2"
    env = {**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y", "OMP_NUM_THREADS": "1"}
    url = "s3://MYKEY:MYSECRET@bucket/dataset"
    for cmd in ([sys.executable, "-m", "flows.cli", "data", "inspect", url],
                [sys.executable, "d2v_train/main.py", "--config", TINY, f"data.url={url}"]):
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "MYSECRET" not in result.stdout + result.stderr and "***@" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_security_the_launchers_stores_listen_on_loopback_for_one_machine_runs():
    """torch's TCPStore binds every interface; d2v_train.launch's binds 127.0.0.1 and still serves
    clients, and only a run whose rendezvous names a reachable host keeps torchrun's stores."""
    psutil = pytest.importorskip("psutil")
    import torch.distributed as dist
    from torch.distributed.run import parse_args

    from d2v_train.launch import LoopbackTCPStore, one_machine

    server = LoopbackTCPStore("localhost", 0, is_master=True, multi_tenant=True)
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False)
    client.set("probe", "seen")
    assert server.get("probe") == b"seen"
    listening = {c.laddr for c in psutil.Process().net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port}
    assert {address.ip for address in listening} == {"127.0.0.1"}, listening

    def local(*args):
        return one_machine(parse_args([*args, "--nproc_per_node", "2", "train.py"]))

    assert local("--standalone") and local() and local("--rdzv-endpoint", "localhost:29400")
    assert not local("--rdzv-endpoint", "node1:29500") and not local("--master-addr", "10.0.0.2")

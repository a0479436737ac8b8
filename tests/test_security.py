"""Security tests: files users download or are sent (checkpoints, datasets) run no code and touch
nothing outside their own folders."""
from __future__ import annotations

import os
import pickle

import pytest

from d2v_train import checkpoint
from d2v_train.config import load_train_config
from d2v_train.models.data2vec import build_model
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

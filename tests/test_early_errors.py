"""What can be checked before the work is checked before it: outputs writable, splits present.
Each failure is one line naming the option or setting, exit 2, within seconds."""
from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers import REPO, run_d2v

TINY = str(REPO / "configs" / "train_speech_tiny.yaml")


def _one_line_error(result, *says: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in says:
        assert text in err, err


def test_eval_and_encode_refuse_an_unwritable_out_before_the_work(speech_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file (a permission check would not hold as root)
    common = ["--checkpoint", "random", "--model", "speech_tiny", "--data", speech_dataset,
              "--train-split", "train-clean-100", "--eval-split", "train-clean-100", "--steps", "100000"]
    started = time.monotonic()
    _one_line_error(run_d2v("eval", "speech-ctc", *common, "--out", str(blocker / "r.json"), check=False),
                    "--out", str(blocker))
    _one_line_error(run_d2v("encode", "random", "x.flac", "--out", str(blocker / "x.npy"), check=False), "--out")
    assert time.monotonic() - started < 60, "100,000 fine-tuning updates would take far longer"
    assert not (tmp_path / "r.json").exists()


def test_speech_ctc_refuses_a_missing_split_before_fine_tuning(speech_dataset):
    common = ["--checkpoint", "random", "--model", "speech_tiny", "--data", speech_dataset, "--steps", "100000"]
    started = time.monotonic()
    _one_line_error(run_d2v("eval", "speech-ctc", *common, "--train-split", "train-clean-100",
                            "--eval-split", "dev-other", check=False),
                    "--eval-split 'dev-other'", "train-clean-100")
    _one_line_error(run_d2v("eval", "speech-ctc", *common, "--train-split", "train-other-500",
                            "--eval-split", "train-clean-100", check=False), "--train-split 'train-other-500'")
    assert time.monotonic() - started < 60


def test_the_trainer_refuses_an_unwritable_checkpoint_url_before_training(speech_dataset, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, "d2v_train/main.py", "--config", TINY, f"data.url={speech_dataset}",
         f"run_dir={tmp_path / 'run'}", f"checkpoint.url={blocker / 'checkpoints'}", "train.max_steps=100000"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    _one_line_error(result, "checkpoint.url", str(blocker))
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_a_silent_object_store_is_reported_within_seconds():
    """An endpoint that accepts connections and never answers: a message after a bounded time."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []

    def accept_and_hold():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept_and_hold, daemon=True).start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1", "D2V_S3_READ_TIMEOUT": "1",
           "D2V_S3_CONNECT_TIMEOUT": "1"}
    try:
        for args in (["data", "inspect", "s3://bucket/dataset"],
                     ["data", "stream", "s3://bucket/dataset", "--split", "train", "--batch-size", "2"]):
            started = time.monotonic()
            result = run_d2v(*args, env=env, check=False, timeout=120)
            took = time.monotonic() - started
            _one_line_error(result, "timeout")
            assert took < 40, f"{args[1]} took {took:.0f} s to report a silent store"
    finally:
        server.close()
        for conn in held:
            conn.close()


def test_a_truncated_checkpoint_falls_back_to_the_one_before(speech_dataset, tmp_path):
    def train(steps: int, *more: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "d2v_train/main.py", "--config", TINY, f"data.url={speech_dataset}",
             f"run_dir={tmp_path / 'run'}", f"train.max_steps={steps}", "checkpoint.every_steps=2",
             "data.workers=1", *more], cwd=REPO, capture_output=True, text=True, timeout=300,
            env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})

    assert train(4).returncode == 0
    newest = tmp_path / "run" / "checkpoints" / "step-00000004"
    payload = next(newest.glob("*.distcp"))
    payload.write_bytes(payload.read_bytes()[:1000])  # a copy or a disk that lost the tail
    resumed = train(6)
    assert resumed.returncode == 0, resumed.stderr
    assert f"warning: checkpoint {newest} cannot be loaded" in resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000002 at step 2" in resumed.stdout
    assert (tmp_path / "run" / "checkpoints" / "step-00000006").exists()
    # another batch plan or model on resume: refused by name, unless asked for
    _one_line_error(train(8, "data.max_tokens=100000", "model.encoder.ffn_dim=256"),
                    "model.encoder.ffn_dim 128 -> 256", "data.max_tokens 160000 -> 100000", "checkpoint.allow_changes")
    forced = train(8, "data.max_tokens=100000", "checkpoint.allow_changes=true")
    assert forced.returncode == 0 and "step-00000006 at step 6" in forced.stdout, forced.stderr


def test_encode_names_the_file_it_cannot_use(tmp_path):
    import io

    import numpy as np
    import soundfile
    from PIL import Image

    from d2v_train import checkpoint
    from d2v_train.config import load_train_config
    from d2v_train.models.objectives import build_model

    cfg = load_train_config(TINY, ["data.url=/nowhere"])
    ckpt = checkpoint.save({"model": build_model(cfg.model).state_dict()}, str(tmp_path / "ck"), 1, keep=1,
                           config_json=cfg.model_dump_json())
    picture = io.BytesIO()
    Image.new("RGB", (8, 8)).save(picture, format="PNG")
    clip = io.BytesIO()
    soundfile.write(clip, np.zeros(100, dtype=np.float32), 16000, format="FLAC")
    files = {"picture.png": picture.getvalue(), "notes.txt": b"hello", "empty.flac": b"", "clip.flac": clip.getvalue()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        result = run_d2v("encode", ckpt, str(tmp_path / name), "--out", str(tmp_path / "x.npy"), check=False)
        _one_line_error(result, str(tmp_path / name))
    assert "100 samples, shorter than one frame of the encoder (400)" in result.stderr


def test_the_trainer_checks_the_dataset_against_the_model_before_training(speech_dataset, tmp_path):
    from pipelines import synthetic

    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), classes=2, train_per_class=2, val_per_class=1)
    run_d2v("data", "build", "imagenet", spec.source, str(tmp_path / "pictures"), "--workers", "0",
            "--image-size", "32", "--patch-size", "8")

    def train(data: str, split: str = "train") -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "d2v_train/main.py", "model=vision_tiny", f"data.url={data}", f"data.split={split}",
             "data.batch_size=2", "data.workers=1", "train.max_steps=5", f"run_dir={tmp_path / 'run'}"],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})

    _one_line_error(train(str(tmp_path / "pictures")), "model.frontend: image_size 64 / patch_size 8",
                    "drawn for 32 / 8")
    _one_line_error(train(speech_dataset, "train-clean-100"), "holds speech shards; the model is vision")

"""`d2v eval speech-ctc` end to end: CTC learns the letter-tone speech, whole utterances are scored
once each, and checkpoints load from a local folder and from S3, in one process and under torchrun."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from d2v_train.data.loader import StreamingLoader
from d2v_train.eval.speech_ctc import eval_policy
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from schemas.evaluation import EvalResult
from tests.helpers import REPO, run_d2v

ONE_THREAD = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SPLITS = ["--train-split", "train-clean-100", "--eval-split", "dev-clean"]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """Transcribed letter-tone speech (train has the corpus faults, one untranscribed utterance)."""
    root = tmp_path_factory.mktemp("eval-speech")
    spec = synthetic.make_librispeech(str(root / "corpus"), {"train-clean-100": 60, "dev-clean": 13}, seed=3,
                                      spoken=True, words=(2, 4), faults=True)
    data = root / "data"
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100", "dev-clean")), Location(str(data)),
                  BuildOptions(ShardSize.parse("20"), 2, 0), workers=0, echo=lambda *_: None)
    return data


def _result(stdout: str) -> EvalResult:
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert len(lines) == 1, stdout  # one JSON object, progress goes to stderr
    return EvalResult.model_validate_json(lines[0])


@pytest.mark.slow
def test_ctc_fine_tuning_brings_cer_well_below_the_all_blank_baseline(spoken, tmp_path):
    out = tmp_path / "results" / "random.json"
    result = _result(run_d2v(
        "eval", "speech-ctc", "--checkpoint", "random", "--model", "speech_tiny", "--data", str(spoken), *SPLITS,
        "--steps", "800", "--lr", "3e-3", "--max-tokens", "200000", "--mask-prob", "0.2", "--mask-channel-prob", "0",
        "--freeze-transformer-steps", "0", "--log-every", "200", "--out", str(out), env=ONE_THREAD).stdout)
    assert result.task == "speech-ctc" and result.label == "random" and result.checkpoint.url == "random"
    assert result.baseline == {"wer": 1.0, "cer": 1.0}  # an empty transcript deletes every reference letter
    assert result.metrics["cer"] <= 0.8, result.metrics
    assert result.metrics["wer"] <= 1.0
    assert result.data.train_samples == 60  # the untranscribed utterance is not trained on
    assert result.data.eval_samples == 13
    assert len(result.curve) == 800 and result.curve[-1].loss < result.curve[0].loss - 1.0
    assert EvalResult.model_validate_json(out.read_text()) == result


def test_evaluation_batches_hold_whole_utterances_once(spoken):
    loader = StreamingLoader(str(spoken), "dev-clean", eval_policy(40_000), workers=1)
    lengths = dict(zip(loader.index.columns["key"], loader.index.columns["length"]))
    seen = []
    for batch in loader:
        samples = (~batch["padding_mask"]).sum(-1).tolist()
        assert samples == [lengths[k] for k in batch["keys"]]  # never cropped
        assert all(batch["transcripts"])
        seen += batch["keys"]
    loader.close()
    assert sorted(seen) == sorted(lengths) and len(seen) == 13


@pytest.fixture(scope="module")
def pretrained(spoken, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval-speech-run")
    result = subprocess.run(
        [sys.executable, "d2v_train/main.py", "--config", "configs/train_speech_tiny.yaml", f"data.url={spoken}",
         f"run_dir={run_dir}", "train.max_steps=2", "checkpoint.every_steps=2"],
        cwd=REPO, env={**os.environ, **ONE_THREAD}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return run_dir / "checkpoints"


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.torchrun
def test_checkpoints_from_a_folder_and_from_s3_in_one_process_and_under_torchrun(spoken, pretrained, s3_server,
                                                                                  s3_bucket):
    s3 = s3_server.filesystem()
    s3.put(str(pretrained / "step-00000002"), f"{s3_bucket}/run/checkpoints/step-00000002", recursive=True)
    common = ["--data", str(spoken), *SPLITS, "--steps", "0", "--eval-max-tokens", "40000", "--seed", "5"]
    local = _result(run_d2v("eval", "speech-ctc", "--checkpoint", str(pretrained), *common, env=ONE_THREAD).stdout)
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "d2v_train/eval/main.py",
         "speech-ctc", "--checkpoint", f"s3://{s3_bucket}/run/checkpoints", *common],
        cwd=REPO, env={**os.environ, **ONE_THREAD, **s3_server.env()}, capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 0, torchrun.stderr
    remote = _result(torchrun.stdout)  # rank 0 alone prints
    assert local.checkpoint.step == remote.checkpoint.step == 2
    assert local.label == "step 2"
    assert remote.checkpoint.url == f"s3://{s3_bucket}/run/checkpoints/step-00000002"
    assert (local.world_size, remote.world_size) == (1, 2)
    # 13 utterances in batches of a few: the ranks' tail is padded, and padding is never scored
    assert local.data.eval_samples == remote.data.eval_samples == 13
    assert local.hyperparameters["chars"] == remote.hyperparameters["chars"] > 0
    assert remote.metrics == pytest.approx(local.metrics)  # same weights, same seeded classifier
    assert local.curve == [] and local.steps == 0


def test_wrong_inputs_are_one_clear_line(spoken):
    result = run_d2v("eval", "speech-ctc", "--checkpoint", "random", "--data", str(spoken), *SPLITS,
                     check=False, env=ONE_THREAD)
    assert result.returncode == 2 and "needs --model" in result.stderr
    result = run_d2v("eval", "speech-ctc", "--checkpoint", "random", "--model", "vision_tiny", "--data", str(spoken),
                     *SPLITS, check=False, env=ONE_THREAD)
    assert result.returncode == 2 and "needs a speech encoder" in result.stderr
    result = run_d2v("eval", "speech-ctc", "--checkpoint", str(spoken / "nowhere"), "--data", str(spoken), *SPLITS,
                     check=False, env=ONE_THREAD)
    assert result.returncode == 2 and "no complete checkpoint" in result.stderr
    assert "Traceback" not in result.stderr

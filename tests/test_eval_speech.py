"""`d2v eval speech-ctc` end to end: CTC learns the letter-tone speech, whole utterances are scored
once each, and checkpoints load from a local folder and from S3, in one process and under torchrun."""
from __future__ import annotations

import json
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
    # a word 4-gram LM of the corpus's sentences: the beam search with it must beat greedy decoding
    sentences = [line.split(" ", 1)[1] for path in (spoken.parent / "corpus").rglob("*.trans.txt")
                 for line in path.read_text().splitlines()]
    (tmp_path / "text.txt").write_text("".join(f"{s}\n" for s in sentences))
    built = run_d2v("lm", "build", str(tmp_path / "text.txt"), str(tmp_path / "lm.arpa"), "--order", "4").stdout
    assert "1-grams" in built and (tmp_path / "lm.arpa").read_text().startswith("\n\\data\\")
    out = tmp_path / "results" / "random.json"
    result = _result(run_d2v(
        "eval", "speech-ctc", "--checkpoint", "random", "--model", "speech_tiny", "--data", str(spoken), *SPLITS,
        "--steps", "800", "--lr", "3e-3", "--max-tokens", "200000", "--mask-prob", "0.2", "--mask-channel-prob", "0",
        "--freeze-transformer-steps", "0", "--log-every", "200", "--out", str(out), "--json",
        "--lm", str(tmp_path / "lm.arpa"), env=ONE_THREAD).stdout)
    assert result.metrics["wer_lm"] < result.metrics["wer"] - 0.1, result.metrics
    assert result.metrics["cer_lm"] < result.metrics["cer"], result.metrics
    assert result.hyperparameters["lm_weight"] == 0.5 and "beam search" in result.hyperparameters["decoding"]
    assert result.task == "speech-ctc" and result.label == "random" and result.checkpoint.url == "random"
    assert result.baseline == {"wer": 1.0, "cer": 1.0}  # an empty transcript deletes every reference letter
    assert result.metrics["cer"] <= 0.8, result.metrics
    assert result.metrics["wer"] <= 1.0
    assert result.data.train_samples == 62  # 60 + the 8 kHz and the stereo one (converted); not the untranscribed one
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
    common = ["--data", str(spoken), *SPLITS, "--steps", "0", "--eval-max-tokens", "40000", "--seed", "5", "--json",
              "--labelled", "40s"]
    local = _result(run_d2v("eval", "speech-ctc", "--checkpoint", str(pretrained), *common, env=ONE_THREAD).stdout)
    torchrun = subprocess.run(
        [sys.executable, "-m", "d2v_train.launch", "--standalone", "--nproc_per_node", "2", "d2v_train/eval/main.py",
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
    # the labelled subset is drawn from the whole split's metadata on every rank alike
    assert remote.data.labelled == local.data.labelled and local.data.labelled.seconds <= 40
    assert local.data.labelled.speakers == 2 and local.data.labelled.keys_sha256


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


def test_a_labelled_budget_restricts_the_loader_to_its_utterances(spoken):
    from d2v_train.data.plan import BatchPolicy
    from d2v_train.eval.speech_ctc import labelled_subset

    loader = StreamingLoader(str(spoken), "train-clean-100",
                             BatchPolicy(max_tokens=200_000, shuffle=True, crop=False), workers=1)
    subset = labelled_subset(loader.index, "12", seed=0)
    chosen = set(loader.index.columns["key"][subset.rows].tolist())
    assert len(chosen) == 12 and all(loader.index.columns["transcript"][subset.rows])
    loader.restrict(subset.rows)
    served = [key for _ in range(2) for batch in loader for key in batch["keys"]]  # two epochs
    loader.close()
    assert sorted(served) == sorted(list(chosen) * 2)
    full = StreamingLoader(str(spoken), "train-clean-100", eval_policy(40_000), workers=1)
    everything = labelled_subset(full.index, "all", 0)
    full.close()
    assert everything.samples == 62  # every transcribed utterance (two converted); the untranscribed one is left out


@pytest.mark.slow
def test_the_curve_runs_every_checkpoint_budget_and_seed_and_reports_the_gain(spoken, pretrained, tmp_path):
    out = tmp_path / "curve"
    common = ["--data", str(spoken), *SPLITS, "--steps", "4", "--eval-max-tokens", "40000", "--log-every", "100"]
    done = run_d2v("eval", "curve", "speech-ctc", "--checkpoint", str(pretrained), "--checkpoint", "random",
                   "--model", "speech_tiny", "--budgets", "30s,all", "--seeds", "2", "--jobs", "2",
                   "--out", str(out), *common, env=ONE_THREAD)
    assert done.stdout.strip() == f"wrote {out}/report.md"
    results = sorted((out / "results").glob("*.json"))
    assert [p.name for p in results] == sorted(f"{name}-{budget}-seed{seed}.json" for name in ("pretrained", "random")
                                               for budget in ("30s", "all") for seed in (0, 1))
    parsed = [EvalResult.model_validate_json(p.read_text()) for p in results]
    subsets = {(r.data.labelled.budget, r.data.labelled.keys_sha256) for r in parsed}
    assert len(subsets) == 2  # one subset per budget, whatever the checkpoint and seed
    assert {r.seed for r in parsed} == {0, 1} and all(r.steps == 4 for r in parsed)
    summary = json.loads((out / "curve.json").read_text())
    assert summary["metric"] == "cer" and len(summary["points"]) == 4
    for point in summary["points"]:
        mine = [r.metrics["cer"] for r in parsed if r.label == point["label"] and r.data.labelled.budget == point["budget"]]
        assert sorted(point["values"]) == sorted(mine) and point["mean"] == pytest.approx(sum(mine) / 2)
    page = (out / "report.md").read_text()
    first = page.splitlines()[2]
    assert first.startswith("**Pre-training (step 2)") and "dev-clean CER" in first and "mean of 2 seeds" in first
    assert (out / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # a plain evaluation prints one summary line; the whole result goes to --out
    single = run_d2v("eval", "speech-ctc", "--checkpoint", "random", "--model", "speech_tiny", *common,
                     "--labelled", "30s", "--out", str(tmp_path / "one.json"), env=ONE_THREAD)
    (line,) = single.stdout.strip().splitlines()
    assert line.startswith("speech-ctc random: WER ") and "budget 30s" in line and "{" not in line
    assert EvalResult.model_validate_json((tmp_path / "one.json").read_text()).curve[-1].step == 4
    refused = run_d2v("eval", "curve", "speech-ctc", "--checkpoint", "random", "--model", "speech_tiny",
                      "--budgets", "30s,lots", "--out", str(out), *common, check=False, env=ONE_THREAD)
    assert refused.returncode == 2 and "--budgets 'lots'" in refused.stderr


ACCENTS = str.maketrans({"E": "É", "A": "À", "O": "Ö", "C": "Ç"})


@pytest.mark.slow
def test_a_vocabulary_from_the_data_learns_accented_letters_and_drops_none(tmp_path):
    """The letter-tone corpus with four letters written accented (the tone of E is written É): with
    --vocab data they are output characters, nothing is dropped and CTC learns them."""
    spec = synthetic.make_librispeech(str(tmp_path / "corpus"), {"train-clean-100": 40, "dev-clean": 8}, seed=5,
                                      spoken=True, words=(2, 3))
    for path in (tmp_path / "corpus").rglob("*.trans.txt"):
        lines = [line.split(" ", 1) for line in path.read_text().splitlines()]
        path.write_text("".join(f"{utt} {text.translate(ACCENTS)}\n" for utt, text in lines))
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100", "dev-clean")),
                  Location(str(tmp_path / "data")), BuildOptions(ShardSize.parse("20"), 1, 0), workers=0,
                  echo=lambda *_: None)
    result = _result(run_d2v(
        "eval", "speech-ctc", "--checkpoint", "random", "--model", "speech_tiny", "--data", str(tmp_path / "data"),
        *SPLITS, "--vocab", "data", "--steps", "300", "--lr", "3e-3", "--max-tokens", "200000", "--mask-prob", "0.2",
        "--mask-channel-prob", "0", "--freeze-transformer-steps", "0", "--log-every", "100", "--json",
        env=ONE_THREAD).stdout)
    chosen = result.hyperparameters
    assert chosen["vocab"] == "data" and set("ÉÀÖÇ") <= set(chosen["vocabulary"])
    assert not set("EAOC") & set(chosen["vocabulary"])  # every one of them is written accented
    assert chosen["dropped_characters"] == 0  # no training target lost a character
    # every reference character is scored, accents included (the letters would drop them)
    dev = [line.split(" ", 1)[1] for path in (tmp_path / "corpus").rglob("*.trans.txt") if "dev-clean" in str(path)
           for line in path.read_text().splitlines()]
    assert chosen["chars"] == sum(len(" ".join(text.split())) for text in dev)
    assert any(c in "".join(dev) for c in "ÉÀÖÇ")
    losses = [point.loss for point in result.curve]
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.5, (losses[:3], losses[-3:])  # CTC learns

"""`d2v eval image-probe` / `image-finetune` on a learnable synthetic ImageNet (the tiny vision model):
through the CLI, under torchrun with a padded tail, and on a checkpoint a real pre-training run wrote."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from d2v_train.config import TrainConfig
from d2v_train.eval.image import ImageClassifier, layer_decay_groups, majority_baseline
from d2v_train.models.config import ModelConfig
from d2v_train.models.data2vec import build_encoder
from flows.cli import main as d2v_main
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.storage import Location
from schemas.evaluation import EvalResult
from tests.helpers import REPO, run_d2v

CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 6, 10, 3  # val: 18 images, not a multiple of 2 ranks x 4
BATCH = "4"
CPU = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # tiny models; gloo, so 2 ranks need no 2 GPUs


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("eval_image")
    spec = synthetic.make_imagenet(str(root / "corpus"), layout="imagefolder", classes=CLASSES,
                                   train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS, seed=3, learnable=True)
    build_dataset(ImageNetSource(Location(spec.source), ("train", "val"), image_size=64, patch_size=8),
                  Location(str(root / "data")), BuildOptions(ShardSize.parse("8"), mask_variants=1, seed=1),
                  workers=0, echo=lambda *_: None)
    return str(root / "data")


def _task_args(task: str, data: str, *extra: str, eval_split: str = "val") -> list[str]:
    return ["eval", task, "--data", data, "--train-split", "train", "--eval-split", eval_split, "--batch-size", BATCH,
            "--workers", "1", "--log-every", "1000", "--json", *extra]


@pytest.fixture(scope="module")
def probe_random(data, tmp_path_factory) -> tuple[dict, str, str]:
    """One single-process probe of a random tiny encoder through the CLI: (result, stdout, --out file)."""
    out = str(tmp_path_factory.mktemp("probe") / "results" / "probe.json")
    result = run_d2v(*_task_args("image-probe", data, "--checkpoint", "random", "--model", "vision_tiny",
                                 "--out", out), env=CPU)
    return json.loads(result.stdout), result.stdout, out


def _in_process(capsys, *args: str) -> tuple[int, str, str]:
    code = d2v_main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_probe_of_a_random_encoder_beats_chance_and_counts_each_image_once(probe_random):
    result, stdout, out = probe_random
    assert len(stdout.strip().splitlines()) == 1
    parsed = EvalResult.model_validate(result)
    assert parsed.task == "image-probe" and parsed.label == "random" and parsed.checkpoint.step is None
    assert parsed.metrics["top1"] >= 2 / CLASSES, "a learnable task: well above chance"
    assert parsed.metrics["top5"] >= parsed.metrics["top1"]
    # the balanced train split's trivial predictor: classes 0..4 by index, whatever the image
    assert parsed.baseline == pytest.approx({"top1": 1 / CLASSES, "top5": 5 / CLASSES})
    assert (parsed.data.train_samples, parsed.data.eval_samples) == (CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS)
    assert parsed.steps == 300 == len(parsed.curve) and parsed.world_size == 1
    assert parsed.curve[-1].loss < parsed.curve[0].loss
    with open(out) as f:
        assert json.load(f) == result


def test_finetune_trains_the_classifier_and_scores_the_eval_split(data, capsys, one_torch_thread):
    code, out, err = _in_process(capsys, *_task_args("image-finetune", data, "--checkpoint", "random",
                                                     "--model", "vision_tiny", "--steps", "20"))
    assert code == 0, err
    result = EvalResult.model_validate_json(out)
    assert result.steps == 20 and [p.step for p in result.curve] == list(range(1, 21))
    losses = [p.loss for p in result.curve]
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05
    assert all(0 <= v <= 1 for v in result.metrics.values())
    assert result.data.eval_samples == CLASSES * VAL_PER_CLASS
    assert result.hyperparameters["layer_decay"] == 0.65 and result.hyperparameters["lr"] == 5e-4

    code, out, err = _in_process(capsys, *_task_args("image-finetune", data, "--checkpoint", "random",
                                                     "--model", "vision_tiny", "--steps", "0"))
    assert code == 0, err
    untrained = EvalResult.model_validate_json(out)
    assert untrained.curve == [] and untrained.data.eval_samples == CLASSES * VAL_PER_CLASS


def test_a_labels_per_class_budget_fine_tunes_on_that_many_of_each_class(data, capsys, one_torch_thread):
    code, out, err = _in_process(capsys, *_task_args("image-finetune", data, "--checkpoint", "random",
                                                     "--model", "vision_tiny", "--steps", "3",
                                                     "--labels-per-class", "1", "--batch-size", "16"))
    assert code == 0, err
    result = EvalResult.model_validate_json(out)
    labelled = result.data.labelled
    assert (labelled.budget, labelled.samples, labelled.classes) == ("1/class", CLASSES, CLASSES)
    assert result.data.train_samples == CLASSES  # batches shrink to the few labels there are
    assert "batches of" in err and len(result.curve) == 3
    code, out, err = _in_process(capsys, *_task_args("image-probe", data, "--checkpoint", "random",
                                                     "--model", "vision_tiny", "--steps", "3",
                                                     "--label-fraction", "0.5", "--subset-seed", "4",
                                                     "--crop-pct", "1"))
    assert code == 0, err
    assert EvalResult.model_validate_json(out).hyperparameters["crop_pct"] == 1.0
    probe = EvalResult.model_validate_json(out).data.labelled
    assert probe.samples < CLASSES * TRAIN_PER_CLASS and probe.classes == CLASSES and probe.seed == 4
    code, _, err = _in_process(capsys, *_task_args("image-probe", data, "--checkpoint", "random", "--model",
                                                   "vision_tiny", "--label-fraction", "2"))
    assert code == 2 and "--label-fraction 2.0" in err


def test_mistakes_are_one_clear_line(data, capsys, one_torch_thread):
    random_tiny = ("--checkpoint", "random", "--model", "vision_tiny")
    cases = [
        (_task_args("image-probe", data, *random_tiny, "--image-size", "32"), "--image-size 32: the model takes 64 px"),
        (_task_args("image-probe", data, *random_tiny, eval_split="test"),
         "--eval-split 'test': the dataset has splits train, val"),
        (_task_args("image-probe", data, "--checkpoint", "random", "--model", "speech_tiny"),
         "needs a vision encoder; the checkpoint's model is speech"),
        (_task_args("image-finetune", data, *random_tiny, "--layer-decay", "0"), "--layer-decay 0.0"),
        (_task_args("image-probe", data, *random_tiny, "--crop-pct", "1.5"), "--crop-pct 1.5: need 0 < crop_pct <= 1"),
        (_task_args("image-finetune", data, *random_tiny, "--crop-scale", "0.9,0.2"),
         "--crop-scale (0.9, 0.2): need 0 < min <= max <= 1"),
    ]
    for args, message in cases:
        code, _, err = _in_process(capsys, *args)
        assert code == 2 and message in err, (args, err)


def test_an_unlabelled_split_is_refused_by_name(tmp_path, capsys, one_torch_thread):
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), layout="imagefolder", classes=2, train_per_class=2,
                                   val_per_class=1, unlabelled=3, seed=3, learnable="words")
    build_dataset(ImageNetSource(Location(spec.source), ("unlabeled", "train", "val"), image_size=64, patch_size=8),
                  Location(str(tmp_path / "data")), BuildOptions(ShardSize.parse("8"), mask_variants=1, seed=1),
                  workers=0, echo=lambda *_: None)
    code, _, err = _in_process(capsys, *_task_args("image-probe", str(tmp_path / "data"), "--checkpoint", "random",
                                                   "--model", "vision_tiny", "--train-split", "unlabeled"))
    assert code == 2 and "split 'unlabeled'" in err and "has unlabelled images" in err, err


@pytest.mark.slow
@pytest.mark.torchrun
def test_torchrun_probe_scores_each_image_once_and_matches_one_process(data, probe_random):
    command = [sys.executable, "-m", "d2v_train.launch", "--standalone", "--nproc_per_node", "2",
               "d2v_train/eval/main.py", *_task_args("image-probe", data, "--checkpoint", "random",
                                                     "--model", "vision_tiny")[1:]]
    run = subprocess.run(command, check=False, cwd=REPO, env={**os.environ, **CPU}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, "rank 0 alone prints the result"
    two, one = EvalResult.model_validate_json(lines[0]), EvalResult.model_validate(probe_random[0])
    assert two.world_size == 2 and two.data.eval_samples == one.data.eval_samples == CLASSES * VAL_PER_CLASS
    # each rank keeps the features of its share alone (never all of them: 3.9 GB per rank at
    # ImageNet size), and the data-parallel full-batch fit is the fit of one process
    held = two.hyperparameters["features_per_rank"]
    assert len(held) == 2 and sum(held) == one.hyperparameters["features_per_rank"][0] and max(held) < sum(held)
    assert two.metrics == pytest.approx(one.metrics, abs=1e-6)
    assert [p.loss for p in two.curve] == pytest.approx([p.loss for p in one.curve], rel=1e-4, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["vision_tiny", "vision_v2_tiny"])
def test_probe_of_a_pre_trained_checkpoint_reports_its_step(data, tmp_path, preset):
    run_dir = tmp_path / "run"
    trained = subprocess.run(
        [sys.executable, "d2v_train/main.py", f"model={preset}", f"data.url={data}", "data.split=train",
         "data.batch_size=8", "data.workers=1", "train.max_steps=2", "checkpoint.every_steps=2",
         f"run_dir={run_dir}"],
        check=False, cwd=REPO, env={**os.environ, **CPU}, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-4000:]
    result = run_d2v(*_task_args("image-probe", data, "--checkpoint", str(run_dir / "checkpoints"), "--steps", "50"),
                     env=CPU)
    parsed = EvalResult.model_validate_json(result.stdout)
    assert parsed.checkpoint.step == 2 and parsed.label == "step 2"
    assert parsed.checkpoint.url.endswith("step-00000002") and parsed.steps == 50
    assert parsed.metrics["top1"] >= 2 / CLASSES


def test_layer_decay_gives_blocks_geometric_rates_and_exempts_1d_parameters():
    model_cfg = ModelConfig.model_validate(TrainConfig._preset("vision_tiny"))
    model = ImageClassifier(build_encoder(model_cfg), model_cfg.encoder.dim, classes=5)
    groups = layer_decay_groups(model.named_parameters(), layers=2, decay=0.5, weight_decay=0.05)
    assigned = {id(p): (g["lr_scale"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(assigned) == len(list(model.parameters()))
    named = dict(model.named_parameters())
    expected = {
        "encoder.frontend.patch_embed.weight": (0.125, 0.05), "encoder.frontend.cls_token": (0.125, 0.0),
        "encoder.transformer.blocks.0.attn.qkv.weight": (0.25, 0.05),
        "encoder.transformer.blocks.1.ffn.fc1.bias": (0.5, 0.0),
        "encoder.frontend.rel_pos_bias.table": (1.0, 0.05),  # shared by every block: the top rate (BEiT)
        "encoder.transformer.final_norm.weight": (1.0, 0.0), "norm.bias": (1.0, 0.0), "head.weight": (1.0, 0.05),
    }
    for name, rate_and_decay in expected.items():
        assert assigned[id(named[name])] == rate_and_decay, name
    flat = layer_decay_groups(model.named_parameters(), layers=2, decay=1.0, weight_decay=0.05)
    assert {g["lr_scale"] for g in flat} == {1.0}
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--layer-decay"):
            layer_decay_groups(model.named_parameters(), layers=2, decay=bad, weight_decay=0.05)


def test_the_fine_tuning_head_starts_near_zero():
    model_cfg = ModelConfig.model_validate(TrainConfig._preset("vision_tiny"))
    torch.manual_seed(0)
    model = ImageClassifier(build_encoder(model_cfg), model_cfg.encoder.dim, classes=5).eval()
    with torch.no_grad():
        logits_BC = model(torch.randn(2, 3, 64, 64))
    assert logits_BC.shape == (2, 5) and logits_BC.abs().max() < 0.01


def test_majority_baseline_ranks_train_classes_by_frequency():
    train_N = np.array([2, 2, 1, 0, 1, 2])  # counts 1, 2, 3 for classes 0, 1, 2; none for 3..6
    eval_M = np.array([2, 1, 0, 3, 6])  # top-5 answers 2, 1, 0, 3, 4
    assert majority_baseline(train_N, eval_M, classes=7) == pytest.approx({"top1": 1 / 5, "top5": 4 / 5})

"""Each evaluation task's validated config: its command-line options are made from its fields
(every field an option, the same defaults), a value that cannot work names its option, the speech
recipe fills only what was left out, and the flow refuses a wrong evaluation option up front."""
from __future__ import annotations

import pytest

from d2v_train.eval.config import TASK_CONFIGS, ImageEvalConfig, SpeechCTCConfig, TextClsConfig
from d2v_train.eval.tasks import TASKS, parse_task, task_parser

REQUIRED = ["--checkpoint", "random", "--data", "/d", "--train-split", "a", "--eval-split", "b"]


@pytest.mark.parametrize("task", list(TASKS))
def test_every_field_is_an_option_with_the_models_default(task):
    cfg = parse_task(task, REQUIRED)
    model = TASK_CONFIGS[task]
    assert type(cfg) is model and cfg.task == task
    flags = {flag for action in task_parser(task)._actions for flag in action.option_strings}
    for name, field in model.model_fields.items():
        if name == "task":
            continue
        assert f"--{name.replace('_', '-')}" in flags, name
        if not field.is_required():
            assert getattr(cfg, name) == field.default, name
    assert {"--out", "--json"} <= flags


@pytest.mark.parametrize(("task", "argv", "message"), [
    ("speech-ctc", ["--steps", "-1"], "--steps must be >= 0"),
    ("speech-ctc", ["--mask-prob", "1"], "--mask-prob must be in [0, 1)"),
    ("text-cls", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("image-probe", ["--crop-pct", "1.5"], "--crop-pct 1.5: need 0 < crop_pct <= 1"),
    ("image-finetune", ["--crop-scale", "0.9,0.2"], "--crop-scale (0.9, 0.2): need 0 < min <= max <= 1"),
    ("image-finetune", ["--label-smoothing", "1"], "--label-smoothing 1.0: expected a value in [0, 1)"),
    ("text-cls", ["--no-such-option", "1"], "unrecognized arguments: --no-such-option"),
])
def test_a_value_that_cannot_work_is_one_error_naming_its_option(task, argv, message):
    with pytest.raises(ValueError) as caught:
        parse_task(task, [*REQUIRED, *argv], raising=True)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_options_parse_into_typed_values_and_the_budget_options_exclude_each_other():
    cfg = parse_task("image-finetune", [*REQUIRED, "--crop-scale", "0.5,1", "--labels-per-class", "4"])
    assert isinstance(cfg, ImageEvalConfig) and cfg.crop_scale == (0.5, 1.0) and cfg.labels_per_class == 4
    with pytest.raises(ValueError, match="not allowed with argument"):
        parse_task("image-probe", [*REQUIRED, "--labels-per-class", "4", "--label-fraction", "0.1"], raising=True)
    speech = parse_task("speech-ctc", [*REQUIRED, "--train-feature-encoder"])
    assert isinstance(speech, SpeechCTCConfig) and speech.train_feature_encoder is True
    assert isinstance(parse_task("text-cls", REQUIRED), TextClsConfig)


def test_the_speech_recipe_fills_only_the_options_left_out():
    from d2v_train.eval.speech_ctc import RECIPES, with_recipe

    given = parse_task("speech-ctc", [*REQUIRED, "--steps", "100", "--mask-prob", "0"])
    filled, name = with_recipe(given, dim=64)
    assert name == "small" and (filled.steps, filled.mask_prob) == (100, 0.0)
    assert filled.lr == RECIPES["small"]["lr"] and filled.max_tokens == RECIPES["small"]["max_tokens"]
    assert filled.freeze_transformer_steps == int(100 * RECIPES["small"]["freeze_share"])
    base, name = with_recipe(parse_task("speech-ctc", REQUIRED), dim=768)
    assert name == "base" and base.steps == RECIPES["base"]["steps"]
    assert base.freeze_transformer_steps == int(RECIPES["base"]["steps"] * RECIPES["base"]["freeze_share"])
    assert given.lr is None  # the caller's config is left as it was


def test_the_flow_refuses_a_wrong_evaluation_option_before_any_stage():
    from pydantic import ValidationError

    from flows.pretrain import PretrainRequest

    with pytest.raises(ValidationError, match="eval_args: .*--crop-pct 2.0"):
        PretrainRequest(modality="vision", source="/c", output="/o", eval_args=["--crop-pct", "2"])
    with pytest.raises(ValidationError, match="eval_args: .*unrecognized arguments: --max-tokens"):
        PretrainRequest(modality="text", source="/c", output="/o", eval_args=["--max-tokens", "10"])
    request = PretrainRequest(modality="speech", source="/c", output="/o", eval_args=["--lr", "3e-3"])
    assert parse_task("speech-ctc", ["--checkpoint", "random", *request.eval_task_options()]).lr == 3e-3

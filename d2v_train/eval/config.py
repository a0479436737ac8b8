"""Each evaluation task's settings as one validated model, as the trainer has TrainConfig.

The fields are the single definition of a task's options: `d2v eval TASK` makes its command-line
options from them (name, type, default, help), the CLI and torchrun (d2v_train/eval/main.py) parse
into them, the curve and the flow build them from command lines, and the tasks read them. A value
that cannot work is an error naming its option, before any model is loaded.
"""
from __future__ import annotations

import argparse
import types
import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from d2v_train.data.transforms import ImageTransform


def option(default=None, help: str = "", **cli):
    """A field that is also a command-line option; `cli`: argparse extras (metavar, group: the name
    of a mutually exclusive group)."""
    return Field(default, description=help, json_schema_extra={"cli": cli} if cli else None)


class EvalConfig(BaseModel):
    """What every task takes."""

    model_config = ConfigDict(extra="forbid")

    task: str
    checkpoint: str = option(..., "checkpoint folder/URL, a run's checkpoint folder (newest complete one), or 'random'")
    model: str | None = option(None, "with --checkpoint random: a preset (speech_tiny), a YAML file or a checkpoint URL")
    data: str = option(..., "the downstream data (URL)")
    train_split: str = option(..., "the labelled split to fine-tune on")
    eval_split: str = option(..., "the split to score")
    steps: int | None = option(None, "fine-tuning updates (task default if omitted)")
    lr: float | None = option(None, "peak learning rate (task default if omitted)")
    batch_size: int | None = option(None, "per rank (task default if omitted)")
    seed: int = option(0, "fine-tuning seed (head, batches, masks)")
    subset_seed: int = option(0, "seed of the labelled subset a budget draws (kept apart from --seed, so that "
                                 "fine-tuning seeds vary the training, not the labels)")
    workers: int = option(2, "loader threads per rank")
    log_every: int = option(10, "updates between progress lines")
    label: str | None = option(None, "the name reports give this run (default: step or 'random')")

    @field_validator("steps", "batch_size")
    @classmethod
    def _counts(cls, value, info):
        least = {"steps": 0, "batch_size": 1}[info.field_name]
        if value is not None and value < least:
            raise ValueError(f"--{info.field_name.replace('_', '-')} must be >= {least}")
        return value


class SpeechCTCConfig(EvalConfig):
    task: Literal["speech-ctc"] = "speech-ctc"
    labelled: str = option("all", "labelled-data budget drawn from the train split, balanced over speakers: a "
                                  "duration (10m, 1h, 90s), an utterance count (48) or 'all' (default)")
    max_tokens: int | None = option(None, "audio samples per training batch per rank (whole utterances, padded; "
                                          "default: the recipe's, 200,000 for encoders narrower than 256, else "
                                          "1,600,000)")
    eval_max_tokens: int | None = option(None, "per evaluation batch (default: --max-tokens)")
    mask_prob: float | None = option(None, "time-span masking while fine-tuning (0: none; default: the recipe's, "
                                           "0.2 or 0.65)")
    mask_length: int = option(10, "frames per masked time span")
    mask_channel_prob: float | None = option(None, "channel-span masking (0: none; default: the recipe's, 0 or 0.1)")
    mask_channel_length: int = option(64, "capped at a quarter of the model width")
    freeze_transformer_steps: int | None = option(None, "updates that train only the output layer (default: the "
                                                        "recipe's share of --steps, a half or a tenth)")
    train_feature_encoder: bool = option(False, "also fine-tune the CNN (frozen by default)")
    dropout: float = option(0.0, "Transformer dropout and attention dropout")
    activation_dropout: float = option(0.1, "dropout inside the feed-forward blocks")
    layer_drop: float = option(0.05, "probability of skipping a block per update")
    lm: str | None = option(None, "a word n-gram LM (ARPA or KenLM binary, any URL; `d2v lm build` makes one): "
                                  "scores are then also given for beam search with it (wer_lm, cer_lm)")
    lm_weight: float = option(0.5, "the LM's weight in the beam search (alpha)")
    word_score: float = option(1.0, "score added per word (beta): longer outputs against the LM's brevity")
    beam: int = option(50, "beams kept by the LM beam search")
    vocab: Literal["letters", "data"] = option("letters", "output characters: letters (blank, |, A-Z, '; LibriSpeech, "
                                                          "the default) or data (every character of the labelled "
                                                          "transcripts: other languages keep theirs)")

    @field_validator("mask_prob")
    @classmethod
    def _mask_prob(cls, value):
        if value is not None and not 0 <= value < 1:
            raise ValueError("--mask-prob must be in [0, 1)")
        return value


class ImageEvalConfig(EvalConfig):
    task: Literal["image-probe", "image-finetune"]
    labels_per_class: int | None = option(None, "labelled-data budget: K images of each class of the train split",
                                          group="budget")
    label_fraction: float | None = option(None, "labelled-data budget: this fraction of each class (0.01, 0.1: "
                                                "ImageNet's 1%% and 10%%)", group="budget")
    image_size: int | None = option(None, "default: the model's")
    crop_pct: float = option(ImageTransform.crop_pct, "scored pictures: centre crop / resized shorter side "
                                                      "(1: the whole picture)")
    crop_scale: tuple[float, float] = option(ImageTransform.crop_scale, "fine-tuning pictures: RandomResizedCrop's "
                                             "area range (1,1: the whole picture)", metavar="MIN,MAX")
    hflip: float = option(ImageTransform.hflip, "fine-tuning pictures: flip probability")
    weight_decay: float | None = option(None, "task default if omitted")
    label_smoothing: float = option(0.1, "fine-tuning only")
    layer_decay: float = option(0.65, "fine-tuning only: LR of block i is lr * decay^(layers - i) (BEiT); 1 disables")

    @field_validator("label_smoothing")
    @classmethod
    def _label_smoothing(cls, value):
        if not 0 <= value < 1:
            raise ValueError(f"--label-smoothing {value}: expected a value in [0, 1)")
        return value

    @model_validator(mode="after")
    def _transform(self) -> ImageEvalConfig:
        self.image_transform()
        return self

    def image_transform(self) -> ImageTransform:
        """--crop-scale, --hflip (fine-tuning) and --crop-pct (scoring); a bad value names its option."""
        try:
            return ImageTransform(crop_scale=tuple(self.crop_scale), hflip=self.hflip, crop_pct=self.crop_pct)
        except ValueError as e:
            name = next(o for o in ("crop_scale", "hflip", "crop_pct") if str(e).startswith(o))
            raise ValueError(f"--{name.replace('_', '-')} {str(e)[len(name) + 1:]}") from None


class TextClsConfig(EvalConfig):
    task: Literal["text-cls"] = "text-cls"
    train_limit: int | None = option(None, "labelled-data budget: at most N training examples, balanced over labels")
    tokenizer: str | None = option(None, "tokenizer folder/URL (default: the one of the dataset the checkpoint was "
                                         "pre-trained on)")
    max_length: int = option(512, "tokens per example, <s> and </s> included")
    glue_task: str | None = option(None, "CoLA, SST-2, MRPC, QQP, MNLI, QNLI, RTE, WNLI (default: from the data "
                                         "folder's name); picks the columns and the headline metric")
    weight_decay: float = option(0.1, "AdamW weight decay")


TASK_CONFIGS: dict[str, type[EvalConfig]] = {
    "speech-ctc": SpeechCTCConfig, "image-probe": ImageEvalConfig, "image-finetune": ImageEvalConfig,
    "text-cls": TextClsConfig,
}
# options of the command, not of the task: where the result goes and how it is printed
OUTPUT_OPTIONS = ("out", "json")


def add_options(parser: argparse.ArgumentParser, task: str) -> None:
    """The task's options, made from its config's fields, then the output options."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for name, field in TASK_CONFIGS[task].model_fields.items():
        if name == "task":
            continue
        cli = (field.json_schema_extra or {}).get("cli", {})
        target = parser
        if "group" in cli:
            if cli["group"] not in groups:
                groups[cli["group"]] = parser.add_mutually_exclusive_group()
            target = groups[cli["group"]]
        flag, kind = f"--{name.replace('_', '-')}", _base_type(field.annotation)
        if kind is bool:
            target.add_argument(flag, action="store_true", help=field.description)
            continue
        extra = {"required": True} if field.is_required() else {"default": field.default}
        if "metavar" in cli:
            extra["metavar"] = cli["metavar"]
        if kind is typing.Literal:
            extra["choices"], kind = list(typing.get_args(field.annotation)), str
        target.add_argument(flag, type=_pair if kind is tuple else kind, help=field.description, **extra)
    parser.add_argument("--out", default=None, help="write the whole result JSON here (any fsspec URL)")
    parser.add_argument("--json", action="store_true",
                        help="print the whole result as one JSON line instead of the one-line summary")


def _base_type(annotation):
    """int for `int | None`, tuple for `tuple[float, float]`, ..."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN,MAX, e.g. 0.08,1") from None
    return lo, hi


def from_namespace(task: str, args: argparse.Namespace) -> EvalConfig:
    """The config of parsed options (the output options and the sub-command's name left out)."""
    fields = TASK_CONFIGS[task].model_fields
    return validated(task, {k: v for k, v in vars(args).items() if k in fields and k != "task"})


def validated(task: str, settings: dict) -> EvalConfig:
    """TASK_CONFIGS[task] of `settings`; an error is one line naming the option."""
    try:
        return TASK_CONFIGS[task].model_validate({**settings, "task": task})
    except ValidationError as exc:
        item = exc.errors()[0]
        message = item["msg"].removeprefix("Value error, ")
        if message.startswith("--"):
            raise ValueError(message) from None
        where = ".".join(str(part) for part in item["loc"]).replace("_", "-")
        raise ValueError(f"--{where}: {message}") from None

"""The trainer's configuration: one validated model, from a YAML file plus `key.sub=value` overrides.

Unknown keys and bad values are errors that name the field. The model part is a preset name
(`speech_tiny` -> configs/speech_tiny.yaml), a path, or the model config itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from d2v_train.data.mix import MixPart
from d2v_train.data.plan import BatchPolicy, check_batch_settings
from d2v_train.data.transforms import ImageTransform
from d2v_train.models.config import ModelConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceConfig(_Strict):
    """One part of a mix (data.sources): a split of a dataset, with a weight or a repeat count."""

    url: str  # the dataset (folder holding dataset.json), any fsspec URL
    split: str = "train"
    weight: float | None = Field(None, gt=0)  # share of each epoch's samples, relative to the others'
    repeat: float | None = Field(None, gt=0)  # times each sample appears per epoch (0.5: a seeded half)
    name: str | None = None  # in metrics (default: the split, or URL#split)

    @model_validator(mode="after")
    def _one_rule(self) -> SourceConfig:
        if self.weight is not None and self.repeat is not None:
            raise ValueError("give weight or repeat, not both")
        return self


class DataConfig(_Strict):
    url: str | None = None  # the dataset (folder holding dataset.json), any fsspec URL
    split: str = "train"
    splits: list[str] | None = None  # several splits of data.url in one run (instead of data.split)
    sources: list[SourceConfig] | None = None  # several datasets mixed (instead of data.url)
    max_tokens: int | None = Field(None, gt=0)  # speech: audio samples per batch (per rank)
    batch_size: int | None = Field(None, gt=0)  # images, text (per rank)
    min_sample_size: int = BatchPolicy.min_sample_size
    max_sample_size: int = BatchPolicy.max_sample_size
    shuffle_block: int = Field(BatchPolicy.shuffle_block, ge=1)
    workers: int = Field(2, ge=1)
    io_threads: int = Field(8, ge=1)
    cache_dir: str | None = None
    skip_bad_shards: bool = False
    # images: RandomResizedCrop's area range and the flip probability (ImageNet's by default)
    crop_scale: tuple[float, float] = ImageTransform.crop_scale
    hflip: float = ImageTransform.hflip

    @field_validator("crop_scale", "hflip")
    @classmethod
    def _image_transform(cls, value, info):
        ImageTransform(**{info.field_name: value})  # the loader's own check
        return value

    @model_validator(mode="after")
    def _one_way_to_name_the_data(self) -> DataConfig:
        if self.sources is not None:
            if self.url is not None or self.splits is not None:
                raise ValueError("data.sources names every dataset of the mix: leave out data.url and data.splits")
            if not self.sources:
                raise ValueError("data.sources: name at least one source")
            weighted = [s.weight is not None for s in self.sources]
            if any(weighted) and not all(weighted):
                raise ValueError("data.sources: give every source a weight, or none (then each one's repeat "
                                 "count applies, default 1)")
        elif self.url is None:
            raise ValueError("data.url: the dataset to train on is missing (or give data.sources)")
        if self.splits is not None and (not self.splits or len(set(self.splits)) != len(self.splits)):
            raise ValueError("data.splits: name one or more different splits")
        return self

    def mix(self) -> list[MixPart] | None:
        """The parts of a mix (several splits or datasets), or None for one split of one dataset."""
        if self.sources is not None:
            return [MixPart(s.url, s.split, s.weight, s.repeat, s.name) for s in self.sources]
        if self.splits is not None:
            return [MixPart(self.url, split) for split in self.splits]
        return None

    @property
    def urls(self) -> list[str]:
        """Every dataset the run reads, the first one first."""
        return list(dict.fromkeys(s.url for s in self.sources)) if self.sources is not None else [self.url]

    @property
    def describe(self) -> str:
        """The data in one phrase, for messages."""
        if self.sources is not None:
            return " + ".join(f"{s.url}#{s.split}" for s in self.sources)
        return f"{self.url}#{'+'.join(self.splits) if self.splits else self.split}"

    @model_validator(mode="after")
    def _batch_plan(self) -> DataConfig:
        check_batch_settings(batch_size=self.batch_size, max_tokens=self.max_tokens,
                             min_sample_size=self.min_sample_size, max_sample_size=self.max_sample_size,
                             shuffle_block=self.shuffle_block, prefix="data.")
        return self

    def policy(self) -> BatchPolicy:
        """The training batch plan these settings describe."""
        return BatchPolicy(batch_size=self.batch_size, max_tokens=self.max_tokens, min_sample_size=self.min_sample_size,
                           max_sample_size=self.max_sample_size, shuffle_block=self.shuffle_block)


class OptimConfig(_Strict):
    lr: float = Field(5e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = Field(0.01, ge=0)
    schedule: Literal["tri_stage", "cosine", "constant"] = "tri_stage"
    warmup: float = Field(0.03, ge=0, le=1)  # fraction of max_steps
    hold: float = Field(0.90, ge=0, le=1)  # tri-stage only
    final_lr_scale: float = Field(0.05, ge=0, le=1)
    clip_norm: float | None = Field(None, gt=0)


class LossScaleConfig(_Strict):
    """fp16's dynamic loss scale (fairseq's and torch's GradScaler's rule): an update whose gradients
    overflow is skipped and the scale halved; `window` overflow-free updates in a row double it;
    a scale below `min` stops the run (the model no longer fits fp16's range)."""

    init: float = Field(128.0, gt=0)
    window: int = Field(1000, ge=1)
    min: float = Field(1e-4, gt=0)


class ProfileConfig(_Strict):
    """Profiles on demand: a torch profiler trace of updates `steps` = [first, last] (1-based, as
    logged) per rank in run_dir/profile (Chrome/Perfetto JSON, readable by TensorBoard's profiler
    plugin), and with `memory_snapshot` a CUDA memory snapshot of the same updates."""

    steps: tuple[int, int] | None = None
    memory_snapshot: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> ProfileConfig:
        if self.steps is not None and not 1 <= self.steps[0] <= self.steps[1]:
            raise ValueError(f"steps: need 1 <= first <= last, got {list(self.steps)}")
        if self.memory_snapshot and self.steps is None:
            raise ValueError("memory_snapshot: set profile.steps to say which updates it covers")
        return self


class LoopConfig(_Strict):
    max_steps: int = Field(gt=0)
    seed: int = 0
    grad_accum: int = Field(1, ge=1)
    log_every: int = Field(1, ge=1)
    # bf16/fp16: FSDP computes in that dtype, keeps fp32 weights and reduces gradients in fp32;
    # fp16 also scales the loss (train.loss_scale) so that small gradients do not underflow
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_scale: LossScaleConfig = Field(default_factory=lambda: LossScaleConfig())
    deterministic: bool = False
    log_keys: bool = False  # each rank appends {"step", "epoch", "keys"} lines to run_dir/keys-rank{r}.jsonl
    activation_checkpointing: bool = False  # recompute each student block's activations in backward
    compile: bool = False  # torch.compile each Transformer block (~1.0x on CPU: for GPUs)


class CheckpointConfig(_Strict):
    url: str | None = None  # default: {run_dir}/checkpoints
    every_steps: int = Field(1000, ge=1)
    keep: int = Field(3, ge=1)
    async_save: bool = False  # write in a background thread while training goes on
    # resume even where the model or the batch plan differs from the checkpoint's (refused otherwise)
    allow_changes: bool = False


class GuardConfig(_Strict):
    """DATA2VEC.md's collapse guard, and what a non-finite loss does."""

    collapse_after: int = Field(5000, ge=0)  # updates before the guard is armed
    min_target_std: float = 0.1
    min_pred_std: float = 0.01
    # effective rank of the targets (loss.effective_rank; the per-channel std cannot see channels
    # that collapse onto a few directions); None = logged, not guarded
    min_target_rank: float | None = Field(None, gt=0)
    nonfinite: Literal["stop", "skip"] = "stop"
    # consecutive skipped steps (non-finite with nonfinite=skip, or every batch lost to bad shards)
    # that stop the run; None: no cap
    max_skipped_steps: int | None = Field(100, ge=1)


class InitConfig(_Strict):
    """Where a new run's weights come from: a d2v checkpoint (`d2v import hf|fairseq` writes one
    from released weights), or None for a seeded random initialisation."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str | None = Field(None, alias="from")  # init.from=CHECKPOINT: its encoder, a fresh optimizer, step 0


class TrainConfig(_Strict):
    model: ModelConfig
    data: DataConfig
    init: InitConfig = InitConfig()
    optim: OptimConfig = OptimConfig()
    train: LoopConfig
    checkpoint: CheckpointConfig = CheckpointConfig()
    guard: GuardConfig = GuardConfig()
    profile: ProfileConfig = ProfileConfig()
    run_dir: str = "runs/d2v"

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, value):
        """A preset name or a YAML path stands for the model config it holds."""
        if isinstance(value, str):
            path = Path(value)
            if not path.suffix:
                path = CONFIGS / f"{value}.yaml"
            if not path.exists():
                raise ValueError(f"no model preset {value!r} (looked for {path})")
            return yaml.safe_load(path.read_text())
        return value

    @model_validator(mode="after")
    def _crop_holds_a_frame(self) -> TrainConfig:
        field = getattr(self.model.frontend, "receptive_field", None)  # speech: samples one frame needs
        if field is not None:
            if self.data.max_sample_size < field:
                raise ValueError(f"data.max_sample_size ({self.data.max_sample_size}) is shorter than one frame of "
                                 f"the model's feature encoder ({field} samples)")
        return self

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or f"{self.run_dir.rstrip('/')}/checkpoints"


def describe(error: ValidationError) -> str:
    """One line per wrong field: `train.max_stepz: Extra inputs are not permitted (got 3)`."""
    lines = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "(top level)"
        given = f" (got {item['input']!r})" if item["type"] != "missing" and not isinstance(item["input"], dict) else ""
        lines.append(f"{field}: {item['msg']}{given}")
    return "\n".join(lines)


def load_train_config(path: str | None, overrides: list[str]) -> TrainConfig:
    data = _yaml(Path(path).read_text(), path) if path else {}
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key.sub=value")
        _set(data, key.split("."), _yaml(raw, f"override {item!r}"))
    return TrainConfig.model_validate(data)


def _yaml(text: str, where: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{where}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None


def _set(tree: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        node = tree.get(key)
        if isinstance(node, str) and key == "model":  # a preset being edited: expand it first
            node = TrainConfig._preset(node)
        if not isinstance(node, dict):
            node = {}
        tree[key] = node
        tree = node
    tree[keys[-1]] = value

"""The evaluation result: what `d2v eval` prints and writes, and what reports and flows read.

One JSON object per run, so results from different checkpoints, tasks and machines can be
compared without re-running anything.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

EVAL_SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 2 added the labelled-data budget (DataRef.labelled)
TASKS = ("speech-ctc", "image-probe", "image-finetune", "text-cls")


class CheckpointRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str  # the checkpoint folder used, or "random"
    step: int | None = None  # pre-training updates behind it (None: random initialisation)
    model: str  # modality and size, e.g. "speech dim=64 layers=2"
    parameters: int  # encoder parameters


class LabelledSubset(BaseModel):
    """The labelled-data budget a fine-tune used: what was asked for and what it amounted to."""

    model_config = ConfigDict(extra="forbid")

    budget: str  # as asked: "10m", "48" (samples), "4/class", "0.1" (of each class), "all"
    samples: int  # labelled samples drawn from the train split
    seconds: float | None = None  # speech: their audio
    speakers: int | None = None  # speech: speakers among them
    classes: int | None = None  # images and text: classes (labels) among them
    seed: int = 0  # the subset's seed (the same subset for every checkpoint and world size)
    keys_sha256: str | None = None  # of the sorted sample keys drawn: equal fingerprints, equal subsets


class DataRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str
    train_split: str
    eval_split: str
    train_samples: int  # distinct samples the fine-tune could draw from
    eval_samples: int  # samples scored (each exactly once)
    labelled: LabelledSubset | None = None  # the budget drawn from train_split (None: the whole split)


class CurvePoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step: int
    loss: float
    lr: float


class EvalResult(BaseModel):
    # an error rate against empty references is inf: keep it (as JSON's Infinity), never null
    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")

    version: int = EVAL_SCHEMA_VERSION
    task: str
    label: str  # how reports name this run (default: "pre-trained@step" or "random")
    metrics: dict[str, float]  # e.g. wer, cer (fractions); top1, top5; accuracy, f1, mcc
    baseline: dict[str, float] = Field(default_factory=dict)  # the trivial predictor on the same data
    checkpoint: CheckpointRef
    data: DataRef
    steps: int  # fine-tuning updates (0 for a probe fitted in closed form)
    world_size: int = 1
    seed: int = 0
    hyperparameters: dict = Field(default_factory=dict)
    curve: list[CurvePoint] = Field(default_factory=list)
    elapsed_s: float = 0.0

"""What the flow `pretrain` does differently per modality, one object each: the corpus splits it
builds by default, the build parameters a finished dataset must record, the source it builds
from, the trainer's batch settings, and the evaluation task with its data, options and labelled
budgets. The flow itself reads these alone; a new modality is a new object here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlowModality:
    name: str
    eval_task: str  # the `d2v eval` task of the curve
    splits: tuple[str, ...] | None  # corpus splits built by default (None: the source splits by itself)
    # Labelled-data budgets of the evaluation curve ("all" is the whole split)
    budgets: tuple[str, ...]
    train_data: tuple[str, ...]  # the trainer's batch settings at base and large size
    tiny_train_data: tuple[str, ...]  # at tiny size (CPU)
    tiny_eval_args: tuple[str, ...]  # `d2v eval TASK` options at tiny size

    def check(self, req) -> None:
        """Refuse, naming the parameter, what this modality cannot do with the request."""

    def build_params(self, req) -> dict:
        """The build parameters beyond the common ones that a reusable dataset.json must record."""
        return {"splits": list(req.splits)}

    def source(self, req):
        """The corpus source to build, from pipelines.sources.registry."""
        raise NotImplementedError

    def eval_data_options(self, req) -> list[str]:
        """`d2v eval TASK`'s data and split options."""
        return ["--data", req.url("dataset"), "--train-split", req.finetune_split, "--eval-split", req.scored_split]

    def skips_evaluation(self, req) -> str | None:
        """Why the request has nothing to evaluate on, or None."""
        return None


def _from_registry(modality: str, inputs, **options):
    from pipelines.sources.registry import BY_MODALITY, make_source

    return make_source(BY_MODALITY[modality].name, inputs, **options)


class SpeechFlow(FlowModality):
    def build_params(self, req):
        return {"subsets": list(req.splits)}

    def source(self, req):
        from pipelines.storage import Location

        return _from_registry(self.name, [Location(req.source)], subsets=tuple(req.splits))


class VisionFlow(FlowModality):
    def build_params(self, req):
        return {"splits": list(req.splits), **image_geometry(req.model)}

    def source(self, req):
        from pipelines.storage import Location

        return _from_registry(self.name, [Location(req.source)], splits=tuple(req.splits), **image_geometry(req.model))


class TextFlow(FlowModality):
    def check(self, req):
        if req.splits is not None:
            raise ValueError("splits: text corpora are split by document (train/valid), not chosen")
        if req.labelled_split or req.eval_split:
            raise ValueError("labelled_split/eval_split: text is evaluated on eval_data's GLUE train/dev files")

    def build_params(self, req):
        return {"vocab_size": req.vocab_size}

    def source(self, req):
        """A folder of .txt files (or one file); the BPE trained on the corpus."""
        from pipelines.sources.text import corpus_files
        from pipelines.storage import Location

        return _from_registry(self.name, corpus_files(Location(req.source)), vocab_size=req.vocab_size, seed=req.seed)

    def eval_data_options(self, req):
        # GLUE's splits; the tokenizer of the pre-training data for both encoders
        return ["--data", req.eval_data or "", "--train-split", "train", "--eval-split", "dev",
                "--tokenizer", req.url("dataset", "tokenizer")]

    def skips_evaluation(self, req):
        return None if req.eval_data else "text: no eval_data (a GLUE-format folder) given: skipping evaluation"


def image_geometry(model: str) -> dict:
    """Images are resized and masked for the model preset's patch grid, so the build follows it."""
    import yaml

    from d2v_train.config import CONFIGS

    frontend = yaml.safe_load((CONFIGS / f"{model}.yaml").read_text())["frontend"]
    return {"image_size": frontend["image_size"], "patch_size": frontend["patch_size"]}


FLOW_MODALITIES: dict[str, FlowModality] = {m.name: m for m in (
    SpeechFlow("speech", "speech-ctc", ("train-clean-100", "dev-clean"),
               budgets=("10m", "all"),  # Libri-light style durations
               train_data=("data.max_tokens=1400000", "data.min_sample_size=32000", "data.max_sample_size=320000"),
               tiny_train_data=("data.max_tokens=160000", "data.min_sample_size=16000", "data.max_sample_size=48000",
                                "data.workers=2"),
               tiny_eval_args=("--max-tokens", "200000")),
    VisionFlow("vision", "image-probe", ("train", "val"),
               budgets=("1%", "10%", "all"),  # ImageNet's 1% / 10% semi-supervised protocols
               train_data=("data.batch_size=64",), tiny_train_data=("data.batch_size=8", "data.workers=1"),
               tiny_eval_args=("--batch-size", "8")),
    TextFlow("text", "text-cls", None, budgets=("100", "all"),  # example counts
             train_data=("data.batch_size=32",), tiny_train_data=("data.batch_size=4", "data.workers=1"),
             tiny_eval_args=("--batch-size", "4")),
)}

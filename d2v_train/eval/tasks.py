"""The evaluation tasks: their modules, their command-line parsers (made from their config models,
d2v_train.eval.config) and one run of a task (`d2v eval TASK`, and each run of `d2v eval curve`)."""
from __future__ import annotations

import argparse
import time
from importlib import import_module

from d2v_train.eval.config import EvalConfig, add_options, from_namespace

# task -> module with evaluate(cfg, world, backbone) -> EvalResult (its settings: config.TASK_CONFIGS)
TASKS = {
    "speech-ctc": "d2v_train.eval.speech_ctc",
    "image-probe": "d2v_train.eval.image",
    "image-finetune": "d2v_train.eval.image",
    "text-cls": "d2v_train.eval.text_cls",
}
HELP = {
    "speech-ctc": "CTC fine-tuning on transcribed speech shards -> WER and CER (greedy decoding)",
    "image-probe": "linear probe on frozen mean-pooled features -> top-1 and top-5",
    "image-finetune": "full fine-tuning (mean pool + LayerNorm + linear) -> top-1 and top-5",
    "text-cls": "sentence (pair) classification from GLUE-format TSV files -> accuracy, F1, MCC",
}


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str):
        raise ValueError(f"{self.prog}: {message}")


def task_parser(task: str, *, raising: bool = False) -> argparse.ArgumentParser:
    """The options of `d2v eval TASK` alone (the curve parses each of its runs with it); `raising`:
    a wrong option is a ValueError instead of a usage message and exit 2 (callers that go on)."""
    parser = (_RaisingParser if raising else argparse.ArgumentParser)(prog=f"d2v eval {task}", description=HELP[task])
    add_options(parser, task)
    return parser


def parse_task(task: str, argv: list[str], *, raising: bool = False) -> EvalConfig:
    """A `d2v eval TASK` command line as the task's config (the output options left out)."""
    return from_namespace(task, task_parser(task, raising=raising).parse_args(argv))


def evaluate_once(cfg: EvalConfig, world):
    """Load the backbone, run the task, time it: the EvalResult of one `d2v eval TASK`."""
    from d2v_train.eval.backbone import load_backbone

    started = time.monotonic()
    backbone = load_backbone(cfg.checkpoint, cfg.model, seed=cfg.seed)
    backbone.encoder.to(world.device)
    result = import_module(TASKS[cfg.task]).evaluate(cfg, world, backbone)
    result.elapsed_s = time.monotonic() - started
    return result

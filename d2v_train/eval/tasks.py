"""The evaluation tasks: their modules, options and one run of a task (`d2v eval TASK`, and each
run of `d2v eval curve`)."""
from __future__ import annotations

import argparse
import time
from importlib import import_module

from d2v_train.data.transforms import ImageTransform

# task -> module with evaluate(args, world, backbone) -> EvalResult (its options: TASK_ARGUMENTS)
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


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder/URL, a run's checkpoint folder (newest complete one), or 'random'")
    parser.add_argument("--model", default=None,
                        help="with --checkpoint random: a preset (speech_tiny), a YAML file or a checkpoint URL")
    parser.add_argument("--data", required=True, help="the downstream data (URL)")
    parser.add_argument("--train-split", required=True, help="the labelled split to fine-tune on")
    parser.add_argument("--eval-split", required=True, help="the split to score")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning updates (task default if omitted)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (task default if omitted)")
    parser.add_argument("--batch-size", type=int, default=None, help="per rank (task default if omitted)")
    parser.add_argument("--seed", type=int, default=0, help="fine-tuning seed (head, batches, masks)")
    parser.add_argument("--subset-seed", type=int, default=0,
                        help="seed of the labelled subset a budget draws (kept apart from --seed, so that "
                             "fine-tuning seeds vary the training, not the labels)")
    parser.add_argument("--workers", type=int, default=2, help="loader threads per rank")
    parser.add_argument("--log-every", type=int, default=10, help="updates between progress lines")
    parser.add_argument("--label", default=None, help="the name reports give this run (default: step or 'random')")
    parser.add_argument("--out", default=None, help="write the whole result JSON here (any fsspec URL)")
    parser.add_argument("--json", action="store_true",
                        help="print the whole result as one JSON line instead of the one-line summary")


def _speech_ctc_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labelled", default="all",
                        help="labelled-data budget drawn from the train split, balanced over speakers: a duration "
                             "(10m, 1h, 90s), an utterance count (48) or 'all' (default)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="audio samples per training batch per rank (whole utterances, padded; default: the "
                             "recipe's, 200,000 for encoders narrower than 256, else 1,600,000)")
    parser.add_argument("--eval-max-tokens", type=int, default=None, help="per evaluation batch (default: --max-tokens)")
    parser.add_argument("--mask-prob", type=float, default=None,
                        help="time-span masking while fine-tuning (0: none; default: the recipe's, 0.2 or 0.65)")
    parser.add_argument("--mask-length", type=int, default=10, help="frames per masked time span")
    parser.add_argument("--mask-channel-prob", type=float, default=None,
                        help="channel-span masking (0: none; default: the recipe's, 0 or 0.1)")
    parser.add_argument("--mask-channel-length", type=int, default=64, help="capped at a quarter of the model width")
    parser.add_argument("--freeze-transformer-steps", type=int, default=None,
                        help="updates that train only the output layer (default: the recipe's share of --steps, "
                             "a half or a tenth)")
    parser.add_argument("--train-feature-encoder", action="store_true", help="also fine-tune the CNN (frozen by default)")
    parser.add_argument("--dropout", type=float, default=0.0, help="Transformer dropout and attention dropout")
    parser.add_argument("--activation-dropout", type=float, default=0.1, help="dropout inside the feed-forward blocks")
    parser.add_argument("--layer-drop", type=float, default=0.05, help="probability of skipping a block per update")


def _crop_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give MIN,MAX, e.g. 0.08,1") from None
    return lo, hi


def _image_arguments(parser: argparse.ArgumentParser) -> None:
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--labels-per-class", type=int, default=None,
                        help="labelled-data budget: K images of each class of the train split")
    budget.add_argument("--label-fraction", type=float, default=None,
                        help="labelled-data budget: this fraction of each class (0.01, 0.1: ImageNet's 1%% and 10%%)")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's")
    parser.add_argument("--crop-pct", type=float, default=ImageTransform.crop_pct,
                        help="scored pictures: centre crop / resized shorter side (1: the whole picture)")
    parser.add_argument("--crop-scale", type=_crop_range, default=ImageTransform.crop_scale, metavar="MIN,MAX",
                        help="fine-tuning pictures: RandomResizedCrop's area range (1,1: the whole picture)")
    parser.add_argument("--hflip", type=float, default=ImageTransform.hflip, help="fine-tuning pictures: flip probability")
    parser.add_argument("--weight-decay", type=float, default=None, help="task default if omitted")
    parser.add_argument("--label-smoothing", type=float, default=0.1, help="fine-tuning only")
    parser.add_argument("--layer-decay", type=float, default=0.65,
                        help="fine-tuning only: LR of block i is lr * decay^(layers - i) (BEiT); 1 disables")


def _text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-limit", type=int, default=None,
                        help="labelled-data budget: at most N training examples, balanced over labels")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder/URL (default: the one of the dataset the checkpoint was pre-trained on)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example, <s> and </s> included")
    parser.add_argument("--glue-task", default=None,
                        help="CoLA, SST-2, MRPC, QQP, MNLI, QNLI, RTE, WNLI (default: from the data folder's name); "
                             "picks the columns and the headline metric")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")


TASK_ARGUMENTS = {"speech-ctc": _speech_ctc_arguments, "image-probe": _image_arguments,
                  "image-finetune": _image_arguments, "text-cls": _text_arguments}


def task_parser(task: str) -> argparse.ArgumentParser:
    """The options of `d2v eval TASK` alone (the curve parses each of its runs with it)."""
    parser = argparse.ArgumentParser(prog=f"d2v eval {task}", description=HELP[task])
    add_common_arguments(parser)
    TASK_ARGUMENTS[task](parser)
    return parser


def evaluate_once(args, world):
    """Load the backbone, run the task, time it: the EvalResult of one `d2v eval TASK`."""
    from d2v_train.eval.backbone import load_backbone

    if args.steps is not None and args.steps < 0:
        raise ValueError("--steps must be >= 0")
    started = time.monotonic()
    backbone = load_backbone(args.checkpoint, args.model, seed=args.seed)
    backbone.encoder.to(world.device)
    result = import_module(TASKS[args.eval_task]).evaluate(args, world, backbone)
    result.elapsed_s = time.monotonic() - started
    return result


"""Fixed-seed tiny runs whose digests must not change when code is reshaped without a change of
behaviour: 30 pre-training steps of each modality (and of data2vec 2.0 on speech) through
`d2v_train/main.py`, then each evaluation task through `d2v eval` on those checkpoints.

A digest is the sha256 of the run's numbers as JSON: per step loss, grad_norm, target_std and
pred_std for pre-training; metrics, baseline and the loss curve for evaluation. Two commits that
print the same lines behave the same on these runs, bit for bit (one process, one thread).

    .venv/bin/python benchmarks/behaviour_digests.py [--out /tmp/digests] [--json FILE]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0"}
STEPS = 30


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result


def datasets(root: Path) -> dict[str, str]:
    """The three corpora, built once per output folder."""
    from pipelines import synthetic
    from pipelines.build import BuildOptions, build_dataset
    from pipelines.plan import ShardSize
    from pipelines.sources.imagenet import ImageNetSource
    from pipelines.sources.librispeech import LibriSpeechSource
    from pipelines.sources.text import TextSource
    from pipelines.storage import Location

    quiet = {"workers": 0, "echo": lambda *_: None}
    out = {"speech": root / "speech", "vision": root / "vision", "text": root / "text"}
    if not (out["speech"] / "dataset.json").exists():
        spec = synthetic.make_librispeech(str(root / "ls"), {"train-clean-100": 24, "dev-clean": 6}, seed=0,
                                          spoken=True, words=(2, 4))
        build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100", "dev-clean")),
                      Location(str(out["speech"])), BuildOptions(ShardSize.parse("8"), 2, 0), **quiet)
    if not (out["vision"] / "dataset.json").exists():
        spec = synthetic.make_imagenet(str(root / "in"), classes=3, train_per_class=8, val_per_class=3, seed=0)
        build_dataset(ImageNetSource(Location(spec.source), ("train", "val"), image_size=64, patch_size=8),
                      Location(str(out["vision"])), BuildOptions(ShardSize.parse("8"), 2, 0), **quiet)
    if not (out["text"] / "dataset.json").exists():
        corpus = synthetic.make_text_corpus(str(root / "corpus"), files=2, docs_per_file=8, seed=1)
        source = TextSource.create(tuple(Location(f) for f in corpus.files), vocab_size=600, block_size=128)
        build_dataset(source, Location(str(out["text"])), BuildOptions(ShardSize.parse("20"), 2, 0), **quiet)
    if not (root / "glue" / "SST-2").exists():
        synthetic.make_glue_task(str(root / "glue"), "SST-2", train=60, dev=30, seed=0)
    return {name: str(path) for name, path in out.items()}


PRETRAIN = {
    "speech": ["model=speech_tiny", "data.split=train-clean-100", "data.max_tokens=160000",
               "data.min_sample_size=16000", "data.max_sample_size=48000"],
    "speech_v2": ["model=speech_v2_tiny", "data.split=train-clean-100", "data.max_tokens=160000",
                  "data.min_sample_size=16000", "data.max_sample_size=48000"],
    "vision": ["model=vision_tiny", "data.split=train", "data.batch_size=4"],
    "text": ["model=text_tiny", "data.batch_size=4"],
}


def pretrain(name: str, data: str, root: Path) -> tuple[str, str]:
    run_dir = root / "runs" / name
    _run("d2v_train/main.py", *PRETRAIN[name], f"data.url={data}", f"run_dir={run_dir}", f"train.max_steps={STEPS}",
         "train.seed=0", "data.workers=1", f"checkpoint.every_steps={STEPS}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    numbers = [[r["step"], r["loss"], r["grad_norm"], r["target_std"], r["pred_std"]] for r in records]
    return digest(numbers), f"loss {numbers[-1][1]:.6f} at step {numbers[-1][0]}"


def evaluate(task: str, checkpoint: str, data: str, splits: tuple[str, str], *extra: str) -> tuple[str, str]:
    result = json.loads(_run("-m", "flows.cli", "eval", task, "--checkpoint", checkpoint, "--data", data,
                             "--train-split", splits[0], "--eval-split", splits[1], "--steps", "20", "--seed", "0",
                             "--workers", "1", "--json", *extra).stdout.strip().splitlines()[-1])
    numbers = {"metrics": result["metrics"], "baseline": result.get("baseline"),
               "curve": result.get("curve")}
    headline = ", ".join(f"{k} {v:.6f}" for k, v in sorted(result["metrics"].items()) if isinstance(v, float))
    return digest(numbers), headline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="/tmp/d2v-digests", help="working folder (datasets are kept and reused)")
    parser.add_argument("--json", default=None, help="also write the digests here")
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    data = datasets(root)
    shutil.rmtree(root / "runs", ignore_errors=True)  # fresh runs: a kept one would resume, not train
    rows = {}
    for name in PRETRAIN:
        rows[f"pretrain {name}"] = pretrain(name, data[name.split("_")[0]], root)
        print(f"{f'pretrain {name}':<28} {rows[f'pretrain {name}'][0]}  {rows[f'pretrain {name}'][1]}", flush=True)
    runs = root / "runs"
    tasks = {
        "speech-ctc": (str(runs / "speech" / "checkpoints"), data["speech"], ("train-clean-100", "dev-clean"),
                       "--max-tokens", "100000"),
        "image-probe": (str(runs / "vision" / "checkpoints"), data["vision"], ("train", "val"),
                        "--batch-size", "8"),
        "image-finetune": (str(runs / "vision" / "checkpoints"), data["vision"], ("train", "val"),
                           "--batch-size", "8"),
        "text-cls": (str(runs / "text" / "checkpoints"), str(root / "glue" / "SST-2"), ("train", "dev"),
                     "--batch-size", "8"),
    }
    for task, (checkpoint, url, splits, *extra) in tasks.items():
        rows[f"eval {task}"] = evaluate(task, checkpoint, url, splits, *extra)
        print(f"{f'eval {task}':<28} {rows[f'eval {task}'][0]}  {rows[f'eval {task}'][1]}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({k: v[0] for k, v in rows.items()}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

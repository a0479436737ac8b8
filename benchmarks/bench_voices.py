"""Pre-training on varied voices through the deployment: `prefect deployment run pretrain/speech`.

A LibriSpeech-layout corpus of generated speech whose speakers differ in pitch, rate, timbre
(formant scale and spectral tilt) and breathiness (`make_librispeech(voices=True)`): about an hour
from 12 voices in `train-other-500` to pre-train on, about 20 minutes from 4 other voices in
`train-clean-100` to draw the labelled budgets from, and 2 voices heard nowhere else in
`dev-clean` to score. A temporary Prefect server and `d2v serve` are started; each pre-training
seed is one `prefect deployment run pretrain/speech --watch` with the flow's default parameters
(only the corpus, its split roles, the output and the seed are given). Reported per budget as in
`bench_learning.py`: random and pre-trained CER over every fine-tuning seed of every run.

    .venv/bin/python benchmarks/bench_voices.py [--pretrain-seeds 3] [--params '{"preset": "tiny"}']
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_learning import last_target_rank, print_table, summarise  # noqa: E402

from flows.local_server import serving_locally  # noqa: E402

SPLITS = ["train-other-500", "train-clean-100", "dev-clean"]
SPEAKERS = {"train-other-500": 12, "train-clean-100": 4, "dev-clean": 2}


def make_corpus(root: Path, utterances: list[int]) -> str:
    from pipelines.synthetic import make_librispeech

    spec = make_librispeech(str(root), dict(zip(SPLITS, utterances)), seed=0, spoken=True, voices=True,
                            words=(3, 8), speakers=SPEAKERS, faults=True)
    return spec.source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-seeds", type=int, default=3, help="deployment runs (seeds 0..N-1)")
    parser.add_argument("--utterances", default="1300,380,100", help="per split: pre-train, labelled, scored")
    parser.add_argument("--params", default="{}", help="more flow parameters (JSON), e.g. '{\"preset\": \"tiny\"}'")
    parser.add_argument("--out", default="/tmp/bench_voices")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    source = make_corpus(out / "corpus", [int(n) for n in args.utterances.split(",")])
    print(f"generated {source} in {time.monotonic() - started:.0f} s", flush=True)

    with serving_locally(out / "prefect-home") as env:
        curves, ranks, took = [], [], []
        for seed in range(args.pretrain_seeds):
            output = out / f"seed{seed}"
            params = {"source": source, "output": str(output), "splits": SPLITS, "seed": seed,
                      **json.loads(args.params)}
            t0 = time.monotonic()
            run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "pretrain/speech",
                                  "--params", json.dumps(params), "--watch"], env=env, cwd=REPO,
                                 capture_output=True, text=True)
            if run.returncode:
                print(f"seed {seed}: the deployment run failed\n{run.stdout}{run.stderr}", file=sys.stderr)
                return 1
            took.append(time.monotonic() - t0)
            curve = json.loads((output / "report" / "curve.json").read_text())
            curves.append(curve)
            ranks.append(last_target_rank(output / "run"))
            print(f"seed {seed}: {took[-1]:.0f} s; " + "; ".join(curve["gains"]), flush=True)
    rows = summarise("speech, varied voices", curves, ranks, took)
    print_table(rows, started)
    (out / "bench_voices.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out / 'bench_voices.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

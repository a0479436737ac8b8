"""Pre-training throughput of the speech presets on this machine, next to the loader alone.

Generates 5-15 s utterances in the LibriSpeech layout, builds shards, then runs
`d2v_train/main.py` for a few steps with the tiny and the base speech presets, as one process
and (tiny) as 2 ranks under torchrun, and reads the throughput rank 0 logged at the last step
(cumulative since the first step, so start-up costs are included). The baseline in the same
run is the streaming loader alone on the same batches: the trainer's rate divided by it shows
how far training is from being data-bound.

    .venv/bin/python benchmarks/bench_trainer.py [--steps 8] [--base-steps 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import synthetic  # noqa: E402
from pipelines.build import BuildOptions, build_dataset  # noqa: E402
from pipelines.plan import ShardSize  # noqa: E402
from pipelines.sources.librispeech import LibriSpeechSource  # noqa: E402
from pipelines.storage import Location  # noqa: E402

SPLIT = "train-clean-100"


def _train(data: Path, run_dir: Path, preset: str, steps: int, max_tokens: int, ranks: int) -> dict:
    overrides = [f"model={preset}", f"data.url={data}", f"data.split={SPLIT}", f"data.max_tokens={max_tokens}",
                 f"train.max_steps={steps}", f"checkpoint.every_steps={steps}", f"run_dir={run_dir}",
                 "guard.collapse_after=1000000"]
    launcher = [sys.executable, "d2v_train/main.py"] if ranks == 1 else \
        [sys.executable, "-m", "d2v_train.launch", "--standalone", f"--nproc_per_node={ranks}", "d2v_train/main.py"]
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the product's own thread choice
    subprocess.run([*launcher, *overrides], cwd=REPO, check=True, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"preset": preset, "ranks": ranks, "steps": steps, "wall_s": round(wall, 1),
            "audio_s_per_s": round(last["audio_s_per_s"], 1), "samples_per_s": round(last["samples_per_s"], 2),
            "memory_mb": round(last["memory_mb"]), "final_loss": round(last["loss"], 4)}


def _loader_alone(data: Path, max_tokens: int, batches: int) -> float:
    from d2v_train.data.loader import StreamingLoader
    from d2v_train.data.plan import BatchPolicy

    loader = StreamingLoader(Location(str(data)), SPLIT, BatchPolicy(max_tokens=max_tokens), workers=2)
    started, audio, seen = time.perf_counter(), 0.0, 0
    for batch in loader:
        audio += batch["source"].numel() / 16000
        seen += 1
        if seen >= batches:
            break
    loader.close()
    return audio / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=200)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--base-steps", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=480_000, help="audio samples per batch per rank")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        spec = synthetic.make_librispeech(str(root / "corpus"), {SPLIT: args.utterances}, seed=0, seconds=(5.0, 15.0),
                                          speakers=4, chapters_per_speaker=4)
        build_dataset(LibriSpeechSource(Location(spec.source), (SPLIT,)), Location(str(root / "data")),
                      BuildOptions(ShardSize.parse("32MB"), 4, 0), workers=0, echo=lambda *_: None)
        loader_rate = _loader_alone(root / "data", args.max_tokens, 30)
        runs = [
            _train(root / "data", root / "tiny-1", "speech_tiny", args.steps, args.max_tokens, 1),
            _train(root / "data", root / "tiny-2", "speech_tiny", args.steps, args.max_tokens // 2, 2),
            _train(root / "data", root / "base-1", "speech_base", args.base_steps, args.max_tokens, 1),
        ]
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "loader_alone_audio_s_per_s": round(loader_rate), "runs": runs}
    print(f"machine: {result['machine']}; loader alone (baseline): {loader_rate:,.0f} audio-s/s")
    print(f"{'preset':<12} {'ranks':>5} {'steps':>5} {'wall s':>7} {'audio-s/s':>10} {'samples/s':>9} "
          f"{'vs loader':>9} {'RSS MB':>7} {'loss':>7}")
    for r in runs:
        print(f"{r['preset']:<12} {r['ranks']:>5} {r['steps']:>5} {r['wall_s']:>7} {r['audio_s_per_s']:>10} "
              f"{r['samples_per_s']:>9} {r['audio_s_per_s'] / loader_rate:>9.3f} {r['memory_mb']:>7} {r['final_loss']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

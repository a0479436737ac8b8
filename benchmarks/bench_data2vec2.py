"""data2vec v1 against data2vec 2.0 (tiny speech presets): time per sample, and time to a probe metric.

One run, one generated spoken corpus (`synthetic.make_librispeech(spoken=True)`: audio that says
its transcript in a letter-tone language), the same machine and the same trainer settings for
both presets (configs/train_speech_tiny.yaml, same batches, one process, same thread count):

1. Time per sample: `d2v_train/main.py` for `--throughput-steps` steps without checkpoints; the
   steady-state rate skips the first `--warmup-steps` steps.
2. Time to probe metric: each preset pre-trains for `--budget-steps` steps (same LR schedule),
   saving a checkpoint every `--every` steps. Every checkpoint, and a random initialisation (the
   floor), gets the same CTC probe: `d2v eval speech-ctc` with the encoder frozen for the whole
   run (`--freeze-transformer-steps` = `--steps`, CNN frozen too), no masking, no dropout, so only
   the linear letter classifier trains; CER on the held-out split is the metric (lower is better).
   Wall-clock of a checkpoint = the trainer's own clock since its first step (process start-up,
   imports and model build excluded for both; data loading and earlier checkpoint saves
   included for both), recovered exactly from metrics.jsonl (cumulative samples/s) and the
   keys log (samples per step).
3. Diagnostics: the effective rank (exp of the entropy of the singular-value spectrum) of the
   encoder's output frames on the held-out split, per checkpoint: a collapsed encoder has few
   dimensions left for a linear probe to read.

Result: v1's probe CER at the end of its budget, the earliest v2 checkpoint whose CER is at least
as good, and the ratio of their wall-clocks (issue target: <= 0.5).

    .venv/bin/python benchmarks/bench_data2vec2.py [--quick] [--out /tmp/bench_data2vec2.json]
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines import synthetic  # noqa: E402
from pipelines.build import BuildOptions, build_dataset  # noqa: E402
from pipelines.plan import ShardSize  # noqa: E402
from pipelines.sources.librispeech import LibriSpeechSource  # noqa: E402
from pipelines.storage import Location  # noqa: E402

TRAIN, HELD_OUT = "train-clean-100", "dev-clean"
PRESETS = {"v1": "speech_tiny", "v2": "speech_v2_tiny"}
CONFIG = "configs/train_speech_tiny.yaml"


def build_corpus(root: Path, train: int, held_out: int, words: tuple[int, int]) -> Path:
    spec = synthetic.make_librispeech(str(root / "corpus"), {TRAIN: train, HELD_OUT: held_out}, seed=0, spoken=True,
                                      words=words, speakers=4, chapters_per_speaker=2)
    build_dataset(LibriSpeechSource(Location(spec.source), (TRAIN, HELD_OUT)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("8MB"), 4, 0), workers=0, echo=lambda *_: None)
    return root / "data"


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def pretrain(data: Path, run_dir: Path, preset: str, steps: int, every: int, threads: int,
             extra: list[str]) -> list[dict]:
    """Runs the trainer; returns per-step records with the trainer's clock (`elapsed_s`) and the
    cumulative samples and audio seconds."""
    overrides = [f"model={preset}", f"data.url={data}", f"data.split={TRAIN}", f"run_dir={run_dir}",
                 f"train.max_steps={steps}", f"checkpoint.every_steps={every}", "checkpoint.keep=1000",
                 "train.log_keys=true", "guard.collapse_after=1000000", *extra]
    subprocess.run([sys.executable, "d2v_train/main.py", "--config", CONFIG, *overrides], cwd=REPO, check=True,
                   capture_output=True, text=True, env=_env(threads))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    keys = {json.loads(line)["step"]: len(json.loads(line)["keys"])
            for line in (run_dir / "keys-rank0.jsonl").read_text().splitlines() if line}
    samples = 0
    for r in records:
        samples += keys[r["step"]]
        r["samples"] = samples
        r["elapsed_s"] = samples / r["samples_per_s"]  # the trainer's own clock since its first step
        r["audio_s"] = r["audio_s_per_s"] * r["elapsed_s"]
    return records


def steady_rate(records: list[dict], skip: int) -> dict:
    first, last = records[skip - 1], records[-1]
    dt = last["elapsed_s"] - first["elapsed_s"]
    return {"steps": last["step"] - first["step"], "window_s": round(dt, 2),
            "samples_per_s": (last["samples"] - first["samples"]) / dt,
            "audio_s_per_s": (last["audio_s"] - first["audio_s"]) / dt,
            "s_per_step": dt / (last["step"] - first["step"]),
            "ms_per_sample": 1000 * dt / (last["samples"] - first["samples"]),
            "cumulative_samples_per_s": last["samples_per_s"]}


def probe(checkpoint: str, data: Path, out: Path, args, seed: int = 0) -> dict:
    """The CTC probe: frozen encoder (and CNN), linear letter classifier, CER/WER on the held-out split."""
    cmd = [sys.executable, "-m", "flows.cli", "eval", "speech-ctc", "--checkpoint", checkpoint, "--model", "speech_tiny",
           "--data", str(data), "--train-split", TRAIN, "--eval-split", HELD_OUT, "--steps", str(args.probe_steps),
           "--freeze-transformer-steps", str(args.probe_steps), "--lr", str(args.probe_lr),
           "--max-tokens", str(args.probe_max_tokens), "--mask-prob", "0", "--mask-channel-prob", "0",
           "--dropout", "0", "--activation-dropout", "0", "--layer-drop", "0", "--seed", str(seed),
           "--log-every", "1000", "--out", str(out)]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True, env=_env(1))
    result = json.loads(out.read_text())
    return {"cer": result["metrics"]["cer"], "wer": result["metrics"]["wer"],
            "probe_final_ctc_loss": result["curve"][-1]["loss"] if result["curve"] else None}


def effective_rank(checkpoints: list[str], data: Path) -> dict[str, float]:
    """exp(entropy of the normalised squared singular values) of the encoder's output frames on
    the first held-out batches: ~dim for a spread-out representation, ~1 for a collapsed one."""
    import torch

    from d2v_train.data.loader import StreamingLoader
    from d2v_train.eval.backbone import load_backbone
    from d2v_train.eval.speech_ctc import eval_policy
    from d2v_train.models.loss import effective_rank
    from d2v_train.models.speech import frame_padding_mask

    loader = StreamingLoader(str(data), HELD_OUT, eval_policy(400_000), workers=1, train=False)
    batches = [batch for _, batch in zip(range(3), loader)]
    loader.close()
    ranks = {}
    for ck in checkpoints:
        encoder = load_backbone(ck, "speech_tiny").encoder.eval()
        fe = encoder.frontend
        frames = []
        with torch.no_grad():
            for batch in batches:
                x_BTD = fe.feature_projection(fe.feature_extractor(batch["source"]))
                padding_BT = frame_padding_mask(batch["padding_mask"], x_BTD.shape[1], fe.conv_geometry)
                frames.append(encoder(x_BTD, padding_BT).x_BTD[~padding_BT])
        frames_ND = torch.cat(frames)
        ranks[ck] = float(effective_rank(frames_ND, max_rows=len(frames_ND)))
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small run (about 3 minutes) to check the script")
    parser.add_argument("--utterances", type=int, default=400, help="training utterances (held out: a fifth)")
    parser.add_argument("--words", type=int, nargs=2, default=(4, 8), help="words per utterance (min max)")
    parser.add_argument("--throughput-steps", type=int, default=200)
    parser.add_argument("--warmup-steps", type=int, default=30, help="left out of the steady-state rate")
    parser.add_argument("--budget-steps", type=int, default=1000, help="pre-training steps of each preset")
    parser.add_argument("--every", type=int, default=100, help="checkpoint (and probe) every N steps")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the trainers")
    parser.add_argument("--probe-steps", type=int, default=400)
    parser.add_argument("--probe-lr", type=float, default=0.1)
    parser.add_argument("--probe-max-tokens", type=int, default=320_000)
    parser.add_argument("--probe-jobs", type=int, default=2, help="probes run side by side (1 thread each)")
    parser.add_argument("--random-seeds", type=int, default=2, help="random-init encoders probed (the floor)")
    parser.add_argument("--v1-override", action="append", default=[],
                        help="extra trainer override for v1 only (e.g. data.max_tokens=80000)")
    parser.add_argument("--v2-override", action="append", default=[],
                        help="extra trainer override for v2 only (e.g. model.data2vec2.clones=4)")
    parser.add_argument("--out", default="/tmp/bench_data2vec2.json")
    args = parser.parse_args()
    if args.quick:
        args.utterances, args.throughput_steps, args.warmup_steps = 160, 60, 15
        args.budget_steps, args.every, args.probe_steps, args.random_seeds = 200, 50, 200, 1

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench_d2v2_") as tmp:
        root = Path(tmp)
        data = build_corpus(root, args.utterances, max(20, args.utterances // 5), tuple(args.words))
        dataset = json.loads((data / "dataset.json").read_text())["splits"]
        print(f"corpus: {dataset[TRAIN]['samples']} training utterances ({dataset[TRAIN]['seconds']:.0f} s), "
              f"{dataset[HELD_OUT]['samples']} held out ({dataset[HELD_OUT]['seconds']:.0f} s), "
              f"{args.words[0]}-{args.words[1]} words each", flush=True)
        extra = {"v1": list(args.v1_override), "v2": list(args.v2_override)}

        # 1. time per sample
        throughput = {}
        for name, preset in PRESETS.items():
            records = pretrain(data, root / f"tp-{name}", preset, args.throughput_steps, 10**9, args.threads,
                               extra[name])
            throughput[name] = steady_rate(records, args.warmup_steps)
            print(f"throughput {name}: {throughput[name]['samples_per_s']:.1f} samples/s", flush=True)

        # 2. pre-training with checkpoints
        runs = {}
        for name, preset in PRESETS.items():
            records = pretrain(data, root / f"run-{name}", preset, args.budget_steps, args.every, args.threads,
                               extra[name])
            by_step = {r["step"]: r for r in records}
            folders = sorted((root / f"run-{name}" / "checkpoints").glob("step-*"))
            runs[name] = [{"step": int(f.name.split("-")[1]), "folder": str(f),
                           "elapsed_s": by_step[int(f.name.split("-")[1])]["elapsed_s"],
                           "pretrain_loss": by_step[int(f.name.split("-")[1])]["loss"]} for f in folders]
            print(f"pre-trained {name}: {args.budget_steps} steps in {runs[name][-1]['elapsed_s']:.1f} s", flush=True)

        # 3. probes (and the random floor), then the diagnostics
        jobs = [("random", "random", seed) for seed in range(args.random_seeds)]
        jobs += [(name, point["folder"], 0) for name in PRESETS for point in runs[name]]
        with ThreadPoolExecutor(args.probe_jobs) as pool:
            results = list(pool.map(lambda job: probe(job[1], data, root / f"probe-{abs(hash(job))}.json", args,
                                                      seed=job[2]), jobs))
        outcome = dict(zip([(j[1], j[2]) for j in jobs], results))
        ranks = effective_rank(["random"] + [p["folder"] for name in PRESETS for p in runs[name]], data)
        random_floor = [{"seed": seed, **outcome[("random", seed)]} for seed in range(args.random_seeds)]
        for name in PRESETS:
            for point in runs[name]:
                point.update(outcome[(point["folder"], 0)], effective_rank=ranks[point["folder"]])
                point.pop("folder")
    total = time.monotonic() - started

    v1_end = runs["v1"][-1]
    reached = next((p for p in runs["v2"] if p["cer"] <= v1_end["cer"]), None)
    ratio = reached["elapsed_s"] / v1_end["elapsed_s"] if reached else None
    random_cer = min(r["cer"] for r in random_floor)
    beats_random = {name: any(p["cer"] < random_cer for p in runs[name]) for name in PRESETS}
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "corpus": {"train": dataset[TRAIN], "held_out": dataset[HELD_OUT]},
        "throughput": throughput, "runs": runs, "random_floor": random_floor,
        "random_effective_rank": ranks["random"],
        "v1_end": {"step": v1_end["step"], "elapsed_s": v1_end["elapsed_s"], "cer": v1_end["cer"]},
        "v2_reaches_v1": reached and {"step": reached["step"], "elapsed_s": reached["elapsed_s"], "cer": reached["cer"]},
        "time_ratio_v2_over_v1": ratio, "target_met": ratio is not None and ratio <= 0.5,
        "probe_beats_random": beats_random, "total_s": round(total, 1),
    }

    tp1, tp2 = throughput["v1"], throughput["v2"]
    print(f"\nmachine: {result['machine']}; trainer threads {args.threads}; whole benchmark {total / 60:.1f} min")
    print(f"\ntime per sample (steps {args.warmup_steps + 1}-{args.throughput_steps}, no checkpoints)")
    print(f"{'preset':<8} {'s/step':>7} {'samples/s':>10} {'audio-s/s':>10} {'ms/sample':>10}")
    for name, tp in throughput.items():
        print(f"{name:<8} {tp['s_per_step']:>7.3f} {tp['samples_per_s']:>10.1f} {tp['audio_s_per_s']:>10.1f} "
              f"{tp['ms_per_sample']:>10.1f}")
    print(f"v2 / v1 time per sample: {tp1['samples_per_s'] / tp2['samples_per_s']:.2f}x")
    print(f"\nCTC probe (frozen encoder, linear classifier, {args.probe_steps} updates, lr {args.probe_lr}): "
          f"held-out CER, lower is better")
    for r in random_floor:
        print(f"random init (seed {r['seed']}): CER {r['cer']:.3f}  WER {r['wer']:.3f}")
    print(f"{'':<4} {'step':>5} {'wall s':>7} {'pretrain loss':>13} {'CER':>6} {'WER':>6} {'eff. rank':>9}")
    for name in PRESETS:
        for p in runs[name]:
            print(f"{name:<4} {p['step']:>5} {p['elapsed_s']:>7.1f} {p['pretrain_loss']:>13.3f} {p['cer']:>6.3f} "
                  f"{p['wer']:>6.3f} {p['effective_rank']:>9.1f}")
    print(f"random encoder output effective rank: {ranks['random']:.1f} (of {64})")
    print(f"\nv1 at the end of its budget: step {v1_end['step']}, {v1_end['elapsed_s']:.1f} s, CER {v1_end['cer']:.3f}")
    if reached:
        print(f"v2 first reaches it at step {reached['step']}, {reached['elapsed_s']:.1f} s: "
              f"ratio v2/v1 {ratio:.2f} (target <= 0.5: {'met' if ratio <= 0.5 else 'NOT met'})")
    else:
        print("v2 never reaches v1's CER within its budget: target NOT met")
    for name in PRESETS:
        if not beats_random[name]:
            print(f"note: no {name} checkpoint beats the random-init encoder (CER {random_cer:.3f}) on this probe: "
                  "the probe metric does not show any benefit of pre-training here")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

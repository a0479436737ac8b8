"""Streaming loader throughput against a file-per-sample DataLoader and the decode-only ceiling.

One run, the same generated data for every method. Each figure is one epoch, best of --repeats,
methods interleaved so that other load on the machine hits each alike. CPU-s counts this process
(all threads) plus a DataLoader's worker processes; a local S3 server's CPU is reported apart.

Speech (LibriSpeech layout, 5-15 s utterances, built into shards in-process):
- d2v StreamingLoader with W worker threads, in training mode (max_tokens batches, random crops)
  and evaluation mode (batch_size, whole utterances padded). "delivered" is the audio in the
  batches (training crops cut some away); "decoded" is the whole utterances the loader decoded
  (it decodes and normalises each utterance before cropping): the figure to hold against the ceiling.
- baseline: torch DataLoader, W worker processes (persistent, started before timing), over the
  source corpus's .flac files: read, soundfile decode, normalise per utterance, pad-collate.
- ceiling: soundfile decoding the same FLAC bytes from memory in one thread, times W. Also
  d2v's decode_speech (decode + normalise) alone in one thread, times W.
- --s3 (default when radosgw or moto can be started): d2v from the shards uploaded to a local S3
  server, and the baseline reading each .flac from it (one fsspec cat per file).

Images (ImageNet layout, 400-500 px JPEGs): d2v loader images/s with training transforms, the
same transform (decode_image) in a file-per-image DataLoader, Pillow's Image.open + load of the
same bytes in memory (one thread, times W), and decode_image alone in one thread, times W.

Targets (speech): d2v >= 2x the baseline, d2v decoded >= 0.8x the ceiling, >= 3,000 audio-s/s
delivered per worker.

    .venv/bin/python benchmarks/bench_loader.py [--utterances 1200] [--images 960] [--workers 2]
                                                [--s3 | --no-s3] [--repeats 3] [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from corpora import SPEECH_SPLIT as SPLIT  # noqa: E402
from corpora import image_corpus, speech_corpus  # noqa: E402
from PIL import Image  # noqa: E402

from d2v_train.data.decode import decode_image, decode_speech  # noqa: E402
from d2v_train.data.loader import StreamingLoader  # noqa: E402
from d2v_train.data.plan import BatchPolicy  # noqa: E402
from pipelines.storage import Location  # noqa: E402
from schemas import FrameGrid  # noqa: E402

RATE = 16_000
MAX_TOKENS = 1_400_000  # `d2v data stream`'s default: ~8 utterances of 10 s
EVAL_BATCH = 8  # about the same audio per batch, for evaluation and the baseline
IMAGE_BATCH = 32
ME = psutil.Process()


# -- timing -------------------------------------------------------------------------------------
def _cpu_by_pid() -> dict[int, float]:
    out = {}
    for process in (ME, *ME.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        out[process.pid] = times.user + times.system
    return out


def best_of(methods: dict, repeats: int) -> dict:
    """Fastest run of each method: {"seconds", "cpu_s", "store_cpu_s", **what the method counted}.

    A method returns a dict of counts ("units": audio-s or images); its CPU is this process's plus
    that of the processes in its `worker_pids`; other child processes (an S3 server) are the store's.
    """
    best = {}
    for _ in range(repeats):
        for name, method in methods.items():
            before, started = _cpu_by_pid(), time.perf_counter()
            counts = method()
            seconds = time.perf_counter() - started
            spent = {pid: t - before.get(pid, 0.0) for pid, t in _cpu_by_pid().items()}
            own = {ME.pid, *getattr(method, "worker_pids", ())}
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"seconds": seconds, "cpu_s": sum(t for pid, t in spent.items() if pid in own),
                              "store_cpu_s": sum(t for pid, t in spent.items() if pid not in own), **counts}
    return best


def dataloader_epoch(dataset, workers: int, collate, batch_size: int, count):
    """An epoch of a started DataLoader (persistent workers: process start-up is not timed)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate, persistent_workers=workers > 0,
                                         generator=torch.Generator().manual_seed(0))

    def run():
        return {"units": sum(count(batch) for batch in loader)}
    gc.collect()  # S3 clients left for garbage would otherwise be closed in the workers, on the wrong event loop
    existing = {p.pid for p in ME.children()}
    run()  # warm-up: starts the workers
    run.worker_pids = {p.pid for p in ME.children()} - existing
    return run


def npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


# -- speech -------------------------------------------------------------------------------------
class FlacFiles(torch.utils.data.Dataset):
    """The baseline's dataset: one .flac per utterance, local or read whole from S3."""

    def __init__(self, paths: list[str], storage_options: dict | None = None):
        self.paths, self.storage_options, self._fs = paths, storage_options, None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        if self.storage_options is None:
            wave, _ = soundfile.read(self.paths[i], dtype="float32")
        else:
            if self._fs is None:  # one client per worker process, made after the fork
                import fsspec
                self._fs = fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)
            wave, _ = soundfile.read(io.BytesIO(self._fs.cat_file(self.paths[i])), dtype="float32")
        return (wave - wave.mean()) / np.sqrt(wave.var() + 1e-5)


def pad_collate(waves):
    source = torch.zeros(len(waves), max(w.size for w in waves))
    padding = torch.ones(source.shape, dtype=torch.bool)
    for row, wave in enumerate(waves):
        source[row, :wave.size] = torch.from_numpy(wave)
        padding[row, :wave.size] = False
    return {"source": source, "padding_mask": padding, "lengths": [w.size for w in waves]}


def d2v_speech_epoch(loader: StreamingLoader):
    length_of = dict(zip(loader.index.columns["key"], loader.index.lengths.tolist()))

    def run():
        # Counted from the index, not from the tensors: a pass over each batch in this thread would
        # take CPU from the loader (a torch sum even wakes torch's intra-op threads).
        delivered = decoded = 0
        requests = loader.reader.stats.requests
        for batch in loader:
            width = batch["source"].shape[1]  # training: the crop; evaluation: the longest member
            delivered += sum(min(length_of[key], width) for key in batch["keys"])
            decoded += sum(length_of[key] for key in batch["keys"])
        return {"units": delivered / RATE, "decoded": decoded / RATE,
                "requests": loader.reader.stats.requests - requests}
    return run


def speech(root: Path, args, server) -> list[dict]:
    spec, data = speech_corpus(root, args.utterances)
    flacs = [f for f in spec.files if f.endswith(".flac")]
    blobs = [Path(f).read_bytes() for f in flacs]
    grid = FrameGrid()
    frames = [soundfile.info(io.BytesIO(b)).frames for b in blobs]
    total_audio = sum(frames) / RATE
    masks = [npy(np.zeros((1, grid.frames(n)), dtype=bool)) for n in frames]  # stand-ins for the stored masks

    def ceiling():
        for blob in blobs:
            soundfile.read(io.BytesIO(blob), dtype="float32")
        return {"units": total_audio}

    def decode_normalise():
        for blob, mask in zip(blobs, masks):
            decode_speech(blob, mask, variant=0, crop_length=None, frame_grid=grid)
        return {"units": total_audio}

    sources = {"local": (Location(str(data)), flacs, None)}
    if server is not None:
        fs = server.filesystem()
        bucket = server.make_bucket()
        for path in data.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{bucket}/data/{path.relative_to(data)}", path.read_bytes())
        remote = [f"{bucket}/flac/{i:06d}.flac" for i in range(len(flacs))]
        for name, blob in zip(remote, blobs):
            fs.pipe_file(name, blob)
        del fs
        sources[f"S3 ({server.kind})"] = (Location(f"s3://{bucket}/data", server.storage_options()), remote,
                                          server.storage_options())
    W = args.workers
    # the baselines first: their worker processes fork before any loader thread exists
    methods = {f"baseline {where}": dataloader_epoch(FlacFiles(files, options), W, pad_collate, EVAL_BATCH,
                                                      lambda batch: sum(batch["lengths"]) / RATE)
               for where, (_, files, options) in sources.items()}
    loaders = []
    for where, (location, _, _) in sources.items():
        for mode, policy in (("train", BatchPolicy(max_tokens=MAX_TOKENS)),
                             ("eval", BatchPolicy(batch_size=EVAL_BATCH, shuffle=False, crop=False))):
            loaders.append(StreamingLoader(location, SPLIT, policy, workers=W, train=mode == "train"))
            methods[f"d2v {mode} {where}"] = d2v_speech_epoch(loaders[-1])
    # what checking every sample's payload checksum costs: the same loader with the check off
    loaders.append(StreamingLoader(sources["local"][0], SPLIT, BatchPolicy(max_tokens=MAX_TOKENS), workers=W))
    loaders[-1].index.columns["payload_crc32"][:] = -1
    methods["d2v train local unchecked"] = d2v_speech_epoch(loaders[-1])
    methods["ceiling"] = ceiling
    methods["decode_speech"] = decode_normalise
    best = best_of(methods, args.repeats)
    for loader in loaders:
        loader.close()
    if server is not None:
        server.remove_bucket(bucket)

    top = best["ceiling"]["units"] / best["ceiling"]["seconds"] * W
    rows = [row("speech", "ceiling: soundfile decode, 1 thread x W", W, best["ceiling"], "audio-s/s", scale=W),
            row("speech", "d2v decode_speech only, 1 thread x W", W, best["decode_speech"], "audio-s/s", scale=W,
                ceiling=top)]
    for where in sources:
        base = best[f"baseline {where}"]
        rows.append(row("speech", f"baseline DataLoader, {where}", W, base, "audio-s/s", ceiling=top))
        for mode in ("train", "eval"):
            m = best[f"d2v {mode} {where}"]
            for what in ("delivered", "decoded"):
                rows.append(row("speech", f"d2v {mode}, {where}, {what}", W, m, "audio-s/s", ceiling=top,
                                baseline=base, units=m["units"] if what == "delivered" else m["decoded"]))
        if where == "local":
            m = best["d2v train local unchecked"]
            rows.append(row("speech", "d2v train, local, payload checksums off, delivered", W, m, "audio-s/s",
                            ceiling=top, baseline=base))
    return rows


# -- images -------------------------------------------------------------------------------------
class JpegFiles(torch.utils.data.Dataset):
    """The baseline's dataset: one .JPEG per image, d2v's training transform."""

    def __init__(self, paths: list[str], mask: bytes):
        self.paths, self.mask = paths, mask

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return decode_image(Path(self.paths[i]).read_bytes(), self.mask, variant=0, train=True,
                            rng=np.random.default_rng(i))


def stack_collate(items):
    return {"image": torch.from_numpy(np.stack([i for i, _ in items])),
            "mask": torch.from_numpy(np.stack([m for _, m in items]))}


def images(root: Path, args) -> list[dict]:
    spec, data = image_corpus(root, args.images)
    jpegs = [f for f in spec.files if f.endswith(".JPEG")]
    blobs = [Path(f).read_bytes() for f in jpegs]
    mask = npy(np.zeros((1, 196), dtype=bool))
    W = args.workers

    def ceiling():
        for blob in blobs:
            Image.open(io.BytesIO(blob)).load()
        return {"units": len(blobs)}

    def transform():
        for i, blob in enumerate(blobs):
            decode_image(blob, mask, variant=0, train=True, rng=np.random.default_rng(i))
        return {"units": len(blobs)}

    baseline = dataloader_epoch(JpegFiles(jpegs, mask), W, stack_collate, IMAGE_BATCH, lambda b: len(b["image"]))
    loader = StreamingLoader(Location(str(data)), "train", BatchPolicy(batch_size=IMAGE_BATCH), workers=W)
    best = best_of({"baseline": baseline, "d2v": lambda: {"units": sum(len(b["keys"]) for b in loader)},
                    "ceiling": ceiling, "transform": transform}, args.repeats)
    loader.close()
    top = best["ceiling"]["units"] / best["ceiling"]["seconds"] * W
    return [row("images", "ceiling: Pillow open+load, 1 thread x W", W, best["ceiling"], "images/s", scale=W),
            row("images", "d2v decode_image only, 1 thread x W", W, best["transform"], "images/s", scale=W,
                ceiling=top),
            row("images", "baseline DataLoader, decode_image", W, best["baseline"], "images/s", ceiling=top),
            row("images", "d2v train", W, best["d2v"], "images/s", ceiling=top, baseline=best["baseline"])]


# -- report -------------------------------------------------------------------------------------
def row(workload, method, workers, m, unit, *, scale=1, units=None, ceiling=None, baseline=None) -> dict:
    """`scale`: W for the one-thread measurements (rate x W; CPU per unit is unchanged)."""
    units = m["units"] if units is None else units
    rate = units / m["seconds"] * scale
    return {"workload": workload, "method": method, "workers": workers, "epoch_s": round(m["seconds"], 3),
            "rate": round(rate, 1), "unit": unit, "per_worker": round(rate / workers, 1),
            "cpu_s": round(m["cpu_s"], 2), "per_cpu_s": round(units / m["cpu_s"], 1) if m["cpu_s"] else None,
            "store_cpu_s": round(m["store_cpu_s"], 2),
            "vs_ceiling": round(rate / ceiling, 2) if ceiling else None,
            "vs_baseline": round(rate / (baseline["units"] / baseline["seconds"]), 2) if baseline else None,
            **({"store_requests": m["requests"]} if "requests" in m else {})}


def targets(rows: list[dict]) -> list[dict]:
    """The speech targets, on local data (the baseline delivers whole utterances: the loader's decoded)."""
    by = {r["method"]: r for r in rows}

    def check(name, value, threshold):
        return {"target": name, "value": value, "met": value >= threshold}
    out = []
    for mode in ("train", "eval"):
        decoded, delivered = by[f"d2v {mode}, local, decoded"], by[f"d2v {mode}, local, delivered"]
        out += [check(f"d2v {mode} decoded >= 2x baseline", decoded["vs_baseline"], 2),
                check(f"d2v {mode} decoded >= 0.8x ceiling", decoded["vs_ceiling"], 0.8),
                check(f"d2v {mode} delivered >= 3,000 audio-s/s per worker", delivered["per_worker"], 3000)]
    return out


def s3_available() -> bool:
    from tests.s3server import chosen_kind
    try:
        kind = chosen_kind()
    except ValueError:
        return False
    return kind != "moto" or importlib.util.find_spec("moto") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=1200)
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action=argparse.BooleanOptionalAction, default=None,
                        help="also stream from a local S3 server (default: when radosgw or moto is available)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.s3 = s3_available() if args.s3 is None else args.s3
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                          f"torch {torch.__version__}", "args": vars(args), "load_before": os.getloadavg()[0]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.s3:
            from tests.s3server import s3_server
            with s3_server() as server:
                rows += speech(Path(tmp), args, server)
        else:
            rows += speech(Path(tmp), args, None)
        rows += images(Path(tmp), args)
    results.update(load_after=os.getloadavg()[0], rows=rows, targets=targets(rows))
    print(f"machine: {results['machine']}; 1-min load average {results['load_before']:.2f} before, "
          f"{results['load_after']:.2f} after")
    print(f"{'workload':<7} {'method':<42} {'W':>2} {'epoch s':>7} {'rate':>8} {'unit':<9} {'/worker':>7} "
          f"{'CPU-s':>6} {'/CPU-s':>7} {'store CPU-s':>11} {'vs ceil':>7} {'vs base':>7}")
    for r in rows:
        store = f"{r['store_cpu_s']:.2f}" if "S3" in r["method"] else ""
        print(f"{r['workload']:<7} {r['method']:<42} {r['workers']:>2} {r['epoch_s']:>7.2f} {r['rate']:>8,.0f} "
              f"{r['unit']:<9} {r['per_worker']:>7,.0f} {r['cpu_s']:>6.2f} {r['per_cpu_s']:>7,.0f} {store:>11} "
              f"{r['vs_ceiling'] or '':>7} {r['vs_baseline'] or '':>7}")
    for t in results["targets"]:
        print(f"target {t['target']}: {t['value']:,} -> {'met' if t['met'] else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

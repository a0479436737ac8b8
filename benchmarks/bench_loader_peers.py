"""d2v's streaming loader against the loaders users would pick instead: MosaicML Streaming, LitData,
webdataset and Lhotse, on the same speech and image corpora, from local disk and from S3.

Every peer gets the same samples (the members of d2v's own shards: FLAC or JPEG bytes and the
stored mask), written into its own format with its own tools, read as its documentation
recommends, with the same worker count and the same work per sample: d2v's decode_speech
(decode + normalise) and a crop of every member to the batch's shortest at a random offset, or
d2v's decode_image (random resized crop, flip, normalise). d2v itself runs its training loader.

- MosaicML Streaming: MDSWriter (64 MB shards) -> StreamingDataset + StreamingDataLoader.
- LitData: optimize (64 MB chunks) -> StreamingDataset + StreamingDataLoader.
- webdataset: WebDataset over d2v's own tars (shard shuffle, 1,000-sample buffer) + WebLoader.
- Lhotse: CutSet in its Shar format (recordings re-encoded as FLAC by Lhotse), read with
  CutSet.from_shar and a DynamicBucketingSampler (the audio budget of d2v's batches) in a
  DataLoader whose workers decode (the sampler in the main process, as Lhotse's resume needs).
- Fixed-size peers use 8 utterances (about d2v's 1.4M-sample budget) or 32 images per batch.

Per method: delivered audio-s/s (images/s) and per worker, time to first batch (from building
the dataset and loader, a fresh cache for S3), peak memory (PSS) of the process tree above what
it held before. Methods interleaved, best of --repeats epochs, one run.

Beside it a feature table that the script checks by running each loader in W=2 real ranks
(torch.distributed with gloo, one process each, as torchrun starts them): every sample exactly
once per epoch across ranks; exact mid-epoch resume (state saved after 3 batches, restored in new
processes, the rest equals the uninterrupted epoch batch for batch); resume at world size 1 from
a state saved at 2 (no sample lost or repeated); batches sized by an audio budget (every batch
within d2v's budget and batch sizes vary). d2v runs these with tail="pad": the global batches that
do not divide among the ranks are repeated to even them out and flagged as repeats (`padding`),
which the coverage count leaves out; its default, "drop", leaves them out as drop_last does.
A peer's refusal (its own error) is shown as "no: <its message>"; an epoch that fails in the
throughput runs is counted beside the figure, not hidden.

The peers are not d2v dependencies: `make bench-peers` installs them in .venv-peers
(pyproject's `peers` extra, pinned against torch by constraints.txt).

    .venv-peers/bin/python benchmarks/bench_loader_peers.py [--utterances 1200] [--images 960]
        [--workers 2] [--repeats 3] [--s3 | --no-s3] [--only speech,images,features]
        [--peers d2v,d2v-cache,mosaic,litdata,webdataset,lhotse] [--json OUT]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import gc
import importlib.metadata
import importlib.util
import io
import json
import multiprocessing
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if importlib.util.find_spec("torchvision") is None:
    # Streaming imports torchvision for its vision datasets alone, which this benchmark does not use;
    # no torchvision build matches a CPU-only torch 2.13 here (make bench-peers removes one that fails).
    sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from corpora import SPEECH_SPLIT as SPLIT  # noqa: E402
from corpora import image_corpus, speech_corpus  # noqa: E402

from d2v_train.data.decode import decode_image, decode_speech  # noqa: E402
from d2v_train.data.loader import StreamingLoader  # noqa: E402
from d2v_train.data.plan import BatchPolicy  # noqa: E402
from pipelines.storage import Location  # noqa: E402
from schemas import FrameGrid  # noqa: E402

RATE = 16_000
MAX_TOKENS = 1_400_000  # d2v's default training budget: ~8 utterances of 10 s
MAX_SAMPLE = 320_000  # longer crops are cut to this (d2v's max_sample_size)
SPEECH_BATCH = 8
IMAGE_BATCH = 32
GRID = FrameGrid()
ME = psutil.Process()
PEERS = ("d2v", "mosaic", "litdata", "webdataset", "lhotse")
# From S3 also d2v with its local shard cache (cache_dir), the way Streaming and LitData always read
REMOTE_ONLY = ("d2v-cache",)
SHARD_BYTES = 1 << 26  # Streaming's default shard size and LitData's recommended chunk size


# -- the work every peer does per sample and per batch ------------------------------------------
def speech_item(key: str, flac: bytes, mask: bytes) -> dict:
    wave, frames = decode_speech(flac, mask, variant=0, crop_length=None, frame_grid=GRID)
    return {"key": key, "wave": wave, "frames": frames}


def speech_collate(items: list[dict]) -> dict:
    """Crop every member to the shortest at a random offset (a multiple of the hop), as d2v's training."""
    rng = np.random.default_rng()
    length = min(min(i["wave"].size for i in items), MAX_SAMPLE)
    hop, crops, masks = GRID.hop, [], []
    for item in items:
        start = int(rng.integers(0, (item["wave"].size - length) // hop + 1)) * hop
        crops.append(item["wave"][start:start + length])
        masks.append(item["frames"][start // hop:start // hop + GRID.frames(length)])
    return {"source": torch.from_numpy(np.stack(crops)), "mask": torch.from_numpy(np.stack(masks)),
            "keys": [i["key"] for i in items], "lengths": [i["wave"].size for i in items]}


def image_item(key: str, jpeg: bytes, mask: bytes) -> dict:
    image, patches = decode_image(jpeg, mask, variant=0, train=True, rng=np.random.default_rng())
    return {"key": key, "image": image, "patches": patches}


def image_collate(items: list[dict]) -> dict:
    return {"image": torch.from_numpy(np.stack([i["image"] for i in items])),
            "mask": torch.from_numpy(np.stack([i["patches"] for i in items])), "keys": [i["key"] for i in items]}


WORK = {"speech": (speech_item, speech_collate, "flac", SPEECH_BATCH),
        "images": (image_item, image_collate, "jpg", IMAGE_BATCH)}


# -- the corpora, written in every format -------------------------------------------------------
def d2v_samples(data: Path, suffix: str) -> list[tuple[str, bytes, bytes]]:
    """(key, payload, mask) of every sample in d2v's shards, read with webdataset."""
    import webdataset as wds
    tars = sorted(str(p) for p in data.rglob("*.tar"))
    return [(s["__key__"], s[suffix], s["mask.npy"]) for s in wds.WebDataset(tars, shardshuffle=False)]


def write_formats(workload: str, data: Path, root: Path) -> dict:
    """Each peer's copy of the corpus in `root`; returns where each lies and what they hold."""
    suffix = WORK[workload][2]
    samples = d2v_samples(data, suffix)
    out = {"d2v": str(data), "tars": sorted(str(p.relative_to(data)) for p in data.rglob("*.tar")),
           "keys": [k for k, _, _ in samples]}

    from streaming import MDSWriter
    with MDSWriter(out=str(root / "mds"), columns={"key": "str", "data": "bytes", "mask": "bytes"},
                   size_limit=SHARD_BYTES) as writer:
        for key, payload, mask in samples:
            writer.write({"key": key, "data": payload, "mask": mask})
    out["mosaic"] = str(root / "mds")

    import litdata
    by_key = {k: (p, m) for k, p, m in samples}
    with contextlib.redirect_stdout(io.StringIO()):
        litdata.optimize(fn=_litdata_item, inputs=[(k, *by_key[k]) for k in out["keys"]],
                         output_dir=str(root / "litdata"), chunk_bytes=SHARD_BYTES, num_workers=1,
                         verbose=False)
    multiprocessing.set_start_method(None, force=True)  # optimize sets spawn for the whole process
    out["litdata"] = str(root / "litdata")

    if workload == "speech":
        from lhotse import CutSet, Recording, RecordingSet
        from lhotse.dataset.sampling.dynamic_bucketing import estimate_duration_buckets
        recordings = RecordingSet.from_recordings(Recording.from_bytes(p, recording_id=k) for k, p, _ in samples)
        cuts = CutSet.from_manifests(recordings=recordings)
        shar = root / "shar"
        shar.mkdir()
        cuts.to_shar(str(shar), fields={"recording": "flac"}, shard_size=1000)
        out["lhotse"] = str(shar)
        out["lhotse_bins"] = estimate_duration_buckets(cuts, num_buckets=10)
        out["lhotse_shards"] = len(list(shar.glob("cuts.*.jsonl.gz")))
        out["masks"] = {k: m for k, _, m in samples}
        out["lengths"] = {k: soundfile.info(io.BytesIO(p)).frames for k, p, _ in samples}
    return out


def _litdata_item(item):
    key, payload, mask = item
    return {"key": key, "data": payload, "mask": mask}


def upload(server, bucket: str, formats: dict) -> dict:
    """The same files on the S3 server; returns the formats' remote locations."""
    fs = server.filesystem()
    remote = dict(formats)
    for name in ("d2v", "mosaic", "litdata", "lhotse"):
        if name not in formats:
            continue
        local = Path(formats[name])
        for path in local.rglob("*"):
            if path.is_file():
                fs.pipe_file(f"{bucket}/{name}/{path.relative_to(local)}", path.read_bytes())
        remote[name] = f"s3://{bucket}/{name}"
    import boto3
    client = boto3.client("s3", endpoint_url=server.endpoint_url, aws_access_key_id=server.key,
                          aws_secret_access_key=server.secret, region_name=server.region)
    remote["tar_urls"] = [client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": f"d2v/{t}"},
                                                        ExpiresIn=24 * 3600) for t in formats["tars"]]
    return remote


# -- each peer's loader -------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """Rank and world size as the peers see them (torch.distributed when started, else 0 of 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loader(peer: str, workload: str, where: dict, workers: int, cache: Path, storage: dict | None,
                seed: int = 0, tail: str = "drop"):
    """An iterable of batches for one epoch of this rank, with `state_dict`/`load_state_dict` where
    the peer has them. `storage`: S3 credentials when `where` is remote. `tail`: d2v's policy for
    the global batches that do not divide among the ranks ("pad" repeats flagged batches)."""
    item, collate, suffix, batch = WORK[workload]
    if peer in ("d2v", "d2v-cache"):
        rank, world = rank_and_world()
        location = Location(where["d2v"], storage) if storage else Location(where["d2v"])
        policy = (BatchPolicy(max_tokens=MAX_TOKENS, tail=tail) if workload == "speech"
                  else BatchPolicy(batch_size=batch, tail=tail))
        return StreamingLoader(location, SPLIT if workload == "speech" else "train", policy, workers=workers,
                               rank=rank, world_size=world, seed=seed,
                               cache_dir=str(cache) if peer == "d2v-cache" else None)
    if peer == "mosaic":
        from streaming import StreamingDataLoader
        from streaming.base.util import clean_stale_shared_memory
        clean_stale_shared_memory()  # as Streaming's docs advise before a dataset is made
        remote = where["mosaic"] if storage else None
        dataset = mds_samples(workload)(local=str(cache) if storage else where["mosaic"], remote=remote, shuffle=True,
                             batch_size=batch, shuffle_seed=seed + 9176)
        return StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate,
                                   drop_last=False, persistent_workers=False)
    if peer == "litdata":
        import litdata
        options = None
        if storage:
            # LitData's fast S3 path (obstore) refuses plain HTTP, which the local test server speaks
            # and real S3 does not: allowed here in its client options, nothing else changed.
            from litdata.streaming import downloader
            downloader._OBSTORE_CLIENT_OPTIONS["allow_http"] = "true"
            options = {"endpoint_url": storage["client_kwargs"]["endpoint_url"],
                       "aws_access_key_id": storage["key"], "aws_secret_access_key": storage["secret"]}
        dataset = litdata.StreamingDataset(where["litdata"], cache_dir=str(cache) if storage else None,
                                           shuffle=True, seed=seed + 42, storage_options=options, drop_last=False,
                                           transform=functools.partial(stored_item, item))
        return litdata.StreamingDataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate)
    if peer == "webdataset":
        import webdataset as wds
        urls = ([f"pipe:curl -s -f '{u}'" for u in where["tar_urls"]] if storage
                else [str(Path(where["d2v"]) / t) for t in where["tars"]])
        pipeline = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, seed=seed,
                                 empty_check=False)
                    .shuffle(1000).map(functools.partial(tar_item, item, suffix))
                    .batched(batch, collation_fn=collate, partial=True))
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers)
    if peer == "lhotse":
        from lhotse import CutSet
        from lhotse.dataset import DynamicBucketingSampler
        base, n = where["lhotse"], where["lhotse_shards"]
        fields = {"cuts": [f"{base}/cuts.{i:06d}.jsonl.gz" for i in range(n)],
                  "recording": [f"{base}/recording.{i:06d}.tar" for i in range(n)]}
        cuts = CutSet.from_shar(fields=fields)
        sampler = DynamicBucketingSampler(cuts, max_duration=MAX_TOKENS / RATE, shuffle=True, seed=seed,
                                          duration_bins=where["lhotse_bins"])
        return LhotseLoader(LhotseSpeech(where["masks"]), sampler, workers)
    raise ValueError(peer)


def stored_item(item, sample: dict) -> dict:
    return item(sample["key"], sample["data"], sample["mask"])


def tar_item(item, suffix: str, sample: dict) -> dict:
    return item(sample["__key__"], sample[suffix], sample["mask.npy"])


@functools.cache
def mds_samples(workload: str):
    """Streaming's documented way to transform samples: a StreamingDataset subclass."""
    from streaming import StreamingDataset

    class MDSSamples(StreamingDataset):
        def __getitem__(self, i):
            return stored_item(WORK[workload][0], super().__getitem__(i))
    MDSSamples.__qualname__ = MDSSamples.__name__ = f"MDSSamples_{workload}"
    globals()[MDSSamples.__name__] = MDSSamples  # picklable by name, should workers be spawned
    return MDSSamples


class LhotseSpeech(torch.utils.data.Dataset):
    """Lhotse's map-style dataset: a sampler's CutSet in, a batch out (decoded in the workers)."""

    def __init__(self, masks: dict[str, bytes]):
        self.masks = masks

    def __getitem__(self, cuts):
        return speech_collate([speech_item(c.recording_id, c.recording.sources[0].source, self.masks[c.recording_id])
                               for c in cuts])


class LhotseLoader:
    """DataLoader over Lhotse's sampler, with the sampler's state for resume."""

    def __init__(self, dataset, sampler, workers: int):
        self.sampler = sampler
        self.loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers)

    def __iter__(self):
        return iter(self.loader)

    def state_dict(self):
        return self.sampler.state_dict()

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state)


def close(loader) -> None:
    if isinstance(loader, StreamingLoader):
        loader.close()


# -- throughput ---------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of this process tree while the block runs (proportional set size: pages shared
    with forked workers counted once), sampled every 50 ms."""

    def __enter__(self):
        self.before, self.peak, self._stop = self.now(), 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.now())

    @staticmethod
    def now() -> int:
        total = 0
        for process in (ME, *ME.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                total += process.memory_full_info().pss
        return total

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def tree_cpu_s() -> float:
    """CPU seconds of this process and its live children (workers, their curl pipes), not the store's."""
    total = 0.0
    for process in (ME, *ME.children(recursive=True)):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def epoch(peer: str, workload: str, where: dict, workers: int, scratch: Path, storage: dict | None) -> dict:
    """One epoch from a new loader: seconds, time to first batch, units, peak memory above the start."""
    cache = Path(tempfile.mkdtemp(dir=scratch))
    gc.collect()
    with PeakMemory() as memory:
        cpu = tree_cpu_s()
        started = time.perf_counter()
        loader = make_loader(peer, workload, where, workers, cache, storage)
        first, units, decoded, samples = None, 0.0, 0.0, 0
        for batch in loader:
            first = first or time.perf_counter() - started
            samples += len(batch["keys"])
            if workload == "speech":
                units += batch["source"].numel() / RATE
                decoded += (sum(batch["lengths"]) if "lengths" in batch
                            else sum(where["lengths"][k] for k in batch["keys"])) / RATE
            else:
                units += len(batch["keys"])
        seconds = time.perf_counter() - started
        cpu = tree_cpu_s() - cpu
        requests = loader.reader.stats.requests if isinstance(loader, StreamingLoader) else None
        close(loader)
        del loader
    shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": seconds, "first_batch_s": first, "units": units, "decoded": decoded, "samples": samples,
            "store_requests": requests, "cpu_s": cpu,
            "peak_pss_mb": (memory.peak - memory.before) / 2**20}


def epoch_job(spec_path: str) -> None:
    """One epoch of one loader in this process (started by `throughput`): peers do not share a process."""
    spec = json.loads(Path(spec_path).read_text())
    where = pickle.loads(Path(spec["where"]).read_bytes())
    result = epoch(spec["peer"], spec["workload"], where, spec["workers"], Path(spec["scratch"]), spec["storage"])
    Path(spec["out"]).write_text(json.dumps(result))


def run_epoch(peer: str, workload: str, where_path: Path, workers: int, scratch: Path, storage) -> dict:
    job = Path(tempfile.mkdtemp(dir=scratch))
    spec = {"peer": peer, "workload": workload, "where": str(where_path), "workers": workers,
            "scratch": str(job), "storage": storage, "out": str(job / "result.json")}
    (job / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, __file__, "--epoch-job", str(job / "spec.json")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{workload} {peer}: the epoch failed:\n{done.stdout[-3000:]}")
    result = json.loads((job / "result.json").read_text())
    shutil.rmtree(job, ignore_errors=True)
    return result


def throughput(workload: str, places: dict, args, scratch: Path) -> list[dict]:
    """Every (peer, place) once per repeat, interleaved, each epoch in a new process; the fastest of each."""
    peers = [p for p in (*PEERS, *REMOTE_ONLY) if p in args.peers and (workload == "speech" or p != "lhotse")]
    paths = {}
    for place, (where, _) in places.items():
        paths[place] = scratch / f"where-{workload}-{len(paths)}.pkl"
        paths[place].write_bytes(pickle.dumps(where))
    best: dict = {}
    failed: dict = {}
    for _ in range(args.repeats):
        for place, (_, storage) in places.items():
            for peer in peers:
                if peer in REMOTE_ONLY and storage is None:
                    continue
                try:
                    m = run_epoch(peer, workload, paths[place], args.workers, scratch, storage)
                except RuntimeError as exc:  # recorded in the table: a failing peer does not end the run
                    failed[peer, place] = failed.get((peer, place), ()) + (exc.args[0].strip().splitlines()[-1],)
                    print(f"{workload} {place} {peer}: FAILED {failed[peer, place][-1]}", file=sys.stderr)
                    continue
                print(f"{workload} {place} {peer}: {m['seconds']:.2f} s", file=sys.stderr, flush=True)
                if (peer, place) not in best or m["seconds"] < best[peer, place]["seconds"]:
                    best[peer, place] = m
    rows = []
    for (peer, place), m in best.items():
        rate = m["units"] / m["seconds"]
        rows.append({"workload": workload, "place": place, "peer": peer, "workers": args.workers,
                     "epoch_s": round(m["seconds"], 2), "rate": round(rate, 1),
                     "per_worker": round(rate / args.workers, 1),
                     "decoded_rate": round(m["decoded"] / m["seconds"], 1) if workload == "speech" else None,
                     "samples": m["samples"], "first_batch_s": round(m["first_batch_s"], 2),
                     "peak_pss_mb": round(m["peak_pss_mb"]), "store_requests": m.get("store_requests"),
                     "cpu_s": round(m["cpu_s"], 1) if "cpu_s" in m else None,
                     "failed_epochs": list(failed.get((peer, place), ()))})
    rows += [{"workload": workload, "place": place, "peer": peer, "workers": args.workers, "failed_epochs": list(errors)}
             for (peer, place), errors in failed.items() if (peer, place) not in best]
    return rows


# -- features, checked in real ranks ------------------------------------------------------------
def rank_job(spec_path: str) -> None:
    """One rank of a feature check (run by `features` in its own process, torchrun's environment)."""
    spec = json.loads(Path(spec_path).read_text())
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    where = pickle.loads(Path(spec["where"]).read_bytes())
    loader = make_loader(spec["peer"], "speech", where, spec["workers"], Path(spec["cache"]) / str(rank), None,
                         tail="pad")
    if spec.get("state_in"):
        loader.load_state_dict(pickle.loads(Path(spec["state_in"]).read_bytes()))
    batches, stop = [], spec.get("stop")
    for batch in loader:
        batches.append({"keys": list(batch["keys"]), "lengths": [where["lengths"][k] for k in batch["keys"]],
                        "repeat": bool(batch.get("padding", False))})
        if stop is not None and len(batches) == stop:
            state = loader.state_dict()
            Path(spec["state_out"].format(rank=rank)).write_bytes(pickle.dumps(state))
            break
    Path(spec["out"].format(rank=rank)).write_text(json.dumps(batches))
    close(loader)
    torch.distributed.destroy_process_group()
    os._exit(0)  # loaders' worker threads and shared memory are left to the process's end


def run_ranks(peer: str, world: int, where_path: Path, scratch: Path, workers: int, tag: str, **spec) -> list:
    """Start `world` ranks of one check, each a process; their batches, by rank."""
    from tests.s3server import free_port
    job = scratch / f"{peer}-{tag}"
    job.mkdir(exist_ok=True)
    spec = {"peer": peer, "where": str(where_path), "workers": workers, "cache": str(job / "cache"),
            "out": str(job / "batches-{rank}.json"), "state_out": str(job / "state-{rank}.pkl"), **spec}
    spec_path = job / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-job", str(spec_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    failed = [(r, o) for r, (p, o) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    if failed:
        raise RuntimeError(f"{peer} {tag}: rank {failed[0][0]} failed:\n{failed[0][1][-3000:]}")
    return [json.loads(Path(spec["out"].format(rank=r)).read_text()) for r in range(world)]


def feature_checks(peer: str, where: dict, scratch: Path, workers: int) -> dict:
    """The four checks for one peer; a value is True/False, or a reason it cannot be checked."""
    keys = where["keys"]
    where_path = scratch / "where.pkl"
    where_path.write_bytes(pickle.dumps(where))
    out: dict = {}
    full = run_ranks(peer, 2, where_path, scratch, workers, "full")
    seen = collections.Counter(k for rank in full for b in rank if not b["repeat"] for k in b["keys"])
    out["every sample once per epoch across ranks"] = once(seen, keys)
    batches = [b for rank in full for b in rank]
    sizes = {len(b["keys"]) for b in batches}
    within = all(sum(b["lengths"]) <= MAX_TOKENS for b in batches)
    out["batches sized by an audio budget"] = within and len(sizes) > 1
    if peer == "webdataset":
        out["exact mid-epoch resume"] = out["resume at another world size"] = "no state API"
        return out
    stop = 3
    head = run_ranks(peer, 2, where_path, scratch, workers, "head", stop=stop)
    state = [scratch / f"{peer}-head" / f"state-{r}.pkl" for r in range(2)]
    try:
        rest = [run_ranks(peer, 2, where_path, scratch, workers, f"rest-{r}", state_in=str(state[r]))[r]
                for r in range(2)]
        out["exact mid-epoch resume"] = all(head[r] + rest[r] == full[r] for r in range(2))
    except RuntimeError as exc:
        out["exact mid-epoch resume"] = refusal(exc)
    try:
        (alone,) = run_ranks(peer, 1, where_path, scratch, workers, "elastic", state_in=str(state[0]))
        done = collections.Counter(k for rank in head for b in rank if not b["repeat"] for k in b["keys"])
        done.update(k for b in alone if not b["repeat"] for k in b["keys"])
        out["resume at another world size"] = once(done, keys)
    except RuntimeError as exc:
        out["resume at another world size"] = refusal(exc)
    return out


def once(seen: collections.Counter, keys: list[str]) -> bool | str:
    """True when every key was served exactly once, else what was missing or repeated."""
    missing = sum(1 for k in keys if k not in seen)
    repeated = sum(n - 1 for n in seen.values() if n > 1)
    return True if not missing and not repeated else f"no: {missing} missing, {repeated} repeated"


def refusal(exc: Exception) -> str:
    """A peer's own error when it refuses a resume: its last line, without torchrun's rank prefix."""
    last = str(exc).strip().splitlines()[-1]
    return "no: " + last.split("]: ", 1)[-1][:110]


# -- the run ------------------------------------------------------------------------------------
def make_corpora(root: Path, args) -> dict:
    corpora = {}
    if "speech" in args.only or "features" in args.only:
        corpora["speech"] = speech_corpus(root, args.utterances)[1]
    if "images" in args.only:
        corpora["images"] = image_corpus(root, args.images)[1]
    return corpora


def run(args, root: Path, server) -> dict:
    results: dict = {"rows": [], "features": {}}
    corpora = make_corpora(root, args)
    for workload, data in corpora.items():
        formats = write_formats(workload, data, root / f"{workload}-formats")
        places = {"local": (formats, None)}
        if server is not None and args.s3:
            bucket = server.make_bucket()
            remote = upload(server, bucket, formats)
            places[f"S3 ({server.kind})"] = (remote, server.storage_options())
        if workload in args.only:
            results["rows"] += throughput(workload, places, args, root)
        if workload == "speech" and "features" in args.only:
            for peer in (p for p in PEERS if p in args.peers):
                results["features"][peer] = feature_checks(peer, formats, root / "features", args.workers)
    return results


@contextlib.contextmanager
def s3_environment(server):
    """The variables through which Streaming (S3_ENDPOINT_URL) and Lhotse (smart_open) find the server."""
    saved = dict(os.environ)
    os.environ.update(server.env(), S3_ENDPOINT_URL=server.endpoint_url)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def report(results: dict) -> None:
    print(f"machine: {results['machine']}; 1-min load average {results['load_before']:.2f} before, "
          f"{results['load_after']:.2f} after")
    print(f"{'workload':<8} {'from':<14} {'loader':<11} {'epoch s':>7} {'rate':>8} {'/worker':>8} {'decoded':>8} "
          f"{'first s':>7} {'PSS MB':>7}")
    for r in results["rows"]:
        if "rate" not in r:
            print(f"{r['workload']:<8} {r['place']:<14} {r['peer']:<11} every epoch failed: {r['failed_epochs'][0]}")
            continue
        print(f"{r['workload']:<8} {r['place']:<14} {r['peer']:<11} {r['epoch_s']:>7.2f} {r['rate']:>8,.0f} "
              f"{r['per_worker']:>8,.0f} {r['decoded_rate'] or '':>8} {r['first_batch_s']:>7.2f} "
              f"{r['peak_pss_mb']:>7,}" + (f"  ({len(r['failed_epochs'])} failed epochs)" if r["failed_epochs"] else ""))
    for peer, checks in results["features"].items():
        for name, value in checks.items():
            print(f"feature {peer:<11} {name:<42} {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances", type=int, default=1203,
                        help="an odd count: the ranks' shares and the batches do not divide evenly")
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", default="speech,images,features")
    parser.add_argument("--peers", default=",".join((*PEERS, *REMOTE_ONLY)))
    parser.add_argument("--json", default=None)
    parser.add_argument("--rank-job", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--epoch-job", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_job:
        return rank_job(args.rank_job)
    if args.epoch_job:
        return epoch_job(args.epoch_job)
    args.only, args.peers = set(args.only.split(",")), set(args.peers.split(","))
    versions = {name: importlib.metadata.version(dist) for name, dist in
                (("torch", "torch"), ("mosaicml-streaming", "mosaicml-streaming"), ("litdata", "litdata"),
                 ("webdataset", "webdataset"), ("lhotse", "lhotse"))}
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "versions": versions, "args": {k: sorted(v) if isinstance(v, set) else v for k, v in vars(args).items()},
               "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "features").mkdir()
        if args.s3:
            from tests.s3server import s3_server
            with s3_server() as server, s3_environment(server):
                results.update(run(args, root, server))
        else:
            results.update(run(args, root, None))
    results["load_after"] = os.getloadavg()[0]
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()

"""The streaming loader end to end: coverage per world size, exact and elastic resume, local and S3."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from d2v_train.data.loader import StreamingLoader
from d2v_train.data.plan import BatchPolicy
from d2v_train.data.transforms import ImageTransform
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.imagenet import ImageNetSource
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.helpers import run_d2v

SPLIT = "train-clean-100"
SPEECH = BatchPolicy(max_tokens=150_000, min_sample_size=16_000, max_sample_size=48_000, shuffle_block=2)


@pytest.fixture(scope="module")
def speech_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speech")
    spec = synthetic.make_librispeech(str(root / "corpus"), {SPLIT: 36}, seed=8, seconds=(0.8, 4.0))
    build_dataset(LibriSpeechSource(Location(spec.source), (SPLIT,)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("5"), 3, 0), workers=0, echo=lambda *_: None)
    return root / "data"


@pytest.fixture(scope="module")
def image_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    spec = synthetic.make_imagenet(str(root / "corpus"), classes=3, train_per_class=7, val_per_class=0, seed=2)
    build_dataset(ImageNetSource(Location(spec.source), ("train",)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("4"), 2, 0), workers=0, echo=lambda *_: None)
    return root / "data"


@pytest.fixture(scope="module")
def speech_on_s3(speech_dataset, s3_server):
    """The same speech dataset uploaded to the S3 server."""
    bucket = s3_server.make_bucket()
    fs = s3_server.filesystem()
    for path in speech_dataset.rglob("*"):
        if path.is_file():
            fs.pipe_file(f"{bucket}/data/{path.relative_to(speech_dataset)}", path.read_bytes())
    yield Location(f"s3://{bucket}/data", s3_server.storage_options())
    s3_server.remove_bucket(bucket)


WHERE = ["local", pytest.param("s3", marks=pytest.mark.s3)]


@pytest.fixture
def speech_location(request, speech_dataset) -> Location:
    if request.param == "s3":
        return request.getfixturevalue("speech_on_s3")
    return Location(str(speech_dataset))


def _epoch(location, policy, split, *, rank=0, world_size=1, seed=0, state=None, limit=None, **options):
    loader = StreamingLoader(location, split, policy, rank=rank, world_size=world_size, seed=seed, workers=2, **options)
    if state:
        loader.load_state_dict(state)
    batches = []
    for batch in loader:
        batches.append(batch)
        if limit is not None and len(batches) >= limit:
            break
    state = loader.state_dict()
    loader.close()
    return batches, state


def _keys(batches) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def _planned_keys(location, policy, split, seed=0, epoch=0, world_size=1) -> list[str]:
    loader = StreamingLoader(location, split, policy, seed=seed, workers=1)
    plan = loader.plan(epoch)
    served = len(plan) - len(plan) % world_size
    keys = [loader.index.columns["key"][i] for batch in plan[:served] for i in batch.samples]
    loader.close()
    return keys


@pytest.mark.parametrize("speech_location, world_size",
                         [("local", 1), ("local", 2), ("local", 3), pytest.param("s3", 2, marks=pytest.mark.s3)],
                         indirect=["speech_location"])
def test_one_epoch_over_all_ranks_yields_every_planned_sample_once(speech_location, world_size):
    location = speech_location
    seen = []
    for rank in range(world_size):
        batches, _ = _epoch(location, SPEECH, SPLIT, rank=rank, world_size=world_size)
        seen += _keys(batches)
        for batch in batches:
            assert batch["source"].dtype == torch.float32 and batch["source"].shape[0] == len(batch["keys"])
            assert batch["mask"].shape[1] == (batch["source"].shape[1] - 400) // 320 + 1
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(_planned_keys(location, SPEECH, SPLIT, world_size=world_size))


def test_epochs_and_seeds_change_the_order_and_runs_repeat(image_dataset):
    location = Location(str(image_dataset))
    policy = BatchPolicy(batch_size=4, shuffle_block=1)
    loader = StreamingLoader(location, "train", policy, seed=1, workers=2)
    first = [b for b in loader]
    second = [b for b in loader]  # the next epoch
    loader.close()
    again, _ = _epoch(location, policy, "train", seed=1)
    other, _ = _epoch(location, policy, "train", seed=2)
    assert _keys(first) == _keys(again) and all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert sorted(_keys(first)) == sorted(_keys(second)) and _keys(first) != _keys(second)
    assert _keys(other) != _keys(first)
    assert first[0]["epoch"] == 0 and second[0]["epoch"] == 1


@pytest.mark.parametrize("speech_location", WHERE, indirect=True)
def test_resume_in_a_fresh_loader_continues_batch_for_batch(speech_location):
    location = speech_location
    full, _ = _epoch(location, SPEECH, SPLIT, seed=4)
    head, state = _epoch(location, SPEECH, SPLIT, seed=4, limit=3)
    tail, _ = _epoch(location, SPEECH, SPLIT, seed=4, state=json.loads(json.dumps(state)))
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full):
        assert a["keys"] == b["keys"] and a["batch"] == b["batch"]
        assert torch.equal(a["source"], b["source"]) and torch.equal(a["mask"], b["mask"])


@pytest.mark.parametrize("speech_location, before, after",
                         [("local", 2, 1), ("local", 1, 2), pytest.param("s3", 2, 1, marks=pytest.mark.s3)],
                         indirect=["speech_location"])
def test_elastic_resume_serves_exactly_the_remaining_samples(speech_location, before, after):
    location = speech_location
    first, states = [], []
    for rank in range(before):
        batches, state = _epoch(location, SPEECH, SPLIT, rank=rank, world_size=before, seed=6, limit=2)
        first += _keys(batches)
        states.append(state)
    assert len({s["global_batches_done"] for s in states}) == 1 and states[0]["global_batches_done"] == 2 * before
    rest = []
    for rank in range(after):
        batches, _ = _epoch(location, SPEECH, SPLIT, rank=rank, world_size=after, seed=6, state=states[0])
        rest += _keys(batches)
    loader = StreamingLoader(location, SPLIT, SPEECH, seed=6, workers=1)
    plan = loader.plan(0)
    loader.close()
    done = states[0]["global_batches_done"]
    end = done + (len(plan) - done) // after * after
    expected_rest = [loader.index.columns["key"][i] for batch in plan[done:end] for i in batch.samples]
    assert sorted(rest) == sorted(expected_rest)
    assert not set(first) & set(rest)


def test_cli_resume_in_a_fresh_process_equals_the_uninterrupted_run(image_dataset, tmp_path):
    url = str(image_dataset)
    common = ["data", "stream", url, "--split", "train", "--batch-size", "3", "--seed", "5", "--workers", "2"]
    run_d2v(*common, "--keys-out", str(tmp_path / "all.txt"))
    result = run_d2v(*common, "--max-batches", "2", "--state-out", str(tmp_path / "state.json"),
                     "--keys-out", str(tmp_path / "head.txt"))
    assert "samples/s" in result.stdout
    run_d2v(*common, "--resume", str(tmp_path / "state.json"), "--keys-out", str(tmp_path / "tail.txt"))
    head, tail = (tmp_path / "head.txt").read_text().split(), (tmp_path / "tail.txt").read_text().split()
    assert len(head) == 6
    assert head + tail == (tmp_path / "all.txt").read_text().split()
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["global_batches_done"] == 2 and state["epoch"] == 0


def test_a_missing_shard_is_named_and_skipping_is_counted(image_dataset, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(image_dataset, copy)
    dataset = json.loads((copy / "dataset.json").read_text())
    victim = dataset["shards"][1]["name"]
    (copy / victim).unlink()
    policy = BatchPolicy(batch_size=4)
    with pytest.raises(Exception, match=victim.split("/")[-1]):
        _epoch(Location(str(copy)), policy, "train")
    batches, _ = _epoch(Location(str(copy)), policy, "train", skip_bad_shards=True)
    expected = dataset["splits"]["train"]["samples"] - dataset["shards"][1]["samples"]
    assert len(_keys(batches)) == expected
    result = run_d2v("data", "stream", str(copy), "--split", "train", "--batch-size", "4", "--skip-bad-shards")
    assert "skipped shards 1" in result.stdout


@pytest.mark.s3
def test_the_same_epoch_and_resume_from_s3(speech_dataset, speech_on_s3, s3_server):
    remote = speech_on_s3
    local = Location(str(speech_dataset))
    full_local, _ = _epoch(local, SPEECH, SPLIT, seed=9)
    head, state = _epoch(remote, SPEECH, SPLIT, seed=9, limit=2)
    tail, _ = _epoch(remote, SPEECH, SPLIT, seed=9, state=state)
    assert [b["keys"] for b in head + tail] == [b["keys"] for b in full_local]
    assert all(torch.equal(a["source"], b["source"]) for a, b in zip(head + tail, full_local))
    result = run_d2v("data", "stream", remote.url, "--split", SPLIT, "--max-tokens", "150000", env=s3_server.env())
    assert "audio-s/s" in result.stdout


def test_transient_store_errors_are_retried_and_the_epoch_is_identical(speech_dataset):
    from d2v_train.data.reader import ShardReader
    from tests.test_reader import flaky

    location = Location(str(speech_dataset))
    clean, _ = _epoch(location, SPEECH, SPLIT, seed=2)
    loader = StreamingLoader(location, SPLIT, SPEECH, seed=2, workers=2)
    wrapper, open_fs = flaky(location, failures=5)
    loader.reader = ShardReader(location, [(s.name, s.sha256, s.bytes) for s in loader.index.shards],
                                data_suffix="flac", retries=6, backoff_s=0.001, open_fs=open_fs)
    flaky_batches = list(loader)
    assert loader.reader.stats.retries == 5 and wrapper.calls > 5
    loader.close()
    assert [b["keys"] for b in flaky_batches] == [b["keys"] for b in clean]
    assert all(torch.equal(a["source"], b["source"]) for a, b in zip(flaky_batches, clean))


def _images_by_key(location, train: bool, transform: ImageTransform, size: int) -> dict:
    loader = StreamingLoader(location, "train", BatchPolicy(batch_size=4, shuffle=train), train=train, workers=1,
                             image_size=size, image_transform=transform)
    images = {key: image for batch in loader for key, image in zip(batch["keys"], batch["image"])}
    loader.close()
    return images


def test_whole_picture_transforms_train_on_exactly_what_evaluation_scores(tmp_path):
    """crop_scale (1, 1) without flips trains on the pictures that crop_pct 1 scores (square ones:
    the generated mosaics); ImageNet's defaults crop, resize and flip them."""
    spec = synthetic.make_imagenet(str(tmp_path / "corpus"), classes=2, train_per_class=4, val_per_class=0,
                                   seed=3, size_range=(48, 48))
    build_dataset(ImageNetSource(Location(spec.source), ("train",)), Location(str(tmp_path / "data")),
                  BuildOptions(ShardSize.parse("4"), 1, 0), workers=0, echo=lambda *_: None)
    location = Location(str(tmp_path / "data"))
    whole = _images_by_key(location, True, ImageTransform(crop_scale=(1.0, 1.0), hflip=0.0), 48)
    scored = _images_by_key(location, False, ImageTransform(crop_pct=1.0), 48)
    cropped = _images_by_key(location, True, ImageTransform(), 48)
    centre = _images_by_key(location, False, ImageTransform(), 48)
    assert len(whole) == len(scored) == 8 and whole.keys() == scored.keys()
    assert all(torch.equal(whole[k], scored[k]) for k in whole)
    assert sum(not torch.equal(cropped[k], scored[k]) for k in whole) >= 6
    assert all(not torch.equal(centre[k], scored[k]) for k in whole)  # 55 px resized, 48 kept


@pytest.mark.parametrize("options, message", [
    ({"crop_scale": (0.5, 0.2)}, "crop_scale (0.5, 0.2): need 0 < min <= max <= 1"),
    ({"crop_scale": (0.0, 1.0)}, "crop_scale (0.0, 1.0)"),
    ({"hflip": 2.0}, "hflip 2.0: a probability"),
    ({"crop_pct": 0.0}, "crop_pct 0.0"),
])
def test_image_transform_errors_name_the_setting(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ImageTransform(**options)


def test_stream_counts_the_batches_it_consumed_not_the_prefetched_ones(speech_dataset):
    import re

    from tests.helpers import run_d2v

    result = run_d2v("data", "stream", speech_dataset, "--split", "train-clean-100", "--eval", "--batch-size", "1",
                     "--max-batches", "2", "--workers", "2")
    done = result.stdout.strip().splitlines()[-1]
    assert re.search(r"batches 2, samples 2, ", done), done


def test_a_damaged_sample_names_its_shard_and_key_or_is_skipped(speech_dataset, tmp_path):
    """Zeroed mask bits still decode (a mask of nothing): the payload checksum in the index catches
    them on every read, without a cache. One line naming the shard and the key, exit 2; with
    --skip-bad-shards only that sample is left out. An index of an older build (no checksum column)
    still names a sample that cannot be decoded."""
    import io
    import json
    import re
    import shutil

    import numpy as np
    import pyarrow.parquet as pq

    from tests.helpers import run_d2v

    copy = tmp_path / "damaged"
    shutil.copytree(speech_dataset, copy)
    doc = json.loads((copy / "dataset.json").read_text())
    shard = doc["shards"][0]
    row = pq.read_table(copy / shard["index"]).to_pylist()[0]
    tar = bytearray((copy / shard["name"]).read_bytes())
    mask = tar[row["mask_offset"]: row["mask_offset"] + row["mask_bytes"]]
    bits = np.load(io.BytesIO(bytes(mask)))
    assert bits.any(), "the test needs a sample with masked frames"
    header = row["mask_bytes"] - bits.size  # .npy header, then one byte per bool
    tar[row["mask_offset"] + header: row["mask_offset"] + row["mask_bytes"]] = bytes(bits.size)
    (copy / shard["name"]).write_bytes(bytes(tar))
    args = ["data", "stream", str(copy), "--split", "train-clean-100", "--eval", "--batch-size", "2"]
    failed = run_d2v(*args, check=False)
    assert failed.returncode == 2, failed.stderr
    err = failed.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: shard {shard['name']}: sample {row['key']}: payload checksum differs"), err
    assert "--skip-bad-shards" in err
    skipped = run_d2v(*args, "--skip-bad-shards")
    total = sum(s["samples"] for s in doc["shards"])
    assert re.search(rf"samples {total - 1}, ", skipped.stdout.strip().splitlines()[-1]), skipped.stdout
    assert row["key"] in skipped.stderr

    older = tmp_path / "older"
    shutil.copytree(speech_dataset, older)
    tar = bytearray((older / shard["name"]).read_bytes())
    tar[row["data_offset"]: row["data_offset"] + 4] = b"JUNK"  # the FLAC's magic
    (older / shard["name"]).write_bytes(bytes(tar))
    table = pq.read_table(older / shard["index"])
    pq.write_table(table.drop_columns(["payload_crc32"]), older / shard["index"])
    undecodable = run_d2v("data", "stream", str(older), *args[3:], check=False)
    assert undecodable.returncode == 2
    assert undecodable.stderr.strip().startswith(f"error: shard {shard['name']}: sample {row['key']} cannot be decoded")
    # the trainer: the same line, exit 2, and with data.skip_bad_shards it trains on
    import subprocess
    import sys

    from tests.helpers import REPO

    train = [sys.executable, "d2v_train/main.py", "--config", str(REPO / "configs" / "train_speech_tiny.yaml"),
             f"data.url={copy}", "train.max_steps=20", "data.workers=1"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    stopped = subprocess.run([*train, f"run_dir={tmp_path / 'a'}"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=300)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 2, stopped.stderr
    assert last.startswith(f"error: shard {shard['name']}: sample {row['key']}: payload checksum differs"), last
    went_on = subprocess.run([*train, f"run_dir={tmp_path / 'b'}", "data.skip_bad_shards=true"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert went_on.returncode == 0, went_on.stderr

"""Streaming from S3 through a fault-injecting proxy (resets, 500s, 503 SlowDown, truncated bodies,
latency spikes, stalls past the read timeout): every planned sample arrives exactly once per epoch."""
from __future__ import annotations

from collections import Counter

import pytest

from d2v_train.data.loader import StreamingLoader
from d2v_train.data.plan import BatchPolicy
from pipelines import synthetic
from pipelines.build import BuildOptions, build_dataset
from pipelines.plan import ShardSize
from pipelines.sources.librispeech import LibriSpeechSource
from pipelines.storage import Location
from tests.faultproxy import KINDS, FaultProxy, Faults

pytestmark = [pytest.mark.s3, pytest.mark.slow]
SPLIT = "train-clean-100"
POLICY = BatchPolicy(max_tokens=60_000, min_sample_size=8_000, max_sample_size=32_000, shuffle_block=2)


@pytest.fixture(scope="module")
def remote(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("faults")
    spec = synthetic.make_librispeech(str(root / "corpus"), {SPLIT: 24}, seed=9, seconds=(0.8, 1.5))
    bucket = s3_server.make_bucket()
    build_dataset(LibriSpeechSource(Location(spec.source), (SPLIT,)),
                  Location(f"s3://{bucket}/data", s3_server.storage_options()),
                  BuildOptions(ShardSize.parse("3"), 2, 0), workers=0, echo=lambda *_: None)
    yield bucket
    s3_server.remove_bucket(bucket)


def test_every_sample_arrives_once_per_epoch_through_injected_faults(remote, s3_server, monkeypatch):
    monkeypatch.setenv("D2V_S3_READ_TIMEOUT", "1")  # a stall outlasts it
    clean_loader = StreamingLoader(Location(f"s3://{remote}/data", s3_server.storage_options()), SPLIT, POLICY,
                                   seed=1, workers=2)
    planned = [[k for b in clean_loader for k in b["keys"]] for _ in range(2)]
    clean_loader.close()
    faults = Faults(reset=1, error_500=1, slowdown_503=1, truncate=1, latency=1, stall=1, latency_s=0.2, stall_s=2.0)
    with FaultProxy(s3_server.endpoint_url, faults, every=5) as proxy:  # every 5th GET: each kind in turn
        options = s3_server.storage_options()
        options["client_kwargs"] = {"endpoint_url": proxy.endpoint_url}
        loader = StreamingLoader(Location(f"s3://{remote}/data", options), SPLIT, POLICY, seed=1, workers=2,
                                 retries=8)
        served = [[k for b in loader for k in b["keys"]] for _ in range(3)]
        stats = loader.reader.stats
        loader.close()
    assert served[:2] == planned  # the same batches, in the same order, as without faults
    for epoch in served:
        assert Counter(epoch) == Counter(set(epoch)) and len(epoch) == len(planned[0])
    assert set(proxy.counts) == set(KINDS) and min(proxy.counts.values()) >= 2, proxy.counts
    assert stats.retries >= 1 and stats.skipped_shards == 0

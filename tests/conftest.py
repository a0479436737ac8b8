"""Shared fixtures. S3: one server per session (see tests/s3server.py), a fresh bucket per test."""

from collections.abc import Iterator

import pytest

from tests.s3server import S3Server, chosen_kind
from tests.s3server import s3_server as _start_s3_server


def pytest_report_header(config):
    try:
        return f"s3 server: {chosen_kind()}"
    except ValueError as e:  # the s3_server fixture reports it again, as an error
        return f"s3 server: {e}"


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with _start_s3_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    name = s3_server.make_bucket()
    yield name
    s3_server.remove_bucket(name)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: a second thread only adds synchronisation (and stalls on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def speech_dataset(tmp_path_factory) -> str:
    """A small built speech dataset (6 transcribed utterances, 3 shards) for tests that only read it."""
    from pipelines import synthetic
    from pipelines.build import BuildOptions, build_dataset
    from pipelines.plan import ShardSize
    from pipelines.sources.librispeech import LibriSpeechSource
    from pipelines.storage import Location

    root = tmp_path_factory.mktemp("dataset")
    spec = synthetic.make_librispeech(str(root / "corpus"), {"train-clean-100": 6}, seed=3, seconds=(1.0, 2.0))
    build_dataset(LibriSpeechSource(Location(spec.source), ("train-clean-100",)), Location(str(root / "data")),
                  BuildOptions(ShardSize.parse("3"), 1, 0), workers=0, echo=lambda *_: None)
    return str(root / "data")

"""The test S3 server behaves like S3 through s3fs, the way the shard writer uses it.

A subprocess such as ``d2v data build ... s3://bucket/prefix`` reaches the server with the
standard AWS variables alone (``S3Server.env()``): botocore reads ``AWS_ENDPOINT_URL`` and
s3fs leaves the endpoint to botocore, so no ``FSSPEC_S3_ENDPOINT_URL`` or CLI flag is needed.
"""

import os
import subprocess
import sys
import textwrap
import time

import fsspec
import pytest

from tests.s3server import S3Server, free_port

pytestmark = pytest.mark.s3

MiB = 2**20


def test_write_read_back(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    fs.pipe_file(f"{s3_bucket}/a/b.bin", b"hello shard")
    assert fs.cat_file(f"{s3_bucket}/a/b.bin") == b"hello shard"
    assert fs.info(f"{s3_bucket}/a/b.bin")["size"] == 11
    with fsspec.open(f"s3://{s3_bucket}/c.txt", "w", **s3_server.storage_options()) as f:
        f.write("text")
    with fsspec.open(f"s3://{s3_bucket}/c.txt", "r", **s3_server.storage_options()) as f:
        assert f.read() == "text"


def test_ranged_read(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    data = bytes(range(256)) * 40
    fs.pipe_file(f"{s3_bucket}/r.bin", data)
    assert fs.cat_file(f"{s3_bucket}/r.bin", start=100, end=356) == data[100:356]
    assert fs.cat_file(f"{s3_bucket}/r.bin", start=len(data) - 7) == data[-7:]
    with fs.open(f"{s3_bucket}/r.bin", "rb", block_size=1024) as f:
        f.seek(5000)
        assert f.read(10) == data[5000:5010]


def test_listing_sees_other_writers_with_refresh(s3_server, s3_bucket):
    reader, writer = s3_server.filesystem(), s3_server.filesystem()
    writer.pipe_file(f"{s3_bucket}/p/0.tar", b"0")
    assert reader.ls(f"{s3_bucket}/p") == [f"{s3_bucket}/p/0.tar"]
    writer.pipe_file(f"{s3_bucket}/p/1.tar", b"1")
    assert reader.ls(f"{s3_bucket}/p", refresh=True) == [
        f"{s3_bucket}/p/0.tar", f"{s3_bucket}/p/1.tar"]
    assert reader.find(s3_bucket) == [f"{s3_bucket}/p/0.tar", f"{s3_bucket}/p/1.tar"]


def _assert_multipart(fs, path, data, parts):
    info = fs.info(path)
    assert info["size"] == len(data)
    assert info["ETag"].strip('"').endswith(f"-{parts}")  # multipart ETags end in -<parts>
    assert fs.cat_file(path) == data


def test_multipart_pipe_file(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    data = os.urandom(10 * MiB + 123)
    fs.pipe_file(f"{s3_bucket}/big.tar", data, chunksize=5 * MiB)
    _assert_multipart(fs, f"{s3_bucket}/big.tar", data, parts=3)


def test_multipart_open_wb(s3_server, s3_bucket):
    fs = s3_server.filesystem()
    data = os.urandom(5 * MiB + 123)
    with fs.open(f"{s3_bucket}/big.tar", "wb", block_size=5 * MiB) as f:
        for i in range(0, len(data), MiB):
            f.write(data[i:i + MiB])
    _assert_multipart(fs, f"{s3_bucket}/big.tar", data, parts=2)


def test_subprocess_finds_server_from_environment_only(s3_server, s3_bucket):
    s3_server.filesystem().pipe_file(f"{s3_bucket}/x/seen.txt", b"from parent")
    code = textwrap.dedent(f"""
        import fsspec
        fs = fsspec.filesystem("s3")
        print(fs.ls("{s3_bucket}/x"))
        fs.pipe_file("{s3_bucket}/x/child.txt", fs.cat_file("{s3_bucket}/x/seen.txt"))
    """)
    res = subprocess.run([sys.executable, "-c", code], env=s3_server.env(),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert f"{s3_bucket}/x/seen.txt" in res.stdout
    assert s3_server.filesystem().cat_file(f"{s3_bucket}/x/child.txt") == b"from parent"


def test_unreachable_endpoint_fails_fast():
    """With botocore's default retries a refused connection takes ~7 s to surface."""
    dead = S3Server(f"http://127.0.0.1:{free_port()}", "k", "s", "none")
    opts = dead.storage_options(connect_timeout=1, read_timeout=2,
                                retries={"max_attempts": 1, "mode": "standard"})
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **opts)
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    t0 = time.monotonic()
    with pytest.raises(Exception, match="(?i)connect"):
        fs.ls("no-such-bucket")
    assert time.monotonic() - t0 < 10

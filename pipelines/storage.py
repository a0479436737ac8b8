"""fsspec access to corpora and outputs: one place for URLs, atomic publish and write checks.

Credentials and endpoints come from the standard places (AWS_* variables, ~/.aws, fsspec's
FSSPEC_<PROTOCOL>_<OPTION> variables); they are never part of what d2v prints or records.
"""
from __future__ import annotations

import os
import posixpath
import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(OSError):
    """A URL that cannot be read or written, with the reason in words."""


# Fail fast on an unreachable or silent object store instead of botocore's minute-long retry
# loops: connect and read (per socket read, not per transfer) timeouts in seconds, settable for
# slow links by D2V_S3_CONNECT_TIMEOUT / D2V_S3_READ_TIMEOUT; with s3fs's and botocore's retries
# a store that accepts connections and never answers is reported after a few read timeouts.
_S3_RETRIES = 2  # botocore attempts per call, and s3fs's retries of a failed call


def _s3_defaults() -> dict:
    timeouts = {}
    for key, default in (("connect_timeout", 10.0), ("read_timeout", 30.0)):
        name = f"D2V_S3_{key.upper()}"
        try:
            timeouts[key] = float(os.environ.get(name, default))
        except ValueError:
            raise StorageError(f"{name}={os.environ[name]!r}: expected seconds") from None
    return {"config_kwargs": {**timeouts, "retries": {"max_attempts": _S3_RETRIES}}}


@dataclass(frozen=True)
class Location:
    """A folder-like place on any fsspec filesystem; picklable, so Dask tasks can carry it."""

    url: str
    storage_options: dict = field(default_factory=dict)

    @property
    def protocol(self) -> str:
        return fsspec.core.split_protocol(self.url)[0] or "file"

    def filesystem(self, *, fail_fast: bool = False) -> tuple[fsspec.AbstractFileSystem, str]:
        """`fail_fast`: a private client that does not retry, for checks before any work starts."""
        options = dict(self.storage_options)
        s3 = self.protocol in ("s3", "s3a")
        if s3:
            for key, value in _s3_defaults().items():
                options.setdefault(key, value)
        if fail_fast:
            options["skip_instance_cache"] = True
            if s3:
                options["config_kwargs"] = {**options["config_kwargs"], "retries": {"max_attempts": 1}}
        fs, root = fsspec.core.url_to_fs(self.url, **options)
        if s3:
            fs.retries = 1 if fail_fast else _S3_RETRIES
        return fs, root.rstrip("/") if root not in ("/", "") else root

    def child(self, *parts: str) -> Location:
        return Location(self.url.rstrip("/") + "/" + "/".join(parts), self.storage_options)

    def public_url(self) -> str:
        return redact(self.url)


_URL_USERINFO = re.compile(r"([a-zA-Z][\w+.-]*://)[^\s\"'@]+@")  # a secret may hold '/'
_USERINFO = re.compile(r"(?<![\w.-])([\w.%+~-]+):([^\s\"'/@]+)@")


def redact_text(text: str) -> str:
    """`text` (an error message, a log line) with every `user:password@` of a URL in it masked,
    also where a library quotes the URL's pieces without its scheme."""
    return _USERINFO.sub("***@", _URL_USERINFO.sub(r"\1***@", text))


def error_line(exc: BaseException) -> str:
    """An error for the terminal: one line, credentials of any URL in it masked."""
    return " ".join(redact_text(str(exc)).split())


def redact(url: str) -> str:
    """The URL without user:password, for logs and dataset.json."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return url


def join(root: str, *parts: str) -> str:
    return posixpath.join(root, *parts) if root else posixpath.join(*parts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def check_output(url: str, what: str, *, folder: bool = False) -> None:
    """Fail now, naming the option or setting `what`, if `url` (a file, or with `folder` a folder)
    cannot be written: a run must not find out after hours of work. Raises StorageError."""
    target = url.rstrip("/") if folder else (url.rstrip("/").rsplit("/", 1)[0] if "/" in url.rstrip("/") else ".")
    try:
        check_writable(Location(target))
    except StorageError as exc:
        raise StorageError(f"{what}: {exc}") from None


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Publish `data` at `path` so that readers see either nothing or the whole object.

    Local disks: a temporary file in the destination folder, fsync, rename. Object stores make a
    PUT (or a completed multipart upload) visible at once, so a single put is already atomic.
    """
    if is_local(fs):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def find_files(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, dict]:
    """Every file under `path`, {path: info with "size"}, as fs.find(detail=True) gives them, but
    on a local disk following symbolic links to folders (corpora spread over disks link their
    subsets in; fsspec lists a link as a single entry), each real folder once (no link loops)."""
    if not is_local(fs):
        return fs.find(path, detail=True)
    found: dict[str, dict] = {}
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(path, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            try:
                found[full] = {"name": full, "size": os.path.getsize(full), "type": "file"}
            except OSError:  # a dangling link: listed with no size, reported by whoever reads it
                found[full] = {"name": full, "size": 0, "type": "file"}
    return dict(sorted(found.items()))


def list_folders(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Names of the folders in `path`, symbolic links to folders included."""
    names = []
    for entry in fs.ls(path, detail=True):
        if entry["type"] == "directory" or (entry.get("islink") and fs.isdir(entry["name"])):
            names.append(posixpath.basename(entry["name"].rstrip("/")))
    return sorted(names)


def abort_orphaned_uploads(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Abort every unfinished multipart upload under `path` of an S3 bucket (a killed build's or
    checkpoint's half-written objects, which the store keeps, and bills, until aborted); returns
    their keys. Other filesystems have none: []. Call it where no other writer works under `path`."""
    if "s3" not in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
        return []
    bucket, _, prefix = path.strip("/").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    aborted, marker = [], {}
    while True:
        page = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker)
        for upload in page.get("Uploads", []) or []:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            aborted.append(upload["Key"])
        if not page.get("IsTruncated"):
            return aborted
        marker = {"KeyMarker": page.get("NextKeyMarker", ""), "UploadIdMarker": page.get("NextUploadIdMarker", "")}


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except FileNotFoundError:
        return False


def size_or_none(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    try:
        return int(fs.size(path))
    except (FileNotFoundError, OSError):
        return None


def check_writable(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open the output and prove it can be written, before any work is done."""
    try:
        fs, root = location.filesystem(fail_fast=True)
    except Exception as exc:  # noqa: BLE001 - any backend error means the same to the user
        raise StorageError(f"cannot open output {location.public_url()}: {_describe(exc)}") from exc
    probe = join(root, f".d2v-write-check-{uuid.uuid4().hex}")
    try:
        if is_local(fs):
            os.makedirs(root, exist_ok=True)
        write_atomic(fs, probe, b"ok")
        if fs.cat_file(probe) != b"ok":
            raise StorageError("a written test object read back different bytes")
        fs.rm_file(probe)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot write to output {location.public_url()}: {_describe(exc)}") from exc
    return location.filesystem()


def check_readable(location: Location) -> tuple[fsspec.AbstractFileSystem, str]:
    """Open a corpus root and check it exists, with a clear error otherwise."""
    try:
        fs, root = location.filesystem()
        found = fs.isdir(root)
    except Exception as exc:  # noqa: BLE001
        raise StorageError(f"cannot read source {location.public_url()}: {_describe(exc)}") from exc
    if not found:
        raise StorageError(f"source {location.public_url()} does not exist or is not a folder")
    return fs, root


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text

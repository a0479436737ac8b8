"""A real S3 server for the tests, on 127.0.0.1.

Shards are written through s3fs to S3-compatible stores, so the tests talk to a real server
instead of mocking botocore: Ceph's radosgw (single node: 1 mon, 1 memstore OSD, beast
frontend) when it is installed, which is the CI path, else moto's server as a subprocess.

Selection, from the environment:
- ``D2V_TEST_S3_ENDPOINT`` (+ ``D2V_TEST_S3_KEY``, ``D2V_TEST_S3_SECRET``, optionally
  ``D2V_TEST_S3_REGION``): use that server, start nothing;
- ``D2V_TEST_S3_SERVER=moto`` or ``=radosgw``: force one kind;
- otherwise radosgw if it and the Ceph daemons are on PATH, else moto.

Every daemon is started by us, tracked by PID and stopped by PID (also when start-up fails);
on Linux each is also killed if the process that started it dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DEFAULT_KEY = "d2v-test-key"
DEFAULT_SECRET = "d2v-test-secret-0123456789abcdef"
# Only used for signing: radosgw accepts any region there.
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """Where a running S3 server is and how to reach it (``kind``: radosgw, moto or external)."""

    endpoint_url: str
    key: str
    secret: str
    kind: str
    region: str = REGION

    def storage_options(self, **config_kwargs) -> dict:
        """Keyword arguments for ``fsspec.filesystem("s3", ...)`` / ``storage_options=``.

        No ``region_name`` in ``client_kwargs``: s3fs would send it as the CreateBucket
        LocationConstraint, which radosgw (zonegroup "default") rejects. The endpoint is an
        IP address, so botocore uses path-style URLs by itself.
        """
        options = {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.endpoint_url},
        }
        if config_kwargs:
            options["config_kwargs"] = config_kwargs
        return options

    def env(self) -> dict[str, str]:
        """Standard AWS variables that make a plain ``fsspec.filesystem("s3")`` reach this server.

        botocore reads ``AWS_ENDPOINT_URL`` itself and s3fs leaves the endpoint to it, so no
        ``FSSPEC_S3_ENDPOINT_URL`` is needed (it works too, but only for fsspec). The AWS
        config files point at /dev/null so a developer's profile cannot redirect requests.
        """
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self, **config_kwargs):
        """A fresh (uncached) s3fs filesystem for this server."""
        import fsspec

        return fsspec.filesystem(
            "s3", skip_instance_cache=True, **self.storage_options(**config_kwargs)
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name when none is given) and return its name."""
        name = name or f"d2v-{uuid.uuid4().hex[:16]}"
        self.filesystem().mkdir(name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Best-effort delete of a bucket and everything in it, pending uploads included."""
        fs = self.filesystem()
        with contextlib.suppress(Exception):
            fs.clear_multipart_uploads(name)
        with contextlib.suppress(Exception):
            fs.rm(name, recursive=True)
        with contextlib.suppress(Exception):
            fs.rmdir(name)


class StartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    # Runs in the child before exec: a killed test run must not leave daemons behind.
    # SIGKILL, because an OSD given SIGTERM after its mon is gone lingers for ~20 s.
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Daemons:
    """Processes started for one server, stopped by PID in reverse start order."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.workdir / f"{name}.out", "wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, cwd=self.workdir, preexec_fn=_die_with_parent,
            )
        self.procs.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise StartError(f"{name} exited with status {proc.returncode}")

    def stop(self, timeout: float = 10.0) -> None:
        # One at a time, newest first: radosgw takes ~5 s longer to exit when the OSD and
        # mon it talks to are already going down.
        while self.procs:
            _, proc = self.procs.pop()
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted(self.workdir.rglob("*")):
            if path.suffix in (".out", ".log") and path.is_file():
                text = path.read_text(errors="replace")[-chars:]
                parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)


def _wait_until(check, deadline: float, what: str, daemons: _Daemons, every: float = 0.2):
    while True:
        daemons.check_alive()
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise StartError(f"timed out waiting for {what}")
        time.sleep(every)


def _http_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the frontend is serving
    except OSError:
        return False


_CEPH_CONF = """\
[global]
fsid = {fsid}
mon_host = v1:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
ms_bind_msgr2 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
crash_dir = {d}/crash
keyring = {d}/keyring
pid_file =
osd_objectstore = memstore
memstore_device_bytes = 2147483648
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
# each radosgw pool creation is an osdmap change; the default 1 s batching makes start-up ~12 s
paxos_propose_interval = 0.05
osd_crush_chooseleaf_type = 0
client_mount_timeout = 30
rados_mon_op_timeout = 30
rados_osd_op_timeout = 30

[mon]
mon_data = {d}/mon/$name

[osd]
osd_data = {d}/osd/$name
# The OSD's own start-up crush commands can race its first monmap and go out with a zero
# fsid ("wrong fsid"), killing it; it is placed in the crush map before it starts instead.
osd_crush_update_on_start = false
osd_class_update_on_start = false

[client.rgw.d2v]
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_data = {d}/rgw
rgw_init_timeout = 60
"""


def _start_radosgw(workdir: Path, daemons: _Daemons, key: str, secret: str,
                   timeout: float) -> str:
    deadline = time.monotonic() + timeout
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mon_port, rgw_port = free_port(), free_port()
    for sub in ("run", "log", "crash", "mon/mon.a", "osd/osd.0", "rgw"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    conf = workdir / "ceph.conf"
    conf.write_text(_CEPH_CONF.format(fsid=fsid, mon_port=mon_port, rgw_port=rgw_port, d=workdir))
    env = {**os.environ, "CEPH_CONF": str(conf)}
    env.pop("CEPH_ARGS", None)

    def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
        left = max(1.0, deadline - time.monotonic())
        try:
            res = subprocess.run(argv, env=env, cwd=workdir, capture_output=True, text=True,
                                 timeout=min(left, 60), preexec_fn=_die_with_parent)
        except subprocess.TimeoutExpired as e:
            raise StartError(f"{argv[0]} {argv[1:4]} timed out") from e
        if check and res.returncode:
            raise StartError(f"{' '.join(argv)} failed: {res.stderr.strip()[-2000:]}")
        return res

    monmap = str(workdir / "monmap")
    run("monmaptool", "--create", "--fsid", fsid, "--add", "a", f"v1:127.0.0.1:{mon_port}", monmap)
    run("ceph-mon", "-c", str(conf), "--mkfs", "-i", "a", "--monmap", monmap)
    daemons.start("mon", ["ceph-mon", "-c", str(conf), "-i", "a", "-f"], env)

    ceph = ("ceph", "-c", str(conf), "--connect-timeout", "10")
    osd_id = _wait_until(
        lambda: (r := run(*ceph, "osd", "new", osd_uuid, check=False)).returncode == 0
        and r.stdout.strip(),
        deadline, "the monitor", daemons)
    run(*ceph, "osd", "crush", "add", f"osd.{osd_id}", "1.0", "root=default")
    run("ceph-osd", "-c", str(conf), "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
    daemons.start("osd", ["ceph-osd", "-c", str(conf), "-i", osd_id, "-f"], env)

    def osd_up() -> bool:
        r = run(*ceph, "osd", "stat", "-f", "json", check=False)
        return r.returncode == 0 and json.loads(r.stdout or "{}").get("num_up_osds") == 1

    _wait_until(osd_up, deadline, "the OSD to be up", daemons)
    daemons.start("rgw", ["radosgw", "-c", str(conf), "-n", "client.rgw.d2v", "-f"], env)
    url = f"http://127.0.0.1:{rgw_port}"
    _wait_until(lambda: _http_up(url), deadline, "radosgw to serve HTTP", daemons)
    run("radosgw-admin", "-c", str(conf), "user", "create",
        "--uid=d2v-test", "--display-name=d2v tests", f"--access-key={key}",
        f"--secret-key={secret}")
    return url


def _start_moto(workdir: Path, daemons: _Daemons, key: str, secret: str, timeout: float) -> str:
    port = free_port()
    daemons.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                           str(port)])
    url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: _http_up(url), time.monotonic() + timeout, "moto_server", daemons, 0.1)
    return url


# Per attempt; radosgw is normally serving in under 2 s, moto in under 1 s.
_STARTERS = {"radosgw": (_start_radosgw, 60.0), "moto": (_start_moto, 30.0)}


def chosen_kind() -> str:
    if os.environ.get("D2V_TEST_S3_ENDPOINT"):
        return "external"
    forced = os.environ.get("D2V_TEST_S3_SERVER", "").strip().lower()
    if forced:
        if forced not in _STARTERS:
            raise ValueError(f"D2V_TEST_S3_SERVER={forced!r}: expected one of {sorted(_STARTERS)}")
        return forced
    needed = ("radosgw", "radosgw-admin", "ceph-mon", "ceph-osd", "ceph", "monmaptool")
    return "radosgw" if all(shutil.which(c) for c in needed) else "moto"


@contextlib.contextmanager
def s3_server(key: str = DEFAULT_KEY, secret: str = DEFAULT_SECRET,
              attempts: int = 2) -> Iterator[S3Server]:
    """Start an S3 server (or use ``D2V_TEST_S3_ENDPOINT``), yield it, stop it.

    A failed start is stopped and retried from a clean folder (a fresh cluster is faster
    than waiting out a wedged one); the error carries the daemons' log tails.
    """
    kind = chosen_kind()
    if kind == "external":
        yield S3Server(
            os.environ["D2V_TEST_S3_ENDPOINT"],
            os.environ.get("D2V_TEST_S3_KEY", key),
            os.environ.get("D2V_TEST_S3_SECRET", secret),
            kind,
            os.environ.get("D2V_TEST_S3_REGION", REGION),
        )
        return
    starter, timeout = _STARTERS[kind]
    errors = []
    for attempt in range(1, attempts + 1):
        workdir = Path(tempfile.mkdtemp(prefix=f"d2v-{kind}-"))
        daemons = _Daemons(workdir)
        try:
            try:
                url = starter(workdir, daemons, key, secret, timeout)
            except (StartError, OSError) as e:
                errors.append(f"{kind} start attempt {attempt} failed: {e}\n{daemons.log_tail()}")
                if attempt < attempts:
                    warnings.warn(f"{kind} start failed ({e}); retrying from scratch", stacklevel=2)
                continue
            yield S3Server(url, key, secret, kind)
            return
        finally:
            daemons.stop()
            shutil.rmtree(workdir, ignore_errors=True)
    raise StartError("\n\n".join(errors))

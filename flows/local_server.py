"""A Prefect server on a free port of 127.0.0.1 with `d2v serve` beside it, for as long as a
`with` block runs: what `prefect deployment run pretrain/speech` needs on one machine, for
benchmarks and tests that drive the deployments as a user does."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flows.launch import REPO

QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving_locally(home: Path, *, extra_env: dict | None = None, timeout_s: float = 180) -> Iterator[dict]:
    """Start both in `home` (PREFECT_HOME, server.log, serve.log), with `extra_env` added to this
    process's environment; yields the environment that points the `prefect` CLI at the server.
    Both end with the block, whatever ends it."""
    home.mkdir(parents=True, exist_ok=True)
    server, env = _start_server(home, {**os.environ, **QUIET, **(extra_env or {})}, timeout_s)
    serve = None
    try:
        log = home / "serve.log"
        serve = _start([sys.executable, "-m", "flows.cli", "serve"], env, log)
        _wait("d2v serve", lambda: "pretrain/speech" in log.read_text(), serve, log, timeout_s)
        yield env
    finally:
        for process in (serve, server):
            if process is not None:
                stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGINT the process group (servers shut down cleanly on it), SIGKILL after 30 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _start_server(home: Path, base_env: dict, timeout_s: float) -> tuple[subprocess.Popen, dict]:
    """Another attempt on another port if the free one was taken meanwhile."""
    log = home / "server.log"
    for _ in range(5):
        port = free_port()
        api = f"http://127.0.0.1:{port}/api"
        env = {**base_env, "PREFECT_HOME": str(home), "PREFECT_API_URL": api}
        server = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                         "--port", str(port)], env, log)
        try:
            _wait("the Prefect server", lambda url=api: _healthy(url), server, log, timeout_s)
            return server, env
        except RuntimeError:
            stop(server)
            if "address already in use" not in log.read_text():
                raise
    raise RuntimeError("no free port for the Prefect server after 5 attempts")


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _wait(what: str, ready, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False

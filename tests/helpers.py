"""Small helpers shared by the builder tests: run the CLI, read shards back."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
D2V = [sys.executable, "-m", "flows.cli"]


def run_d2v(*args: str, env: dict | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """`d2v ARGS...` in a subprocess, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run([*D2V, *args], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"d2v {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def kill_when_held(command: list[str], proxy, env: dict, timeout: float = 240) -> str:
    """Run `command` (its S3 requests through `proxy`, which holds one of them); SIGKILL its whole
    process group the moment storage is frozen at the hold. Returns its output. Fails if the
    process ended first (the hold never came)."""
    env = {**os.environ, **env, "AWS_ENDPOINT_URL": proxy.endpoint_url}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not proxy.held.wait(0.02) and process.poll() is None and time.monotonic() < deadline:
            pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.returncode != -signal.SIGKILL:
        raise AssertionError(f"exited {process.returncode} before the hold ({proxy.hold}) was reached\n{out[-4000:]}")
    return out


def inspect_json(url: str, env: dict | None = None) -> dict:
    return json.loads(run_d2v("data", "inspect", url, "--json", env=env).stdout)


def shard_checksums(dataset_json: dict) -> dict[str, str]:
    return {shard["name"]: shard["sha256"] for shard in dataset_json["shards"]}


def read_dataset_json(folder: str | Path) -> dict:
    return json.loads(Path(folder, "dataset.json").read_text())


def tar_members(path: str | Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)

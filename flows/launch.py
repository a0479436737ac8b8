"""Child processes of a flow (torchrun, `d2v eval`): their own process group, output streamed
line by line, the whole group killed when the flow stops early (failure, cancel, SIGTERM)."""
from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAIL_LINES = 30


class ProcessFailed(RuntimeError):
    """A child exited non-zero; the message ends with its last output lines."""

    def __init__(self, what: str, returncode: int, tail: list[str]):
        self.returncode, self.tail = returncode, tail
        super().__init__(f"{what} exited with code {returncode}; its last output:\n" + "\n".join(tail))


def run_streamed(cmd: Sequence[str], *, what: str, on_line: Callable[[str], None], env: dict | None = None,
                 kill_grace_s: float = 10.0) -> None:
    """Run `cmd` in a new session, pass each output line (stdout and stderr) to `on_line`, and
    raise ProcessFailed on a non-zero exit. Leaving early for any reason kills the process group:
    torchrun's workers would otherwise outlive a cancelled flow and keep the CPUs or GPUs busy."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    process = subprocess.Popen(
        list(cmd), cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, bufsize=1, start_new_session=True,
    )
    try:
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)
        returncode = process.wait()
    except BaseException:
        kill_group(process, kill_grace_s)
        raise
    if returncode != 0:
        kill_group(process, 0)  # strays of a failed torchrun (a rank stuck in a collective)
        raise ProcessFailed(what, returncode, list(tail))


def kill_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the child's process group (the trainer saves and exits on it), SIGKILL after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # The leader is gone; members that ignored SIGTERM must not linger.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return


def python() -> str:
    return sys.executable

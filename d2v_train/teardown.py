"""Ending a finished training or evaluation process without interpreter teardown.

Once a run's outputs are written and its loader, metrics and process group are closed, loader
threads can still be winding down inside native code (libsndfile, numpy, torch). Interpreter
teardown stops such daemon threads in place, which sometimes aborts the process ("terminate
called without an active exception"): a run that succeeded would then exit with SIGABRT, and
torchrun would report the whole job failed.
"""
from __future__ import annotations

import os
import sys

__all__ = ["exit_without_teardown"]


def exit_without_teardown(code: int) -> None:
    """Flush stdout and stderr, then end the process with ``code`` at once."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

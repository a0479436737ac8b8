"""How d2v's command-line entry points end (`d2v`, and `d2v eval` under torchrun): an error a user
can cause (bad input, unreachable storage, a wrong config) is one line on stderr and exit 2,
Ctrl-C is exit 130; anything else is a bug and keeps its traceback."""
from __future__ import annotations

import sys
from collections.abc import Callable

from pipelines.storage import error_line


def exit_code(run: Callable[[], int]) -> int:
    """`run()`'s exit code, with the errors users can cause reported as one line."""
    try:
        return run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ConnectionError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2

"""Evaluate under torchrun: `python -m d2v_train.launch --standalone --nproc_per_node N d2v_train/eval/main.py
TASK --checkpoint ...`
(the arguments of `d2v eval TASK`; also runs as one plain process)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script by torchrun


def main(argv: list[str] | None = None) -> int:
    from d2v_train.eval.cli import main as eval_main

    return eval_main(sys.argv[1:] if argv is None else argv, exit_after_eval=argv is None)


if __name__ == "__main__":
    sys.exit(main())

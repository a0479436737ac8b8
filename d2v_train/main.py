"""Pre-train data2vec: `python -m d2v_train.launch --standalone --nproc_per_node N d2v_train/main.py
--config FILE key.sub=value ...` (torchrun with loopback stores; also runs as one plain process)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by torchrun


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="d2v_train/main.py", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML training config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (YAML values), e.g. train.max_steps=100")
    args = parser.parse_args(argv)

    from pydantic import ValidationError

    from d2v_train.config import describe, load_train_config
    from pipelines.storage import error_line

    try:
        cfg = load_train_config(args.config, args.overrides)
    except ValidationError as exc:
        print(f"error: invalid configuration:\n{describe(exc)}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: invalid configuration: {error_line(exc)}", file=sys.stderr)
        return 2

    from d2v_train.data.reader import ShardError
    from d2v_train.distributed import close_world
    from d2v_train.trainer import Trainer, TrainingStopped

    _share_cpus(cfg.data.workers)

    try:
        try:
            trainer = Trainer(cfg)
            trainer.resume()
        except (ValueError, OSError) as exc:  # a dataset or checkpoint that does not fit the config
            print(f"error: cannot start: {error_line(exc)}", file=sys.stderr)
            return 2
        return trainer.train()
    except TrainingStopped as exc:  # raised alike on every rank: say it once
        if trainer.world.main:
            print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    except ShardError as exc:  # damaged data on this rank's share (data.skip_bad_shards skips it)
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    finally:
        close_world()




def _share_cpus(loader_workers: int) -> None:
    """Leave the loader's threads their cores: torch's default of one compute thread per core
    fights them (a 2-core run trained 4x slower). torchrun and users set OMP_NUM_THREADS to choose."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    per_process = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, per_process - loader_workers))


if __name__ == "__main__":
    from d2v_train.teardown import exit_without_teardown

    exit_without_teardown(main())

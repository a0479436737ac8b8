"""Runs every benchmark in turn (`make bench`); each prints its table and its baseline."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in ("bench_masking.py", "bench_build.py", "bench_loader.py", "bench_models.py", "bench_trainer.py",
               "bench_data2vec2_cost.py", "bench_data2vec2.py", "bench_learning.py"):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)

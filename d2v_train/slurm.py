"""`d2v launch slurm`: the sbatch script of a multi-node run. One task per node starts torchrun
(d2v_train.launch) with the c10d rendezvous on the first node; torchrun starts a rank per GPU.

Pre-emption and time limits: SLURM sends SIGTERM to the job's tasks (at pre-emption, and with
`--signal=TERM@grace` that many seconds before the time limit); the trainer saves a checkpoint and
exits 143, torchrun too, and the script then requeues the job (`scontrol requeue`), whose next
start resumes from that checkpoint by itself. The batch shell traps SIGTERM so that it outlives
the save and can requeue; any other exit code ends the job with that code.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from d2v_train.launch import PREEMPTED_EXIT

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    trainer_args: list[str]  # main.py's: [--config FILE] key=value ...
    job_name: str = "d2v"
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # the time limit, as sbatch takes it (HH:MM:SS, D-HH:MM:SS)
    cpus_per_node: int | None = None
    port: int = 29500  # the rendezvous port on the first node
    grace_s: int = 180  # SIGTERM this long before the time limit: time enough to save
    output: str = "slurm-%j.out"
    python: str = "python"
    workdir: str = str(REPO)
    sbatch_options: list[str] = field(default_factory=list)  # more `--key=value` lines, verbatim

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes and --gpus-per-node must be >= 1 (got {self.nodes}, {self.gpus_per_node})")

    def torchrun_command(self) -> list[str]:
        return [self.python, "-m", "d2v_train.launch", f"--nnodes={self.nodes}",
                f"--nproc-per-node={self.gpus_per_node}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=$head_node:{self.port}", "--rdzv-id=$SLURM_JOB_ID", "--max-restarts=0",
                "d2v_train/main.py", *self.trainer_args]


def sbatch_script(job: SlurmJob) -> str:
    directives = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={job.gpus_per_node}", f"--output={job.output}", "--open-mode=append",
                  "--requeue", f"--signal=TERM@{job.grace_s}"]
    directives += [f"--{key}={value}" for key, value in (("partition", job.partition), ("account", job.account),
                                                         ("time", job.time), ("cpus-per-task", job.cpus_per_node))
                   if value is not None]
    directives += [option if option.startswith("--") else f"--{option}" for option in job.sbatch_options]
    # $head_node and $SLURM_JOB_ID are left for the shell to expand: quote everything else
    command = " ".join(part if "$" in part else shlex.quote(part) for part in job.torchrun_command())
    command = command.replace("--rdzv-endpoint=$head_node", '--rdzv-endpoint="$head_node"')
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "",
             "# written by `d2v launch slurm`; see d2v_train/slurm.py", "set -u",
             f"cd {shlex.quote(job.workdir)}",
             'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
             "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
             "# SIGTERM (pre-emption, the time limit): the trainer saves and exits "
             f"{PREEMPTED_EXIT}; this shell waits for it",
             "trap 'echo \"d2v: SIGTERM: waiting for the trainer to save\"' TERM",
             f"srun --ntasks-per-node=1 --kill-on-bad-exit=1 {command} &",
             "step=$!",
             "wait $step; code=$?",
             'while kill -0 "$step" 2>/dev/null; do wait $step; code=$?; done',
             f'if [ "$code" -eq {PREEMPTED_EXIT} ]; then',
             '    echo "d2v: the trainer saved and stopped (pre-emption or time limit): requeueing job $SLURM_JOB_ID"',
             '    scontrol requeue "$SLURM_JOB_ID"',
             "fi",
             'exit "$code"', ""]
    return "\n".join(lines)

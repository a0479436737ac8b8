"""`d2v launch slurm`: the sbatch script, checked by parsing it (its torchrun line through torchrun's
own argument parser) and by running its shell logic with stand-ins for srun and scontrol on PATH
(no SLURM here): a pre-emption's save (exit 143) requeues the job, other codes end it."""
from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.cli import main
from tests.helpers import REPO

ARGS = ["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--config", "configs/train_speech_tiny.yaml",
        "--partition", "gpu", "--time", "2-00:00:00", "--sbatch-option=--exclusive", "data.url=s3://corpus/data",
        "train.max_steps=100000", "run_dir=/shared/run"]


def _script(capsys) -> str:
    assert main([*ARGS, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_the_script_for_2_nodes_x_8_gpus_starts_torchrun_on_each_node_with_a_c10d_rendezvous(capsys):
    from torch.distributed.run import parse_args

    script = _script(capsys)
    directives = [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH ")]
    for expected in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "--time=2-00:00:00",
                     "--requeue", "--signal=TERM@180", "--exclusive"):
        assert expected in directives, directives
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    expanded = srun.replace("$head_node", "node1").replace("$SLURM_JOB_ID", "4242").rstrip(" &")
    words = shlex.split(expanded)
    launch = words.index("d2v_train.launch")
    assert words[launch - 1] == "-m" and words[launch - 2] == sys.executable
    torchrun = parse_args(words[launch + 1:])
    assert (torchrun.nnodes, torchrun.nproc_per_node) == ("2", "8")
    assert (torchrun.rdzv_backend, torchrun.rdzv_endpoint, torchrun.rdzv_id) == ("c10d", "node1:29500", "4242")
    assert torchrun.max_restarts == 0 and torchrun.training_script == "d2v_train/main.py"
    assert torchrun.training_script_args == ["--config=configs/train_speech_tiny.yaml", "data.url=s3://corpus/data",
                                             "train.max_steps=100000", "run_dir=/shared/run"]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell


def _stand_ins(folder: Path, srun_body: str) -> dict:
    """srun and scontrol on PATH: scontrol prints the nodes and records what it is asked."""
    folder.mkdir()
    for name, body in (("srun", srun_body),
                       ("scontrol", f'echo "$@" >> {folder}/scontrol.log\n'
                                    '[ "$1" = show ] && printf "node1\\nnode2\\n"\nexit 0')):
        path = folder / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "node[1-2]"}


@pytest.mark.parametrize("code, requeued", [(143, True), (1, False), (0, False)])
def test_a_saved_preemption_requeues_the_job_and_other_exits_end_it(code, requeued, capsys, tmp_path):
    script = tmp_path / "job.sbatch"
    script.write_text(_script(capsys))
    env = _stand_ins(tmp_path / "bin", f'echo "srun $*" > {tmp_path}/srun.log\nexit {code}')
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert "--rdzv-endpoint=node1:29500" in (tmp_path / "srun.log").read_text()
    calls = (tmp_path / "bin" / "scontrol.log").read_text().splitlines()
    assert ("requeue 4242" in calls) == requeued, calls


def test_the_batch_shell_outlives_sigterm_until_the_trainer_has_saved(capsys, tmp_path):
    """SLURM signals the batch shell and the job's tasks together: the shell must wait for the save
    (here: srun taking 1 s after its SIGTERM, then exiting 143), then requeue."""
    script = tmp_path / "job.sbatch"
    script.write_text(_script(capsys))
    srun = f"trap 'sleep 1; echo saved > {tmp_path}/saved; exit 143' TERM\nsleep 60 & wait"
    env = _stand_ins(tmp_path / "bin", srun)
    process = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    time.sleep(1.0)  # srun is running
    os.killpg(process.pid, signal.SIGTERM)  # as SLURM's pre-emption: every process of the job
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 143, out
    assert (tmp_path / "saved").exists() and "waiting for the trainer to save" in out
    assert "requeue 4242" in (tmp_path / "bin" / "scontrol.log").read_text()


def test_a_wrong_trainer_setting_is_refused_before_anything_is_written(capsys, tmp_path):
    script = tmp_path / "job.sbatch"
    assert main(["launch", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--script", str(script),
                 "data.url=/data", "model=speech_tiny", "train.max_stepz=3"]) == 2
    assert "train.max_stepz" in capsys.readouterr().err and not script.exists()


def test_the_flow_hands_training_to_the_slurm_launcher():
    from flows.pretrain import PretrainRequest, trainer_command

    req = PretrainRequest(modality="speech", source="/c", output="/shared/out", max_steps=50,
                          slurm={"nodes": 2, "gpus_per_node": 8, "partition": "gpu", "sbatch_options": ["--exclusive"]})
    command = trainer_command(req)
    assert command[1:5] == ["-m", "flows.cli", "launch", "slurm"] and "--submit" in command and "--wait" in command
    assert command[command.index("--script") + 1] == "/shared/out/run/d2v-train.sbatch"
    dry = [word for word in command if word not in ("--submit", "--wait")] + ["--dry-run"]
    script = subprocess.run(dry, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0, script.stderr
    assert "#SBATCH --nodes=2" in script.stdout and "#SBATCH --exclusive" in script.stdout
    assert "run_dir=/shared/out/run" in script.stdout and "train.max_steps=50" in script.stdout

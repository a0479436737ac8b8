"""The Prefect flow `pretrain`: build shards -> pre-train (torchrun) -> evaluate -> report.

Each stage is a task that calls the stage's own entry point (the shard builder, `d2v_train/main.py`,
`d2v eval`) and records what it produced as artifacts. Everything lands under `output`:
dataset/ (shards and dataset.json), run/ (checkpoints, metrics.jsonl), eval/ (result JSONs) and
report/ (report.md and its plots). Re-running with the same parameters skips a finished build and
resumes training from the newest checkpoint.
"""
from __future__ import annotations

import json
import re
from typing import Literal

import fsspec
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.states import Cancelled, State
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from flows.launch import ProcessFailed, python, run_streamed
from flows.modalities import FLOW_MODALITIES, FlowModality

Modality = Literal["speech", "vision", "text"]
Preset = Literal["tiny", "base", "large"]
Variant = Literal["data2vec", "data2vec2"]

DEFAULT_STEPS = {"tiny": 2000, "base": 400_000, "large": 600_000}  # tiny: what the speech demo needs to learn


class SlurmTraining(BaseModel):
    """Pre-training handed to SLURM (`d2v launch slurm --submit --wait`): the flow waits for the job
    and reads its exit code; run/ must be on storage every node reaches (a shared disk, S3)."""

    model_config = ConfigDict(extra="forbid")

    nodes: PositiveInt
    gpus_per_node: PositiveInt
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # the job's time limit; a job at its limit saves and requeues itself
    cpus_per_node: PositiveInt | None = None
    sbatch_options: list[str] = []  # more #SBATCH lines, e.g. ["--exclusive"]

    def launch_options(self) -> list[str]:
        options = ["--nodes", str(self.nodes), "--gpus-per-node", str(self.gpus_per_node)]
        for name in ("partition", "account", "time", "cpus_per_node"):
            if getattr(self, name) is not None:
                options += [f"--{name.replace('_', '-')}", str(getattr(self, name))]
        return options + [f"--sbatch-option={option}" for option in self.sbatch_options]


class PretrainRequest(BaseModel):
    """The flow's parameters, validated together (a wrong one is an error naming it)."""

    model_config = ConfigDict(extra="forbid")

    modality: Modality
    source: str = Field(min_length=1)  # corpus root (any fsspec URL)
    output: str = Field(min_length=1)  # dataset/, run/, eval/ and report/ go under it
    preset: Preset = "tiny"
    variant: Variant = "data2vec"  # data2vec2: the efficiency mode's presets ({modality}_v2_{preset})
    max_steps: PositiveInt | None = None  # default: the preset's
    nproc: PositiveInt = 1  # trainer processes (torchrun --nproc_per_node)
    slurm: SlurmTraining | None = None  # train on a SLURM cluster instead (nproc is then unused)
    splits: list[str] | None = None  # corpus splits/subsets to build
    pretrain_split: str | None = None  # pre-trained on (default: the first of splits)
    pretrain_splits: list[str] | None = None  # or several, mixed in one run (LibriSpeech 960 h: three subsets)
    labelled_split: str | None = None  # fine-tuned on (default: the second of three or more splits, else the first)
    eval_split: str | None = None  # scored (default: the last of splits)
    shard_size: str = "256MB"
    mask_variants: PositiveInt = 4
    seed: NonNegativeInt = 0
    overwrite_dataset: bool = False  # replace a dataset of other build parameters under output/dataset
    vocab_size: PositiveInt = 8000  # text: the BPE trained on the corpus
    build_workers: NonNegativeInt | None = None  # local Dask cluster size (default: CPU count; 0: in-process)
    dask_address: str | None = None  # an existing Dask scheduler instead
    dask_cluster_class: str | None = None  # or a cluster class to start, e.g. "dask_jobqueue.SLURMCluster"
    dask_cluster_kwargs: dict = {}  # its arguments, e.g. {"cores": 8, "memory": "32GB", "n_workers": 4}
    eval_steps: NonNegativeInt | None = None  # fine-tuning updates (default: the task's)
    eval_budgets: list[str] | None = None  # labelled-data budgets of the curve (default: the modality's, flows/modalities.py)
    eval_seeds: PositiveInt = 3  # fine-tuning seeds per budget and encoder: mean and spread
    eval_jobs: PositiveInt | None = None  # fine-tunes side by side (default: 2 on a machine with 2+ CPUs)
    eval_data: str | None = None  # text: GLUE-format folder (no text evaluation without it)
    train_overrides: list[str] = []  # extra trainer settings, key.sub=value
    eval_args: list[str] = []  # extra `d2v eval TASK` options, e.g. ["--lr", "3e-3"]

    @field_validator("dask_cluster_kwargs", "train_overrides", "eval_args", mode="before")
    @classmethod
    def _none_is_empty(cls, value, info):  # the flow's parameters default to None, not to a shared mutable
        if value is None:
            return {} if info.field_name == "dask_cluster_kwargs" else []
        return value

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        from pipelines.plan import ShardSize

        ShardSize.parse(value)
        return value

    @model_validator(mode="after")
    def _where(self) -> PretrainRequest:
        if sum(bool(x) for x in (self.dask_address, self.build_workers, self.dask_cluster_class)) > 1:
            raise ValueError("give one of build_workers (a local cluster), dask_address (an existing one) and "
                             "dask_cluster_class (a cluster to start)")
        from d2v_train.config import CONFIGS

        if not (CONFIGS / f"{self.model}.yaml").exists():
            raise ValueError(f"preset: there is no {self.variant} {self.preset} preset for {self.modality} "
                             f"(configs/{self.model}.yaml)")
        self.kind.check(self)
        if self.splits is None and self.kind.splits is not None:
            self.splits = list(self.kind.splits)
        if self.pretrain_split is not None and self.pretrain_splits is not None:
            raise ValueError("pretrain_splits: give pretrain_split (one) or pretrain_splits (several), not both")
        if self.pretrain_splits is not None and (not self.pretrain_splits
                                                 or len(set(self.pretrain_splits)) != len(self.pretrain_splits)):
            raise ValueError("pretrain_splits: name one or more different splits")
        for field in ("pretrain_split", "labelled_split", "eval_split", "pretrain_splits"):
            values = getattr(self, field)
            for value in (values if isinstance(values, list) else [values]):
                if value is not None and self.splits is not None and value not in self.splits:
                    raise ValueError(f"{field}: {value!r} is not among the splits built ({', '.join(self.splits)})")
        if self.eval_budgets is not None and not self.eval_budgets:
            raise ValueError("eval_budgets: give at least one budget (or leave it out for the defaults)")
        from d2v_train.eval.curve_run import budget_options

        for budget in self.budgets:
            try:
                budget_options(self.kind.eval_task, budget)
            except ValueError as exc:
                raise ValueError(f"eval_budgets: {exc}") from None
        from d2v_train.eval.tasks import parse_task

        try:  # the task's own config model: a wrong option or value fails now, not after pre-training
            parse_task(self.kind.eval_task, ["--checkpoint", "random", *self.eval_task_options()], raising=True)
        except ValueError as exc:
            raise ValueError(f"eval_args: {exc}") from None
        return self

    @property
    def kind(self) -> FlowModality:
        """What the stages do for this modality."""
        return FLOW_MODALITIES[self.modality]

    def url(self, *parts: str) -> str:
        return "/".join([self.output.rstrip("/"), *parts])

    @property
    def model(self) -> str:
        """The model preset's name: configs/{model}.yaml."""
        return f"{self.modality}_v2_{self.preset}" if self.variant == "data2vec2" else f"{self.modality}_{self.preset}"

    @property
    def steps(self) -> int:
        return self.max_steps or DEFAULT_STEPS[self.preset]

    @property
    def train_split(self) -> str:
        """The split pre-trained on."""
        return self.pretrain_split or (self.splits[0] if self.splits else "train")

    @property
    def finetune_split(self) -> str:
        """The split the labelled budgets are drawn from."""
        if self.labelled_split:
            return self.labelled_split
        return self.splits[1] if self.splits and len(self.splits) > 2 else self.splits[0] if self.splits else "train"

    @property
    def scored_split(self) -> str:
        return self.eval_split or (self.splits[-1] if self.splits and len(self.splits) > 1 else "valid")

    @property
    def budgets(self) -> list[str]:
        return list(self.eval_budgets) if self.eval_budgets else list(self.kind.budgets)

    @property
    def jobs(self) -> int:
        import os

        return self.eval_jobs or min(2, os.cpu_count() or 1)

    def eval_task_options(self) -> list[str]:
        """The options every run of the evaluation curve gets (`d2v eval TASK`'s, eval_args last)."""
        options = self.kind.eval_data_options(self)
        if self.eval_steps is not None:
            options += ["--steps", str(self.eval_steps)]
        if self.preset == "tiny":
            options += list(self.kind.tiny_eval_args)
        return options + list(self.eval_args)

    def trainer_overrides(self) -> list[str]:
        data = self.kind.tiny_train_data if self.preset == "tiny" else self.kind.train_data
        return [
            f"model={self.model}", *data, f"data.url={self.url('dataset')}",
            (f"data.splits=[{','.join(self.pretrain_splits)}]" if self.pretrain_splits else f"data.split={self.train_split}"),
            f"run_dir={self.url('run')}", f"train.max_steps={self.steps}",
            f"train.seed={self.seed}", *self.train_overrides,
        ]


# -- build ------------------------------------------------------------------------------------
def build_request(req: PretrainRequest) -> dict:
    """The build parameters a finished dataset must record to be reused (dataset.json's `build`)."""
    from pipelines.plan import ShardSize

    wanted = {"modality": req.modality, "shard_size": ShardSize.parse(req.shard_size).describe(),
              "mask_variants": req.mask_variants, "seed": req.seed}
    return {**wanted, **req.kind.build_params(req)}


def finished_build(req: PretrainRequest) -> dict | None:
    """dataset.json of an earlier build of the same corpus with the same parameters, if any."""
    from pipelines.storage import Location
    from schemas.dataset import DATASET_JSON

    url = req.url("dataset", DATASET_JSON)
    fs, path = Location(url).filesystem()
    if not fs.exists(path):
        return None
    dataset = json.loads(fs.cat_file(path))
    if dataset.get("source") != Location(req.source).public_url():
        return None
    build = dataset.get("build", {})
    return dataset if all(build.get(k) == v for k, v in build_request(req).items()) else None


def make_source(req: PretrainRequest):
    """The source of the modality's kind (pipelines.sources.registry), as `d2v data build` makes it."""
    return req.kind.source(req)


def build_options(req: PretrainRequest):
    from pipelines.build import BuildOptions
    from pipelines.plan import ShardSize

    return BuildOptions(ShardSize.parse(req.shard_size), req.mask_variants, req.seed, overwrite=req.overwrite_dataset)


@task(name="build-shards-on-dask")
def build_on_dask(req: PretrainRequest) -> dict:
    """The build driven from a task of the flow's DaskTaskRunner: one Dask task per shard on its cluster
    (raw Dask, not a Prefect task each: per-task overhead would dominate small shards)."""
    from prefect_dask import get_dask_client

    from pipelines.build import build_with_runner
    from pipelines.cluster import Runner
    from pipelines.storage import Location, check_writable

    out = Location(req.url("dataset"))
    check_writable(out)
    with get_dask_client() as client:
        built = build_with_runner(make_source(req), out, build_options(req), Runner(client),
                                  echo=get_run_logger().info)
    return json.loads(built.to_json())


@flow(name="build-shards")
def build_shards(req: PretrainRequest) -> dict:
    """Shards and dataset.json under output/dataset/; skipped when an identical build is there."""
    logger = get_run_logger()
    dataset = finished_build(req)
    if dataset is not None:
        logger.info("dataset.json at %s records the same build parameters: skipping the build",
                    req.url("dataset"))
        dataset["skipped"] = True
    elif req.build_workers == 0:
        from pipelines.build import build_dataset
        from pipelines.storage import Location

        built = build_dataset(make_source(req), Location(req.url("dataset")), build_options(req), workers=0,
                              echo=logger.info)
        dataset = {**json.loads(built.to_json()), "skipped": False}
    else:
        dataset = {**build_on_dask.submit(req).result(), "skipped": False}
    create_table_artifact(
        key=f"{req.modality}-shards",
        table=[{"split": name, **{k: v for k, v in split.items() if v is not None}}
               for name, split in dataset["splits"].items()],
        description=f"Shards of {req.url('dataset')}: {dataset['samples']} samples, "
                    f"{dataset['rejected']} rejected of {dataset['source_items']} source items",
    )
    create_table_artifact(
        key=f"{req.modality}-rejects",
        table=[{"reason": reason, "items": count} for reason, count in dataset["rejects_by_reason"].items()]
        or [{"reason": "(none)", "items": 0}],
        description=f"Rejected source items by reason (details: {req.url('dataset', 'rejects.parquet')})",
    )
    return {k: dataset[k] for k in ("samples", "rejected", "source_items", "fingerprint", "skipped")}


def dask_runner(req: PretrainRequest):
    """An existing scheduler by address, else a local cluster bound to 127.0.0.1 without dashboards."""
    from prefect_dask import DaskTaskRunner

    if req.dask_address:
        return DaskTaskRunner(address=req.dask_address)
    if req.dask_cluster_class:  # prefect-dask imports it by its dotted name
        return DaskTaskRunner(cluster_class=req.dask_cluster_class, cluster_kwargs=dict(req.dask_cluster_kwargs))
    import os

    from pipelines.cluster import local_cluster_settings

    workers = req.build_workers or os.cpu_count() or 1
    # The task driving the build holds a worker thread while its shard tasks run: a cluster of one
    # worker gets a second thread for them, or the build would wait for itself forever.
    return DaskTaskRunner(cluster_kwargs=local_cluster_settings(workers, threads_per_worker=2 if workers == 1 else 1))


# -- pre-train --------------------------------------------------------------------------------
STEP_LINE = re.compile(r"^step (\d+) \|")


def trainer_command(req: PretrainRequest) -> list[str]:
    """The trainer under torchrun, its stores on 127.0.0.1 (d2v_train.launch); one process: the
    script itself, no rendezvous; with `slurm`, an sbatch job that the command waits for."""
    if req.slurm is not None:
        script = req.url("run", "d2v-train.sbatch") if "://" not in req.output else "d2v-train.sbatch"
        return [python(), "-m", "flows.cli", "launch", "slurm", *req.slurm.launch_options(), "--script", script,
                "--submit", "--wait", *req.trainer_overrides()]
    launcher = [python(), "d2v_train/main.py"] if req.nproc == 1 else [
        python(), "-m", "d2v_train.launch", "--standalone", "--nproc_per_node", str(req.nproc),
        "d2v_train/main.py"]
    return [*launcher, *req.trainer_overrides()]


@task(name="pretrain")
def train(req: PretrainRequest) -> dict | State:
    """Run the trainer to max_steps (it resumes from the newest checkpoint in run/ by itself).
    A trainer pre-empted by a SIGTERM (it saved, then exited 143) ends the task Cancelled, not
    Failed: nothing went wrong, and running the flow again resumes from that save."""
    from d2v_train.config import load_train_config
    from d2v_train.launch import PREEMPTED_EXIT

    logger = get_run_logger()
    load_train_config(None, req.trainer_overrides())  # a wrong setting fails here, naming the field
    progress = create_progress_artifact(0.0, key=f"{req.modality}-pretrain-progress",
                                        description=f"steps of {req.steps}")

    def on_line(line: str) -> None:
        logger.info(line)
        match = STEP_LINE.match(line)
        if match:
            update_progress_artifact(progress, 100.0 * int(match.group(1)) / req.steps)

    try:
        run_streamed(trainer_command(req), what="the trainer", on_line=on_line)
    except ProcessFailed as stopped:
        if stopped.returncode != PREEMPTED_EXIT:
            raise
        saved = next((line for line in reversed(stopped.tail) if line.startswith("SIGTERM: saved")),
                     "no save was reported")
        return Cancelled(message=f"the trainer was pre-empted (SIGTERM, exit {PREEMPTED_EXIT}): {saved}; "
                                 "run the flow again to resume")
    records = read_metrics(req.url("run", "metrics.jsonl"))
    if records:
        every = max(1, len(records) // 50)
        create_table_artifact(
            key=f"{req.modality}-training-curve",
            table=[{k: r.get(k) for k in ("step", "loss", "lr", "target_std", "pred_std")}
                   for r in records[::every] + ([records[-1]] if (len(records) - 1) % every else [])],
            description=f"Training curve of {req.url('run')} (plot: metrics.png there)",
        )
    return {"run": req.url("run"), "step": records[-1]["step"] if records else 0, "records": len(records)}


def read_metrics(url: str) -> list[dict]:
    """The JSON lines rank 0 wrote (one per logged step)."""
    with fsspec.open(url, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


# -- evaluate and report ----------------------------------------------------------------------
def eval_command(req: PretrainRequest) -> list[str]:
    """`d2v eval curve`: the pre-trained and a random encoder at every budget and seed."""
    return [python(), "-m", "flows.cli", "eval", "curve", req.kind.eval_task,
            "--checkpoint", req.url("run", "checkpoints"), "--checkpoint", "random", "--model", req.model,
            "--budgets", ",".join(req.budgets), "--seeds", str(req.eval_seeds), "--jobs", str(req.jobs),
            "--results", req.url("eval"), "--out", req.url("report"),
            "--title", f"{req.variant} {req.modality} {req.preset}: {req.source}", *req.eval_task_options()]


@task(name="evaluate")
def evaluate(req: PretrainRequest) -> str | None:
    """The label-efficiency curve of the pre-trained encoder against a random one (`d2v eval curve`):
    every result under eval/, the report under report/; returns report.md's URL."""
    logger = get_run_logger()
    why_not = req.kind.skips_evaluation(req)
    if why_not:
        logger.warning(why_not)
        return None
    run_streamed(eval_command(req), what="d2v eval curve", on_line=logger.info)
    with fsspec.open(req.url("report", "curve.json"), "rt") as f:
        summary = json.load(f)
    rows = [{"encoder": p["label"], "budget": p["budget"], "labelled": round(p["amount"], 2),
             summary["metric"]: round(p["mean"], 4), "spread": round(p["spread"], 4), "seeds": len(p["values"])}
            for p in summary["points"]]
    create_table_artifact(key=f"{req.modality}-label-efficiency", table=rows,
                          description="; ".join(summary["gains"]) or "Downstream metric by labelled-data budget")
    with fsspec.open(req.url("report", "results.json"), "rt") as f:
        results = json.load(f)
    create_table_artifact(key=f"{req.modality}-eval-metrics", table=[
        {"label": r["label"], "task": r["task"], "budget": (r["data"].get("labelled") or {}).get("budget", "all"),
         "seed": r["seed"], **r["metrics"]} for r in results],
        description="Downstream metrics of every run: pre-trained encoder vs. random initialisation")
    for gain in summary["gains"]:
        logger.info(gain)
    return req.url("report", "report.md")


def training_section(req: PretrainRequest) -> str:
    """The report's pre-training section: run/training.png (copied beside report.md) and where the
    steps' time went, on average after the first step (start-up)."""
    from d2v_train.metrics import TIME_PHASES

    records = [r for r in read_metrics(req.url("run", "metrics.jsonl")) if "time/step" in r]
    fs, _ = fsspec.core.url_to_fs(req.url("run"))
    lines = ["## Pre-training", ""]
    if fs.exists(req.url("run", "training.png")):
        fs.copy(req.url("run", "training.png"), req.url("report", "training.png"))
        lines += ["![loss, target spread and effective rank, step time](training.png)", ""]
    steady = records[1:] or records
    if steady:
        total = sum(r["time/step"] for r in steady) / len(steady)
        lines += [f"Steps {steady[0]['step']}-{steady[-1]['step']}: {total:.3f} s per step on average.", "",
                  "| phase | seconds per step | share |", "|---|---|---|"]
        for phase, short in TIME_PHASES.items():
            mean = sum(r.get(f"time/{phase}", 0.0) for r in steady) / len(steady)
            lines.append(f"| {short} | {mean:.3f} | {100 * mean / max(total, 1e-9):.0f}% |")
        rates = [r["mfu"] for r in steady if "mfu" in r]
        lines += ["", f"MFU {100 * sum(rates) / len(rates):.1f}%" if rates else
                  f"{sum(r['flops_per_s'] for r in steady) / len(steady) / 1e9:.2f} GFLOP/s of model FLOPs "
                  "(no known peak for this device: no MFU)", ""]
    return "\n".join(lines) if len(lines) > 2 else ""


@task(name="report")
def report(req: PretrainRequest, report_url: str | None) -> str | None:
    """The curve's report.md (the gain first) as a Markdown artifact."""
    if report_url is None:
        get_run_logger().info("no evaluation results: no report")
        return None
    with fsspec.open(report_url, "rt") as f:
        markdown = f.read()
    section = training_section(req)
    if section:
        markdown = markdown.rstrip("\n") + "\n\n" + section
        with fsspec.open(report_url, "wt") as f:
            f.write(markdown)
    create_markdown_artifact(key=f"{req.modality}-report", markdown=markdown,
                             description=f"{report_url} (curve.png and the runs' plots beside it)")
    return report_url


@flow(name="pretrain", description=__doc__.split("\n\n")[0])
def pretrain(modality: Modality, source: str, output: str, preset: Preset = "tiny", variant: Variant = "data2vec",
             max_steps: PositiveInt | None = None, nproc: PositiveInt = 1, slurm: SlurmTraining | None = None,
             splits: list[str] | None = None,
             shard_size: str = "256MB", mask_variants: PositiveInt = 4, seed: NonNegativeInt = 0,
             vocab_size: PositiveInt = 8000, build_workers: NonNegativeInt | None = None,
             dask_address: str | None = None, dask_cluster_class: str | None = None,
             dask_cluster_kwargs: dict | None = None, eval_steps: NonNegativeInt | None = None,
             eval_data: str | None = None, train_overrides: list[str] | None = None,
             eval_args: list[str] | None = None, pretrain_split: str | None = None,
             pretrain_splits: list[str] | None = None, labelled_split: str | None = None,
             eval_split: str | None = None, eval_budgets: list[str] | None = None, eval_seeds: PositiveInt = 3,
             eval_jobs: PositiveInt | None = None, overwrite_dataset: bool = False) -> dict:
    """Build shards, pre-train, evaluate against a random encoder, report; everything under `output`."""
    req = PretrainRequest(**locals())  # the parameters, every one: their checks live in the request
    # A Dask cluster only when there is something to build (a finished build is skipped in a blink).
    on_dask = req.build_workers != 0 and finished_build(req) is None
    dataset = (build_shards.with_options(task_runner=dask_runner(req)) if on_dask else build_shards)(req)
    training = train(req, return_state=True)
    if training.is_cancelled():  # pre-empted: the flow run ends Cancelled too, its save kept
        return Cancelled(message=training.message)
    training = training.result()
    report_url = report(req, evaluate(req))
    return {"dataset": dataset, "training": training, "report": report_url,
            "gains": _gains(req) if report_url else []}


def _gains(req: PretrainRequest) -> list[str]:
    with fsspec.open(req.url("report", "curve.json"), "rt") as f:
        return json.load(f)["gains"]

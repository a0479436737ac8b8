"""Orchestration: the `d2v` command (cli.py), the Prefect flow `pretrain` (pretrain.py: build ->
pre-train -> evaluate -> report), its deployments (serve.py), `d2v demo`, child processes
(launch.py) and a local Prefect server for benchmarks and tests (local_server.py). The top of the
import order: nothing else imports flows."""

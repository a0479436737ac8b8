"""Corpus -> shards, on Dask: sources/ scan and encode each corpus layout (sources/registry.py:
the one place the CLI and the flow make them), plan.py assigns items to
shards, masking.py draws the stored masks, shards.py writes a tar and its Parquet index, build.py
runs the build (resumable, every reject reported), inspection.py summarises and verifies,
synthetic/ generates corpora in the real layouts. Imports schemas only, never torch (Dask workers
need no GPU stack)."""

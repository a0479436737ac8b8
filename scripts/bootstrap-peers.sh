#!/usr/bin/env bash
# Creates .venv-peers: d2v plus the loaders benchmarks/bench_loader_peers.py compares it with
# (pyproject's `peers` extra). A venv of its own: MosaicML Streaming pins transformers<5 and
# numpy<2.2, which the test extra's HF parity checks do not accept.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-peers/bin/python ]; then
    python3 -m venv .venv-peers
fi
stamp=.venv-peers/.d2v-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv-peers/bin/python -m pip install --quiet --upgrade pip
    # d2v first, so that torch is the build the main venv gets; then the peers against it
    .venv-peers/bin/python -m pip install --quiet -c constraints.txt -e .
    .venv-peers/bin/python -m pip install --quiet -c constraints.txt -e ".[peers]"
    # The peers' torchvision requirement (their vision datasets, unused here) can resolve to a build
    # made for another torch; one that cannot be imported is removed rather than left to fail imports.
    if ! .venv-peers/bin/python -c "import torchvision" >/dev/null 2>&1; then
        .venv-peers/bin/python -m pip uninstall --quiet -y torchvision
    fi
    echo "$want" > "$stamp"
fi

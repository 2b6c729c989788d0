#!/usr/bin/env bash
# Install everything ImageLM needs, then run every test: the export and clean checks, the output check (every
# notebook committed executed, README.md written from nbs/index.ipynb), nbdev_test over nbs/ (lessons included, slow
# cells too) and pytest (slow tests too). Any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch: keep an installed one; otherwise take the pinned CPU wheel, never a CUDA build.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==2.13.0"
fi
python -m pip install --quiet -e ".[dev]"

# The browser tests drive Debian's Chromium through Playwright; Playwright's own browser downloads are never used.
if ! command -v chromium >/dev/null 2>&1; then
    echo "== installing Debian's chromium for the browser tests"
    as_root=""; [ "$(id -u)" -ne 0 ] && as_root="sudo"
    $as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null
fi

echo "== export check: nbdev_export must leave imagelm/ as committed"
nbdev_export
if [ -n "$(git status --porcelain -- imagelm)" ]; then
    git status --porcelain -- imagelm
    git --no-pager diff --stat -- imagelm
    echo "FAIL: imagelm/ differs from what the notebooks export; run nbdev_export and commit both." >&2
    exit 1
fi

echo "== clean check: notebooks must be committed clean (nbdev_clean)"
nbdev_clean
if [ -n "$(git status --porcelain -- nbs)" ]; then
    git status --porcelain -- nbs
    echo "FAIL: notebooks carry metadata that nbdev_clean strips; run nbdev_clean and commit." >&2
    exit 1
fi

echo "== output check: notebooks show their results, README.md matches nbs/index.ipynb"
python tools/notebooks.py check

echo "== nbdev_test over nbs/ and nbs/lessons/"
n_notebooks=$(find nbs -name '*.ipynb' -not -path '*/.ipynb_checkpoints/*' | wc -l)
if [ "$n_notebooks" -eq 0 ]; then echo "FAIL: no notebooks to test" >&2; exit 1; fi
nbdev_test --n_workers 2 --timing --flags slow

echo "== pytest tests/"
python -m pytest tests/ -q

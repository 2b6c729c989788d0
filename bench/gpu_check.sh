#!/usr/bin/env bash
# GPU readiness in under 10 minutes on one CUDA machine (the project's tests and CI have no GPU):
#   1. the suite's CUDA tests: `pytest -m gpu` (tests/test_gpu_paths.py and any others) and tests/test_render.py's CUDA test;
#   2. STEPS (default 50) steps of depth 20 at the speedrun's per-GPU batch (--preset=gpu: 32 rows x 2048 positions), on
#      the embedded corpus, in a throwaway IMAGELM_BASE_DIR: positions/s, MFU, loader share and peak memory;
#   3. greedy samples from the checkpoint it saved.
#
#   bash bench/gpu_check.sh                 # needs torch with CUDA and the project installed (pip install -e ".[dev]")
#   STEPS=20 bash bench/gpu_check.sh        # a shorter run
# Exits 1 at once, saying so, when no CUDA device is present.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
STEPS="${STEPS:-50}"

if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device (torch $(python -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')," \
         "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}); run it on a GPU machine" >&2
    exit 1
fi
python -c "import torch; print('== gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"

BASE_DIR="$(mktemp -d -t imagelm_gpu_check.XXXXXX)"
trap 'rm -rf "$BASE_DIR"' EXIT
export IMAGELM_BASE_DIR="$BASE_DIR"

echo "== 1. the CUDA tests"
if python -c "import httpx, openai" 2>/dev/null; then SUITE=(tests); else
    echo "   (httpx/openai missing, so tests/ does not collect: only tests/test_gpu_paths.py; pip install -e '.[dev]' for all)"
    SUITE=(tests/test_gpu_paths.py)
fi
timeout 270 python -m pytest "${SUITE[@]}" -m gpu -q -p no:cacheprovider --durations=5

echo "== 2. $STEPS steps of depth 20 at 32 x 2048 positions per step (--preset=gpu, embedded corpus)"
timeout 330 python - --preset=gpu --run=gpu_check --num_iterations="$STEPS" --eval_batches=2 --save_every=0 <<'PY'
import gc, json, statistics, sys
import torch
from imagelm.base_train import base_samples, main
from imagelm.checkpoints import load_model

result = main(sys.argv[1:])
log = result['history']['log']
steady = [r for r in log if r['step'] >= min(10, len(log) // 2)] or log   # past compilation and warm-up
median = lambda key: statistics.median(r[key] for r in steady)
figures = {'gpu': torch.cuda.get_device_name(0), 'steps': len(log), 'steady_steps': len(steady),
           'positions_per_s': round(median('positions_per_s')), 'chars_per_s': round(median('chars_per_s')),
           'mfu': round(median('mfu'), 4), 'loader_share': round(median('loader_share'), 4), 'step_ms': round(median('ms'), 1),
           'first_step_s': round(log[0]['ms'] / 1000, 1), 'final_val_bpb': result['final_val_bpb'],
           'peak_memory_allocated_gib': round(torch.cuda.max_memory_allocated() / 2**30, 2),
           'peak_memory_reserved_gib': round(torch.cuda.max_memory_reserved() / 2**30, 2)}
print(f"== steady state (median of steps {steady[0]['step']}..{steady[-1]['step']}): {figures['positions_per_s']:,} positions/s | "
      f"MFU {100 * figures['mfu']:.1f}% | loader {100 * figures['loader_share']:.1f}% of the step | {figures['step_ms']} ms/step | "
      f"peak memory {figures['peak_memory_allocated_gib']} GiB allocated, {figures['peak_memory_reserved_gib']} GiB reserved")
print('== figures', json.dumps(figures))

gc.collect(); torch.cuda.empty_cache()
print('== 3. samples from the saved base checkpoint')
model, meta = load_model('base', 'gpu_check', device='cuda')
for prompt, text in base_samples(model): print(f'   {prompt}|{text!r}')
PY
echo "== gpu_check: done in ${SECONDS} s"

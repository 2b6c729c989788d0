#!/usr/bin/env bash
# ImageLM speedrun: pretrain end to end on this machine, then write the report.
#   GPU node:  torchrun over every GPU, depth 20 (as in the seed README).
#   CPU only:  the CPU preset, a small model on the embedded corpus that trains in about 15 minutes on 2 cores.
# Set RUN, DATA, DEPTH or MINUTES to change the defaults; the checkpoints, curves and report.md go to
# $IMAGELM_BASE_DIR (default ~/.cache/imagelm).
#
#   bash speedrun.sh
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
set -euo pipefail
cd "$(dirname "$0")"
export IMAGELM_BASE_DIR="${IMAGELM_BASE_DIR:-$HOME/.cache/imagelm}"
mkdir -p "$IMAGELM_BASE_DIR"

if ! python -c "import imagelm" 2>/dev/null; then
    python -c "import torch" 2>/dev/null || python -m pip install "torch==2.13.0"
    python -m pip install -e .
fi

RUN="${RUN:-speedrun}"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
echo "== ImageLM speedrun: run '$RUN', $NGPU GPU(s), base dir $IMAGELM_BASE_DIR"
printf '# ImageLM report\n\nrun %s, started %s on %s\n' "$RUN" "$(date -u +%FT%TZ)" "$(hostname)" > "$IMAGELM_BASE_DIR/report.md"

if [ "$NGPU" -gt 0 ]; then
    # Downloaded FineWeb-Edu shards when present, else the embedded corpus (which a depth-20 run repeats many times).
    DATA="${DATA:-$(python -c "from imagelm.dataloader import list_parquet_files as f; print('parquet' if len(f()) > 1 else 'embedded')")}"
    torchrun --standalone --nproc_per_node="$NGPU" -m imagelm.base_train -- \
        --run="$RUN" --data="$DATA" --depth="${DEPTH:-20}" --device_batch_size=32 --max_seq_len=2048 \
        --total_batch_size=$((32 * 2048 * NGPU)) --eval_every=250 --eval_batches=16 --sample_every=1000 --save_every=1000
else
    # The CPU preset: depth 2 (128 wide, 0.86M parameters), rows of 512 positions, 8 rows a step. On 2 cores a step takes
    # about 0.23 s, so the 15-minute budget stops it near 4,000 of its 4,200 steps, ~19 positions per parameter
    # (bench/cpu_preset.py); a faster machine runs all 4,200 (~20), a slower one stops earlier.
    python -m imagelm.base_train --run="$RUN" --data="${DATA:-embedded}" --depth="${DEPTH:-2}" --max_seq_len=512 \
        --device_batch_size=8 --num_iterations="${STEPS:-4200}" --time_budget="${MINUTES:-15}" \
        --eval_every=500 --eval_batches=16 --sample_every=1000 --save_every=500 --log_every=50
fi
echo "== done: report at $IMAGELM_BASE_DIR/report.md"
cat "$IMAGELM_BASE_DIR/report.md"

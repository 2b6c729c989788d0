#!/usr/bin/env bash
# ImageLM speedrun: pretrain end to end on this machine, then write the report.
#   GPU node:  torchrun over every GPU with the gpu preset (depth 20).
#   CPU only:  the cpu preset, a small model on the embedded corpus that trains in about 15 minutes on 2 cores.
# The presets live in imagelm.base_train.PRESETS (`python -m imagelm.base_train --help`). Set RUN, DATA, DEPTH, STEPS or
# MINUTES to change them; checkpoints, curves and report.md go to $IMAGELM_BASE_DIR (default ~/.cache/imagelm).
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

OVERRIDES=(${DEPTH:+--depth=$DEPTH} ${STEPS:+--num_iterations=$STEPS} ${MINUTES:+--time_budget=$MINUTES})
if [ "$NGPU" -gt 0 ]; then
    # Downloaded FineWeb-Edu shards when present, else the embedded corpus (which a depth-20 run repeats many times).
    DATA="${DATA:-$(python -c "from imagelm.dataloader import list_parquet_files as f; print('parquet' if len(f()) > 1 else 'embedded')" 2>/dev/null || echo embedded)}"
    torchrun --standalone --nproc_per_node="$NGPU" -m imagelm.base_train -- --preset=gpu --run="$RUN" --data="$DATA" "${OVERRIDES[@]}"
else
    python -m imagelm.base_train --preset=cpu --run="$RUN" --data="${DATA:-embedded}" "${OVERRIDES[@]}"
fi
echo "== done: report at $IMAGELM_BASE_DIR/report.md"
cat "$IMAGELM_BASE_DIR/report.md"

#!/usr/bin/env bash
# ImageLM speedrun: base pretraining, midtraining, supervised fine-tuning and the chat evals, end to end, then the report.
#   GPU node:  torchrun over every GPU with the gpu presets (depth 20).
#   CPU only:  the cpu presets on the embedded corpus and the offline tasks: 3 + 11 + 4 minutes of training and the evals, under 20 minutes on 2 cores.
# The presets live in imagelm.base_train.PRESETS and imagelm.chat_train.CHAT_PRESETS (`--help` of each stage). Set RUN,
# DATA, DEPTH or STEPS to change base training, and BASE_MINUTES, MID_MINUTES, SFT_MINUTES to change the CPU budgets.
# RL=1 adds reinforcement learning after SFT (GPU: GSM8K; CPU: synthetic arithmetic, RL_MINUTES, default 3) and its evals.
# On GPUs the chat datasets are downloaded first (python -m imagelm.chat_datasets; HF_ENDPOINT for a mirror).
# Checkpoints, curves, eval figures and report.md go to $IMAGELM_BASE_DIR (default ~/.cache/imagelm).
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

OVERRIDES=(${DEPTH:+--depth=$DEPTH} ${STEPS:+--num_iterations=$STEPS})
if [ "$NGPU" -gt 0 ]; then
    # Downloaded FineWeb-Edu shards when present, else the embedded corpus (which a depth-20 run repeats many times).
    DATA="${DATA:-$(python -c "from imagelm.dataloader import list_parquet_files as f; print('parquet' if len(f()) > 1 else 'embedded')" 2>/dev/null || echo embedded)}"
    LAUNCH=(torchrun --standalone --nproc_per_node="$NGPU" -m)
    python -m imagelm.chat_datasets
    "${LAUNCH[@]}" imagelm.base_train -- --preset=gpu --run="$RUN" --data="$DATA" "${OVERRIDES[@]}"
    "${LAUNCH[@]}" imagelm.mid_train -- --preset=gpu --run="$RUN" --source_run="$RUN" --data="$DATA"
    "${LAUNCH[@]}" imagelm.chat_sft -- --preset=gpu --run="$RUN" --source_run="$RUN" --data="$DATA"
    "${LAUNCH[@]}" imagelm.chat_eval -- --stage=sft --run="$RUN" --examples=500
    if [ "${RL:-0}" = 1 ]; then
        "${LAUNCH[@]}" imagelm.chat_rl -- --preset=gpu --run="$RUN" --source_run="$RUN" --data="$DATA"
        "${LAUNCH[@]}" imagelm.chat_eval -- --stage=rl --run="$RUN" --examples=500
    fi
else
    python -m imagelm.base_train --preset=cpu --run="$RUN" --data="${DATA:-embedded}" --time_budget="${BASE_MINUTES:-3}" "${OVERRIDES[@]}"
    python -m imagelm.mid_train --preset=cpu --run="$RUN" --source_run="$RUN" --time_budget="${MID_MINUTES:-11}"
    python -m imagelm.chat_sft --preset=cpu --run="$RUN" --source_run="$RUN" --time_budget="${SFT_MINUTES:-4}"
    python -m imagelm.chat_eval --stage=sft --run="$RUN" --examples=200
    if [ "${RL:-0}" = 1 ]; then
        python -m imagelm.chat_rl --preset=cpu --run="$RUN" --source_run="$RUN" --time_budget="${RL_MINUTES:-3}"
        python -m imagelm.chat_eval --stage=rl --run="$RUN" --examples=200
    fi
fi
if [ "${RL:-0}" = 1 ]; then STAGE=rl; else STAGE=sft; fi
echo "== done: checkpoints in $IMAGELM_BASE_DIR/checkpoints/<stage>/$RUN (base, mid, sft and rl with RL=1), report at $IMAGELM_BASE_DIR/report.md"
echo "== chat with it:  python -m imagelm.chat_cli --stage=$STAGE --run=$RUN"
echo "   in a browser:    python -m imagelm.chat_web --stage=$STAGE --run=$RUN    (then open http://127.0.0.1:8000)"
echo "   in a notebook:   nbs/lessons/06_chat_and_look_inside.ipynb (the chat widget and the attention maps)"
echo "   or in Python:    from imagelm.checkpoints import load_model; from imagelm.engine import Engine; from imagelm.conversation import generate_reply"
echo "                    model, _ = load_model('$STAGE', '$RUN'); print(generate_reply(Engine(model), [{'role': 'user', 'content': 'Who are you?'}]))"
cat "$IMAGELM_BASE_DIR/report.md"

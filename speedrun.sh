#!/usr/bin/env bash
# ImageLM speedrun: set up, pretrain, evaluate, midtrain, fine-tune, evaluate again, and write report.md.
#
#   bash speedrun.sh                                          # every GPU of the node (the $100 tier on 8 x H100), else the CPU path
#   screen -L -Logfile speedrun.log -S speedrun bash speedrun.sh
#   IMAGELM_PRESET=smoke bash speedrun.sh                     # every stage in about two minutes, on any machine
#
# Tiers (IMAGELM_PRESET, default gpu with GPUs, else cpu):
#   gpu    torchrun over every GPU: FineWeb-Edu shards (downloaded in the background), depth 20, the chat datasets, CORE.
#   cpu    the embedded corpus and the offline tasks: 3 + 11 + 4 minutes of training and the evals, about 25 minutes on 2 cores.
#   smoke  the same stages with tiny models and a few steps each.
# Knobs: RUN (or WANDB_RUN, which also names the wandb run) names the checkpoints; DEPTH, DEVICE_BATCH_SIZE, STEPS and
#   SHARDS change base training (DEVICE_BATCH_SIZE midtraining too); BASE_MINUTES, MID_MINUTES, SFT_MINUTES the CPU budgets;
#   RL=1 adds reinforcement learning and its evals; IMAGELM_NPROC the processes per node (default: the GPU count);
#   GPU_HOUR_COST the report's price ($/GPU-hour, default 3); FRESH=1 starts over instead of resuming.
# Re-running after an interruption skips the finished stages and resumes the one that was cut off from its last checkpoint.
# Setup: a virtual environment (.venv, or IMAGELM_VENV; uv creates it when present) that sees the system's packages, so an
#   installed torch is kept; IMAGELM_SETUP=0 skips it and uses the current Python as it is.
# Everything goes to $IMAGELM_BASE_DIR (default ~/.cache/imagelm): checkpoints, logs/<run>/<stage>.log, report/report.md.
set -euo pipefail
cd "$(dirname "$0")"
export IMAGELM_BASE_DIR="${IMAGELM_BASE_DIR:-$HOME/.cache/imagelm}"
export PYTHONUNBUFFERED=1
mkdir -p "$IMAGELM_BASE_DIR"
say() { echo "== $*"; }

# ---- setup: a virtual environment with the project installed, and the package exported from the notebooks
if [ "${IMAGELM_SETUP:-1}" != 0 ]; then
    VENV="${IMAGELM_VENV:-.venv}"
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        if [ ! -x "$VENV/bin/python" ]; then
            say "creating the virtual environment $VENV (with the system's packages, so an installed torch is kept)"
            if command -v uv >/dev/null 2>&1; then uv venv --quiet --seed --system-site-packages "$VENV"
            else python3 -m venv --system-site-packages "$VENV"; fi
        fi
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
            say "installing torch 2.13.0 (the CUDA build: this machine has a GPU)"
            python -m pip install --quiet "torch==2.13.0"
        else
            say "installing torch 2.13.0 (the CPU build: this machine has no GPU)"
            python -m pip install --quiet "torch==2.13.0" --extra-index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    STAMP="$VIRTUAL_ENV/.imagelm-installed"
    WANT="$(cat pyproject.toml settings.ini | cksum) $(pwd)"
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
        say "installing the project into $VIRTUAL_ENV (torch $(python -c 'import torch; print(torch.__version__)') stays)"
        CONSTRAINTS="$(mktemp)"
        python -c "import torch; print(f'torch=={torch.__version__}')" > "$CONSTRAINTS"
        python -m pip install --quiet --constraint "$CONSTRAINTS" -e .
        rm -f "$CONSTRAINTS"
        echo "$WANT" > "$STAMP"
    fi
    say "nbdev_export: the imagelm package from the notebooks"
    nbdev_export
fi

# ---- the run: tier, processes, where the logs and the stage markers go
RUN="${WANDB_RUN:-${RUN:-speedrun}}"
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
PRESET="${IMAGELM_PRESET:-$([ "$NGPU" -gt 0 ] && echo gpu || echo cpu)}"
case "$PRESET" in gpu|cpu|smoke) ;; *) echo "IMAGELM_PRESET=$PRESET: use gpu, cpu or smoke" >&2; exit 2 ;; esac
NPROC="${IMAGELM_NPROC:-$([ "$NGPU" -gt 0 ] && echo "$NGPU" || echo 1)}"
if [ "$NPROC" -gt 1 ]; then LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" -m); else LAUNCH=(python -m); fi
LOGS="$IMAGELM_BASE_DIR/logs/$RUN"
MARKS="$IMAGELM_BASE_DIR/speedrun/$RUN"
if [ "${FRESH:-0}" = 1 ]; then rm -rf "$MARKS"; fi
mkdir -p "$LOGS" "$MARKS"
say "ImageLM speedrun: run '$RUN', preset $PRESET, $NGPU GPU(s), $NPROC process(es), base dir $IMAGELM_BASE_DIR"

fail() {   # stage, status, log
    echo "== FAILED: stage '$1' exited with status $2" >&2
    echo "   last line of its log: $(grep -v '^[[:space:]]*$' "$3" | tail -n 1)" >&2
    echo "   whole log: $3" >&2
    echo "   fix it, then run bash speedrun.sh again: finished stages are skipped, and this one resumes" >&2
    exit "$2"
}

# stage NAME CHECKPOINT_STAGE COMMAND...: run COMMAND once, logged to logs/<run>/NAME.log. A finished stage is skipped;
# one that was cut off runs again with --resume=1 when it trains (CHECKPOINT_STAGE names its checkpoints, '-' for none).
stage() {
    local name="$1" trains="$2"; shift 2
    local log="$LOGS/$name.log" resume=()
    if [ -f "$MARKS/$name.done" ]; then say "$name: done already ($(cat "$MARKS/$name.done")), skipped"; return 0; fi
    if [ "$trains" != - ]; then
        if [ -f "$MARKS/$name.started" ]; then resume=(--resume=1); say "$name: resuming from its last checkpoint"
        elif [ -d "$IMAGELM_BASE_DIR/checkpoints/$trains/$RUN" ]; then
            say "$name: starting afresh, so the old '$trains' checkpoints of run '$RUN' go"
            rm -rf "$IMAGELM_BASE_DIR/checkpoints/$trains/$RUN"
        fi
    fi
    touch "$MARKS/$name.started"
    say "$name: $* ${resume[*]}"
    local status
    set +e; "$@" "${resume[@]}" 2>&1 | tee "$log"; status=${PIPESTATUS[0]}; set -e
    if [ "$status" -ne 0 ]; then fail "$name" "$status" "$log"; fi
    date -u +%FT%TZ > "$MARKS/$name.done"
    rm -f "$MARKS/$name.started"
}

# needs STAGE: stop, naming it, when the checkpoint a later stage starts from is missing.
needs() {
    python -c "import sys; from imagelm.checkpoints import find_checkpoint; find_checkpoint(sys.argv[1], sys.argv[2])" "$1" "$RUN" \
        2>"$LOGS/needs_$1.log" || { echo "== FAILED: no '$1' checkpoint of run '$RUN': $(tail -n 1 "$LOGS/needs_$1.log")" >&2; exit 1; }
}

if ! ls "$MARKS"/*.done >/dev/null 2>&1 && ! ls "$MARKS"/*.started >/dev/null 2>&1; then python -m imagelm.report reset; fi

BASE_FLAGS=(--preset="$PRESET" --run="$RUN" ${DEPTH:+--depth=$DEPTH} ${DEVICE_BATCH_SIZE:+--device_batch_size=$DEVICE_BATCH_SIZE}
            ${STEPS:+--num_iterations=$STEPS})
MID_FLAGS=(--preset="$PRESET" --run="$RUN" --source_run="$RUN" ${DEVICE_BATCH_SIZE:+--device_batch_size=$DEVICE_BATCH_SIZE})
CHAT_FLAGS=(--preset="$PRESET" --run="$RUN" --source_run="$RUN")
# Off the GPU tier, CORE runs only when its bundle is already here (python -m imagelm.core_eval --download_only=1 fetches it).
HAVE_BUNDLE=$([ -d "$IMAGELM_BASE_DIR/data/eval_bundle" ] && echo 1 || echo 0)
case "$PRESET" in
    gpu)   DATA=parquet; EVAL_FLAGS=(--examples=-1); BASE_EVAL_FLAGS=()
           SHARDS="${SHARDS:-$(python -m imagelm.dataset --shards_for_depth "${DEPTH:-20}")}"
           say "data: $SHARDS FineWeb-Edu shards for depth ${DEPTH:-20}, downloading in the background"
           stage download_shards - python -m imagelm.dataset -n "$SHARDS" &
           SHARDS_PID=$!
           stage chat_datasets - python -m imagelm.chat_datasets
           stage eval_bundle - python -m imagelm.core_eval --download_only=1
           wait "$SHARDS_PID" || exit $? ;;
    cpu)   DATA=embedded; EVAL_FLAGS=(--examples=200); BASE_EVAL_FLAGS=(--max_per_task=100 --core="$HAVE_BUNDLE")
           BASE_FLAGS+=(--time_budget="${BASE_MINUTES:-3}"); MID_FLAGS+=(--time_budget="${MID_MINUTES:-11}")
           CHAT_FLAGS+=(--time_budget="${SFT_MINUTES:-4}") ;;
    smoke) DATA=embedded; EVAL_FLAGS=(--examples=8 --val_batches=2); BASE_EVAL_FLAGS=(--max_per_task=4 --val_batches=2 --core="$HAVE_BUNDLE") ;;
esac
MID_FLAGS+=(--data="$DATA"); CHAT_FLAGS+=(--data="$DATA")

stage base_train base "${LAUNCH[@]}" imagelm.base_train -- "${BASE_FLAGS[@]}" --data="$DATA"
needs base
stage base_eval - "${LAUNCH[@]}" imagelm.base_eval -- --run="$RUN" "${BASE_EVAL_FLAGS[@]}"
stage mid_train mid "${LAUNCH[@]}" imagelm.mid_train -- "${MID_FLAGS[@]}"
needs mid
stage mid_eval - "${LAUNCH[@]}" imagelm.chat_eval -- --stage=mid --run="$RUN" "${EVAL_FLAGS[@]}"
stage sft_train sft "${LAUNCH[@]}" imagelm.chat_sft -- "${CHAT_FLAGS[@]}"
needs sft
stage sft_eval - "${LAUNCH[@]}" imagelm.chat_eval -- --stage=sft --run="$RUN" "${EVAL_FLAGS[@]}"
STAGE=sft
if [ "${RL:-0}" = 1 ]; then
    RL_FLAGS=(--preset="$PRESET" --run="$RUN" --source_run="$RUN" --data="$DATA")
    if [ "$PRESET" = cpu ]; then RL_FLAGS+=(--time_budget="${RL_MINUTES:-3}"); fi
    stage rl_train rl "${LAUNCH[@]}" imagelm.chat_rl -- "${RL_FLAGS[@]}"
    needs rl
    stage rl_eval - "${LAUNCH[@]}" imagelm.chat_eval -- --stage=rl --run="$RUN" "${EVAL_FLAGS[@]}"
    STAGE=rl
fi
python -m imagelm.report generate --gpu_hour_cost="${GPU_HOUR_COST:-3}"

say "done: checkpoints in $IMAGELM_BASE_DIR/checkpoints/<stage>/$RUN, logs in $LOGS, report at $IMAGELM_BASE_DIR/report/report.md"
echo "== chat with it:  python -m imagelm.chat_cli --stage=$STAGE --run=$RUN"
echo "   in a browser:    python -m imagelm.chat_web --stage=$STAGE --run=$RUN    (then open http://127.0.0.1:8000)"
echo "   in a notebook:   nbs/lessons/06_chat_and_look_inside.ipynb (the chat widget and the attention maps)"

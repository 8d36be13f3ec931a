#!/usr/bin/env bash
# The curriculum, stage after stage.
#
#   ./train.sh                    the tiny CPU demo: phantom data -> align -> instruct -> grpo, each evaluated
#                                 on held-out closed questions; summary in runs/demo/summary.json
#   ./train.sh stages/<family>    a real recipe family: align -> instruct -> grpo (the stages that exist)
#
# Environment for real recipes:
#   NPROC=8                 processes (GPUs); default: every visible GPU
#   LAUNCHER=torchrun       torchrun | accelerate | deepspeed
#   INSTRUCT=instruct_lora  which instruction recipe to run (instruct | instruct_lora | instruct_qlora)
#   STAGES="align instruct" which stages to run, in order
#   EVAL_DATA=FILE EVAL_IMAGES=DIR   evaluate every stage output on a VQA set
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1

demo() {
  local start data=data/phantom runs=runs/demo
  start=$(date +%s)
  rm -rf "$runs"
  echo "== phantom data"
  python data_recipes/phantom.py --out "$data" --train 2000 --test 100
  echo "== tiny vision tower + LLM (random init, tokenizer trained on the demo texts)"
  medllava tiny "$runs/base" --corpus "$data/corpus.txt" --vision clip --llm llama \
    --vision-hidden 64 --llm-hidden 128 --llm-layers 4
  for stage in align instruct; do
    echo "== stage: $stage"
    medllava train "stages/demo/$stage.yaml"
    medllava eval "$runs/$stage" --data "$data/test.jsonl" --image-folder "$data/images" --blind \
      --summary "$runs/summary.json" --stage "$stage" >/dev/null
  done
  echo "{\"seconds\": $(( $(date +%s) - start ))}" >"$runs/timing.json"
  medllava summary "$runs/summary.json" --timing "$runs/timing.json"
}

launch() {
  local nproc=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  [ "$nproc" -ge 1 ] || nproc=1
  case "${LAUNCHER:-torchrun}" in
    torchrun)   torchrun --standalone --nproc_per_node="$nproc" -m medllava.cli "$@" ;;
    accelerate) accelerate launch --num_processes "$nproc" -m medllava.cli "$@" ;;
    deepspeed)  deepspeed --num_gpus "$nproc" --module medllava.cli "$@" ;;
    *) echo "unknown LAUNCHER=${LAUNCHER}" >&2; exit 2 ;;
  esac
}

family() {
  local dir=${1%/} stage recipe out
  [ -d "$dir" ] || { echo "no such recipe folder: $dir" >&2; exit 2; }
  for stage in ${STAGES:-align ${INSTRUCT:-instruct} grpo}; do
    recipe="$dir/$stage.yaml"
    [ -f "$recipe" ] || { echo "== skip $stage (no $recipe)"; continue; }
    echo "== stage: $recipe"
    launch train "$recipe"
    out=$(python -c "from medllava.config import load_config; print(load_config('$recipe').run.output_dir)")
    if [ -n "${EVAL_DATA:-}" ]; then
      medllava eval "$out" --data "$EVAL_DATA" --image-folder "${EVAL_IMAGES:-.}" --blind \
        --summary "$(dirname "$out")/summary.json" --stage "$stage"
    fi
  done
}

if [ $# -eq 0 ]; then demo; else family "$1"; fi

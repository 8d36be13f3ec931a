#!/usr/bin/env bash
# The curriculum, stage after stage.
#
#   ./train.sh                    the tiny CPU demo: phantom data -> align -> instruct -> grpo, each evaluated
#                                 on held-out closed questions; summary in runs/demo/summary.json
#                                 (SEED=1 DEMO_RUNS=runs/demo-1 DEMO_DATA=data/phantom-1 for another seed)
#   ./train.sh stages/<family>    a real recipe family: align -> instruct -> grpo (the stages that exist)
#
# Environment for real recipes:
#   NPROC=8                 processes (GPUs); default: every visible GPU
#   LAUNCHER=torchrun       torchrun | accelerate | deepspeed
#   INSTRUCT=instruct_lora  which instruction recipe to run (instruct | instruct_lora | instruct_qlora)
#   GRPO=grpo_lora          which RL recipe to run (grpo | grpo_lora)
#   STAGES="align instruct" which stages to run, in order
#   EVAL_DATA=FILE EVAL_IMAGES=DIR   evaluate every stage output on a VQA set
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
# shellcheck disable=SC1091
source .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1

demo() {
  # SEED changes the phantom data, the tiny models' init and every stage's seed; DEMO_RUNS where runs go.
  local start seed=${SEED:-0} runs=${DEMO_RUNS:-runs/demo} data stage
  data=${DEMO_DATA:-data/phantom}
  start=$(date +%s)
  rm -rf "$runs"
  echo "== phantom data (seed $seed)"
  python data_recipes/phantom.py --out "$data" --train 2000 --test 100 --seed "$seed"
  echo "== tiny vision tower + LLM (random init, tokenizer trained on the demo texts)"
  medllava tiny "$runs/base" --corpus "$data/corpus.txt" --vision clip --llm llama \
    --vision-hidden 64 --llm-hidden 128 --llm-layers 4 --seed "$seed"
  local paths=(--data.image_folder="$data/images" --run.seed="$seed")
  for stage in align instruct grpo; do
    if [ "$stage" = grpo ]; then
      echo "== pass-rate filter: keep RL questions the instruct model sometimes gets right"
      python data_recipes/pass_rate_filter.py --model "$runs/instruct" --data "$data/rl.jsonl" \
        --image-folder "$data/images" --out "$runs/rl_filtered.jsonl" --n 4 --max-new-tokens 8 --seed "$seed"
    fi
    echo "== stage: $stage"
    case $stage in
      align)    medllava train stages/demo/align.yaml "${paths[@]}" --run.output_dir="$runs/align" \
                  --model.vision_tower="$runs/base/vision" --model.llm="$runs/base/llm" \
                  --data.train_files="[$data/align.jsonl]" ;;
      instruct) medllava train stages/demo/instruct.yaml "${paths[@]}" --run.output_dir="$runs/instruct" \
                  --model.init_from="$runs/align" --data.train_files="[$data/instruct.jsonl]" ;;
      grpo)     medllava train stages/demo/grpo.yaml "${paths[@]}" --run.output_dir="$runs/grpo" \
                  --model.init_from="$runs/instruct" --data.train_files="[$runs/rl_filtered.jsonl]" ;;
    esac
    medllava eval "$runs/$stage" --data "$data/test.jsonl" --image-folder "$data/images" --blind \
      --summary "$runs/summary.json" --stage "$stage" >/dev/null
  done
  echo "== export: merged, verified with plain transformers -> $runs/export"
  medllava export "$runs/grpo" --out "$runs/export"
  echo "== one-shot chat on a held-out image"
  python - "$data" "$runs/export" <<'PY'
import json, subprocess, sys
data, model = sys.argv[1], sys.argv[2]
row = next(json.loads(line) for line in open(f"{data}/test.jsonl") if '"qtype": "yes_no"' in line)
question = row["question"]
print(f"medllava chat {model} --image {data}/images/{row['image']} --prompt {question!r}")
answer = subprocess.run(["medllava", "chat", model, "--image", f"{data}/images/{row['image']}", "--prompt", question],
                        capture_output=True, text=True, check=True).stdout.strip()
print(f"  -> {answer}   (gold: {row['answer']})")
PY
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
  local dir=${1%/} stage recipe out prev=""
  [ -d "$dir" ] || { echo "no such recipe folder: $dir" >&2; exit 2; }
  for stage in ${STAGES:-align ${INSTRUCT:-instruct} ${GRPO:-grpo}}; do
    recipe="$dir/$stage.yaml"
    [ -f "$recipe" ] || { echo "== skip $stage (no $recipe)"; continue; }
    echo "== stage: $recipe"
    # Each stage after the first starts from the previous stage's output.
    if [ -n "$prev" ]; then launch train "$recipe" --model.init_from="$prev"; else launch train "$recipe"; fi
    out=$(python -c "from medllava.config import load_config; print(load_config('$recipe').run.output_dir)")
    prev=$out
    if [ -n "${EVAL_DATA:-}" ]; then
      medllava eval "$out" --data "$EVAL_DATA" --image-folder "${EVAL_IMAGES:-.}" --blind \
        --summary "$(dirname "$out")/summary.json" --stage "$stage"
    fi
  done
}

if [ $# -eq 0 ]; then demo; else family "$1"; fi

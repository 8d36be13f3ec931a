#!/usr/bin/env bash
# Rehearse a real recipe family on CPU before anyone rents GPUs for it:
#
#   scripts/rehearse.sh llava_med_v15 [WORKDIR]      (or siglip_qwen25, qwen25vl_medvlthinker, medgemma)
#
# It runs ./train.sh stages/<family> as a user would -- the same YAML files, stage order, launcher, pass-rate
# filter, per-stage evaluation and export -- with two swaps made through train.sh's ordinary environment:
#   - the models: tiny random-init models of the family's architectures (VISION_TOWER, LLM):
#       llava_med_v15 -> CLIP-like tower + Mistral-like LLM;  siglip_qwen25 -> SigLIP-like tower + Qwen2-like LLM;
#     or, for the recipes that start from a released VLM (INIT_FROM), a tiny stock model of its family:
#       qwen25vl_medvlthinker -> Qwen2.5-VL;  medgemma -> Gemma 3 (`medllava tiny --family`)
#   - the data: small fixtures in the corpora's published layouts (LLaVA-Med JSON, VQA-RAD JSON, SLAKE JSON,
#     PMC-VQA CSV, PathVQA parquet), converted by data_recipes/ into the paths the recipes name (WORKDIR).
# Two overrides go to every stage (TRAIN_ARGS): the pass-rate filter keeps every question
# (--grpo.pass_rate_filter.min_rate=-1), since a random-init model never answers right and would leave GRPO
# nothing to train on; and completions stop at 32 tokens (--grpo.max_completion_length=32; the DPO pairs' samples at 16,
# --dpo.pairs.max_new_tokens=16): a random-init model rarely ends a completion, and 512 tokens x 256 completions per
# step is most of an hour on 2 CPU cores.
# Everything else -- batch sizes, learning rates, precision, DeepSpeed files, LoRA and QLoRA settings, prompts,
# rewards, generations per question -- is the recipe's own.
#
# Environment: NPROC (default 2 processes; per node), LAUNCHER (torchrun | accelerate | deepspeed; default torchrun),
# NNODES (default 1; more: that many loopback "nodes" on this machine, each its own train.sh with its NODE_RANK and
# its own node-local data cache, as on nodes without a shared scratch disk; node i's log in WORKDIR/node<i>.log),
# STAGES (default: the pair families every variant, chained: align instruct instruct_lora instruct_qlora dpo_lora grpo
# grpo_lora;
# the model-family recipes train.sh's own chain: qwen25vl_medvlthinker instruct dpo grpo, medgemma instruct_lora
# dpo_lora grpo_lora).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
family=${1:?usage: scripts/rehearse.sh FAMILY [WORKDIR]}
family=$(basename "${family%/}")
work=${2:-$repo/runs/rehearsal/$family-${LAUNCHER:-torchrun}}
vision="" llm="" model_family=""
case $family in
  llava_med_v15) vision=clip; llm=mistral ;;
  siglip_qwen25) vision=siglip; llm=qwen2 ;;
  qwen25vl_medvlthinker) model_family=qwen2_5_vl ;;
  medgemma) model_family=gemma3 ;;
  *) echo "no rehearsal models for family $family (known: llava_med_v15, siglip_qwen25, qwen25vl_medvlthinker," \
       "medgemma)" >&2; exit 2 ;;
esac
"$repo/scripts/setup_venv.sh"
# shellcheck disable=SC1091
source "$repo/.venv/bin/activate"
mkdir -p "$work"
work=$(cd "$work" && pwd)
start=$(date +%s)
[ -f "$work/data/corpus.txt" ] || python "$repo/scripts/rehearsal_data.py" "$work"
if [ -n "$model_family" ]; then
  [ -f "$work/base/config.json" ] || medllava tiny "$work/base" --family "$model_family" \
    --corpus "$work/data/corpus.txt" >/dev/null
  export INIT_FROM=$work/base
  default_stages=""  # train.sh's chain for the folder (medgemma ships LoRA stages only: instruct_lora dpo_lora grpo_lora)
else
  [ -f "$work/base/llm/config.json" ] || medllava tiny "$work/base" --corpus "$work/data/corpus.txt" --vision "$vision" \
    --llm "$llm" --vision-hidden 32 --llm-hidden 64 --llm-layers 2 >/dev/null
  export VISION_TOWER=$work/base/vision LLM=$work/base/llm
  default_stages="align instruct instruct_lora instruct_qlora dpo_lora grpo grpo_lora"
fi

export WORKDIR=$work
export NPROC=${NPROC:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export EVAL_DATA=data/vqa/vqa_rad_test.jsonl EVAL_IMAGES=data/vqa/images
[ -z "${STAGES:-$default_stages}" ] || export STAGES=${STAGES:-$default_stages}
export TRAIN_ARGS="--grpo.pass_rate_filter.min_rate=-1 --grpo.max_completion_length=32 --dpo.pairs.max_new_tokens=16 ${TRAIN_ARGS:-}"
nodes=${NNODES:-1}
echo "== rehearsal of stages/$family on $nodes x $NPROC CPU processes (${LAUNCHER:-torchrun}) in $work: ${STAGES:-the chain of train.sh}"
if [ "$nodes" -gt 1 ]; then
  export NNODES=$nodes MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29500}
  pids=()
  for ((node = 1; node < nodes; node++)); do
    NODE_RANK=$node TRAIN_ARGS="$TRAIN_ARGS --data.cache_dir=$work/node$node-cache" \
      setsid "$repo/train.sh" "$repo/stages/$family" >"$work/node$node.log" 2>&1 &
    pids+=($!)
  done
  status=0
  NODE_RANK=0 TRAIN_ARGS="$TRAIN_ARGS --data.cache_dir=$work/node0-cache" "$repo/train.sh" "$repo/stages/$family" || status=$?
  # node 0 failed: the others would wait for it until NODE_WAIT; end them (each node is its own process group)
  [ "$status" = 0 ] || for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done
  for ((node = 1; node < nodes; node++)); do
    wait "${pids[node - 1]}" || { echo "node $node failed; the end of $work/node$node.log:" >&2
                                  tail -n 40 "$work/node$node.log" >&2; status=1; }
  done
  [ "$status" = 0 ] || exit "$status"
else
  "$repo/train.sh" "$repo/stages/$family"
fi
echo "{\"family\": \"$family\", \"launcher\": \"${LAUNCHER:-torchrun}\", \"nnodes\": $nodes, \"nproc\": $NPROC, \"stages\": \"${STAGES:-default}\", \"seconds\": $(( $(date +%s) - start ))}" \
  >"$work/rehearsal.json"
echo "== rehearsal of stages/$family done in $(( $(date +%s) - start )) s"

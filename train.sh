#!/usr/bin/env bash
# The curriculum, stage after stage.
#
#   ./train.sh                    the tiny CPU demo: phantom data -> align -> instruct -> preference pairs -> dpo
#                                 -> grpo, each evaluated on held-out closed questions; summary in
#                                 runs/demo/summary.json (SEED=1 DEMO_RUNS=runs/demo-1 DEMO_DATA=data/phantom-1 for
#                                 another seed; GRPO_FROM=instruct starts GRPO from instruct instead of dpo)
#   ./train.sh stages/<family>    a real recipe family: align -> instruct -> [pairs] -> dpo -> [pass-rate filter]
#                                 -> grpo -> export
#
# Environment for real recipes:
#   NPROC=8                 processes (GPUs) per node; default: every visible GPU
#   LAUNCHER=torchrun       torchrun | accelerate | deepspeed
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 [MASTER_PORT=29500]   many nodes: run train.sh on every node with its
#                           NODE_RANK; under SLURM (`srun --ntasks-per-node=1 ./train.sh stages/<family>`) they come
#                           from SLURM's environment. Node 0 runs the pass-rate filter, the evaluations and the export;
#                           the other nodes wait for them. run.output_dir must be on a disk every node mounts.
#   MAX_RESTARTS=2          torchrun / accelerate restart a failed stage from its newest checkpoint (default 0)
#   HOSTFILE=FILE           DeepSpeed's hostfile: with NNODES>1 it gives the node order; alone (on node 0 only)
#                           DeepSpeed starts the listed nodes over ssh
#   NODE_WAIT=14400         seconds a node waits for node 0's filter or evaluation before giving up
#   INSTRUCT=instruct_lora  which instruction recipe to run (instruct | instruct_lora | instruct_qlora)
#   DPO=dpo_lora            which preference recipe to run (dpo | dpo_lora)
#   GRPO=grpo_lora          which RL recipe to run (grpo | grpo_lora)
#   STAGES="align instruct" which stages to run, in order
#   EVAL_DATA=FILE EVAL_IMAGES=DIR   evaluate every stage output on a VQA set (with the stage's own prompt)
#   EVAL_PRIOR="FILE ..."   training files for the text-prior baseline beside each evaluation (--prior-from)
#   VISION_TOWER=ID LLM=ID  another encoder + LLM pair for the first stage (hub ids or local folders)
#   INIT_FROM=ID            another starting model for the first stage of a model-family recipe (qwen25vl_*, medgemma)
#   TRAIN_ARGS="--optim.lr=1e-5 ..."  overrides for every stage (and for the pass-rate filter)
#   WORKDIR=DIR             where the recipes' relative data/ and runs/ paths resolve (default: this folder)
#   EXPORT=0                skip the export of the last stage
# A stage whose output folder is complete is skipped, so re-running a family after a crash resumes the
# unfinished stage (from its newest checkpoint) and never retrains a finished one.
set -euo pipefail
repo=$(cd "$(dirname "$0")" && pwd)
"$repo/scripts/setup_venv.sh"
# shellcheck disable=SC1091
source "$repo/.venv/bin/activate"
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
recipe_dir=${1:+$(cd "$1" 2>/dev/null && pwd || echo "$1")}
cd "${WORKDIR:-$repo}"

demo() {
  # SEED changes the phantom data, the tiny models' init and every stage's seed; DEMO_RUNS where runs go.
  local start seed=${SEED:-0} runs=${DEMO_RUNS:-runs/demo} data stage
  data=${DEMO_DATA:-data/phantom}
  start=$(date +%s)
  rm -rf "$runs"
  echo "== phantom data (seed $seed)"
  python -m data_recipes.phantom --out "$data" --train 2000 --test 100 --seed "$seed"
  echo "== tiny vision tower + LLM (random init, tokenizer trained on the demo texts)"
  medllava tiny "$runs/base" --corpus "$data/corpus.txt" --vision clip --llm llama \
    --vision-hidden 64 --llm-hidden 128 --llm-layers 4 --seed "$seed"
  local paths=(--data.image_folder="$data/images" --run.seed="$seed") grpo_from=${GRPO_FROM:-dpo}
  for stage in align instruct dpo grpo; do
    if [ "$stage" = dpo ]; then
      echo "== preference pairs: the instruct model's right answers, rejected with the image blanked or the lesion noised"
      python -m data_recipes.preference_pairs --model "$runs/instruct" --data "$data/rl.jsonl" \
        --image-folder "$data/images" --out "$runs/pairs.jsonl" --rejects image:blank image:lesion \
        --max-records 500 --n 4 --max-new-tokens 8 --seed "$seed" >/dev/null
    fi
    if [ "$stage" = grpo ]; then
      echo "== pass-rate filter: keep RL questions the $grpo_from model sometimes gets right"
      python -m data_recipes.pass_rate_filter --model "$runs/$grpo_from" --data "$data/rl.jsonl" \
        --image-folder "$data/images" --out "$runs/rl_filtered.jsonl" --n 4 --max-new-tokens 8 --seed "$seed"
    fi
    echo "== stage: $stage"
    case $stage in
      align)    medllava train "$repo"/stages/demo/align.yaml "${paths[@]}" --run.output_dir="$runs/align" \
                  --model.vision_tower="$runs/base/vision" --model.llm="$runs/base/llm" \
                  --data.train_files="[$data/align.jsonl]" ;;
      instruct) medllava train "$repo"/stages/demo/instruct.yaml "${paths[@]}" --run.output_dir="$runs/instruct" \
                  --model.init_from="$runs/align" --data.train_files="[$data/instruct.jsonl]" ;;
      dpo)      medllava train "$repo"/stages/demo/dpo.yaml "${paths[@]}" --run.output_dir="$runs/dpo" \
                  --model.init_from="$runs/instruct" --data.train_files="[$runs/pairs.jsonl]" ;;
      grpo)     medllava train "$repo"/stages/demo/grpo.yaml "${paths[@]}" --run.output_dir="$runs/grpo" \
                  --model.init_from="$runs/$grpo_from" --data.train_files="[$runs/rl_filtered.jsonl]" ;;
    esac
    medllava eval "$runs/$stage" --data "$data/test.jsonl" --image-folder "$data/images" --blind \
      --prior-from "$data/instruct.jsonl" "$data/rl.jsonl" \
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

launch() {  # the launcher's command for this node: medllava/launch.py (layout from NNODES... or SLURM)
  python -m medllava.launch -- "$@"
}

wait_for_node0() {  # wait_for_node0 FILE NEWER_THAN WHAT: the other nodes wait for what node 0 makes between stages
  local file=$1 newer=$2 what=$3 waited=0 limit=${NODE_WAIT:-14400}
  until [ -f "$file" ] && { [ ! -e "$newer" ] || [ "$file" -nt "$newer" ]; }; do
    [ "$waited" -gt 0 ] || echo "== node $NODE_RANK: waiting for node 0's $what ($file)"
    if [ "$waited" -ge "$limit" ]; then
      echo "node $NODE_RANK: node 0's $what ($file) did not appear within NODE_WAIT=$limit s; see node 0's log" >&2
      exit 1
    fi
    sleep 2; waited=$((waited + 2))
  done
}

stage_field() {  # stage_field RECIPE EXPRESSION [overrides...]: a field of the resolved stage config
  local recipe=$1 expr=$2; shift 2
  python - "$recipe" "$expr" "$@" <<'PY'
import sys
from medllava.config import load_config
cfg = load_config(sys.argv[1], sys.argv[3:])
print(eval(sys.argv[2], {"cfg": cfg}))
PY
}

family() {
  local dir=$1 stage recipe out prev="" args maker made from layout
  [ -d "$dir" ] || { echo "no such recipe folder: $dir" >&2; exit 2; }
  layout=$(python -m medllava.launch --layout) || exit 2
  eval "export $layout"
  [ "$NNODES" -eq 1 ] || echo "== node $NODE_RANK of $NNODES ($NPROC processes each), rendezvous at $MASTER_ADDR:$MASTER_PORT"
  # shellcheck disable=SC2206
  local extra=(${TRAIN_ARGS:-})
  # The default chain: align, instruct, dpo, grpo (INSTRUCT/DPO/GRPO pick variants; a folder without a stage skips
  # it); a recipe folder that ships only the LoRA variant of a stage (stages/medgemma) runs that one.
  local defaults=() s
  for s in align "${INSTRUCT:-instruct}" "${DPO:-dpo}" "${GRPO:-grpo}"; do
    if [ ! -f "$dir/$s.yaml" ] && [ -f "$dir/${s}_lora.yaml" ]; then defaults+=("${s}_lora"); else defaults+=("$s"); fi
  done
  for stage in ${STAGES:-${defaults[*]}}; do
    recipe="$dir/$stage.yaml"
    [ -f "$recipe" ] || { echo "== skip $stage (no $recipe)"; continue; }
    # Each stage after the first starts from the previous stage's output; the first may get another pair.
    args=()
    if [ -n "$prev" ]; then
      args+=(--model.init_from="$prev")
    else
      [ -z "${VISION_TOWER:-}" ] || args+=(--model.vision_tower="$VISION_TOWER")
      [ -z "${LLM:-}" ] || args+=(--model.llm="$LLM")
      [ -z "${INIT_FROM:-}" ] || args+=(--model.init_from="$INIT_FROM")
    fi
    args+=("${extra[@]}")
    out=$(stage_field "$recipe" "cfg.run.output_dir" "${args[@]}")
    if [ -f "$out/medllava_stage.yaml" ]; then
      echo "== stage: $recipe (complete in $out; skipped)"
    else
      # Some stages' data is made from the previous stage's model first (node 0 makes it, the others wait):
      # GRPO's questions by the pass-rate filter, DPO's pairs by data_recipes/preference_pairs.py.
      maker=$(stage_field "$recipe" "{'grpo': 'pass_rate_filter' if cfg.grpo.pass_rate_filter.source else '',
        'dpo': 'preference_pairs' if cfg.dpo.pairs.source else ''}.get(cfg.kind, '')" "${args[@]}")
      if [ -n "$maker" ]; then
        made=$(stage_field "$recipe" "cfg.data.train_files[0]" "${args[@]}")
        from=$(stage_field "$recipe" "cfg.model.init_from" "${args[@]}")  # the previous stage's, or INIT_FROM's
        if [ "$NODE_RANK" != 0 ]; then
          wait_for_node0 "$made" "$from/medllava_stage.yaml" "$maker"
        elif [ -f "$made" ] && [ -f "$from/medllava_stage.yaml" ] && [ "$made" -nt "$from/medllava_stage.yaml" ]; then
          echo "== $maker: $made is newer than $from (kept)"
        else
          echo "== $maker: from $from -> $made"
          python -m "data_recipes.$maker" --stage "$recipe" --model "$from" "${extra[@]}"
        fi
      fi
      echo "== stage: $recipe -> $out"
      launch train "$recipe" "${args[@]}"
    fi
    prev=$out
    if [ "$NODE_RANK" != 0 ]; then  # node 0 evaluates; the next stage starts when it is done
      [ -z "${EVAL_DATA:-}" ] || wait_for_node0 "$out/eval/metrics.json" "$out/medllava_stage.yaml" "evaluation"
      continue
    fi
    if [ -n "${EVAL_DATA:-}" ] && [ ! -f "$out/eval/metrics.json" ]; then
      local prior=()
      [ -n "${EVAL_PRIOR:-}" ] && read -r -a prior <<<"--prior-from $EVAL_PRIOR"
      medllava eval "$out" --data "$EVAL_DATA" --image-folder "${EVAL_IMAGES:-.}" --blind \
        ${prior[@]+"${prior[@]}"} --summary "$(dirname "$out")/summary.json" --stage "$stage"
    fi
  done
  if [ -n "$prev" ] && [ "${EXPORT:-1}" != 0 ] && [ "$NODE_RANK" = 0 ]; then
    local exported
    exported="$(dirname "$prev")/export"
    if [ -f "$exported/config.json" ] && [ "$exported/config.json" -nt "$prev/medllava_stage.yaml" ]; then
      echo "== export: $exported is up to date"
    else
      echo "== export: $prev -> $exported (merged, verified with plain transformers)"
      medllava export "$prev" --out "$exported"
    fi
  fi
}

if [ $# -eq 0 ]; then demo; else family "$recipe_dir"; fi

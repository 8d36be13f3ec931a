#!/usr/bin/env bash
# The whole GPU check in one call, on a lent H100/H200 (the device tool runs it in the repo root):
#   1. here:   benchmarks/fetch_gpu_wheels.sh            (once; packages the GPU image lacks -> .whl/)
#   2. there:  bash benchmarks/gpu_check.sh              (carry .whl; results land in $OUT)
#   3. here:   copy $OUT/* to results/gpu/ and commit    (JSON + a short table)
# Steps: GPU-marked tests (bf16 steps, QLoRA on CUDA, DeepSpeed ZeRO-2, packing isolation in bf16 on the training
# layouts, bitwise bf16 resume, bf16 export probes); the throughput
# benchmark (1.5B pair full fine-tune: packed vs padded vs TRL vs packed + Liger; 7B pair QLoRA at 2048 tokens with gradient
# checkpointing: peak memory); a few GRPO steps of a real-size pair with the generation / training time split; peak
# host memory of exporting the 7B-shaped model in bf16 (probes on the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
site=/tmp/medllava-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  ls .whl/deepspeed-*.tar.gz >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target "$site" .whl/deepspeed-*.tar.gz
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"

python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -30 | tee "$OUT/gpu_tests.log"
python3 -m medllava.cli bench --preset clip-qwen2.5-1.5b --modes packed,padded,trl,liger --precision bf16 \
  --samples 512 --steps 20 --batch-size 8 --profile-steps 2 --out "$OUT/bench_clip_qwen1.5b_full.json" 2>&1 | tail -15
python3 -m medllava.cli bench --preset clip-qwen2.5-7b --modes packed,padded --trainable qlora \
  --gradient-checkpointing --precision bf16 --samples 256 --steps 10 --batch-size 4 --max-length 2048 --profile-steps 2 \
  --out "$OUT/bench_clip_qwen7b_qlora.json" 2>&1 | tail -15
python3 benchmarks/grpo_real_size.py --preset clip-qwen2.5-1.5b --steps 6 --out "$OUT/grpo_real_size.json" 2>&1 | tail -15
python3 benchmarks/export_memory.py --llm-layers 32 --dtype bfloat16 --work /tmp/medllava_export_memory \
  --out "$OUT/export_memory_7b" 2>&1 | tail -8
python3 benchmarks/summarize.py "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"

# Sourced by scripts/setup_venv.sh and scripts/lock.sh: the torch (+ torchvision) a CPU machine installs.
# Qwen-VL processors need torchvision (transformers 5.x). PyPI's torchvision does not import beside the CPU-only
# torch 2.13.0 file, so CPU machines take a matching pair: on x86_64 torch 2.14.1 + torchvision 0.29.1 (a CUDA build
# that runs on the CPU; about 5.5 GB in the venv), on aarch64 the CPU build torch 2.9.1 + torchvision 0.24.1.
case "$(uname -m)" in
  aarch64|arm64) default_cpu_torch="torch==2.9.1 torchvision==0.24.1" ;;
  *) default_cpu_torch="torch==2.14.1 torchvision==0.29.1" ;;
esac
cpu_torch=${MEDLLAVA_CPU_TORCH:-$default_cpu_torch}

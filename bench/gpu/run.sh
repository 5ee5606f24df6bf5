#!/usr/bin/env bash
# Every GPU check and benchmark of the speed goals in one run on a lent GPU machine, in under 8 minutes, building nothing:
# the PyTorch eager (and torch.compile) step of the same model, our trainer on the same preset and shapes, the fused
# kernels against the plain ones, the checkpoint stall, gpu-worker check. Writes $OUT/gpu-report.md (and run.log).
# Our side needs build/gpu-bundle.tar.xz (bench/gpu/pack.sh) carried to the machine, or a dotnet on it.
#   device run: bash bench/gpu/run.sh        (carry: build/gpu-bundle.tar.xz)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
report=$OUT/gpu-report.md
exec > >(tee -a "$OUT/run.log") 2>&1
preset=${PRESET:-v2-lite-80gb} seq=${SEQ_LEN:-4096} batch=${BATCH:-2}

# The declared dense bf16 peak of the card (the same table as Training/Perf/DeclaredPeaks.cs), for the PyTorch side's MFU.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$gpu" in
  *H100*NVL*|*H200*NVL*) peak=835.5 ;; *H100*PCIe*) peak=756 ;; *H100*|*H200*|*H800*) peak=989.4 ;; *A100*) peak=312 ;; *) peak=0 ;;
esac
{
  echo "# GPU run, $(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo "- device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
  python3 -c 'import torch; print(f"- PyTorch {torch.__version__}, CUDA {torch.version.cuda}, NCCL {\".\".join(map(str, torch.cuda.nccl.version()))}")'
  echo "- declared dense bf16 peak used for PyTorch's MFU: $peak TFLOP/s; preset $preset, $seq x $batch"
  echo
} >> "$report"

section() { echo; echo "## $1"; echo; } >> "$report"
run() { # seconds, command...: output into the report; a failure or timeout is a line in it, and the run goes on
  local limit=$1; shift
  timeout "$limit" "$@" >> "$report" 2>> "$OUT/run.log"
  local rc=$?
  [ $rc -eq 0 ] || echo "**failed ($rc$([ $rc -eq 124 ] && echo ", timed out after ${limit}s")): \`$*\`**" >> "$report"
}

section "PyTorch, the same model, batch and sequence"
run 150 python3 bench/torch/deepseek_step.py --preset "$preset" --seq-len "$seq" --batch "$batch" --steps 5 --warmup 2 --peak-tflops "$peak" --compile

section "DeepSeekCluster"
if command -v dotnet >/dev/null; then
  bench=(dotnet bench/Bench/bin/Release/net10.0/Bench.dll) worker=(dotnet GpuWorker/bin/Release/net10.0/gpu-worker.dll)
elif [ -f build/gpu-bundle.tar.xz ]; then
  mkdir -p /tmp/gpu-bundle && tar -xJf build/gpu-bundle.tar.xz -C /tmp/gpu-bundle
  torchlib=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  nccllib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
  export LD_LIBRARY_PATH=$torchlib${nccllib:+:$nccllib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  bench=(/tmp/gpu-bundle/bundle/Bench) worker=(/tmp/gpu-bundle/bundle/gpu-worker)
else
  echo "**no dotnet and no build/gpu-bundle.tar.xz: only the PyTorch side ran (make the bundle with bench/gpu/pack.sh and carry it)**" >> "$report"
  exit 1
fi
run 60 "${worker[@]}" check
run 140 "${bench[@]}" train --device cuda --presets "$preset" --precisions bf16 --seq-len "$seq" --batch "$batch" --steps 5 --warmup 2
# The async checkpoint's stall against a blocking save on the GPU: pinned host copies filled beside the next step.
run 75 "${bench[@]}" checkpoint --parts cost,stall --device cuda --preset small --nice 0 --prepare false --repeats 2 --disk-mb 256
run 50 "${bench[@]}" kernels --device cuda --parts attention,adamw,moe --preset "$preset" --seq-len "$seq" --batch "$batch" --rounds 5
# The dp all-reduce overlapped with the backward over NCCL needs two GPUs (NCCL refuses two ranks on one): only then.
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  run 150 "${bench[@]}" dp-overlap --device cuda --presets small --seq-len 1024 --batch 16 --micro 8 --rounds 3 --steps 3
fi
echo "report: $report"

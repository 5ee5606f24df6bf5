#!/usr/bin/env bash
# Makes build/gpu-bundle.tar.xz: self-contained Release builds of the bench and gpu-worker (no .NET needed on the lent GPU
# machine, which has PyTorch with CUDA but no .NET and no network), without libtorch: bench/gpu/run.sh points the loader
# at the machine's PyTorch libtorch instead (docs/gpus.md, "Building for CUDA"). Run here, then carry build/gpu-bundle.tar.xz.
set -euo pipefail
cd "$(dirname "$0")/../.."
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for project in bench/Bench GpuWorker; do
  echo "pack: publishing $project (self-contained, linux-x64)"
  dotnet publish "$project" -c Release -r linux-x64 --self-contained -o "$stage/bundle" -p:DebugType=none > "$stage/publish.log" 2>&1 \
    || { grep -E 'error' "$stage/publish.log" | sort -u >&2; echo "pack: publishing $project failed" >&2; exit 1; }
done
# PyTorch's own libtorch replaces TorchSharp's CPU build; LibTorchSharp (the binding) stays.
find "$stage/bundle" \( -name 'libtorch*.so*' -o -name 'libc10*.so*' -o -name 'libgomp*.so*' \) -delete
mkdir -p build
tar -C "$stage" -cJf build/gpu-bundle.tar.xz bundle
echo "build/gpu-bundle.tar.xz: $(du -h build/gpu-bundle.tar.xz | cut -f1) (the device tool carries at most 64 MiB)"

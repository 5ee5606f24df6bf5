#!/usr/bin/env bash
# The README's test command: checks what it cannot install, installs what the tests need on a fresh Debian machine
# (Azurite, redis-server, prometheus, chromium, patchelf, Debian's NCCL), then runs every test and closes with one
# "tests: N passed, N failed" line. On a machine that already has all of that, `dotnet test DeepSeekCluster.sln` is the same.
# Arguments go to dotnet test: ./test.sh --filter "FullyQualifiedName~Checkpoint"
set -euo pipefail
cd "$(dirname "$0")"
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

# ---- Prerequisites this script does not install: all checked before anything is installed ----
problems=()
if ! dotnet --list-sdks 2>/dev/null | grep -q '^10\.'; then
  problems+=("the .NET 10 SDK: 'dotnet --list-sdks' lists no 10.x SDK (https://dotnet.microsoft.com/download/dotnet/10.0)")
fi
if ! command -v kubectl >/dev/null 2>&1; then
  problems+=("kubectl 1.27 or later with its built-in kustomize: the deployment tests run 'kubectl kustomize' (docs/kubernetes.md)")
elif ! kubectl kustomize k8s/base >/dev/null 2>&1; then
  problems+=("kubectl with kustomize: 'kubectl kustomize k8s/base' fails here ($(kubectl kustomize k8s/base 2>&1 | head -1)); kubectl 1.27 or later is needed")
fi
if ! command -v cc >/dev/null 2>&1; then
  problems+=("a C compiler as 'cc': the nccl binding's tests compile a C check against nccl.h (Debian: apt-get install gcc)")
fi
if ! command -v azurite-blob >/dev/null 2>&1 && ! command -v npm >/dev/null 2>&1; then
  problems+=("npm, to install Azurite (the Azure Blob emulator the storage tests run against); or install azurite-blob yourself")
fi
if [ ${#problems[@]} -gt 0 ]; then
  echo "test.sh: cannot run the tests; this machine lacks what this script does not install:" >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 2
fi

# ---- Packages the tests need: installed when missing ----
# Azurite: the Azure Blob protocol for the storage tests (npm).
if ! command -v azurite-blob >/dev/null 2>&1; then
  echo "test.sh: installing azurite (npm install -g azurite)"
  npm install -g --no-fund --no-audit azurite >/dev/null \
    || { echo "test.sh: 'npm install -g azurite' failed (run it as a user who may write npm's global prefix)" >&2; exit 1; }
fi
# Debian packages: redis-server (Orleans clustering and grain storage), prometheus (the live scrape test evaluates every
# dashboard query through it), chromium (the status page test drives it headless over the DevTools protocol),
# patchelf (.ci/fetch-nccl points a copy of the dotnet host at the glibc that Debian's libnccl2 needs).
missing=()
for tool in redis-server prometheus chromium patchelf; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "test.sh: the tests need Debian packages that are not installed: ${missing[*]}. Install them, then run ./test.sh again:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
  echo "test.sh: installing ${missing[*]} (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The real NCCL (Debian's libnccl2 and nccl.h) that the nccl binding's tests check against; no GPU needed.
.ci/fetch-nccl
# dotnet-stack (a local tool, .config/dotnet-tools.json): an end-to-end test that times out shows each process's stacks.
dotnet tool restore >/dev/null || { echo "test.sh: 'dotnet tool restore' failed (NuGet unreachable?)" >&2; exit 1; }

# ---- The tests ----
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
dotnet test DeepSeekCluster.sln "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# One closing line in the plain "N passed, N failed" form, summed over the test projects.
passed=$(grep -oE 'Passed: +[0-9]+' "$log" | awk '{s+=$2} END {print s+0}')
failed=$(grep -oE 'Failed: +[0-9]+' "$log" | awk '{s+=$2} END {print s+0}')
echo "tests: ${passed} passed, ${failed} failed"
if [ "$status" -ne 0 ] || [ "$passed" -eq 0 ]; then exit 1; fi

# The whole run (no filter) also checks that every bench command the docs write is one the bench takes (runs nothing;
# dotnet test builds only the test projects and what they reference, so the bench is built here, ~15 s).
if [ $# -eq 0 ]; then
  dotnet build bench/Bench --nologo -v q >/dev/null || { echo "test.sh: building bench/Bench failed" >&2; exit 1; }
  BENCH_DLL=bench/Bench/bin/Debug/net10.0/Bench.dll bench/check-docs.sh
fi

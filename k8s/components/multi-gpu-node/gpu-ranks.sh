#!/bin/bash
# One worker pod per GPU node: start one gpu-worker rank per GPU the pod holds, each with a GPU of its own
# (CUDA_VISIBLE_DEVICES, as the AppHost does locally: NCCL refuses two ranks on one GPU), its own worker id
# ("<pod>-g<rank>") and its own ports, since the ranks share the pod's network namespace. One rank ending on its own
# ends the pod: the others are stopped and the launcher exits non-zero, so the kubelet restarts the whole pod and the
# Coordinator re-forms from the last checkpoint (a pod with a missing rank would hold GPUs nobody trains on). SIGTERM
# is forwarded to every rank, which leaves at a step boundary; the launcher exits when all have gone.
set -u

fail() { echo "gpu-ranks: $*" >&2; exit 2; }
number() { [[ "$2" =~ ^[0-9]+$ ]] || fail "$1 = '$2' is not a whole number"; }

ranks="${GPUS_PER_POD:-}"
number GPUS_PER_POD "$ranks"
(( ranks >= 1 )) || fail "GPUS_PER_POD = $ranks: expected at least 1 (the nvidia.com/gpu limit of the pod)"
worker="${GPU_WORKER:-/app/gpu-worker}"
pod="${DEEPSEEK_INSTANCE:-}"
[[ -n "$pod" ]] || fail "DEEPSEEK_INSTANCE (the pod's name, the prefix of each rank's worker id) is not set"
http="${RANK_HTTP_BASE_PORT:-8080}"; number RANK_HTTP_BASE_PORT "$http"
collective="${Worker__CollectivePort:-}"; number Worker__CollectivePort "$collective"
pipeline="${Worker__PipelinePort:-}"; number Worker__PipelinePort "$pipeline"
out="${Worker__OutputDir:-}"
[[ -n "$out" ]] || fail "Worker__OutputDir is not set"
stop_grace="${RANK_STOP_GRACE_SECONDS:-240}"; number RANK_STOP_GRACE_SECONDS "$stop_grace"

# The device plugin names the GPUs it gave the pod (NVIDIA_VISIBLE_DEVICES, UUIDs); the driver shows them as 0..n-1.
# A rank count that differs from the GPUs held would idle a GPU or put two ranks on one.
devices="${NVIDIA_VISIBLE_DEVICES:-}"
if [[ -n "$devices" && "$devices" != all && "$devices" != none && "$devices" != void ]]; then
    IFS=, read -r -a held <<< "$devices"
    (( ${#held[@]} == ranks )) || fail "GPUS_PER_POD = $ranks but the pod holds ${#held[@]} GPUs (NVIDIA_VISIBLE_DEVICES=$devices): set GPUS_PER_POD to the nvidia.com/gpu limit"
fi
# Each rank takes base + rank of every port range: the ranges must not overlap.
overlap() { (( $1 < $2 + ranks && $2 < $1 + ranks )); }
overlap "$http" "$collective" && fail "ports $http.. (RANK_HTTP_BASE_PORT) and $collective.. (Worker__CollectivePort) overlap for $ranks ranks"
overlap "$http" "$pipeline" && fail "ports $http.. (RANK_HTTP_BASE_PORT) and $pipeline.. (Worker__PipelinePort) overlap for $ranks ranks"
overlap "$collective" "$pipeline" && fail "ports $collective.. (Worker__CollectivePort) and $pipeline.. (Worker__PipelinePort) overlap for $ranks ranks"

pids=()
terminating=0
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null; }
on_term() { terminating=1; stop_all; }
trap on_term TERM INT

for (( r = 0; r < ranks; r++ )); do
    (( terminating )) && break # SIGTERM while starting: start no more ranks
    mkdir -p "$out/g$r" || fail "cannot create $out/g$r"
    CUDA_VISIBLE_DEVICES=$r LOCAL_RANK=$r DEEPSEEK_INSTANCE="$pod-g$r" \
    Worker__CollectivePort=$(( collective + r )) Worker__PipelinePort=$(( pipeline + r )) Worker__OutputDir="$out/g$r" \
    Kestrel__Endpoints__http__Url="http://+:$(( http + r ))" \
        "$worker" "$@" &
    pids+=($!)
done

# The first rank to end (a signal interrupts wait with a status above 128 while every rank still runs).
ended="" code=0 # set by wait -p; unset again when a signal interrupts the wait
while [[ -z "${ended:-}" ]]; do
    wait -n -p ended "${pids[@]}"
    code=$?
    (( terminating )) && break
done

watchdog=""
if (( ! terminating )); then
    echo "gpu-ranks: rank pid $ended ended on its own (exit $code); stopping the other ranks" >&2
    stop_all
    # Ranks that do not leave within the grace are killed, so the restart is not held up by a stuck collective.
    # Its own output goes nowhere, and it ends its sleep when stopped, so nothing outlives the launcher holding its pipes.
    ( trap 'kill "$s" 2>/dev/null; exit 0' TERM; sleep "$stop_grace" & s=$!; wait "$s"; kill -KILL "${pids[@]}" ) >/dev/null 2>&1 &
    watchdog=$!
fi

# Reap every rank; a forwarded signal may interrupt a wait while the rank still runs, so wait until it is gone.
worst=0
for p in "${pids[@]}"; do
    [[ "$p" == "${ended:-}" ]] && { (( code > worst )) && worst=$code; continue; }
    while :; do
        wait "$p"; rc=$?
        kill -0 "$p" 2>/dev/null || break
    done
    (( rc > worst )) && worst=$rc
done
[[ -n "$watchdog" ]] && { kill "$watchdog" 2>/dev/null; wait "$watchdog" 2>/dev/null; }

if (( terminating )); then exit "$worst"; fi
# A rank that ended on its own leaves a broken pod even with exit 0: restart the pod.
(( code != 0 )) && exit "$code"
exit 1

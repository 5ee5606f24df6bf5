#!/usr/bin/env bash
# Checks every `bench -- VERB ...` command written in README.md and docs/*.md against the bench as built: the command
# must pass --dry-run (every option it names is one its verb reads), and the same command with a bogus option must be
# refused (exit 2). It runs nothing. A command pinned to a commit (`bench -- ...` at abc1234) is left out: it is true
# at that commit. Run after `dotnet build -c Release bench/Bench`: bench/check-docs.sh (test.sh runs it on the Debug
# build it makes first: BENCH_DLL=bench/Bench/bin/Debug/net10.0/Bench.dll).
set -u
cd "$(dirname "$0")/.."
bench=(dotnet "${BENCH_DLL:-bench/Bench/bin/Release/net10.0/Bench.dll}")
[ -f "${bench[1]}" ] || { echo "check-docs: ${bench[1]} is not built (dotnet build -c Release bench/Bench)" >&2; exit 1; }
# Placeholders: DIR, an elided list (…), an optional [--x a\|b].
commands=$(grep -ohP '(?:bench/Bench|\bbench) -- \K[a-z][a-z0-9-]*(?:\\\||[^`\n#|)])*(?![^`\n]*` at [0-9a-f]{7})' README.md docs/*.md \
  | sed -e 's/ DIR\b/ \/nonexistent-model-dir/g; s/ …/ 65536/g; s/\\|[^] ]*//g; s/[][]//g; s/ *$//' | sort -u)
failed=0 checked=0
while read -r command; do
  [ -z "$command" ] && continue
  checked=$((checked + 1))
  # shellcheck disable=SC2086 # the command's words are meant to split
  if ! out=$("${bench[@]}" $command --dry-run 2>&1); then echo "refused as written: bench -- $command"; echo "  $out" | head -2; failed=1; fi
  # shellcheck disable=SC2086
  out=$(timeout 60 "${bench[@]}" $command --no-such-option 1 2>&1); rc=$?
  if [ $rc -ne 2 ]; then echo "not refused with a bogus option (exit $rc): bench -- $command"; failed=1; fi
done <<< "$commands"
echo "$checked documented bench commands checked"
exit $failed

#!/usr/bin/env bash
# Where a training step's time goes, per kernel: perf samples of the models benchmark's
# child process, attributed to the innermost kernel on each sample's stack.
#
#   scripts/profile.sh MODEL [BATCHES] [THREADS]     (e.g. scripts/profile.sh lenet 100 1)
#
# Needs `perf` (Debian: linux-perf) and permission to sample (root, or
# kernel.perf_event_paranoid <= 1). Writes target/profile/MODEL-tTHREADS.{perf,json,txt}.
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?usage: scripts/profile.sh MODEL [BATCHES] [THREADS]}
batches=${2:-100}
threads=${3:-1}
cargo bench -q -p common --bench models --no-run
bench=$(ls -t target/release/deps/models-* | grep -v '\.d$' | head -1)
mkdir -p target/profile
out=target/profile/$model-t$threads
LOCKSTEP_BENCH_MODEL=$model LOCKSTEP_BENCH_BATCHES=$batches RAYON_NUM_THREADS=$threads \
    perf record -q -e cpu-clock -F 500 --call-graph dwarf,16384 -o "$out.perf" "$bench" \
    > "$out.json" 2>/dev/null
# The child trains `batches` batches after 3 warm-up batches.
python3 scripts/profile_kernels.py "$out.perf" $((batches + 3)) | tee "$out.txt"

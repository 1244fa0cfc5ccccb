#!/usr/bin/env bash
# Every benchmark of the README in one sitting, ours and PyTorch's side by side:
#
#   scripts/bench.sh [PYTHON]     (PYTHON: an interpreter with torch; default python3)
#
# 1. single-process training and evaluation images/s per model at 1 and 2 threads, with the
#    machine's measured fp32 peak; on a CPU with AVX-512 also with the kernels held to their
#    AVX2 path (LOCKSTEP_SIMD=avx2), as an AVX2-only CPU would run them;
# 2. one ring all-reduce of LeNet's 431,080 floats at 2 and 4 ranks, over TCP and through
#    shared memory, against the loopback bandwidth bound;
# 3. cluster images/s of LeNet at 1, 2 and 4 workers, parameter server and ring, with the
#    time per step computing, communicating and the rest, then the wall time to 99% test
#    accuracy for LeNet with --workers 4;
# 4. the same in PyTorch (DDP with gloo on loopback), if PYTHON has torch.
#
# Figures go to target/bench/*.json and the tables to target/bench/bench.md. Run it on an idle
# machine: every figure is a wall-clock rate. Takes about 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
mkdir -p target/bench
out=target/bench/bench.md
: > "$out"

section() {
    printf '\n## %s\n\n' "$1" | tee -a "$out"
}

section "single process: cargo bench -p common --bench models -- softmax mlp lenet cnn"
cargo bench -q -p common --bench models -- softmax mlp lenet cnn | tee -a "$out"
if grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
    section "single process, kernels on their AVX2 path: LOCKSTEP_SIMD=avx2 cargo bench -p common --bench models -- mlp lenet cnn"
    LOCKSTEP_SIMD=avx2 cargo bench -q -p common --bench models -- mlp lenet cnn | tee -a "$out"
fi

section "ring all-reduce: cargo bench -p worker --bench allreduce"
cargo bench -q -p worker --bench allreduce | tee -a "$out"

section "cluster: cargo bench -p coordinator --bench cluster -- --time-to-accuracy"
cargo bench -q -p coordinator --bench cluster -- --time-to-accuracy | tee -a "$out"

if "$python" -c 'import torch' 2>/dev/null; then
    section "PyTorch single process: scripts/pytorch_models.py softmax mlp lenet cnn"
    "$python" scripts/pytorch_models.py softmax mlp lenet cnn | tee -a "$out"
    section "PyTorch DDP: scripts/pytorch_ddp.py --models lenet --time-to-accuracy"
    "$python" scripts/pytorch_ddp.py --models lenet --time-to-accuracy | tee -a "$out"
else
    echo "($python has no torch: PyTorch comparison skipped; see scripts/pytorch_models.py)" | tee -a "$out"
fi
echo "tables written to $out"

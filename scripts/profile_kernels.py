#!/usr/bin/env python3
"""Per-kernel time within the training step, from `perf script` stacks (dwarf call graphs).

  scripts/profile_kernels.py PERF_DATA BATCHES [ROOT_REGEX] [HZ]

Each sample under ROOT (default: the training step and the optimiser) goes to the first
(innermost) frame matching a kernel; `scripts/profile.sh` records PERF_DATA."""
import subprocess, sys, re, collections
data, batches = sys.argv[1], int(sys.argv[2])
root = re.compile(sys.argv[3] if len(sys.argv) > 3 else r"Replica::gradient|Optimizer::step")
freq = None
kernels = [
    ("conv forward", r"conv_op::forward"),
    ("conv backward", r"conv_op::backward|sum_partials"),
    ("linear forward/backward (gemm)", r"Tensor::matmul|linear::Dense"),
    ("tanh", r"tanh::"),
    ("pool", r"pool::"),
    ("relu", r"relu::"),
    ("softmax / cross-entropy", r"cross_entropy|log_softmax|softmax"),
    ("engine other (dense act, fill_bias)", r"engine::Engine"),
    ("dropout", r"dropout"),
    ("candle grad accumulation (zeros+add)", r"GradStore::or_insert|Tensor::add$|zeros_like"),
    ("load_flat", r"load_flat"),
    ("grads_flat", r"grads_flat"),
    ("optimiser", r"Optimizer::step"),
    ("accuracy sums", r"replica::sums"),
]
kre = [(n, re.compile(p)) for n, p in kernels]
proc = subprocess.Popen(["perf", "script", "-i", data, "-F", "period,ip,sym", "--no-inline"], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True)
counts = collections.Counter(); total = 0; step = 0; periods = collections.Counter()
stack = []
def flush():
    global total, step
    if not stack: return
    total += 1
    if any(root.search(f) for f in stack):
        step += 1
        for f in stack:  # innermost first
            for n, r in kre:
                if r.search(f):
                    counts[n] += 1
                    return
        counts["other (framework, alloc, faults)"] += 1
for line in proc.stdout:
    line = line.rstrip("\n")
    if not line.strip():
        flush(); stack = []; continue
    if not line.startswith("\t") and not line.startswith(" " * 8):
        flush(); stack = []
        continue
    parts = line.strip().split(None, 1)
    if len(parts) == 2:
        stack.append(parts[1])
flush()
# samples at cpu-clock F Hz: ms = samples / F * 1000
F = float(sys.argv[4]) if len(sys.argv) > 4 else 500.0
print(f"samples {total}, in step {step}; ms per batch at {F:.0f} Hz:")
for n, _ in kernels + [("other (framework, alloc, faults)", None)]:
    c = counts[n]
    print(f"  {n:40s} {c/F*1000/batches:7.2f} ms  ({100*c/max(step,1):5.1f}%)")
print(f"  {'total step':40s} {step/F*1000/batches:7.2f} ms")

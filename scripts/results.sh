#!/usr/bin/env bash
# Trains each of the five models with --workers 4 on this machine and prints the README's
# results table (markdown) from the runs' summary.json files.
#
#   scripts/results.sh [RUNS_DIR]     (default: runs/results)
#
# Settings per model are below; every run uses the default seed. A model whose run directory
# already has a summary.json is not trained again: delete RUNS_DIR to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/results}
mkdir -p "$runs"
cargo build --release --quiet --bin coordinator

train() {
    local model=$1
    shift
    if [ -f "$runs/$model/summary.json" ]; then
        echo "== $model: already trained in $runs/$model" >&2
        return
    fi
    echo "== $model: $*" >&2
    target/release/coordinator --workers 4 --model "$model" --run-dir "$runs/$model" "$@" \
        > "$runs/$model.log" 2>&1
}

train softmax --epochs 5 --lr 0.01
train mlp --epochs 10
train mlp-dropout --epochs 15
train lenet --epochs 5
train cnn --epochs 5 --optimizer adam

python3 - "$runs" <<'PY'
import json, sys, pathlib
runs = pathlib.Path(sys.argv[1])
print("| model | epochs | test accuracy | wall time | images/s (training) |")
print("|---|---|---|---|---|")
for model in ["softmax", "mlp", "mlp-dropout", "lenet", "cnn"]:
    summary = json.loads((runs / model / "summary.json").read_text())
    epochs = summary["epochs"]
    rate = sum(e["samples"] for e in epochs) / sum(e["train_seconds"] for e in epochs)
    print(f"| {model} | {summary['epochs_completed']} | {summary['final_test_accuracy']*100:.2f}% "
          f"| {summary['wall_seconds']:.0f} s | {rate:,.0f} |")
PY

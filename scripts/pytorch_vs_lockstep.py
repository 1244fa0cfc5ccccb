#!/usr/bin/env python3
"""lockstep and PyTorch single-process training and evaluation, measured in turn on a shared
machine: for each model and thread count, a lockstep run (a child of the Rust benchmark
`cargo bench -p common --bench models`) and a PyTorch run (a child of
scripts/pytorch_models.py) alternate for --rounds rounds, and the ratio is taken pair by pair.
Alternating keeps the ratios meaningful when other work on the machine makes every rate drift;
quote the medians.

Usage:
  python3 scripts/pytorch_vs_lockstep.py [--models lenet cnn mlp] [--threads 1 2] [--rounds 5]
                                         [--lockstep-bench PATH] [--simd avx2]

--lockstep-bench is the benchmark executable (default: the newest target/release/deps/models-*
that `cargo bench -p common --bench models --no-run` builds). --simd caps lockstep's kernels
(LOCKSTEP_SIMD), e.g. to run the AVX2 path on an AVX-512 machine. Prints a markdown table and
writes target/bench/pytorch_vs_lockstep.json (..._avx2.json with --simd avx2).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD_ENV = "LOCKSTEP_BENCH_MODEL"


def newest_bench(target):
    candidates = [
        p for p in (target / "release" / "deps").glob("models-*")
        if p.is_file() and os.access(p, os.X_OK) and p.suffix == ""
    ]
    if not candidates:
        sys.exit("error: no models benchmark built; run `cargo bench -p common --bench models --no-run`")
    return max(candidates, key=lambda p: p.stat().st_mtime)


def last_json_line(text):
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def lockstep(bench, model, threads, simd):
    env = dict(os.environ, **{CHILD_ENV: model, "RAYON_NUM_THREADS": str(threads),
                              "CANDLE_NUM_THREADS": str(threads)})
    if simd:
        env["LOCKSTEP_SIMD"] = simd
    done = subprocess.run([str(bench)], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return last_json_line(done.stdout)


def pytorch(python, model, threads):
    env = dict(os.environ, **{CHILD_ENV: f"{model}:{threads}"})
    script = ROOT / "scripts" / "pytorch_models.py"
    done = subprocess.run([python, str(script)], env=env, stdout=subprocess.PIPE, text=True, check=True)
    return last_json_line(done.stdout)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "cnn", "mlp"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lockstep-bench", type=Path)
    parser.add_argument("--simd", help="LOCKSTEP_SIMD for lockstep's runs (avx2, portable)")
    parser.add_argument("--python", default=sys.executable, help="interpreter with torch")
    args = parser.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    bench = args.lockstep_bench or newest_bench(target)
    data_dir = os.environ.get("LOCKSTEP_DATA_DIR")
    if not data_dir:
        os.environ["LOCKSTEP_DATA_DIR"] = str(Path.home() / ".cache" / "lockstep" / "mnist")
    try:
        load_average = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load_average = ""
    started = time.time()
    rows = []
    torch_version = None
    for model in args.models:
        for threads in args.threads:
            pairs = []
            for _ in range(args.rounds):
                ours = lockstep(bench, model, threads, args.simd)
                theirs = pytorch(args.python, model, threads)
                pairs.append((ours, theirs))
                print(f"{model} x{threads}: lockstep {ours['train_images_per_s']:.0f}, "
                      f"PyTorch {theirs['train_images_per_s']:.0f} train images/s", file=sys.stderr)
            med = lambda xs: statistics.median(xs)
            row = {"model": model, "threads": threads, "rounds": args.rounds}
            for what in ["train", "eval"]:
                key = f"{what}_images_per_s"
                row[f"lockstep_{key}"] = med([o[key] for o, _ in pairs])
                row[f"pytorch_{key}"] = med([t[key] for _, t in pairs])
                ratios = [o[key] / t[key] for o, t in pairs]
                row[f"{what}_ratio"] = med(ratios)
                row[f"{what}_ratio_range"] = [min(ratios), max(ratios)]
            rows.append(row)
    report = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "seconds": time.time() - started,
        "load_average_at_start": load_average,
        "lockstep_bench": str(bench),
        "simd": args.simd or "best the CPU has",
        "results": rows,
    }
    print(f"\nlockstep and PyTorch in turn, {args.rounds} rounds each, medians; started "
          f"{report['started']}, load average {load_average}; lockstep kernels: {report['simd']}\n")
    print("| model | threads | lockstep train | PyTorch train | ratio (range) | lockstep eval | PyTorch eval | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        lo, hi = r["train_ratio_range"]
        print(f"| {r['model']} | {r['threads']} | {r['lockstep_train_images_per_s']:.0f} "
              f"| {r['pytorch_train_images_per_s']:.0f} | {r['train_ratio']:.2f}x ({lo:.2f}-{hi:.2f}) "
              f"| {r['lockstep_eval_images_per_s']:.0f} | {r['pytorch_eval_images_per_s']:.0f} "
              f"| {r['eval_ratio']:.2f}x |")
    by = {(r["model"], r["threads"]): r for r in rows}
    for model in args.models:
        if (model, 1) in by and (model, 2) in by:
            ours = by[(model, 2)]["lockstep_train_images_per_s"] / by[(model, 1)]["lockstep_train_images_per_s"]
            theirs = by[(model, 2)]["pytorch_train_images_per_s"] / by[(model, 1)]["pytorch_train_images_per_s"]
            print(f"{model}: 1 -> 2 threads {ours:.2f}x for lockstep, {theirs:.2f}x for PyTorch")
    out_dir = target / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "pytorch_vs_lockstep" + (f"_{args.simd}" if args.simd else "")
    partial = out_dir / f".{name}.json.partial"
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out_dir / f"{name}.json")
    print(f"wrote {out_dir / (name + '.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The five lockstep models in PyTorch, measured as `cargo bench -p common --bench models` measures
them in candle: single process on the CPU, real MNIST, batch 64, at 1 and 2 threads.

Training is a forward pass, the backward pass and an SGD step (momentum 0.9, lr 0.01) per
batch of a seeded epoch order; evaluation is a forward pass without gradients over chunks of
1000 test images. Each thread count runs in a fresh process (`torch.set_num_threads(n)` first).

Usage: python3 scripts/pytorch_models.py [MODEL...]    (softmax mlp mlp-dropout lenet cnn)

Reads the IDX files (raw or .gz) from $LOCKSTEP_DATA_DIR, else ~/.cache/lockstep/mnist (run
any lockstep command, or the Rust benchmark, once to fetch them). Prints a markdown table and
writes target/bench/pytorch_models.json.
"""

import gzip
import json
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path

CHILD_ENV = "LOCKSTEP_BENCH_MODEL"
THREADS = [1, 2]
BATCH = 64
EVAL_CHUNK = 1000
WARMUP_BATCHES = 3
MIN_TRAIN_BATCHES = 30
MIN_TRAIN_SECONDS = 2.0
WARMUP_EVAL_CHUNKS = 1
MIN_EVAL_CHUNKS = 3
MIN_EVAL_SECONDS = 1.0
LEARNING_RATE = 0.01
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081
MODELS = ["softmax", "mlp", "mlp-dropout", "lenet", "cnn"]

try:
    import torch
    from torch import nn
    import torch.nn.functional as F
except ImportError:
    sys.exit(
        f"error: PyTorch is not installed for {sys.executable}.\n"
        "Install it with `pip install torch`, for instance into a virtual environment:\n"
        "  python3 -m venv VENV && VENV/bin/pip install torch\n"
        "and run this script with VENV/bin/python."
    )


def data_dir():
    if os.environ.get("LOCKSTEP_DATA_DIR"):
        return Path(os.environ["LOCKSTEP_DATA_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache) if cache and Path(cache).is_absolute() else Path.home() / ".cache"
    return base / "lockstep" / "mnist"


def read_idx(directory, name, expected_magic):
    """The payload of IDX file `name` (raw, else .gz) as bytes, and its dimensions."""
    raw = directory / name
    gz = directory / f"{name}.gz"
    if raw.is_file():
        data = raw.read_bytes()
    elif gz.is_file():
        data = gzip.decompress(gz.read_bytes())
    else:
        sys.exit(
            f"error: {raw} (or .gz) is missing; fetch MNIST first, e.g. with "
            "`cargo bench -p common --bench models`, or set LOCKSTEP_DATA_DIR"
        )
    magic = struct.unpack(">I", data[:4])[0]
    if magic != expected_magic:
        sys.exit(f"error: {name}: magic {magic:#x}, expected {expected_magic:#x}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return data[4 + 4 * ndim :], dims


def load_split(directory, prefix):
    pixels, (count, rows, cols) = read_idx(directory, f"{prefix}-images-idx3-ubyte", 0x803)
    labels, (label_count,) = read_idx(directory, f"{prefix}-labels-idx1-ubyte", 0x801)
    if (rows, cols) != (28, 28) or label_count != count:
        sys.exit(f"error: {prefix}: {count} images of {rows}x{cols}, {label_count} labels")
    images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).view(count, 1, 28, 28)
    labels = torch.frombuffer(bytearray(labels), dtype=torch.uint8).long()
    return images, labels


def normalise(grey):
    return (grey.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def build(name):
    if name == "softmax":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 128), nn.ReLU(),
            nn.Linear(128, 64), nn.ReLU(),
            nn.Linear(64, 10),
        )
    if name == "mlp-dropout":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 512), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(512, 256), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(256, 10),
        )
    if name == "lenet":
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5), nn.Tanh(), nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(50 * 4 * 4, 500), nn.Tanh(),
            nn.Linear(500, 10),
        )
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 3 * 3, 128), nn.ReLU(),
            nn.Linear(128, 10),
        )
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")


def train_flops_per_image(name):
    """FLOPs of the dense layers and convolutions per training image (2 per multiply-add), three
    passes' worth (forward, input gradient, weight gradient); as in the Rust benchmark."""

    def dense(i, o):
        return i * o

    def conv(i, o, k, side):  # side: the output's side
        return i * o * k * k * side * side

    macs = {
        "softmax": dense(784, 10),
        "mlp": dense(784, 128) + dense(128, 64) + dense(64, 10),
        "mlp-dropout": dense(784, 512) + dense(512, 256) + dense(256, 10),
        "lenet": conv(1, 20, 5, 24) + conv(20, 50, 5, 8) + dense(800, 500) + dense(500, 10),
        "cnn": conv(1, 32, 3, 26) + conv(32, 64, 3, 11) + conv(64, 64, 3, 3)
        + dense(576, 128) + dense(128, 10),
    }[name]
    return 3 * 2 * macs


def measure(name, threads):
    """In a child process: trains `name` over a seeded epoch order, then evaluates."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    directory = data_dir()
    train_images, train_labels = load_split(directory, "train")
    test_images, test_labels = load_split(directory, "t10k")
    model = build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(0))
    steps = len(order) // BATCH

    model.train()
    losses = []
    sgd = 0.0
    step = 0
    measured_from = time.perf_counter()
    while True:
        if step == WARMUP_BATCHES:
            measured_from = time.perf_counter()
            sgd = 0.0
        measured = max(0, step - WARMUP_BATCHES)
        if measured >= MIN_TRAIN_BATCHES and time.perf_counter() - measured_from >= MIN_TRAIN_SECONDS:
            break
        indices = order[(step % steps) * BATCH : (step % steps + 1) * BATCH]
        images, labels = normalise(train_images[indices]), train_labels[indices]
        optimizer.zero_grad(set_to_none=True)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        sgd_from = time.perf_counter()
        optimizer.step()
        sgd += time.perf_counter() - sgd_from
        # What a lockstep worker reports with its gradient.
        losses.append(loss.item())
        (logits.argmax(1) == labels).sum().item()
        step += 1
    train_seconds = time.perf_counter() - measured_from
    train_batches = step - WARMUP_BATCHES

    model.eval()
    chunks = len(test_labels) // EVAL_CHUNK
    chunk = 0
    measured_from = time.perf_counter()
    with torch.no_grad():
        while True:
            if chunk == WARMUP_EVAL_CHUNKS:
                measured_from = time.perf_counter()
            measured = max(0, chunk - WARMUP_EVAL_CHUNKS)
            if measured >= MIN_EVAL_CHUNKS and time.perf_counter() - measured_from >= MIN_EVAL_SECONDS:
                break
            start = (chunk % chunks) * EVAL_CHUNK
            images = normalise(test_images[start : start + EVAL_CHUNK])
            labels = test_labels[start : start + EVAL_CHUNK]
            logits = model(images)
            F.cross_entropy(logits, labels, reduction="sum").item()
            (logits.argmax(1) == labels).sum().item()
            chunk += 1
    eval_seconds = time.perf_counter() - measured_from
    eval_images = (chunk - WARMUP_EVAL_CHUNKS) * EVAL_CHUNK

    return {
        "model": name,
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "train_batches": train_batches,
        "train_seconds": train_seconds,
        "train_images_per_s": train_batches * BATCH / train_seconds,
        "ms_per_train_batch": 1e3 * train_seconds / train_batches,
        "ms_per_sgd_step": 1e3 * sgd / train_batches,
        "first_loss": losses[WARMUP_BATCHES],
        "last_loss": losses[-1],
        "eval_images": eval_images,
        "eval_seconds": eval_seconds,
        "eval_images_per_s": eval_images / eval_seconds,
    }


def run_child(name, threads):
    env = dict(os.environ, **{CHILD_ENV: f"{name}:{threads}"})
    done = subprocess.run(
        [sys.executable, __file__], env=env, stdout=subprocess.PIPE, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"error: measuring {name} at {threads} thread(s) failed ({done.returncode})")
    line = [line for line in done.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(line)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    if CHILD_ENV in os.environ:
        name, threads = os.environ[CHILD_ENV].rsplit(":", 1)
        print(json.dumps(measure(name, int(threads))))
        return
    models = sys.argv[1:] or MODELS
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"error: unknown model(s) {', '.join(unknown)}; expected {', '.join(MODELS)}")
    try:
        load_average = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load_average = ""
    started = time.perf_counter()
    results = []
    for name in models:
        for threads in THREADS:
            row = run_child(name, threads)
            mflop = train_flops_per_image(name) / 1e6
            row["train_mflop_per_image"] = mflop
            row["train_gflop_per_s"] = mflop * row["train_images_per_s"] / 1e3
            print(
                f"{name} at {threads} thread(s): {row['train_images_per_s']:.0f} train images/s, "
                f"{row['eval_images_per_s']:.0f} eval images/s",
                file=sys.stderr,
            )
            results.append(row)
    report = {
        "torch": torch.__version__,
        # The instruction set PyTorch's own kernels were dispatched to (oneDNN and MKL choose
        # theirs the same way, at run time).
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": load_average,
        "batch": BATCH,
        "eval_chunk": EVAL_CHUNK,
        "results": results,
    }

    print(
        f"PyTorch {report['torch']} on the CPU, batch {BATCH}, evaluation in chunks of {EVAL_CHUNK}; "
        f"{report['cpu']} ({report['cores']} cores available, kernels for {report['cpu_capability']}, "
        f"load average {load_average})"
    )
    print()
    print("| model | threads | train images/s | eval images/s | ms per training batch | train MFLOP/image | train GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['model']} | {r['threads']} | {r['train_images_per_s']:.0f} | {r['eval_images_per_s']:.0f} "
            f"| {r['ms_per_train_batch']:.2f} | {r['train_mflop_per_image']:.2f} | {r['train_gflop_per_s']:.1f} |"
        )

    target = Path(os.environ.get("CARGO_TARGET_DIR") or Path(__file__).resolve().parent.parent / "target")
    out_dir = target / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".pytorch_models.json.partial"
    partial.write_text(json.dumps(report, indent=2) + "\n")
    path = out_dir / "pytorch_models.json"
    partial.replace(path)
    print(f"took {time.perf_counter() - started:.0f} s; wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

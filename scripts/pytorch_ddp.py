#!/usr/bin/env python3
"""Synchronous data-parallel training of the lockstep models with PyTorch's
DistributedDataParallel (DDP) on the CPU, as a yardstick for the Rust cluster.

N ranks run as separate processes on this machine and talk through the gloo backend over
loopback (127.0.0.1; GLOO_SOCKET_IFNAME=lo unless set). The rendezvous store is a TCPStore
held by this (parent) process on a free port (bound as port 0). Each rank uses
`torch.set_num_threads(--threads)` (default 1) and takes 64 images per step, so the global
batch is 64 * N, as a lockstep worker does. The models, the data loading and the
normalisation are those of scripts/pytorch_models.py.

Usage:
  python3 scripts/pytorch_ddp.py [--models lenet cnn mlp] [--ranks 1 2 4] [--threads 1]
                                 [--seconds 5] [--steps 30] [--warmup 5]
                                 [--allreduce-ranks 2 4] [--allreduce-reps 50]
                                 [--time-to-accuracy [--no-throughput] [--epochs 5]
                                  [--tta-ranks 4] [--single-threads 2] [--max-steps K]]
  python3 scripts/pytorch_ddp.py --help          (every option)

  Full measurement (machine idle):
    python3 scripts/pytorch_ddp.py --models lenet cnn mlp --time-to-accuracy
  Quick look while developing:
    python3 scripts/pytorch_ddp.py --seconds 1 --steps 10 --allreduce-reps 20
    python3 scripts/pytorch_ddp.py --no-throughput --time-to-accuracy --max-steps 30

Reads the IDX files (raw or .gz) from $LOCKSTEP_DATA_DIR, else ~/.cache/lockstep/mnist (any
lockstep command fetches them, e.g. `cargo run --release --bin coordinator -- --max-steps 1`).
Prints the exact command line and markdown tables, and writes target/bench/pytorch_ddp.json
($CARGO_TARGET_DIR/bench/ if set) with the parts that ran.

What each figure means
----------------------
1. Throughput ("DDP images/s"): aggregate training images per second over all ranks,
   64 * N * steps / wall time, for `steps` steps after `--warmup` untimed steps; the step count
   is at least --steps and enough for about --seconds (estimated from the warm-up steps). The
   wall time is the slowest rank's, between a barrier and its last step. A step is: slice and
   normalise the batch, forward, cross-entropy, backward (during which DDP all-reduces gradient
   buckets as they become ready, overlapped with the rest of the backward pass), SGD step,
   and reading the loss and the number of correct predictions (what a lockstep worker reports).

2. Per-step split, two ways, in milliseconds per step, averaged over steps and ranks:
   * "DDP (overlapped)": the step above timed phase by phase: data (slice + normalise),
     forward (with the loss), backward + allreduce (DDP's backward: gradient computation and
     the bucketed allreduce it overlaps, up to the wait for the last bucket), optimizer
     (SGD step) and other (zero_grad, learning-rate update, reading loss and accuracy). The
     communication cannot be told apart from the computation here; compare with the next.
   * "separated": the same model under DDP's `no_sync()` (no allreduce during backward),
     followed by, one after the other: a barrier ("wait": time this rank waits for the slowest
     rank to finish its backward pass, plus the barrier's own latency; on an oversubscribed
     machine it includes time the rank is descheduled), copying the gradients into one flat
     buffer and back after ("copy"), one `dist.all_reduce` of the flat gradient ("allreduce":
     the transfer and reduction itself, all ranks having arrived) and the SGD step. "compute"
     is data + forward + backward without communication. "separated images/s" is this
     variant's throughput, with nothing overlapped; on few, busy cores it can nevertheless beat
     DDP, whose communication threads then compete with the computation for the cores.
   The "DDP comm. overhead" column is DDP's step time minus the separated run's data + compute
   + optimizer + other time: what the overlapped allreduce (and waiting) still costs DDP per
   step. It is a difference between two separate measurements, so it is noisy (it can come out
   slightly negative at 1 rank).

3. Allreduce of 431,080 float32 (LeNet's parameter count, 1.72 MB) at 2 and 4 ranks: after
   warm-up repetitions, each repetition is a barrier then one timed `dist.all_reduce` (sum);
   the time of a repetition is the slowest rank's. Median, p90, mean and minimum over
   --allreduce-reps repetitions, and the bus bandwidth 2 (N-1)/N * bytes / median (what each
   rank sends in a ring allreduce, per second).

4. Time to accuracy (--time-to-accuracy): LeNet trained for full epochs (up to --epochs, 5)
   with the lockstep schedule: SGD momentum 0.9, learning rate 0.05 at global batch 64 scaled
   linearly with the global batch (0.2 at 4 ranks), `--lr-warmup-steps` (50) steps of linear
   warm-up (rate peak * (step + 1) / 50), then half a cosine down to 0 at the job's last step
   (common/src/optim/schedule.rs). Each epoch has ceil(60000 / (64 N)) steps over a seeded
   permutation (the same on every rank); a step's global batch is split evenly among the
   ranks (the last step is short) and the gradient is the mean over the global batch. After
   each epoch the 10,000 test images are evaluated, split evenly among the ranks, in chunks
   of 1000. Reported: the first epoch whose test accuracy reached --target (0.99), the
   training time up to then (the epochs' training loops only) and the total time up to then
   (training + evaluations, from the barrier after start-up), the start-up time (process
   launch to training start: importing torch, loading MNIST, joining the process group) and
   the accuracy of every epoch. Run at --tta-ranks (4) ranks of --threads threads and as a
   single process (world size 1) with --single-threads (2) threads. --max-steps K caps the
   job's steps (and the cosine's length) as the coordinator's --max-steps does, for smoke
   runs. The permutation comes from PyTorch's generator and the initial parameters from
   PyTorch's default initialisation, not from lockstep's seeded ChaCha8 streams, so the runs
   follow the same recipe but are not bit-identical to the Rust ones.

World size 1 still goes through DDP (a one-rank allreduce), so its figures include DDP's
overhead; scripts/pytorch_models.py measures the plain single process.

If any rank fails, the others are stopped, the failing rank's error is shown and the script
exits non-zero; ranks die with this process (PR_SET_PDEATHSIG) and are killed on Ctrl-C or
SIGTERM. Only a crash in the teardown after the final barrier (gloo can abort a process on
its way out) is reported as a warning instead, all the work being done by then.
"""

import argparse
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD_ENV = "LOCKSTEP_DDP_CHILD"
RESULT_MARKER = "LOCKSTEP_DDP_RESULT "
DONE_MARKER = "LOCKSTEP_DDP_DONE"
BATCH = 64
LENET_PARAMETERS = 431_080
DATA_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]

try:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
except ImportError:
    sys.exit(
        f"error: PyTorch is not installed for {sys.executable}.\n"
        "Install it with `pip install torch numpy`, for instance into a virtual environment:\n"
        "  python3 -m venv VENV && VENV/bin/pip install torch numpy\n"
        "and run this script with VENV/bin/python."
    )

sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no scripts/__pycache__ in the working tree
import pytorch_models as pm  # noqa: E402  (the models, MNIST loading and normalisation)


# ---------------------------------------------------------------------------------------------
# Shared helpers


def split_evenly(length, parts):
    """`parts` contiguous ranges covering 0..length, sizes differing by at most one, larger
    first (common/src/sharding.rs)."""
    base, extra = divmod(length, parts)
    ranges, start = [], 0
    for part in range(parts):
        size = base + (1 if part < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def lr_at(step, peak, warmup_steps, total_steps):
    """LrSchedule::at of common/src/optim/schedule.rs with cosine decay."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def quantile(values, q):
    """Linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def epoch_order(seed, epoch, length):
    """The epoch's sample order, the same on every rank."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


# ---------------------------------------------------------------------------------------------
# Rank side


class Rank:
    def __init__(self, spec):
        self.spec = spec
        self.rank = int(os.environ["LOCKSTEP_DDP_RANK"])
        self.world = int(os.environ["LOCKSTEP_DDP_WORLD"])
        torch.set_num_threads(spec["threads"])
        timeout = timedelta(seconds=spec["collective_timeout"])
        store = dist.TCPStore(
            "127.0.0.1", int(os.environ["LOCKSTEP_DDP_PORT"]), is_master=False, timeout=timeout
        )
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world, timeout=timeout)
        directory = pm.data_dir()
        self.train_images, self.train_labels = pm.load_split(directory, "train")
        self.test_images, self.test_labels = pm.load_split(directory, "t10k")
        self.train_len = len(self.train_labels)

    def log(self, message):
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    def fresh_model(self, name):
        torch.manual_seed(self.spec["seed"])
        model = pm.build(name)
        torch.manual_seed(self.spec["seed"] + 1 + self.rank)  # dropout masks differ per rank
        ddp = DDP(model)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0, momentum=self.spec["momentum"])
        return model, ddp, optimizer

    def local_batch(self, order, step):
        """This rank's share of the global batch of `step` and the global batch's size."""
        global_batch = BATCH * self.world
        start = min(step * global_batch, len(order))
        end = min(start + global_batch, len(order))
        mine = split_evenly(end - start, self.world)[self.rank]
        indices = order[start + mine.start : start + mine.stop]
        images = pm.normalise(self.train_images[indices])
        return images, self.train_labels[indices], end - start

    def reduce(self, values, op=dist.ReduceOp.SUM):
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        return tensor.tolist()

    # -- 1 and 2: throughput and per-step split ------------------------------------------

    def throughput(self, name, separated):
        model, ddp, optimizer = self.fresh_model(name)
        params = [p for p in ddp.parameters() if p.requires_grad]
        flat = torch.empty(sum(p.numel() for p in params))
        order = epoch_order(self.spec["seed"], 0, self.train_len)
        full_steps = self.train_len // (BATCH * self.world)
        peak = self.spec["lr"] * self.world
        phases = (
            ["data", "forward", "backward", "optimizer", "other"]
            if not separated
            else ["data", "forward", "backward", "wait", "copy", "allreduce", "optimizer", "other"]
        )

        def step(index, sums):
            t0 = time.perf_counter()
            images, labels, global_count = self.local_batch(order, index % full_steps)
            t1 = time.perf_counter()
            lr = lr_at(index, peak, self.spec["lr_warmup_steps"], full_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            if not separated:
                t1b = time.perf_counter()
                logits = ddp(images)
                loss_sum = F.cross_entropy(logits, labels, reduction="sum")
                t2 = time.perf_counter()
                (loss_sum * (self.world / global_count)).backward()
                t3 = time.perf_counter()
                optimizer.step()
                t4 = time.perf_counter()
                loss_sum.item()
                (logits.argmax(1) == labels).sum().item()
                t5 = time.perf_counter()
                marks = [t1 - t0, t2 - t1b, t3 - t2, t4 - t3, (t1b - t1) + (t5 - t4)]
            else:
                with ddp.no_sync():
                    t1b = time.perf_counter()
                    logits = ddp(images)
                    loss_sum = F.cross_entropy(logits, labels, reduction="sum")
                    t2 = time.perf_counter()
                    (loss_sum * (self.world / global_count)).backward()
                t3 = time.perf_counter()
                dist.barrier()
                t4 = time.perf_counter()
                offset = 0
                for p in params:
                    n = p.numel()
                    flat[offset : offset + n].copy_(p.grad.reshape(-1))
                    offset += n
                t5 = time.perf_counter()
                dist.all_reduce(flat)
                t6 = time.perf_counter()
                flat.div_(self.world)
                offset = 0
                for p in params:
                    n = p.numel()
                    p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                    offset += n
                t7 = time.perf_counter()
                optimizer.step()
                t8 = time.perf_counter()
                loss_sum.item()
                (logits.argmax(1) == labels).sum().item()
                t9 = time.perf_counter()
                marks = [t1 - t0, t2 - t1b, t3 - t2, t4 - t3, (t5 - t4) + (t7 - t6), t6 - t5,
                         t8 - t7, (t1b - t1) + (t9 - t8)]
            if sums is not None:
                for i, value in enumerate(marks):
                    sums[i] += value

        warmup = self.spec["warmup"]
        dist.barrier()
        for index in range(warmup):
            if index == 1:
                calibration_from = time.perf_counter()
            step(index, None)
        per_step = (time.perf_counter() - calibration_from) / max(warmup - 1, 1) if warmup > 1 else 0.1
        steps = torch.tensor(
            [max(self.spec["steps"], math.ceil(self.spec["seconds"] / max(per_step, 1e-6)))]
        )
        dist.broadcast(steps, src=0)  # every rank runs rank 0's count
        steps = int(steps.item())

        sums = [0.0] * len(phases)
        dist.barrier()
        started = time.perf_counter()
        for index in range(warmup, warmup + steps):
            step(index, sums)
        elapsed = time.perf_counter() - started
        (elapsed_max,) = self.reduce([elapsed], dist.ReduceOp.MAX)
        mean_sums = [s / self.world for s in self.reduce(sums)]
        ms = {phase: 1e3 * total / steps for phase, total in zip(phases, mean_sums)}
        return {
            "steps": steps,
            "seconds": elapsed_max,
            "images_per_s": BATCH * self.world * steps / elapsed_max,
            "ms_per_step": 1e3 * elapsed_max / steps,
            "ms_phases": ms,
            "parameters": flat.numel(),
        }

    # -- 3: one allreduce -----------------------------------------------------------------

    def allreduce(self):
        floats, warmup, reps = (self.spec["allreduce_floats"], self.spec["allreduce_warmup"],
                                self.spec["allreduce_reps"])
        buffer = torch.randn(floats, generator=torch.Generator().manual_seed(self.rank))
        times = []
        for rep in range(warmup + reps):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(buffer)
            elapsed = time.perf_counter() - started
            buffer.div_(self.world)
            if rep >= warmup:
                times.append(elapsed)
        slowest = self.reduce(times, dist.ReduceOp.MAX)
        ms = [1e3 * t for t in slowest]
        nbytes = 4 * floats
        median = quantile(ms, 0.5)
        return {
            "ranks": self.world,
            "floats": floats,
            "bytes": nbytes,
            "reps": reps,
            "warmup": warmup,
            "median_ms": median,
            "p90_ms": quantile(ms, 0.9),
            "mean_ms": sum(ms) / len(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "bus_gb_per_s": 2 * (self.world - 1) / self.world * nbytes / (median / 1e3) / 1e9,
            "ms": ms,
        }

    # -- 4: time to accuracy ----------------------------------------------------------------

    def evaluate(self, model):
        mine = split_evenly(len(self.test_labels), self.world)[self.rank]
        loss_sum, correct = 0.0, 0
        model.eval()
        with torch.no_grad():
            for start in range(mine.start, mine.stop, pm.EVAL_CHUNK):
                end = min(start + pm.EVAL_CHUNK, mine.stop)
                logits = model(pm.normalise(self.test_images[start:end]))
                labels = self.test_labels[start:end]
                loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                correct += (logits.argmax(1) == labels).sum().item()
        model.train()
        loss_sum, correct, count = self.reduce([loss_sum, correct, len(mine)])
        return loss_sum / count, correct / count, int(count)

    def time_to_accuracy(self):
        spec = self.spec
        model, ddp, optimizer = self.fresh_model(spec["model"])
        global_batch = BATCH * self.world
        steps_per_epoch = math.ceil(self.train_len / global_batch)
        total_steps = steps_per_epoch * spec["epochs"]
        if spec["max_steps"] is not None:
            total_steps = min(total_steps, spec["max_steps"])
        peak = spec["lr"] * global_batch / BATCH
        self.log(
            f"  {self.world} rank(s) x {spec['threads']} thread(s): {spec['epochs']} epoch(s) of "
            f"{steps_per_epoch} steps, {total_steps} steps in all, peak lr {peak:g}"
        )
        dist.barrier()
        train_started_unix = time.time()
        started = time.perf_counter()
        step = 0
        train_seconds = 0.0
        epochs = []
        reached = None
        for epoch in range(1, spec["epochs"] + 1):
            if step >= total_steps:
                break
            order = epoch_order(spec["seed"], epoch, self.train_len)
            epoch_started = time.perf_counter()
            loss_total, correct_total, seen, epoch_steps = 0.0, 0, 0, 0
            for index in range(steps_per_epoch):
                if step >= total_steps:
                    break
                images, labels, global_count = self.local_batch(order, index)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, peak, spec["lr_warmup_steps"], total_steps)
                optimizer.zero_grad(set_to_none=True)
                logits = ddp(images)
                loss_sum = F.cross_entropy(logits, labels, reduction="sum")
                (loss_sum * (self.world / global_count)).backward()
                optimizer.step()
                loss_total += loss_sum.item()
                correct_total += (logits.argmax(1) == labels).sum().item()
                seen += len(labels)
                step += 1
                epoch_steps += 1
            epoch_train = time.perf_counter() - epoch_started
            train_seconds += epoch_train
            eval_started = time.perf_counter()
            test_loss, test_accuracy, test_count = self.evaluate(model)
            eval_seconds = time.perf_counter() - eval_started
            wall = time.perf_counter() - started
            loss_total, correct_total, seen = self.reduce([loss_total, correct_total, seen])
            record = {
                "epoch": epoch,
                "steps": epoch_steps,
                "train_images": int(seen),
                "train_seconds": epoch_train,
                "eval_seconds": eval_seconds,
                "cumulative_train_seconds": train_seconds,
                "wall_seconds": wall,
                "train_loss": loss_total / max(seen, 1),
                "train_accuracy": correct_total / max(seen, 1),
                "test_loss": test_loss,
                "test_accuracy": test_accuracy,
                "test_images": test_count,
            }
            epochs.append(record)
            self.log(
                f"  epoch {epoch}: {epoch_steps} steps, train {epoch_train:.1f} s "
                f"({seen / epoch_train:.0f} images/s), eval {eval_seconds:.1f} s, "
                f"test accuracy {test_accuracy:.4f}, {wall:.1f} s since start"
            )
            if reached is None and test_accuracy >= spec["target"]:
                reached = record
                if spec["stop_at_target"]:
                    break
        return {
            "model": spec["model"],
            "ranks": self.world,
            "threads_per_rank": spec["threads"],
            "global_batch": global_batch,
            "peak_lr": peak,
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "steps_run": step,
            "target": spec["target"],
            "reached_epoch": reached and reached["epoch"],
            "train_seconds_to_target": reached and reached["cumulative_train_seconds"],
            "wall_seconds_to_target": reached and reached["wall_seconds"],
            "train_seconds": train_seconds,
            "wall_seconds": time.perf_counter() - started,
            "final_test_accuracy": epochs[-1]["test_accuracy"] if epochs else None,
            "train_started_unix": train_started_unix,
            "epochs": epochs,
        }

    def run(self):
        spec = self.spec
        result = {"ranks": self.world, "threads_per_rank": spec["threads"]}
        if spec["task"] == "throughput":
            result["models"] = []
            for name in spec["models"]:
                row = {"model": name}
                for separated in (False, True):
                    label = "separated" if separated else "ddp"
                    row[label] = self.throughput(name, separated)
                    self.log(
                        f"  {name} at {self.world} rank(s), {label}: "
                        f"{row[label]['images_per_s']:.0f} images/s over {row[label]['steps']} steps"
                    )
                result["models"].append(row)
            if spec["allreduce"]:
                result["allreduce"] = self.allreduce()
                self.log(
                    f"  allreduce of {spec['allreduce_floats']} float32 at {self.world} ranks: "
                    f"median {result['allreduce']['median_ms']:.3f} ms"
                )
        elif spec["task"] == "tta":
            result["tta"] = self.time_to_accuracy()
        else:
            raise ValueError(f"unknown task {spec['task']!r}")
        return result


def child_main():
    """One rank. Exits through os._exit: gloo's threads can abort the interpreter's own
    finalisation (std::terminate), which would turn a finished run into a failure."""
    try:
        spec = json.loads(os.environ[CHILD_ENV])
        rank = Rank(spec)
        result = rank.run()
        if rank.rank == 0:
            print(RESULT_MARKER + json.dumps(result), flush=True)
        dist.barrier()  # every rank is done: nothing is lost if the teardown below fails
        print(DONE_MARKER, flush=True)
        dist.destroy_process_group()
        code = 0
    except SystemExit as exit:  # pytorch_models' data errors
        if exit.code not in (None, 0) and not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
        code = exit.code if isinstance(exit.code, int) and exit.code else 1
    except BaseException:  # noqa: BLE001 (reported to the parent through stderr and the status)
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------------------------
# Parent side


class RankFailure(Exception):
    pass


def die_with_parent(parent_pid):
    """Runs in each rank before exec: SIGKILL when this script dies, however it dies."""

    def setup():
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # the parent died before prctl
            os._exit(1)

    return setup


def finished(out):
    """Whether the rank writing to `out` passed the final barrier."""
    try:
        return DONE_MARKER.encode() in Path(out.name).read_bytes()
    except OSError:
        return False


def tail(path, lines=40):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def launch(spec, world, threads, timeout):
    """Runs `spec` on `world` ranks; returns rank 0's result. Raises RankFailure if a rank fails
    or the run outlives `timeout` seconds; never leaves a rank running."""
    spec = dict(spec, threads=threads)
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False,
        timeout=timedelta(seconds=spec["collective_timeout"]),
    )
    port = store.port
    logs = tempfile.TemporaryDirectory(prefix="pytorch_ddp.")
    procs, outs, errs = [], [], []
    launched_unix = time.time()
    try:
        for rank in range(world):
            env = dict(os.environ)
            env.update({
                CHILD_ENV: json.dumps(spec),
                "LOCKSTEP_DDP_RANK": str(rank),
                "LOCKSTEP_DDP_WORLD": str(world),
                "LOCKSTEP_DDP_PORT": str(port),
                "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads),
                "PYTHONUNBUFFERED": "1",
            })
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            out = open(Path(logs.name) / f"rank{rank}.out", "w+b")
            err = open(Path(logs.name) / f"rank{rank}.err", "w+b")
            outs.append(out)
            errs.append(err)
            procs.append(subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve())],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                preexec_fn=die_with_parent(os.getpid()),
            ))
        forwarded = 0
        deadline = time.monotonic() + timeout
        while True:
            # Rank 0's progress lines, as they come.
            text = Path(errs[0].name).read_bytes()
            newline = text.rfind(b"\n", forwarded) + 1
            if newline > forwarded:
                sys.stderr.write(text[forwarded:newline].decode(errors="replace"))
                sys.stderr.flush()
                forwarded = newline
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0) and not finished(outs[r])]
            if failed:
                # The first to fail is the cause; the others usually fail because of it.
                first = failed[0]
                stop(procs)
                others = [r for r, p in enumerate(procs) if p.returncode != 0 and r != first]
                output = tail(errs[first].name) or "(none)"
                message = f"rank {first} of {world} {describe(codes[first])}; its error output:\n{output}"
                if others:
                    message += f"\n(other ranks that failed or were stopped: {', '.join(map(str, others))})"
                raise RankFailure(message)
            if all(c is not None for c in codes):
                for r, c in enumerate(codes):
                    if c != 0:  # after the final barrier: the work is complete
                        print(f"warning: rank {r} {describe(c)} while shutting down, after finishing; "
                              f"its error output:\n{tail(errs[r].name, 5)}", file=sys.stderr)
                break
            if time.monotonic() > deadline:
                stop(procs)
                raise RankFailure(
                    f"{world} rank(s) still running after {timeout} s (see --timeout); stopped them.\n"
                    f"rank 0's error output:\n{tail(errs[0].name)}"
                )
            time.sleep(0.05)
        text = Path(errs[0].name).read_bytes()
        sys.stderr.write(text[forwarded:].decode(errors="replace"))
        lines = [line for line in Path(outs[0].name).read_text().splitlines() if line.startswith(RESULT_MARKER)]
        if not lines:
            raise RankFailure(f"rank 0 exited without a result; its output:\n{tail(outs[0].name)}")
        result = json.loads(lines[-1][len(RESULT_MARKER):])
        result["process_seconds"] = time.time() - launched_unix
        result["launched_unix"] = launched_unix
        return result
    finally:
        stop(procs)
        for f in outs + errs:
            f.close()
        logs.cleanup()
        del store


def describe(code):
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"failed (exit status {code})"


def stop(procs):
    """Terminates the ranks still running, then kills those that linger."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def check_data():
    directory = pm.data_dir()
    missing = [n for n in DATA_FILES if not (directory / n).is_file() and not (directory / f"{n}.gz").is_file()]
    if missing:
        sys.exit(
            f"error: MNIST is missing from {directory}: {', '.join(missing)} (raw or .gz).\n"
            "Fetch it with any lockstep command, e.g. from the repository root:\n"
            "  cargo run --release --bin coordinator -- --max-steps 1\n"
            "which downloads MNIST into ~/.cache/lockstep/mnist, or point LOCKSTEP_DATA_DIR at a "
            "directory holding the four IDX files."
        )
    return directory


def load_average():
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return ""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="PyTorch DDP (gloo, CPU, loopback) throughput, step split, allreduce time "
        "and time to accuracy for the lockstep models. See the module docstring.",
    )
    parser.add_argument("--models", nargs="+", default=["lenet"], choices=pm.MODELS,
                        help="models for the throughput part (default: lenet)")
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4],
                        help="world sizes for the throughput part (default: 1 2 4)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank (default: 1)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps before each throughput measurement (default: 5)")
    parser.add_argument("--steps", type=int, default=30,
                        help="at least this many measured steps per throughput figure (default: 30)")
    parser.add_argument("--seconds", type=float, default=5.0,
                        help="and about this many seconds (default: 5)")
    parser.add_argument("--allreduce-ranks", nargs="*", type=int, default=[2, 4],
                        help="world sizes for the allreduce timing; none to skip (default: 2 4)")
    parser.add_argument("--allreduce-floats", type=int, default=LENET_PARAMETERS,
                        help=f"float32 values per allreduce (default: {LENET_PARAMETERS:,}, LeNet's parameters)")
    parser.add_argument("--allreduce-reps", type=int, default=50, help="timed allreduces (default: 50)")
    parser.add_argument("--allreduce-warmup", type=int, default=5, help="untimed allreduces first (default: 5)")
    parser.add_argument("--no-throughput", action="store_true",
                        help="skip parts 1-3 (throughput, step split, allreduce)")
    parser.add_argument("--time-to-accuracy", action="store_true",
                        help="also measure wall time to --target test accuracy (long: minutes)")
    parser.add_argument("--tta-model", default="lenet", choices=pm.MODELS, help="(default: lenet)")
    parser.add_argument("--tta-ranks", type=int, default=4,
                        help="ranks of the distributed time-to-accuracy run (default: 4)")
    parser.add_argument("--single-threads", type=int, default=2,
                        help="threads of the single-process time-to-accuracy run (default: 2)")
    parser.add_argument("--epochs", type=int, default=5, help="time to accuracy: at most this many epochs (default: 5)")
    parser.add_argument("--target", type=float, default=0.99, help="test accuracy to reach (default: 0.99)")
    parser.add_argument("--stop-at-target", action="store_true",
                        help="end a time-to-accuracy run at the first epoch reaching --target")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="time to accuracy: at most this many steps in all (smoke runs)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="learning rate at global batch 64, scaled linearly (default: 0.05)")
    parser.add_argument("--lr-warmup-steps", type=int, default=50,
                        help="steps of linear learning-rate warm-up (default: 50)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    parser.add_argument("--seed", type=int, default=42, help="(default: 42)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds one launch of the ranks may take before they are killed (default: 3600)")
    parser.add_argument("--collective-timeout", type=float, default=300.0,
                        help="seconds a rank waits in a collective or the rendezvous (default: 300)")
    args = parser.parse_args(argv)
    for flag in ("threads", "steps", "allreduce_reps", "tta_ranks", "single_threads", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if any(n < 1 for n in args.ranks) or any(n < 1 for n in args.allreduce_ranks):
        parser.error("world sizes must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error("--max-steps must be at least 1")
    if args.warmup < 0 or args.allreduce_warmup < 0 or args.lr_warmup_steps < 0:
        parser.error("warm-up counts cannot be negative")
    if args.no_throughput and not args.time_to_accuracy:
        parser.error("--no-throughput leaves nothing to do without --time-to-accuracy")
    return args


def main():
    if CHILD_ENV in os.environ:
        child_main()
        return
    args = parse_args(sys.argv[1:])
    command = shlex.join([sys.executable] + sys.argv)
    # SIGTERM unwinds like Ctrl-C, so that the ranks are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    check_data()
    print(f"command: {command}")
    print(file=sys.stdout, flush=True)
    report = {
        "command": command,
        "torch": torch.__version__,
        "cpu": pm.cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average_start": load_average(),
        "settings": {k: v for k, v in vars(args).items()},
        "batch_per_rank": BATCH,
        "backend": "gloo",
        "address": "127.0.0.1",
    }
    common = {
        "seed": args.seed,
        "lr": args.lr,
        "lr_warmup_steps": args.lr_warmup_steps,
        "momentum": args.momentum,
        "collective_timeout": args.collective_timeout,
    }
    started = time.perf_counter()
    try:
        if not args.no_throughput:
            throughput, allreduce = [], []
            for world in sorted(set(args.ranks) | set(args.allreduce_ranks)):
                spec = dict(
                    common,
                    task="throughput",
                    models=args.models if world in args.ranks else [],
                    allreduce=world in args.allreduce_ranks,
                    warmup=args.warmup,
                    steps=args.steps,
                    seconds=args.seconds,
                    allreduce_floats=args.allreduce_floats,
                    allreduce_warmup=args.allreduce_warmup,
                    allreduce_reps=args.allreduce_reps,
                )
                print(f"{world} rank(s) x {args.threads} thread(s): throughput and allreduce", file=sys.stderr)
                result = launch(spec, world, args.threads, args.timeout)
                for row in result["models"]:
                    throughput.append(dict(row, ranks=world, threads_per_rank=args.threads))
                if "allreduce" in result:
                    allreduce.append(result["allreduce"])
            report["throughput"] = throughput
            report["allreduce"] = allreduce
        if args.time_to_accuracy:
            report["time_to_accuracy"] = []
            for world, threads in ((args.tta_ranks, args.threads), (1, args.single_threads)):
                spec = dict(
                    common,
                    task="tta",
                    model=args.tta_model,
                    epochs=args.epochs,
                    target=args.target,
                    stop_at_target=args.stop_at_target,
                    max_steps=args.max_steps,
                )
                print(f"time to accuracy: {world} rank(s) x {threads} thread(s)", file=sys.stderr)
                result = launch(spec, world, threads, args.timeout)
                tta = result["tta"]
                tta["setup_seconds"] = tta["train_started_unix"] - result["launched_unix"]
                tta["process_seconds"] = result["process_seconds"]
                report["time_to_accuracy"].append(tta)
    except RankFailure as failure:
        sys.exit(f"error: {failure}")
    except KeyboardInterrupt:
        sys.exit("interrupted; ranks stopped")
    report["load_average_end"] = load_average()
    report["seconds"] = time.perf_counter() - started
    print_report(report)
    write_report(report)


def print_report(report):
    print(
        f"PyTorch {report['torch']} DDP, gloo over 127.0.0.1, CPU, batch {BATCH} per rank; "
        f"{report['cpu']} ({report['cores']} cores available, load average "
        f"{report['load_average_start']} at start, {report['load_average_end']} at end)"
    )
    if "throughput" in report and report["throughput"]:
        base = {(r["model"]): r["ddp"]["images_per_s"] for r in report["throughput"] if r["ranks"] == 1}
        print()
        print("Training throughput (aggregate over all ranks, after warm-up):")
        print()
        print("| model | ranks | threads/rank | global batch | DDP images/s | per rank | ms/step | vs 1 rank | separated images/s | steps |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in report["throughput"]:
            d, s = r["ddp"], r["separated"]
            ratio = f"{d['images_per_s'] / base[r['model']]:.2f}x" if r["model"] in base else "-"
            print(
                f"| {r['model']} | {r['ranks']} | {r['threads_per_rank']} | {BATCH * r['ranks']} "
                f"| {d['images_per_s']:.0f} | {d['images_per_s'] / r['ranks']:.0f} | {d['ms_per_step']:.2f} "
                f"| {ratio} | {s['images_per_s']:.0f} | {d['steps']} |"
            )
        print()
        print("Per step, DDP (overlapped), ms, mean over steps and ranks:")
        print()
        print("| model | ranks | data | forward | backward + allreduce | optimizer | other | sum | step (wall) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in report["throughput"]:
            p = r["ddp"]["ms_phases"]
            print(
                f"| {r['model']} | {r['ranks']} | {p['data']:.2f} | {p['forward']:.2f} | {p['backward']:.2f} "
                f"| {p['optimizer']:.2f} | {p['other']:.2f} | {sum(p.values()):.2f} | {r['ddp']['ms_per_step']:.2f} |"
            )
        print()
        print("Per step, separated (no_sync + barrier + one allreduce of the flat gradient), ms:")
        print()
        print("| model | ranks | compute (data+fwd+bwd) | wait | copy | allreduce | optimizer | other | step (wall) | DDP comm. overhead |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in report["throughput"]:
            p = r["separated"]["ms_phases"]
            compute = p["data"] + p["forward"] + p["backward"]
            overhead = r["ddp"]["ms_per_step"] - (compute + p["optimizer"] + p["other"])
            print(
                f"| {r['model']} | {r['ranks']} | {compute:.2f} | {p['wait']:.2f} | {p['copy']:.2f} "
                f"| {p['allreduce']:.2f} | {p['optimizer']:.2f} | {p['other']:.2f} "
                f"| {r['separated']['ms_per_step']:.2f} | {overhead:.2f} |"
            )
    if report.get("allreduce"):
        print()
        a0 = report["allreduce"][0]
        print(
            f"One allreduce (sum) of {a0['floats']:,} float32 ({a0['bytes'] / 1e6:.2f} MB), slowest rank, "
            f"{a0['reps']} repetitions after {a0['warmup']} warm-up:"
        )
        print()
        print("| ranks | median ms | p90 ms | mean ms | min ms | bus GB/s (median) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for a in report["allreduce"]:
            print(
                f"| {a['ranks']} | {a['median_ms']:.3f} | {a['p90_ms']:.3f} | {a['mean_ms']:.3f} "
                f"| {a['min_ms']:.3f} | {a['bus_gb_per_s']:.2f} |"
            )
    if report.get("time_to_accuracy"):
        rows = report["time_to_accuracy"]
        print()
        print(
            f"Time to {rows[0]['target']:.2%} test accuracy, {rows[0]['model']}, lr {report['settings']['lr']} "
            f"at batch 64 scaled linearly, {report['settings']['lr_warmup_steps']} warm-up steps, cosine to 0:"
        )
        print()
        print("| ranks x threads | global batch | epoch reached | training s to target | total s to target "
              "| start-up s | epochs run | steps | final accuracy | accuracy per epoch |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for t in rows:
            if t["reached_epoch"]:
                reached = (f"{t['reached_epoch']} | {t['train_seconds_to_target']:.1f} "
                           f"| {t['wall_seconds_to_target']:.1f}")
            else:
                reached = "not reached | - | -"
            accuracies = ", ".join(f"{e['test_accuracy']:.4f}" for e in t["epochs"])
            print(
                f"| {t['ranks']} x {t['threads_per_rank']} | {t['global_batch']} | {reached} "
                f"| {t['setup_seconds']:.1f} | {len(t['epochs'])} | {t['steps_run']} "
                f"| {t['final_test_accuracy']:.4f} | {accuracies} |"
            )
        print()
        print("| ranks x threads | epoch | steps | train s | eval s | total s since start | train images/s | train loss | test accuracy |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in rows:
            for e in t["epochs"]:
                print(
                    f"| {t['ranks']} x {t['threads_per_rank']} | {e['epoch']} | {e['steps']} | {e['train_seconds']:.1f} "
                    f"| {e['eval_seconds']:.2f} | {e['wall_seconds']:.1f} | {e['train_images'] / e['train_seconds']:.0f} "
                    f"| {e['train_loss']:.4f} | {e['test_accuracy']:.4f} |"
                )
    sys.stdout.flush()


def write_report(report):
    target = Path(os.environ.get("CARGO_TARGET_DIR") or HERE.parent / "target")
    out_dir = target / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / ".pytorch_ddp.json.partial"
    partial.write_text(json.dumps(report, indent=2) + "\n")
    path = out_dir / "pytorch_ddp.json"
    partial.replace(path)
    print(f"took {report['seconds']:.0f} s; wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

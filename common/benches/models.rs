//! Single-process throughput of the five models on the CPU, on real MNIST at batch 64: what one
//! worker computes per training step (a gradient and an SGD step on the flat parameters) and per
//! evaluation chunk of 1000 test images, at 1 and 2 threads; and the machine's measured fp32
//! multiply-add peak at 1 and 2 threads, which each training rate is set against.
//!
//! `cargo bench -p common --bench models [-- MODEL...]` prints a markdown table and writes
//! `target/bench/models.json`; `scripts/pytorch_models.py` measures the same in PyTorch. With
//! `LOCKSTEP_SIMD=avx2` (or `portable`) the kernels run the lesser path on a better CPU and
//! the report is `models-avx2.json`; `gemm`'s products still choose their own kernels.
//!
//! candle sizes its CPU thread pools from `RAYON_NUM_THREADS` once per process, so each
//! (model, thread count) runs in a child process: this binary again, with [`CHILD_ENV`] naming
//! the model, answering with one JSON line on stdout.
//!
//! For profiles (`valgrind --tool=callgrind`, `perf record`), run one child by hand with
//! [`BATCHES_ENV`] set: it then trains exactly that many batches after the warm-up and
//! evaluates [`MIN_EVAL_CHUNKS`] chunks, whatever the time, so that instruction counts repeat:
//!
//! ```text
//! LOCKSTEP_BENCH_MODEL=lenet LOCKSTEP_BENCH_BATCHES=20 RAYON_NUM_THREADS=1 \
//!     CANDLE_NUM_THREADS=1 valgrind --tool=callgrind target/release/deps/models-HASH
//! ```

use candle_core::Device;
use common::dataset::Dataset;
use common::fetch::{default_data_dir, ensure_mnist};
use common::model::ModelKind;
use common::optim::{Optimizer, OptimizerConfig};
use common::replica::Replica;
use common::sharding::EpochPlan;
use common::simd::Isa;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Set in a child process to the model it measures.
const CHILD_ENV: &str = "LOCKSTEP_BENCH_MODEL";
/// Set in a child process to a fixed number of measured training batches (for profiles).
const BATCHES_ENV: &str = "LOCKSTEP_BENCH_BATCHES";
/// The thread counts measured, each in its own process.
const THREADS: [usize; 2] = [1, 2];
/// A worker's batch in the tutorials' single-worker setting.
const BATCH: usize = 64;
/// Images per evaluation pass, as the worker's executor evaluates.
const EVAL_CHUNK: usize = 1000;
const WARMUP_BATCHES: usize = 3;
const MIN_TRAIN_BATCHES: usize = 30;
const MIN_TRAIN_TIME: Duration = Duration::from_secs(2);
const WARMUP_EVAL_CHUNKS: usize = 1;
const MIN_EVAL_CHUNKS: usize = 3;
const MIN_EVAL_TIME: Duration = Duration::from_secs(1);
const LEARNING_RATE: f32 = 0.01;

/// What a child process measured for one model at one thread count.
#[derive(Debug, Serialize, Deserialize)]
struct Measurement {
    model: String,
    /// `RAYON_NUM_THREADS` as set for the child.
    threads: usize,
    /// The thread count candle's CPU kernels actually use.
    candle_threads: usize,
    train_batches: usize,
    train_seconds: f64,
    train_images_per_s: f64,
    ms_per_train_batch: f64,
    /// Of `ms_per_train_batch`, the time in the optimiser step.
    ms_per_sgd_step: f64,
    /// Mean loss of the first and last measured batches: the steps really train.
    first_loss: f64,
    last_loss: f64,
    eval_images: usize,
    eval_seconds: f64,
    eval_images_per_s: f64,
}

/// A measurement with the figures derived from the model's arithmetic.
#[derive(Debug, Serialize)]
struct Row {
    #[serde(flatten)]
    measurement: Measurement,
    /// Floating-point operations of the dense layers and convolutions per training image.
    train_mflop_per_image: f64,
    train_gflop_per_s: f64,
    /// `train_gflop_per_s` as a fraction of the measured peak at the same thread count.
    fraction_of_peak: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    /// The vector extensions `/proc/cpuinfo` lists (see [`vector_extensions`]).
    cpu_extensions: String,
    /// The instruction set the kernels ran with ([`Isa::current`], capped by `LOCKSTEP_SIMD`).
    isa: String,
    cores: usize,
    load_average: String,
    batch: usize,
    eval_chunk: usize,
    /// Measured fp32 multiply-add peak per thread count, GFLOP/s (see [`peak_gflops`]).
    peak_gflops: Vec<(usize, f64)>,
    results: Vec<Row>,
}

fn main() -> Result<()> {
    match std::env::var(CHILD_ENV) {
        Ok(model) => {
            let measurement = measure(model.parse()?)?;
            println!("{}", serde_json::to_string(&measurement)?);
            Ok(())
        }
        Err(_) => run_all(),
    }
}

/// Measures every model named on the command line (all when none is) at each thread count.
fn run_all() -> Result<()> {
    // Cargo passes `--bench`; anything else that is not a flag is a model name.
    let models: Vec<ModelKind> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .map(|arg| arg.parse())
        .collect::<std::result::Result<_, _>>()?;
    let models = if models.is_empty() {
        ModelKind::ALL.to_vec()
    } else {
        models
    };
    let data_dir = default_data_dir();
    ensure_mnist(&data_dir)?;

    let cpu = common::bench_report::cpu_model();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load_average = common::bench_report::load_average();
    let started = Instant::now();
    let peaks: Vec<(usize, f64)> = THREADS.iter().map(|&t| (t, peak_gflops(t))).collect();
    for (threads, peak) in &peaks {
        eprintln!(
            "fp32 multiply-add peak at {threads} thread(s): {peak:.1} GFLOP/s ({})",
            Isa::current()
        );
    }
    let mut results = Vec::new();
    for &kind in &models {
        for threads in THREADS {
            let measurement = run_child(kind, threads, &data_dir)?;
            eprintln!(
                "{kind} at {threads} thread(s): {:.0} train images/s, {:.0} eval images/s",
                measurement.train_images_per_s, measurement.eval_images_per_s
            );
            let train_mflop_per_image = train_flops_per_image(kind) / 1e6;
            let train_gflop_per_s = train_mflop_per_image * measurement.train_images_per_s / 1e3;
            let peak = peaks
                .iter()
                .find(|(t, _)| *t == threads)
                .map_or(f64::NAN, |p| p.1);
            results.push(Row {
                train_gflop_per_s,
                train_mflop_per_image,
                fraction_of_peak: train_gflop_per_s / peak,
                measurement,
            });
        }
    }
    let report = Report {
        cpu,
        cpu_extensions: vector_extensions(),
        isa: Isa::current().to_string(),
        cores,
        load_average,
        batch: BATCH,
        eval_chunk: EVAL_CHUNK,
        peak_gflops: peaks,
        results,
    };
    print_table(&report);
    // A run with the kernels capped (`LOCKSTEP_SIMD=avx2`) is reported beside the plain one.
    let name = match std::env::var_os(common::simd::SIMD_ENV) {
        Some(_) => format!("models-{}", Isa::current()),
        None => "models".to_string(),
    };
    let path = common::bench_report::write(
        env!("CARGO_TARGET_TMPDIR"),
        &name,
        &serde_json::to_string_pretty(&report)?,
    )?;
    eprintln!(
        "took {:.0} s; wrote {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(())
}

fn run_child(kind: ModelKind, threads: usize, data_dir: &Path) -> Result<Measurement> {
    let output = Command::new(std::env::current_exe()?)
        .env(CHILD_ENV, kind.name())
        .env("RAYON_NUM_THREADS", threads.to_string())
        // candle's barrier pool prefers this one over RAYON_NUM_THREADS.
        .env("CANDLE_NUM_THREADS", threads.to_string())
        .env("LOCKSTEP_DATA_DIR", data_dir)
        .stderr(Stdio::inherit())
        .output()?;
    if !output.status.success() {
        return Err(format!("measuring {kind} at {threads} thread(s): {}", output.status).into());
    }
    let stdout = String::from_utf8(output.stdout)?;
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .ok_or_else(|| format!("measuring {kind}: no JSON line in {stdout:?}"))?;
    Ok(serde_json::from_str(line)?)
}

/// In a child: trains `kind` from seeded parameters over a seeded epoch order, then evaluates.
fn measure(kind: ModelKind) -> Result<Measurement> {
    // What a worker process does at start-up (unless LOCKSTEP_BENCH_GLIBC_DEFAULTS is set,
    // to see the difference).
    if std::env::var_os("LOCKSTEP_BENCH_GLIBC_DEFAULTS").is_none() {
        common::allocator::keep_freed_memory();
    }
    let threads = std::env::var("RAYON_NUM_THREADS")?.parse()?;
    let device = Device::Cpu;
    let dataset = Dataset::load(&default_data_dir())?;
    let mut replica = Replica::new(kind, &device)?;
    let mut params = replica.params().init_flat(0);
    let mut optimizer = Optimizer::new(OptimizerConfig::default(), params.len());
    let plan = EpochPlan::new(0, 0, dataset.train.len(), BATCH);
    let fixed_batches: Option<usize> = match std::env::var(BATCHES_ENV) {
        Ok(batches) => Some(batches.parse()?),
        Err(_) => None,
    };
    let enough =
        |measured: usize, from: Instant, min: usize, min_time: Duration| match fixed_batches {
            Some(_) => measured >= min,
            None => measured >= min && from.elapsed() >= min_time,
        };

    let mut sgd = Duration::ZERO;
    let mut losses = Vec::new();
    let mut step = 0;
    let mut measured_from = Instant::now();
    loop {
        if step == WARMUP_BATCHES {
            measured_from = Instant::now();
            sgd = Duration::ZERO;
        }
        let measured = step.saturating_sub(WARMUP_BATCHES);
        let min = fixed_batches.unwrap_or(MIN_TRAIN_BATCHES);
        if enough(measured, measured_from, min, MIN_TRAIN_TIME) {
            break;
        }
        let (images, labels) = dataset
            .train
            .batch(plan.batch(step % plan.steps()), &device)?;
        let out = replica.gradient(&params, &images, &labels, step as u64)?;
        let sgd_from = Instant::now();
        optimizer.step(&mut params, &out.gradient, LEARNING_RATE)?;
        sgd += sgd_from.elapsed();
        losses.push(out.loss_sum / out.count as f64);
        step += 1;
    }
    let train_seconds = measured_from.elapsed().as_secs_f64();
    let train_batches = step - WARMUP_BATCHES;
    let (first_loss, last_loss) = (losses[WARMUP_BATCHES], losses[losses.len() - 1]);
    if !last_loss.is_finite() {
        return Err(format!("{kind} diverged: loss {last_loss}").into());
    }

    let test = &dataset.test;
    let chunks = test.len() / EVAL_CHUNK;
    let mut chunk = 0;
    let mut measured_from = Instant::now();
    loop {
        if chunk == WARMUP_EVAL_CHUNKS {
            measured_from = Instant::now();
        }
        let measured = chunk.saturating_sub(WARMUP_EVAL_CHUNKS);
        if enough(measured, measured_from, MIN_EVAL_CHUNKS, MIN_EVAL_TIME) {
            break;
        }
        let start = (chunk % chunks) * EVAL_CHUNK;
        let (images, labels) = test.range_batch(start..start + EVAL_CHUNK, &device)?;
        replica.evaluate(&params, &images, &labels)?;
        chunk += 1;
    }
    let eval_seconds = measured_from.elapsed().as_secs_f64();
    let eval_images = (chunk - WARMUP_EVAL_CHUNKS) * EVAL_CHUNK;

    let train_images = (train_batches * BATCH) as f64;
    Ok(Measurement {
        model: kind.name().to_string(),
        threads,
        candle_threads: candle_core::utils::get_num_threads(),
        train_batches,
        train_seconds,
        train_images_per_s: train_images / train_seconds,
        ms_per_train_batch: 1e3 * train_seconds / train_batches as f64,
        ms_per_sgd_step: 1e3 * sgd.as_secs_f64() / train_batches as f64,
        first_loss,
        last_loss,
        eval_images,
        eval_seconds,
        eval_images_per_s: eval_images as f64 / eval_seconds,
    })
}

/// Floating-point operations per training image in the dense layers and convolutions (2 per
/// multiply-add), three passes' worth: forward, gradient of the input, gradient of the weights.
/// Activations, pooling, the loss and the optimiser are left out; they are a few percent.
fn train_flops_per_image(kind: ModelKind) -> f64 {
    let dense = |inputs: u64, outputs: u64| inputs * outputs;
    // `side` is the output's side: stride 1, no padding.
    let conv = |inputs: u64, outputs: u64, kernel: u64, side: u64| {
        inputs * outputs * kernel * kernel * side * side
    };
    let multiply_adds = match kind {
        ModelKind::Softmax => dense(784, 10),
        ModelKind::Mlp => dense(784, 128) + dense(128, 64) + dense(64, 10),
        ModelKind::MlpDropout => dense(784, 512) + dense(512, 256) + dense(256, 10),
        ModelKind::Lenet => {
            conv(1, 20, 5, 24) + conv(20, 50, 5, 8) + dense(50 * 4 * 4, 500) + dense(500, 10)
        }
        ModelKind::Cnn => {
            conv(1, 32, 3, 26)
                + conv(32, 64, 3, 11)
                + conv(64, 64, 3, 3)
                + dense(64 * 3 * 3, 128)
                + dense(128, 10)
        }
    };
    (3 * 2 * multiply_adds) as f64
}

fn print_table(report: &Report) {
    println!(
        "lockstep's CPU engine, batch {}, evaluation in chunks of {}; {} ({} cores available, \
         kernels for {}, load average {})",
        report.batch, report.eval_chunk, report.cpu, report.cores, report.isa, report.load_average
    );
    let peaks: Vec<String> = report
        .peak_gflops
        .iter()
        .map(|(threads, peak)| format!("{peak:.1} GFLOP/s on {threads} thread(s)"))
        .collect();
    println!("instruction sets: {}", report.cpu_extensions);
    println!("measured fp32 multiply-add peak: {}", peaks.join(", "));
    println!();
    println!(
        "| model | threads | train images/s | eval images/s | ms per training batch | train MFLOP/image | train GFLOP/s | of peak |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in &report.results {
        let m = &row.measurement;
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.1} | {:.0}% |",
            m.model,
            m.threads,
            m.train_images_per_s,
            m.eval_images_per_s,
            m.ms_per_train_batch,
            row.train_mflop_per_image,
            row.train_gflop_per_s,
            100.0 * row.fraction_of_peak
        );
    }
}

/// The CPU's vector extensions among those that matter here (SSE2 to AVX-512 and AMX), from
/// the flags of `/proc/cpuinfo`; empty where there is none.
fn vector_extensions() -> String {
    const KNOWN: [&str; 14] = [
        "sse2",
        "sse4_2",
        "avx",
        "avx2",
        "fma",
        "avx512f",
        "avx512dq",
        "avx512bw",
        "avx512vl",
        "avx512_vnni",
        "avx512_bf16",
        "avx512_fp16",
        "amx_bf16",
        "amx_tile",
    ];
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = info
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .and_then(|rest| rest.split(':').nth(1))
        .map(|flags| flags.split_whitespace().collect())
        .unwrap_or_default();
    KNOWN
        .iter()
        .filter(|known| flags.contains(known))
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine's fp32 multiply-add rate on `threads` threads at once, GFLOP/s: each thread runs
/// independent chains of fused multiply-adds on the widest vectors the CPU has (as `gemm`'s
/// kernels do), enough chains to hide the instruction's latency. The best of 20 windows of
/// about 20 ms, all threads running through each window together: a shared machine's other
/// work then lowers the figure less. What the models' GFLOP/s are measured against.
fn peak_gflops(threads: usize) -> f64 {
    // Rounds for about 20 ms on one thread, from a first timing.
    let probe = Instant::now();
    let probe_flops = fma_rounds(Isa::current(), 1 << 14);
    let rate = probe_flops / probe.elapsed().as_secs_f64().max(1e-9);
    let rounds = ((0.02 * rate / probe_flops) as u64 * (1 << 14)).max(1 << 12);
    (0..20)
        .map(|_| {
            let started = Instant::now();
            let flops: f64 = std::thread::scope(|scope| {
                let workers: Vec<_> = (0..threads)
                    .map(|_| scope.spawn(move || fma_rounds(Isa::current(), rounds)))
                    .collect();
                workers.into_iter().map(|w| w.join().unwrap()).sum()
            });
            flops / started.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// `rounds` rounds of 12 independent multiply-adds, each on a full vector of `isa`; returns the
/// floating-point operations done (2 per multiply-add and lane).
fn fma_rounds(isa: Isa, rounds: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `Isa::current` is supported by this CPU.
        Isa::Avx512 => return unsafe { x86_fma::avx512(rounds) },
        // SAFETY: as above.
        Isa::Avx2 => return unsafe { x86_fma::avx2(rounds) },
        Isa::Portable => {}
    }
    let _ = isa;
    // Without vector multiply-adds: twelve scalar chains of multiply and add.
    let mut acc = [1.0f32; 12];
    for _ in 0..rounds {
        for a in &mut acc {
            *a = *a * 0.999_999 + 1e-7;
        }
    }
    std::hint::black_box(acc);
    (rounds * 12 * 2) as f64
}

#[cfg(target_arch = "x86_64")]
mod x86_fma {
    use std::arch::x86_64::*;

    /// # Safety
    ///
    /// The CPU must have AVX-512 F.
    #[target_feature(enable = "avx512f,fma")]
    pub unsafe fn avx512(rounds: u64) -> f64 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..rounds {
            for v in &mut acc {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        (rounds * 12 * 16 * 2) as f64
    }

    /// # Safety
    ///
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(rounds: u64) -> f64 {
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..rounds {
            for v in &mut acc {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        std::hint::black_box(acc);
        (rounds * 12 * 8 * 2) as f64
    }
}

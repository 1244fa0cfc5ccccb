//! Ring allreduce of LeNet's 431,080 gradients, over loopback TCP and through shared memory,
//! against what the machine can move: memcpy, one TCP stream, and two streams in opposite
//! directions at once.
//!
//! `cargo bench -p worker --bench allreduce` prints a markdown table and writes
//! `target/bench/allreduce.json`.
//!
//! Each rank is a child process (this binary again, with [`RANK_ENV`] set), as workers are:
//! ranks as threads of one process would share an allocator and a scheduler's view that
//! real workers do not. A child binds its listener, prints the address, reads every rank's
//! address from stdin, and answers with one JSON line of its timings.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use worker::ring::{Ring, RingConfig, RingListener, Transport};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Set in a child process to its rank; [`SIZE_ENV`] to the ring size, [`SHARED_ENV`] to its
/// `shared_memory_floats`.
const RANK_ENV: &str = "LOCKSTEP_RING_BENCH_RANK";
const SIZE_ENV: &str = "LOCKSTEP_RING_BENCH_SIZE";
const SHARED_ENV: &str = "LOCKSTEP_RING_BENCH_SHARED";
/// LeNet-5's parameter count: one gradient.
const FLOATS: usize = 431_080;
const RING_SIZES: [usize; 2] = [2, 4];
const WARMUP: usize = 20;
const REPETITIONS: usize = 50;
/// Bytes per stream in the bandwidth measurements, written in pieces of [`WRITE_BYTES`].
const STREAM_BYTES: usize = 256 << 20;
const WRITE_BYTES: usize = 256 << 10;
const MEMCPY_BYTES: usize = 256 << 20;
/// Loopback bandwidth varies from run to run with the other load on the machine; the bound
/// takes the best of these tries, as what the machine can do.
const BANDWIDTH_TRIES: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(60);

/// What one rank measured.
#[derive(Debug, Serialize, Deserialize)]
struct RankReport {
    rank: usize,
    transport: String,
    /// Seconds of each measured allreduce.
    seconds: Vec<f64>,
    /// Means over the measured allreduces of [`worker::ring::RingTimings`], in seconds.
    mean_receive_s: f64,
    mean_reduce_s: f64,
    mean_send_s: f64,
    mean_drain_s: f64,
    bytes_sent: u64,
}

#[derive(Debug, Serialize)]
struct RingResult {
    ranks: usize,
    /// What the ring settled on: shared memory, or TCP.
    transport: String,
    floats: usize,
    bytes: usize,
    repetitions: usize,
    /// Of each repetition the slowest rank's time (ranks start together after a barrier).
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
    /// 2(n-1)/n of the buffer through one loopback stream.
    bound_ms: f64,
    /// The same through a stream that shares the machine with one in the other direction.
    duplex_bound_ms: f64,
    /// All n links' bytes, 2(n-1) buffers, through the machine's aggregate loopback capacity
    /// (twice the duplex figure): with more ranks than cores the links share the CPUs that
    /// copy their bytes, which the per-link bounds ignore.
    shared_bound_ms: f64,
    median_over_bound: f64,
    per_rank: Vec<RankReport>,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    cores: usize,
    load_average: String,
    chunk_floats: usize,
    memcpy_gb_per_s: f64,
    /// One stream, 256 MiB, best of [`BANDWIDTH_TRIES`].
    tcp_one_way_gb_per_s: f64,
    /// Each of two streams in opposite directions at once, best of [`BANDWIDTH_TRIES`].
    tcp_duplex_gb_per_s_each: f64,
    rings: Vec<RingResult>,
}

fn main() -> Result<()> {
    match std::env::var(RANK_ENV) {
        Ok(rank) => {
            let size = std::env::var(SIZE_ENV)?.parse()?;
            let shared = std::env::var(SHARED_ENV)?.parse()?;
            let report = child(rank.parse()?, size, shared)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        Err(_) => run_all(),
    }
}

fn run_all() -> Result<()> {
    let memcpy_gb_per_s = memcpy_bandwidth();
    let one_way = best_of(BANDWIDTH_TRIES, || tcp_bandwidth(1))?;
    let duplex = best_of(BANDWIDTH_TRIES, || tcp_bandwidth(2))?;
    let bytes = FLOATS * 4;
    let mut rings = Vec::new();
    for (n, shared) in RING_SIZES.into_iter().flat_map(|n| [(n, 0), (n, FLOATS)]) {
        let mut per_rank = run_ring(n, shared)?;
        per_rank.sort_by_key(|r| r.rank);
        let mut slowest: Vec<f64> = (0..REPETITIONS)
            .map(|i| per_rank.iter().map(|r| r.seconds[i]).fold(0.0, f64::max))
            .collect();
        slowest.sort_by(f64::total_cmp);
        let moved = 2.0 * (n as f64 - 1.0) / n as f64 * bytes as f64;
        let median_ms = percentile(&slowest, 0.5) * 1e3;
        let bound_ms = moved / (one_way * 1e9) * 1e3;
        rings.push(RingResult {
            ranks: n,
            transport: per_rank[0].transport.clone(),
            floats: FLOATS,
            bytes,
            repetitions: REPETITIONS,
            median_ms,
            p90_ms: percentile(&slowest, 0.9) * 1e3,
            min_ms: slowest[0] * 1e3,
            bound_ms,
            duplex_bound_ms: moved / (duplex * 1e9) * 1e3,
            shared_bound_ms: n as f64 * moved / (2.0 * duplex * 1e9) * 1e3,
            median_over_bound: median_ms / bound_ms,
            per_rank,
        });
    }
    let report = Report {
        cpu: common::bench_report::cpu_model(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load_average: common::bench_report::load_average(),
        chunk_floats: worker::ring::CHUNK_FLOATS,
        memcpy_gb_per_s,
        tcp_one_way_gb_per_s: one_way,
        tcp_duplex_gb_per_s_each: duplex,
        rings,
    };
    print_table(&report);
    let path = common::bench_report::write(
        env!("CARGO_TARGET_TMPDIR"),
        "allreduce",
        &serde_json::to_string_pretty(&report)?,
    )?;
    println!("\nwrote {}", path.display());
    Ok(())
}

/// Copies between two 256 MiB buffers; the median of 5, in GB/s.
fn memcpy_bandwidth() -> f64 {
    let source = vec![1u8; MEMCPY_BYTES];
    let mut target = vec![0u8; MEMCPY_BYTES];
    let mut seconds: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            target.copy_from_slice(std::hint::black_box(&source));
            std::hint::black_box(&mut target);
            started.elapsed().as_secs_f64()
        })
        .collect();
    seconds.sort_by(f64::total_cmp);
    MEMCPY_BYTES as f64 / seconds[2] / 1e9
}

/// GB/s of each of `streams` loopback connections (1, or 2 in opposite directions) that each
/// carry 256 MiB at the same time; each stream's time runs from its first write to its last
/// read.
fn tcp_bandwidth(streams: usize) -> Result<f64> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    let pairs: Vec<(TcpStream, TcpStream)> = (0..streams)
        .map(|_| {
            let writer = TcpStream::connect(addr)?;
            let (reader, _) = listener.accept()?;
            writer.set_nodelay(true)?;
            Ok((writer, reader))
        })
        .collect::<Result<_>>()?;
    let seconds: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = pairs
            .into_iter()
            .map(|(mut writer, mut reader)| {
                let started = Instant::now();
                scope.spawn(move || {
                    let piece = vec![7u8; WRITE_BYTES];
                    for _ in 0..STREAM_BYTES / WRITE_BYTES {
                        writer.write_all(&piece).expect("loopback write");
                    }
                });
                scope.spawn(move || {
                    let mut piece = vec![0u8; WRITE_BYTES];
                    let mut left = STREAM_BYTES;
                    while left > 0 {
                        let n = reader.read(&mut piece).expect("loopback read");
                        assert!(n > 0, "loopback stream ended early");
                        left -= n;
                    }
                    started.elapsed().as_secs_f64()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    Ok(seconds
        .iter()
        .map(|s| STREAM_BYTES as f64 / s / 1e9)
        .sum::<f64>()
        / streams as f64)
}

fn best_of(tries: usize, measure: impl Fn() -> Result<f64>) -> Result<f64> {
    (0..tries).try_fold(0.0, |best: f64, _| Ok(best.max(measure()?)))
}

/// Starts `n` rank processes, tells each the others' addresses and collects their reports.
fn run_ring(n: usize, shared: usize) -> Result<Vec<RankReport>> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for rank in 0..n {
        let mut child = Command::new(&exe)
            .env(RANK_ENV, rank.to_string())
            .env(SIZE_ENV, n.to_string())
            .env(SHARED_ENV, shared.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        addrs.push(line.trim().to_owned());
        children.push((child, stdout));
    }
    let peers = addrs.join(" ") + "\n";
    for (child, _) in &mut children {
        child
            .stdin
            .take()
            .ok_or("no stdin")?
            .write_all(peers.as_bytes())?;
    }
    children
        .into_iter()
        .map(|(mut child, mut stdout)| {
            let mut line = String::new();
            stdout.read_to_string(&mut line)?;
            if !child.wait()?.success() {
                return Err("a rank process failed".into());
            }
            Ok(serde_json::from_str(line.trim())?)
        })
        .collect()
}

/// One rank: forms the ring, warms up, then times [`REPETITIONS`] allreduces, each after a
/// one-float allreduce that lines the ranks up.
fn child(rank: usize, size: usize, shared: usize) -> Result<RankReport> {
    let listener = RingListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?;
    println!("{}", listener.local_addr());
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let peers = line
        .split_whitespace()
        .map(str::parse)
        .collect::<std::result::Result<Vec<SocketAddr>, _>>()?;
    assert_eq!(peers.len(), size);
    let config = RingConfig {
        rank: common::ids::Rank(rank as u32),
        peers,
        generation: 1,
        key: *b"allreduce-bench!",
        timeout: TIMEOUT,
        shared_memory_floats: shared,
    };
    let mut ring = Ring::connect(&listener, &config)?;
    let input: Vec<f32> = (0..FLOATS).map(|i| (rank + i % 7) as f32).collect();
    let expected: Vec<f32> = (0..FLOATS)
        .map(|i| (0..size).map(|r| (r + i % 7) as f32).sum())
        .collect();
    let mut data = input.clone();
    let mut step = 0;
    let mut report = RankReport {
        rank,
        transport: match ring.transport() {
            Transport::SharedMemory { .. } => "shared memory".into(),
            Transport::Tcp { .. } => "tcp".into(),
            Transport::Alone => "none".into(),
        },
        seconds: Vec::new(),
        mean_receive_s: 0.0,
        mean_reduce_s: 0.0,
        mean_send_s: 0.0,
        mean_drain_s: 0.0,
        bytes_sent: 0,
    };
    for repetition in 0..WARMUP + REPETITIONS {
        data.copy_from_slice(&input);
        ring.allreduce_sum(step, &mut [0.0])?;
        let timings = ring.allreduce_sum(step + 1, &mut data)?;
        step += 2;
        if data != expected {
            return Err(format!("rank {rank}: wrong sum").into());
        }
        if repetition >= WARMUP {
            report.seconds.push(timings.total.as_secs_f64());
            report.mean_receive_s += timings.receive.as_secs_f64() / REPETITIONS as f64;
            report.mean_reduce_s += timings.reduce.as_secs_f64() / REPETITIONS as f64;
            report.mean_send_s += timings.send.as_secs_f64() / REPETITIONS as f64;
            report.mean_drain_s += timings.drain.as_secs_f64() / REPETITIONS as f64;
            report.bytes_sent = timings.bytes_sent;
        }
    }
    Ok(report)
}

/// `sorted[⌈q·len⌉ - 1]`: the smallest value with at least a fraction `q` at or below it.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let index = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn print_table(report: &Report) {
    println!(
        "{} ({} cores), load {}, chunks of {} floats",
        report.cpu, report.cores, report.load_average, report.chunk_floats
    );
    println!(
        "memcpy {:.1} GB/s; loopback TCP {:.2} GB/s one way, {:.2} GB/s each way in both at once\n",
        report.memcpy_gb_per_s, report.tcp_one_way_gb_per_s, report.tcp_duplex_gb_per_s_each
    );
    println!(
        "| ranks | transport | floats | median ms | p90 ms | min ms | bound ms | duplex bound ms | shared bound ms | median / bound |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for ring in &report.rings {
        println!(
            "| {} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} |",
            ring.ranks,
            ring.transport,
            ring.floats,
            ring.median_ms,
            ring.p90_ms,
            ring.min_ms,
            ring.bound_ms,
            ring.duplex_bound_ms,
            ring.shared_bound_ms,
            ring.median_over_bound
        );
    }
    println!(
        "\nmean per rank, ms: receive (blocked reading; in shared memory, waiting in barriers) / \
         reduce (in shared memory, all copying and adding) / send (sender thread) / drain"
    );
    for ring in &report.rings {
        for r in &ring.per_rank {
            println!(
                "  {} ranks, {}, rank {}: {:.3} / {:.3} / {:.3} / {:.3}",
                ring.ranks,
                ring.transport,
                r.rank,
                r.mean_receive_s * 1e3,
                r.mean_reduce_s * 1e3,
                r.mean_send_s * 1e3,
                r.mean_drain_s * 1e3
            );
        }
    }
}

//! Rings of threads in one process over real 127.0.0.1 sockets.

use super::*;
use proptest::prelude::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::mpsc;

const KEY: [u8; 16] = *b"0123456789abcdef";
/// For tests that are not about timing: long enough for a loaded machine, and still an end.
const PATIENT: Duration = Duration::from_secs(60);
/// `shared_memory_floats` for a ring that stays on TCP.
const TCP: usize = 0;
/// ... and for one that sums up to LeNet's gradient through shared memory.
const SHARED: usize = 431_080;

fn listeners(n: usize) -> Vec<RingListener> {
    (0..n)
        .map(|_| RingListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap())
        .collect()
}

fn config(
    listeners: &[RingListener],
    rank: usize,
    generation: u64,
    timeout: Duration,
    shared_memory_floats: usize,
) -> RingConfig {
    RingConfig {
        rank: Rank(rank as u32),
        peers: listeners.iter().map(RingListener::local_addr).collect(),
        generation,
        key: KEY,
        timeout,
        shared_memory_floats,
    }
}

/// Forms a ring of generation `generation` on one thread per listener and runs `body` on
/// each; the results come back in rank order. `shared` is every rank's
/// `shared_memory_floats`.
fn on_ring<T: Send>(
    listeners: &[RingListener],
    generation: u64,
    timeout: Duration,
    shared: usize,
    body: impl Fn(usize, Ring) -> T + Sync,
) -> Vec<T> {
    on_mixed_ring(listeners, generation, timeout, |_| shared, body)
}

/// [`on_ring`] with each rank's `shared_memory_floats` from `shared`.
fn on_mixed_ring<T: Send>(
    listeners: &[RingListener],
    generation: u64,
    timeout: Duration,
    shared: impl Fn(usize) -> usize + Sync,
    body: impl Fn(usize, Ring) -> T + Sync,
) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..listeners.len())
            .map(|rank| {
                let (body, shared) = (&body, &shared);
                scope.spawn(move || {
                    let config = config(listeners, rank, generation, timeout, shared(rank));
                    let ring = Ring::connect(&listeners[rank], &config).unwrap();
                    body(rank, ring)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Rank `rank`'s input: reproducible values of mixed signs and magnitudes, so that the order
/// of summation shows in the last bits.
fn input(rank: usize, step: u64, len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let mut z = (rank as u64) << 48 ^ step << 32 ^ i as u64;
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let unit = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            unit * [0.01, 1.0, 100.0][(z % 3) as usize]
        })
        .collect()
}

/// Checks `results` (one buffer per rank) against the sum of `inputs` computed in f64, and
/// that every rank has the same bits.
fn assert_sum(inputs: &[Vec<f32>], results: &[Vec<f32>]) {
    let n = inputs.len();
    for (rank, result) in results.iter().enumerate() {
        assert_eq!(
            bits(result),
            bits(&results[0]),
            "rank {rank} differs from rank 0"
        );
    }
    for (i, &got) in results[0].iter().enumerate() {
        let exact: f64 = inputs.iter().map(|x| f64::from(x[i])).sum();
        let magnitude: f64 = inputs.iter().map(|x| f64::from(x[i]).abs()).sum();
        let tolerance = n as f64 * f64::from(f32::EPSILON) * magnitude;
        assert!(
            (f64::from(got) - exact).abs() <= tolerance,
            "element {i} of {} on {n} ranks: {got} vs {exact}",
            results[0].len()
        );
    }
}

fn bits(data: &[f32]) -> Vec<u32> {
    data.iter().map(|x| x.to_bits()).collect()
}

/// Checks that a ring of two or more settled on the transport `shared` asks for.
fn assert_transport(ring: &Ring, shared: usize) {
    match ring.transport() {
        Transport::Alone => assert_eq!(ring.size(), 1),
        Transport::SharedMemory { floats } => assert_eq!(*floats, shared),
        Transport::Tcp { why_not_shared } => {
            assert_eq!(shared, TCP, "not in shared memory: {why_not_shared}");
            assert!(why_not_shared.contains("turned off"), "{why_not_shared}");
        }
    }
}

/// The documented order: segment s is summed from rank s around the ring, in f32.
fn ring_order_sum(inputs: &[Vec<f32>]) -> Vec<f32> {
    let n = inputs.len();
    let len = inputs[0].len();
    let mut out = vec![0.0; len];
    for s in 0..n {
        for i in segment(len, n, s) {
            out[i] = (1..n).fold(inputs[s][i], |acc, k| acc + inputs[(s + k) % n][i]);
        }
    }
    out
}

#[test]
fn sums_every_length_on_rings_of_one_to_five() {
    sums_every_length(TCP);
}

#[test]
fn sums_every_length_through_shared_memory() {
    sums_every_length(SHARED);
}

/// Successive allreduces of many lengths on rings of one to five, each the ring-order sum.
fn sums_every_length(shared: usize) {
    for n in 1..=5 {
        let lengths = [
            0,
            1,
            n - 1,
            n + 1,
            2 * n + 1,
            1001,
            2 * CHUNK_FLOATS + 3,
            431_080,
        ];
        let listeners = listeners(n);
        // Successive allreduces of every length on one ring.
        let results = on_ring(&listeners, 1, PATIENT, shared, |rank, mut ring| {
            assert_transport(&ring, shared);
            lengths
                .iter()
                .enumerate()
                .map(|(step, &len)| {
                    let mut data = input(rank, step as u64, len);
                    ring.allreduce_sum(step as u64, &mut data).unwrap();
                    data
                })
                .collect::<Vec<_>>()
        });
        for (step, &len) in lengths.iter().enumerate() {
            let inputs: Vec<_> = (0..n).map(|rank| input(rank, step as u64, len)).collect();
            let results: Vec<_> = results.iter().map(|r| r[step].clone()).collect();
            assert_sum(&inputs, &results);
            assert_eq!(
                bits(&results[0]),
                bits(&ring_order_sum(&inputs)),
                "length {len}"
            );
        }
    }
}

#[test]
fn repeats_and_rebuilds_give_the_same_bits() {
    let (n, len) = (3, 431_080);
    let inputs: Vec<_> = (0..n).map(|rank| input(rank, 0, len)).collect();
    let expected = bits(&ring_order_sum(&inputs));
    let listeners = listeners(n);
    for generation in [7, 8] {
        let results = on_ring(&listeners, generation, PATIENT, TCP, |rank, mut ring| {
            (0..3)
                .map(|step| {
                    let mut data = inputs[rank].clone();
                    ring.allreduce_sum(step, &mut data).unwrap();
                    bits(&data)
                })
                .collect::<Vec<_>>()
        });
        for (rank, repeats) in results.iter().enumerate() {
            for (step, got) in repeats.iter().enumerate() {
                assert!(
                    *got == expected,
                    "generation {generation}, rank {rank}, step {step}: not the ring-order sum"
                );
            }
        }
    }
}

#[test]
fn a_dropped_peer_fails_its_neighbours_at_once() {
    a_dropped_peer_fails_the_others_at_once(3, TCP);
}

/// In shared memory every member notices, not only the neighbours: rank 3 of 4 does not
/// border rank 1.
#[test]
fn a_dropped_peer_fails_every_member_of_a_shared_memory_ring_at_once() {
    let errors = a_dropped_peer_fails_the_others_at_once(4, SHARED);
    for rank in [0, 3] {
        match &errors[rank] {
            Some(RingError::Closed { peer, phase }) => {
                assert_eq!(peer.rank, Rank(1), "rank {rank}");
                assert_eq!(*phase, Phase::ReduceScatter { step: 1, round: 0 });
            }
            other => panic!("rank {rank}: {other:?}"),
        }
    }
}

/// Rank 1 of `n` drops its ring after one allreduce; the others' next one fails, at once.
fn a_dropped_peer_fails_the_others_at_once(n: usize, shared: usize) -> Vec<Option<RingError>> {
    let listeners = listeners(n);
    let errors = on_ring(&listeners, 1, PATIENT, shared, |rank, mut ring| {
        let mut data = input(rank, 0, 1000);
        ring.allreduce_sum(0, &mut data).unwrap();
        if rank == 1 {
            drop(ring);
            return None;
        }
        Some(ring.allreduce_sum(1, &mut data).unwrap_err())
    });
    for error in errors.iter().flatten() {
        assert!(
            !matches!(error, RingError::Timeout { .. }),
            "waited for the timeout: {error}"
        );
    }
    // Rank 2 receives from rank 1.
    match &errors[2] {
        Some(RingError::Closed { peer, phase }) => {
            assert_eq!(peer.rank, Rank(1));
            assert_eq!(*phase, Phase::ReduceScatter { step: 1, round: 0 });
        }
        other => panic!("rank 2: {other:?}"),
    }
    errors
}

#[test]
fn a_broken_ring_stays_broken() {
    let listeners = listeners(2);
    let errors = on_ring(&listeners, 1, PATIENT, TCP, |rank, mut ring| {
        if rank == 1 {
            return None;
        }
        let first = ring.allreduce_sum(0, &mut [1.0]).unwrap_err();
        let second = ring.allreduce_sum(1, &mut [1.0]).unwrap_err();
        Some((first, second))
    });
    let (first, second) = errors[0].as_ref().unwrap();
    assert!(matches!(first, RingError::Closed { .. }), "{first}");
    assert!(matches!(second, RingError::Broken(_)), "{second}");
    assert!(second.to_string().contains(&first.to_string()), "{second}");
}

/// Rank 1 is played by hand: it forms the ring, sends half a frame and vanishes.
#[test]
fn a_peer_dying_mid_frame_is_named_with_the_phase() {
    let listeners = listeners(2);
    let len = 1000;
    std::thread::scope(|scope| {
        let real = scope.spawn(|| {
            let config = config(&listeners, 0, 4, PATIENT, TCP);
            let mut ring = Ring::connect(&listeners[0], &config).unwrap();
            ring.allreduce_sum(9, &mut input(0, 9, len)).unwrap_err()
        });
        let hello = |rank| Hello {
            version: VERSION,
            generation: 4,
            rank,
            size: 2,
            key: KEY,
        };
        let peer = |rank: usize| Peer {
            rank: Rank(rank as u32),
            addr: listeners[rank].local_addr(),
        };
        let deadline = Instant::now() + PATIENT;
        let mut right = dial::dial_right(peer(0), &hello(1), &hello(0), deadline, PATIENT).unwrap();
        let mut left = listeners[1]
            .accept_left(peer(0), &hello(0), &hello(1), deadline, PATIENT)
            .unwrap();
        // Rank 0's offer (it has shared memory off) goes back to it, then comes the outcome.
        let mut offer = [0; Offer::LEN];
        left.read_exact(&mut offer).unwrap();
        right.write_all(&offer).unwrap();
        left.read_exact(&mut offer).unwrap();
        assert!(!Offer::decode(&offer).unwrap().usable);
        let own = segment(len, 2, 1);
        let mut frame = [0; FrameHeader::LEN];
        FrameHeader {
            step: 9,
            total: len as u64,
            offset: own.start as u64,
            round: 0,
            count: own.len() as u32,
        }
        .encode(&mut frame);
        right.write_all(&frame).unwrap();
        right.write_all(&[0; 100]).unwrap();
        drop((right, left));
        match real.join().unwrap() {
            RingError::Closed { peer, phase } => {
                assert_eq!(peer.rank, Rank(1));
                assert_eq!(phase, Phase::ReduceScatter { step: 9, round: 0 });
            }
            other => panic!("{other}"),
        }
    });
}

#[test]
fn a_stalled_peer_times_out_and_is_named() {
    a_stalled_peer_times_out(TCP);
}

#[test]
fn a_stalled_peer_of_a_shared_memory_ring_times_out_and_is_named() {
    let errors = a_stalled_peer_times_out(SHARED);
    match &errors[0] {
        Some(RingError::Timeout { peer, phase, .. }) => {
            assert_eq!(peer.rank, Rank(1));
            assert_eq!(*phase, Phase::ReduceScatter { step: 5, round: 0 });
        }
        other => panic!("rank 0: {other:?}"),
    }
}

fn a_stalled_peer_times_out(shared: usize) -> Vec<Option<RingError>> {
    // The timeout is the point here: short, and the stalled rank holds still for longer.
    let timeout = Duration::from_secs(2);
    let listeners = listeners(3);
    let (release, stalled) = mpsc::channel::<()>();
    let stalled = std::sync::Mutex::new(stalled);
    let errors = on_ring(&listeners, 1, timeout, shared, |rank, mut ring| {
        if rank == 1 {
            // Holds its ring open, sending nothing, until the others have failed.
            let _ = stalled.lock().unwrap().recv();
            return None;
        }
        let error = ring
            .allreduce_sum(5, &mut input(rank, 5, 1000))
            .unwrap_err();
        if rank == 2 {
            let _ = release.send(());
        }
        Some(error)
    });
    // Rank 2 receives from the stalled rank 1; rank 0 learns when rank 2 gives up.
    match &errors[2] {
        Some(RingError::Timeout {
            peer,
            direction,
            phase,
            timeout: t,
        }) => {
            assert_eq!(peer.rank, Rank(1));
            assert_eq!(*direction, Direction::ReceivingFrom);
            assert_eq!(*phase, Phase::ReduceScatter { step: 5, round: 0 });
            assert_eq!(*t, timeout);
        }
        other => panic!("rank 2: {other:?}"),
    }
    assert!(errors[0].is_some());
    errors
}

#[test]
fn strangers_are_refused_and_the_ring_still_forms() {
    let listeners = listeners(2);
    let generation = 5;
    let hello = |generation, key| {
        Hello {
            version: VERSION,
            generation,
            rank: 1,
            size: 2,
            key,
        }
        .encode()
    };
    let mut wrong_key = KEY;
    wrong_key[15] ^= 1;
    let garbage: Vec<u8> = (0..Hello::LEN as u8).map(|i| i.wrapping_mul(97)).collect();
    // Queued on rank 0's listener ahead of rank 1, so they are accepted and refused first.
    let strangers: Vec<_> = [
        hello(generation, wrong_key).to_vec(),
        hello(generation - 1, KEY).to_vec(),
        hello(generation + 1, KEY).to_vec(),
        garbage,
        Vec::new(), // connects and says nothing
    ]
    .into_iter()
    .map(|bytes| {
        let mut stream = TcpStream::connect(listeners[0].local_addr()).unwrap();
        stream.write_all(&bytes).unwrap();
        stream
    })
    .collect();

    let results = on_ring(&listeners, generation, PATIENT, TCP, |rank, mut ring| {
        let mut data = vec![rank as f32 + 1.0; 10];
        ring.allreduce_sum(0, &mut data).unwrap();
        data
    });
    assert_eq!(results, vec![vec![3.0; 10]; 2]);

    for (i, mut stream) in strangers.into_iter().enumerate() {
        stream.set_read_timeout(Some(PATIENT)).unwrap();
        let mut answer = [0; Hello::LEN];
        match stream.read(&mut answer) {
            Ok(0) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
            other => panic!("stranger {i} was answered: {other:?}"),
        }
    }
}

#[test]
fn mismatched_lengths_are_named() {
    let listeners = listeners(3);
    let errors = on_ring(&listeners, 1, PATIENT, TCP, |rank, mut ring| {
        let len = if rank == 2 { 431_081 } else { 431_080 };
        ring.allreduce_sum(7, &mut vec![1.0; len]).unwrap_err()
    });
    // Ranks 0 and 2 receive from a rank of the other length; whichever reads first reports
    // the mismatch, and its shutdown may reach the other before the header does.
    let mismatches: Vec<_> = errors
        .iter()
        .enumerate()
        .filter_map(|(rank, e)| match e {
            RingError::LengthMismatch {
                peer,
                step,
                theirs,
                ours,
            } => Some((rank, peer.rank, *step, *theirs, *ours)),
            _ => None,
        })
        .collect();
    assert!(!mismatches.is_empty(), "{errors:?}");
    for error in &errors {
        if let RingError::LengthMismatch { .. } = error {
            assert!(!error.is_retryable());
        }
    }
    for mismatch in mismatches {
        assert!(
            mismatch == (0, Rank(2), 7, 431_081, 431_080)
                || mismatch == (2, Rank(1), 7, 431_080, 431_081),
            "{mismatch:?}"
        );
    }
    let text = format!("{} / {}", errors[0], errors[2]);
    assert!(
        text.contains("rank 2 (127.0.0.1:")
            && text.contains("sent 431081 floats for step 7, this rank has 431080")
            || text.contains("sent 431080 floats for step 7, this rank has 431081"),
        "{text}"
    );
}

/// Every rank compares every other's length, and names the first that differs from its own.
#[test]
fn mismatched_lengths_in_shared_memory_are_named() {
    let listeners = listeners(3);
    let errors = on_ring(&listeners, 1, PATIENT, SHARED, |rank, mut ring| {
        let len = if rank == 2 { 1001 } else { 1000 };
        ring.allreduce_sum(7, &mut vec![1.0; len]).unwrap_err()
    });
    for (rank, error) in errors.iter().enumerate() {
        let (named, theirs, ours) = if rank == 2 {
            (0, 1000, 1001)
        } else {
            (2, 1001, 1000)
        };
        match error {
            RingError::LengthMismatch {
                peer,
                step: 7,
                theirs: t,
                ours: o,
            } if peer.rank == Rank(named) && *t == theirs && *o == ours => {}
            other => panic!("rank {rank}: {other}"),
        }
        assert!(!error.is_retryable());
    }
}

/// Buffers longer than the segment go over TCP, shorter ones through it, on the same ring,
/// and both give the ring-order sum.
#[test]
fn buffers_beyond_the_segment_go_over_tcp() {
    let n = 3;
    let lengths = [100, 5000, 99, 100, 7000, 1];
    let listeners = listeners(n);
    let results = on_ring(&listeners, 1, PATIENT, 100, |rank, mut ring| {
        assert_eq!(*ring.transport(), Transport::SharedMemory { floats: 100 });
        lengths
            .iter()
            .enumerate()
            .map(|(step, &len)| {
                let mut data = input(rank, step as u64, len);
                let timings = ring.allreduce_sum(step as u64, &mut data).unwrap();
                assert_eq!(timings.bytes_sent > 0, len > 100, "length {len}");
                data
            })
            .collect::<Vec<_>>()
    });
    for (step, &len) in lengths.iter().enumerate() {
        let inputs: Vec<_> = (0..n).map(|rank| input(rank, step as u64, len)).collect();
        for result in &results {
            assert_eq!(bits(&result[step]), bits(&ring_order_sum(&inputs)));
        }
    }
}

/// A member that cannot (here: will not) map the segment keeps the whole ring on TCP, and
/// every member learns which one and why.
#[test]
fn one_member_without_shared_memory_keeps_the_ring_on_tcp() {
    for holdout in 0..3 {
        let listeners = listeners(3);
        let shared = |rank| if rank == holdout { TCP } else { SHARED };
        let results = on_mixed_ring(&listeners, 1, PATIENT, shared, |rank, mut ring| {
            let mut data = input(rank, 0, 1000);
            let timings = ring.allreduce_sum(0, &mut data).unwrap();
            assert!(timings.bytes_sent > 0);
            (ring.transport().clone(), data)
        });
        let inputs: Vec<_> = (0..3).map(|rank| input(rank, 0, 1000)).collect();
        for (transport, data) in results {
            assert_eq!(
                transport,
                Transport::Tcp {
                    why_not_shared: format!("rank {holdout}: shared memory is turned off")
                }
            );
            assert_eq!(bits(&data), bits(&ring_order_sum(&inputs)));
        }
    }
}

/// The segment's name is gone once the ring has formed: a crash later leaves nothing behind.
#[test]
fn the_segment_leaves_no_file_behind() {
    let listeners = listeners(2);
    let key = *b"segment-file-key";
    // A segment holds its ring's key at bytes 16..32.
    let ours = |path: &std::path::Path| {
        let mut head = [0; 32];
        std::fs::File::open(path)
            .is_ok_and(|mut file| file.read_exact(&mut head).is_ok() && head[16..] == key)
    };
    let results = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|rank| {
                let listeners = &listeners;
                scope.spawn(move || {
                    let config = RingConfig {
                        key,
                        ..config(listeners, rank, 1, PATIENT, 1000)
                    };
                    let mut ring = Ring::connect(&listeners[rank], &config).unwrap();
                    let mut data = vec![1.0; 1000];
                    ring.allreduce_sum(0, &mut data).unwrap();
                    // Looked for while the ring, and so its segment, is still alive.
                    let files: Vec<_> = std::fs::read_dir(shm::SHM_DIR)
                        .unwrap()
                        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                        .filter(|path| ours(path))
                        .collect();
                    (ring.transport().clone(), data, files)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (transport, data, files) in results {
        assert_eq!(transport, Transport::SharedMemory { floats: 1000 });
        assert_eq!(data, vec![2.0; 1000]);
        assert!(files.is_empty(), "{files:?}");
    }
}

/// A member opens only a segment's name in the segments' directory, and not through a link:
/// the path comes from another process.
#[test]
fn only_segment_files_are_opened() {
    let open = |path: &std::path::Path| match shm::SharedRing::open(path, 1, &KEY, 1, 2) {
        Ok(_) => panic!("{} was opened", path.display()),
        Err(why) => why,
    };
    let why = open(std::path::Path::new("/etc/passwd"));
    assert!(why.ends_with("is not a segment's name"), "{why}");
    let why = open(&std::path::Path::new(shm::SHM_DIR).join("other-file"));
    assert!(why.ends_with("is not a segment's name"), "{why}");
    let target = tempfile::NamedTempFile::new_in(shm::SHM_DIR).unwrap();
    let link = std::path::Path::new(shm::SHM_DIR)
        .join(format!("lockstep-ring-link-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(target.path(), &link).unwrap();
    let why = open(&link);
    std::fs::remove_file(&link).unwrap();
    assert!(why.starts_with("cannot open"), "{why}");
    // A real file with the right name, but not this ring's.
    let stranger = tempfile::Builder::new()
        .prefix("lockstep-ring-")
        .tempfile_in(shm::SHM_DIR)
        .unwrap();
    stranger.as_file().set_len(8192).unwrap();
    let why = open(stranger.path());
    assert!(why.ends_with("is not this ring's segment"), "{why}");
}

/// The worker moves its ring to the compute thread and keeps the listener for later ones.
#[test]
fn ring_and_listener_can_move_between_threads() {
    fn send<T: Send>() {}
    fn share<T: Sync>() {}
    send::<Ring>();
    send::<RingListener>();
    share::<RingListener>();
}

#[test]
fn invalid_configs_are_refused() {
    let listeners = listeners(2);
    let mut bad = config(&listeners, 2, 1, PATIENT, TCP);
    assert!(matches!(
        Ring::connect(&listeners[0], &bad),
        Err(RingError::Config(_))
    ));
    bad.rank = Rank(0);
    bad.timeout = Duration::ZERO;
    assert!(matches!(
        Ring::connect(&listeners[0], &bad),
        Err(RingError::Config(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn any_ring_sums_any_length(
        n in 1usize..=4,
        len in 0usize..3000,
        step: u64,
        shared in prop_oneof![Just(TCP), Just(3000)],
    ) {
        let inputs: Vec<_> = (0..n).map(|rank| input(rank, step, len)).collect();
        let listeners = listeners(n);
        let results = on_ring(&listeners, 1, PATIENT, shared, |rank, mut ring| {
            assert_transport(&ring, shared);
            let mut data = inputs[rank].clone();
            ring.allreduce_sum(step, &mut data).unwrap();
            data
        });
        assert_sum(&inputs, &results);
        prop_assert_eq!(bits(&results[0]), bits(&ring_order_sum(&inputs)));
    }
}

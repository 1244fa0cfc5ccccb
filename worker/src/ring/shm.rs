//! Summing through shared memory when every member of a ring runs on one host, as NCCL and
//! gloo do within a node: no socket copies, no kernel in the data path.
//!
//! # Layout
//! One file in [`SHM_DIR`], made by rank 0 and mapped by every member (the others learn its
//! path over the ring's authenticated TCP connections, see [`Ring::connect`](super::Ring)):
//! a header page, then for each of two parities n buffers of `capacity` f32 in the host's
//! byte order. The header holds what a member checks before trusting the file (magic,
//! generation, key, size, capacity), the barrier's words, and for each parity and rank the
//! step and length that rank brought.
//!
//! # One allreduce
//! With parity p (calls so far, mod 2), rank r copies its data into its buffer of parity p and
//! records its step and length; barrier; rank r checks that every rank brought the same step
//! and length, sums segment r of all n buffers in ring order from rank r (the order of the TCP
//! ring, so the bits are the same) and writes it into its own buffer; barrier; every rank
//! copies the other segments from their owners' buffers. No third barrier: the next call
//! writes the other parity's buffers, and a rank writes parity p again only in the call after
//! that, past the next call's first barrier, which no rank reaches before it has copied out.
//!
//! # Failures
//! The barrier sleeps on a futex in slices of [`SLICE`]; between slices it looks at the abort
//! word, at the two TCP connections (a neighbour that dies closes them) and at the deadline.
//! A rank that sees a neighbour gone, or drops its ring, sets the abort word so that the
//! others stop at once as well. A rank that times out names a rank that had not arrived.

use super::error::{Direction, Peer, Phase, RingError};
use super::segments::segment;
use memmap2::MmapMut;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where segments live: a tmpfs on Linux, so the file is memory and never reaches a disk.
pub(super) const SHM_DIR: &str = "/dev/shm";
/// Every segment's file name starts so.
const PREFIX: &str = "lockstep-ring-";
const MAGIC: [u8; 8] = *b"LSTPSHM1";
/// Longest sleep in a barrier before checking on the neighbours again.
const SLICE: Duration = Duration::from_millis(10);
/// How long a waiting rank spins before sleeping, when every rank can have a core: a wake-up
/// from a futex costs tens of microseconds, a spin nothing but the core.
const SPIN: Duration = Duration::from_micros(50);

// Header offsets, in bytes. The barrier's words sit on cache lines of their own.
const GENERATION: usize = 8;
const KEY: usize = 16;
const SIZE: usize = 32;
const CAPACITY: usize = 40;
const ARRIVED: usize = 64;
const EPOCH: usize = 128;
const SLEEPERS: usize = 192;
/// 0 while the ring is whole; then the culprit's rank + 1, and [`TIMED_OUT`] if it was late
/// rather than gone.
const ABORTED: usize = 256;
const CULPRIT: u32 = 0x00ff_ffff;
const TIMED_OUT: u32 = 1 << 31;
/// Then each rank's count of barriers reached (u64), then per parity and rank (step, len).
const ARRIVALS: usize = 320;
const PAGE: usize = 4096;

/// One member's view of a ring's segment.
pub(super) struct SharedRing {
    /// Unmapped when the ring is dropped; reached only through `base`.
    _map: MmapMut,
    rank: usize,
    size: usize,
    capacity: usize,
    data_offset: usize,
    /// Allreduces so far; its parity picks the buffers.
    calls: u64,
    /// Whether to spin before sleeping: only when no member has to wait for a core.
    spin: bool,
    /// Rank 0 keeps the file's name until every member has opened it, then removes it.
    path: Option<tempfile::TempPath>,
    /// The start of the mapping, taken once: every process reaches the segment through its
    /// own raw pointer, never through a Rust reference to the whole.
    base: *mut u8,
}

// SAFETY: `base` points into `map`, which moves with the struct; the memory is shared with
// other processes in any case and touched only as described in the module's documentation.
unsafe impl Send for SharedRing {}

/// What a barrier checks while it waits, besides the abort word and its deadline.
pub(super) trait Watch {
    /// An error if a neighbour is gone or broke the protocol.
    fn check(&mut self, phase: Phase) -> Result<(), RingError>;
    /// The member of rank `rank`, for naming it in errors.
    fn peer(&self, rank: usize) -> Peer;
    /// How long a barrier may wait for the others.
    fn timeout(&self) -> std::time::Duration;
}

/// Why a segment could not be made or used; the ring then sums over TCP.
pub(super) type Unusable = String;

impl SharedRing {
    /// Rank 0: makes and maps a segment for `size` members of up to `capacity` floats.
    pub fn create(
        dir: &Path,
        generation: u64,
        key: &[u8; 16],
        size: usize,
        capacity: usize,
    ) -> Result<SharedRing, Unusable> {
        let (data_offset, len) = layout(size, capacity).ok_or("the segment would be too large")?;
        let named = tempfile::Builder::new()
            .prefix(PREFIX)
            .tempfile_in(dir)
            .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
        reserve(named.as_file(), len)?;
        let mut map = map(named.as_file())?;
        map[..8].copy_from_slice(&MAGIC);
        map[GENERATION..GENERATION + 8].copy_from_slice(&generation.to_ne_bytes());
        map[KEY..KEY + 16].copy_from_slice(key);
        map[SIZE..SIZE + 4].copy_from_slice(&(size as u32).to_ne_bytes());
        map[CAPACITY..CAPACITY + 8].copy_from_slice(&(capacity as u64).to_ne_bytes());
        let (_, path) = named.into_parts();
        Ok(SharedRing::new(
            map,
            0,
            size,
            capacity,
            data_offset,
            Some(path),
        ))
    }

    /// Every other rank: opens rank 0's segment at `path` and checks that it is this ring's.
    pub fn open(
        path: &Path,
        generation: u64,
        key: &[u8; 16],
        rank: usize,
        size: usize,
    ) -> Result<SharedRing, Unusable> {
        // The path came from a member that knows the key; still, only a segment's name in
        // the segments' directory is opened, never a device or another file it names.
        let ours = path.parent() == Some(Path::new(SHM_DIR))
            && path
                .file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with(PREFIX));
        if !ours {
            return Err(format!("{} is not a segment's name", path.display()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let metadata = file.metadata().map_err(|e| e.to_string())?;
        if !metadata.is_file() {
            return Err(format!("{} is not a regular file", path.display()));
        }
        let file_len = metadata.len();
        if file_len < PAGE as u64 {
            return Err(format!("{} is too short", path.display()));
        }
        let map = map(&file)?;
        let u64_at = |at: usize| u64::from_ne_bytes(map[at..at + 8].try_into().expect("8 bytes"));
        let capacity = u64_at(CAPACITY) as usize;
        let ours = map[..8] == MAGIC
            && u64_at(GENERATION) == generation
            && map[KEY..KEY + 16] == key[..]
            && u32::from_ne_bytes(map[SIZE..SIZE + 4].try_into().expect("4 bytes")) as usize
                == size;
        if !ours {
            return Err(format!("{} is not this ring's segment", path.display()));
        }
        let (data_offset, len) = layout(size, capacity).ok_or("a segment too large")?;
        if file_len != len as u64 {
            return Err(format!(
                "{} has {file_len} bytes, not {len}",
                path.display()
            ));
        }
        Ok(SharedRing::new(
            map,
            rank,
            size,
            capacity,
            data_offset,
            None,
        ))
    }

    fn new(
        mut map: MmapMut,
        rank: usize,
        size: usize,
        capacity: usize,
        data_offset: usize,
        path: Option<tempfile::TempPath>,
    ) -> SharedRing {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        SharedRing {
            base: map.as_mut_ptr(),
            _map: map,
            rank,
            size,
            capacity,
            data_offset,
            calls: 0,
            spin: size <= cores,
            path,
        }
    }

    /// The segment's file, while rank 0 still has it.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Removes the file's name once every member has mapped it; the memory stays until the
    /// last member unmaps it, and nothing is left behind should a member die.
    pub fn unlink(&mut self) {
        self.path = None;
    }

    /// The longest buffer this segment can sum.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sums `data` over all members, in place. Returns the time spent waiting for the others
    /// and the time spent copying and adding.
    pub fn allreduce(
        &mut self,
        step: u64,
        data: &mut [f32],
        watch: &mut dyn Watch,
    ) -> Result<(Duration, Duration), RingError> {
        let (n, rank, len) = (self.size, self.rank, data.len());
        assert!(len <= self.capacity, "the caller checks the capacity");
        let parity = (self.calls % 2) as usize;
        self.calls += 1;
        let (mut waited, mut worked) = (Duration::ZERO, Duration::ZERO);

        let started = Instant::now();
        self.slot(parity, rank)[0].store(step, Ordering::Relaxed);
        self.slot(parity, rank)[1].store(len as u64, Ordering::Relaxed);
        // SAFETY: only this rank writes its own buffer, and every rank finished reading this
        // parity's buffers before this rank could pass the last call's second barrier.
        unsafe { self.buffer_mut(parity, rank, 0..len) }.copy_from_slice(data);
        worked += started.elapsed();

        let started = Instant::now();
        self.barrier(Phase::ReduceScatter { step, round: 0 }, watch)?;
        waited += started.elapsed();

        let started = Instant::now();
        for other in 0..n {
            let [their_step, their_len] = self.slot(parity, other);
            let (their_step, their_len) = (
                their_step.load(Ordering::Relaxed),
                their_len.load(Ordering::Relaxed),
            );
            if their_len != len as u64 {
                return Err(RingError::LengthMismatch {
                    peer: watch.peer(other),
                    step,
                    theirs: their_len,
                    ours: len as u64,
                });
            }
            if their_step != step {
                return Err(RingError::Protocol {
                    peer: watch.peer(other),
                    phase: Phase::ReduceScatter { step, round: 0 },
                    reason: format!("it is at step {their_step}"),
                });
            }
        }
        let own = segment(len, n, rank);
        // SAFETY: between the two barriers rank r writes only segment r of its own buffer and
        // reads only segment r of the others'; all buffers are complete after the first one.
        unsafe { self.sum_segment(parity, own.clone(), &mut data[own]) };
        worked += started.elapsed();

        let started = Instant::now();
        self.barrier(Phase::AllGather { step, round: 0 }, watch)?;
        waited += started.elapsed();

        let started = Instant::now();
        for owner in (0..n).filter(|&owner| owner != rank) {
            let theirs = segment(len, n, owner);
            // SAFETY: segment `owner` of its owner's buffer is final after the second barrier.
            let sum = unsafe { self.buffer(parity, owner, theirs.clone()) };
            data[theirs].copy_from_slice(sum);
        }
        worked += started.elapsed();
        Ok((waited, worked))
    }

    /// Segment `range`, summed from this rank around the ring, into `out` and into this
    /// rank's buffer. Works through the segment in pieces that stay in the cache.
    unsafe fn sum_segment(&self, parity: usize, range: std::ops::Range<usize>, out: &mut [f32]) {
        const PIECE: usize = 4096;
        let (n, rank) = (self.size, self.rank);
        let mut start = range.start;
        while start < range.end {
            let piece = start..(start + PIECE).min(range.end);
            let out = &mut out[piece.start - range.start..piece.end - range.start];
            out.copy_from_slice(unsafe { self.buffer(parity, rank, piece.clone()) });
            for k in 1..n {
                let theirs = unsafe { self.buffer(parity, (rank + k) % n, piece.clone()) };
                for (acc, x) in out.iter_mut().zip(theirs) {
                    *acc += *x;
                }
            }
            unsafe { self.buffer_mut(parity, rank, piece.clone()) }.copy_from_slice(out);
            start = piece.end;
        }
    }

    /// Waits until every member has arrived here.
    fn barrier(&self, phase: Phase, watch: &mut dyn Watch) -> Result<(), RingError> {
        let epoch = self.word(EPOCH);
        let sleepers = self.word(SLEEPERS);
        let seen = epoch.load(Ordering::SeqCst);
        self.arrivals(self.rank).fetch_add(1, Ordering::SeqCst);
        if self.word(ARRIVED).fetch_add(1, Ordering::AcqRel) + 1 == self.size as u32 {
            self.word(ARRIVED).store(0, Ordering::Relaxed);
            epoch.store(seen.wrapping_add(1), Ordering::SeqCst);
            if sleepers.load(Ordering::SeqCst) > 0 {
                futex::wake_all(epoch);
            }
            return Ok(());
        }
        let started = Instant::now();
        if self.spin {
            while started.elapsed() < SPIN {
                for _ in 0..64 {
                    if epoch.load(Ordering::Acquire) != seen {
                        return Ok(());
                    }
                    std::hint::spin_loop();
                }
            }
        }
        loop {
            sleepers.fetch_add(1, Ordering::SeqCst);
            if epoch.load(Ordering::SeqCst) == seen {
                futex::wait(epoch, seen, SLICE);
            }
            sleepers.fetch_sub(1, Ordering::SeqCst);
            if epoch.load(Ordering::Acquire) != seen {
                return Ok(());
            }
            let aborted = self.word(ABORTED).load(Ordering::Acquire);
            if aborted != 0 {
                let peer = watch.peer((aborted & CULPRIT) as usize - 1);
                return Err(if aborted & TIMED_OUT != 0 {
                    RingError::Timeout {
                        peer,
                        direction: Direction::ReceivingFrom,
                        phase,
                        timeout: watch.timeout(),
                    }
                } else {
                    RingError::Closed { peer, phase }
                });
            }
            if let Err(e) = watch.check(phase) {
                if let RingError::Closed { peer, .. } = &e {
                    self.abort(peer.rank.0 as usize, 0);
                }
                return Err(e);
            }
            if started.elapsed() >= watch.timeout() {
                let late = self.late_member();
                self.abort(late, TIMED_OUT);
                return Err(RingError::Timeout {
                    peer: watch.peer(late),
                    direction: Direction::ReceivingFrom,
                    phase,
                    timeout: watch.timeout(),
                });
            }
        }
    }

    /// A member that has not reached the barrier this rank waits at: the first after this
    /// rank in ring order.
    fn late_member(&self) -> usize {
        let ours = self.arrivals(self.rank).load(Ordering::SeqCst);
        (1..self.size)
            .map(|k| (self.rank + k) % self.size)
            .find(|&other| self.arrivals(other).load(Ordering::SeqCst) < ours)
            .unwrap_or((self.rank + self.size - 1) % self.size)
    }

    /// Tells every member to stop waiting, because of `culprit`: it is gone or leaving, or
    /// with [`TIMED_OUT`] in `how`, it kept a member waiting too long. The first abort stands.
    fn abort(&self, culprit: usize, how: u32) {
        let _ = self.word(ABORTED).compare_exchange(
            0,
            (culprit as u32 + 1) | how,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        // A sleeper wakes for the abort word within a slice anyway; this makes it now.
        let epoch = self.word(EPOCH);
        if self.word(SLEEPERS).load(Ordering::SeqCst) > 0 {
            futex::wake_all(epoch);
        }
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: the offsets are 4-aligned, inside the header page, and only ever accessed
        // atomically, by every process that maps the segment.
        unsafe { AtomicU32::from_ptr(self.base.add(offset) as *mut u32) }
    }

    fn arrivals(&self, rank: usize) -> &AtomicU64 {
        // SAFETY: as for `word`; `layout` leaves room for every rank's u64.
        unsafe { AtomicU64::from_ptr(self.base.add(ARRIVALS + 8 * rank) as *mut u64) }
    }

    /// The (step, length) rank `rank` recorded for parity `parity`.
    fn slot(&self, parity: usize, rank: usize) -> [&AtomicU64; 2] {
        let at = ARRIVALS + 8 * self.size + 16 * (parity * self.size + rank);
        // SAFETY: as for `word`.
        unsafe {
            [
                AtomicU64::from_ptr(self.base.add(at) as *mut u64),
                AtomicU64::from_ptr(self.base.add(at + 8) as *mut u64),
            ]
        }
    }

    fn buffer_start(&self, parity: usize, rank: usize) -> *mut f32 {
        let at = self.data_offset + 4 * self.capacity * (parity * self.size + rank);
        // SAFETY: `layout` sized the map for every parity's and rank's buffer.
        unsafe { self.base.add(at) as *mut f32 }
    }

    /// # Safety
    /// No member may write `range` of this buffer while the slice lives.
    unsafe fn buffer(&self, parity: usize, rank: usize, range: std::ops::Range<usize>) -> &[f32] {
        debug_assert!(range.end <= self.capacity);
        unsafe {
            std::slice::from_raw_parts(
                self.buffer_start(parity, rank).add(range.start),
                range.len(),
            )
        }
    }

    /// # Safety
    /// No other member may read or write `range` of this buffer while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn buffer_mut(
        &self,
        parity: usize,
        rank: usize,
        range: std::ops::Range<usize>,
    ) -> &mut [f32] {
        debug_assert!(range.end <= self.capacity);
        unsafe {
            std::slice::from_raw_parts_mut(
                self.buffer_start(parity, rank).add(range.start),
                range.len(),
            )
        }
    }
}

impl Drop for SharedRing {
    fn drop(&mut self) {
        // Whoever still waits in this generation's barrier learns that this rank left.
        self.abort(self.rank, 0);
    }
}

/// The data's offset and the segment's length for `size` ranks of `capacity` floats.
fn layout(size: usize, capacity: usize) -> Option<(usize, usize)> {
    let header = (ARRIVALS + 8 * size + 32 * size).div_ceil(PAGE) * PAGE;
    let data = capacity.checked_mul(4)?.checked_mul(size)?.checked_mul(2)?;
    Some((header, header.checked_add(data)?))
}

/// Gives the file its length with its memory reserved now: a tmpfs that is too small (a
/// container's 64 MiB /dev/shm) refuses here, instead of killing the process with SIGBUS at
/// the first write past its limit.
fn reserve(file: &File, len: usize) -> Result<(), Unusable> {
    file.set_len(len as u64)
        .map_err(|e| format!("cannot size the segment: {e}"))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain system call on an open descriptor.
        let status = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        if status != 0 {
            return Err(format!(
                "cannot reserve {len} bytes of shared memory: {}",
                std::io::Error::from_raw_os_error(status)
            ));
        }
    }
    Ok(())
}

fn map(file: &File) -> Result<MmapMut, Unusable> {
    // SAFETY: the file is this ring's own, 0600 and unlinked once every member has it; its
    // contents are only touched atomically or under the barrier's ordering (see above).
    unsafe { MmapMut::map_mut(file) }.map_err(|e| format!("cannot map the segment: {e}"))
}

/// Sleeping on a word of shared memory until another process changes it.
#[cfg(target_os = "linux")]
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    /// Sleeps while `word` holds `expected`, for at most `timeout` (or a spurious wake-up).
    pub fn wait(word: &AtomicU32, expected: u32, timeout: Duration) {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on a live, aligned word. Not FUTEX_PRIVATE_FLAG: the word is
        // shared between processes.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                word.as_ptr(),
                libc::FUTEX_WAIT,
                expected,
                &timeout as *const libc::timespec,
            );
        }
    }

    pub fn wake_all(word: &AtomicU32) {
        // SAFETY: FUTEX_WAKE on a live, aligned word.
        unsafe {
            libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX);
        }
    }
}

/// Elsewhere a short nap stands in for the futex.
#[cfg(not(target_os = "linux"))]
mod futex {
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    pub fn wait(_word: &AtomicU32, _expected: u32, timeout: Duration) {
        std::thread::sleep(timeout.min(Duration::from_micros(50)));
    }

    pub fn wake_all(_word: &AtomicU32) {}
}

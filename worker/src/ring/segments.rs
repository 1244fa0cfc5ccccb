//! How a buffer is cut: n segments (one per rank), each streamed as chunks.

use std::ops::Range;

/// Segment `s` of `n` over `len` floats: the first `len % n` segments get one float more, so
/// lengths below n or not divisible by n leave some segments empty or one shorter. The
/// same cut as a step's batch among its members.
pub(super) use common::sharding::even_part as segment;

/// The chunks of at most `chunk` floats that stream `range`. An empty range still gives one
/// (empty) chunk: every round then carries a message, so a rank whose buffer length differs
/// learns of it from its neighbour's header instead of waiting for data that never comes.
pub(super) fn chunks(range: Range<usize>, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let count = range.len().div_ceil(chunk).max(1);
    (0..count).map(move |i| {
        let start = range.start + i * chunk;
        start..(start + chunk).min(range.end)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn segments_and_chunks_cover_every_index_once(
            len in 0usize..5000,
            n in 1usize..9,
            chunk in 1usize..700,
        ) {
            let mut next = 0;
            for s in 0..n {
                let seg = segment(len, n, s);
                prop_assert!(seg.len() == len / n || seg.len() == len / n + 1);
                for c in chunks(seg.clone(), chunk) {
                    prop_assert_eq!(c.start, next);
                    prop_assert!(c.len() <= chunk);
                    prop_assert!(!c.is_empty() || seg.is_empty());
                    next = c.end;
                }
                prop_assert_eq!(next, seg.end);
            }
            prop_assert_eq!(next, len);
        }
    }
}

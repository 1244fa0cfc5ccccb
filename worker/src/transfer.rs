//! Receiving the coordinator's dataset, so remote workers need no shared volume.

use crate::session::Client;
use crate::{Error, Result};
use common::dataset::FILE_NAMES;
use proto::{health::Liveness, v1::FetchDatasetRequest};
use sha2::{Digest, Sha256};
use std::{
    io::Write,
    path::{Path, PathBuf},
};
use tracing::info;

/// Largest file accepted: MNIST's training images are 47 MB; allow for larger IDX datasets
/// without letting a hostile peer fill the disk.
const MAX_FILE_BYTES: u64 = 1 << 30;

/// Downloads the four dataset files into `dir`, checking each against the SHA-256 the
/// coordinator sends with its last chunk. Files land under their own names only once
/// complete and verified.
pub async fn receive_dataset(client: &mut Client, dir: &Path, liveness: &Liveness) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
    let staging = tempfile::Builder::new()
        .prefix(".receiving-")
        .tempdir_in(dir)
        .map_err(|source| io(dir, source))?;
    let mut stream = client
        .fetch_dataset(FetchDatasetRequest {})
        .await?
        .into_inner();
    let mut current: Option<Incoming> = None;
    let mut done: Vec<(String, PathBuf)> = Vec::new();
    while let Some(chunk) = stream.message().await? {
        liveness.beat();
        let name = chunk.file_name.clone();
        if !is_dataset_file(&name) {
            return Err(Error::Transfer(format!("unexpected file name '{name}'")));
        }
        if chunk.file_size > MAX_FILE_BYTES {
            return Err(Error::Transfer(format!(
                "{name} is {} bytes, more than the {MAX_FILE_BYTES} accepted",
                chunk.file_size
            )));
        }
        let incoming = match &mut current {
            Some(incoming) if incoming.name == name => incoming,
            _ => {
                if current.is_some() {
                    return Err(Error::Transfer(format!(
                        "{name} started before the previous file ended"
                    )));
                }
                current.insert(Incoming::create(staging.path(), &name, chunk.file_size)?)
            }
        };
        incoming.append(chunk.offset, &chunk.data)?;
        if !chunk.sha256.is_empty() {
            let incoming = current.take().expect("a file is in progress");
            done.push((name, incoming.finish(&chunk.sha256)?));
        }
    }
    if let Some(incoming) = current {
        return Err(Error::Transfer(format!(
            "{} ended after {} of {} bytes",
            incoming.name, incoming.written, incoming.size
        )));
    }
    for (name, path) in &done {
        let target = dir.join(name);
        std::fs::rename(path, &target).map_err(|source| io(&target, source))?;
    }
    info!(dir = %dir.display(), files = done.len(), "received the dataset");
    Ok(())
}

/// One file being received.
struct Incoming {
    name: String,
    path: PathBuf,
    file: std::fs::File,
    hasher: Sha256,
    size: u64,
    written: u64,
}

impl Incoming {
    fn create(dir: &Path, name: &str, size: u64) -> Result<Incoming> {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|source| io(&path, source))?;
        Ok(Incoming {
            name: name.to_string(),
            path,
            file,
            hasher: Sha256::new(),
            size,
            written: 0,
        })
    }

    fn append(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if offset != self.written {
            return Err(Error::Transfer(format!(
                "{}: chunk at offset {offset}, expected {}",
                self.name, self.written
            )));
        }
        if self.written + data.len() as u64 > self.size {
            return Err(Error::Transfer(format!(
                "{}: more data than the announced {} bytes",
                self.name, self.size
            )));
        }
        self.file
            .write_all(data)
            .map_err(|source| io(&self.path, source))?;
        self.hasher.update(data);
        self.written += data.len() as u64;
        Ok(())
    }

    fn finish(self, expected_sha256: &str) -> Result<PathBuf> {
        if self.written != self.size {
            return Err(Error::Transfer(format!(
                "{}: {} of {} bytes",
                self.name, self.written, self.size
            )));
        }
        let actual = hex::encode(self.hasher.finalize());
        if actual != expected_sha256 {
            return Err(Error::Transfer(format!(
                "{}: sha256 {actual}, the coordinator announced {expected_sha256}",
                self.name
            )));
        }
        self.file
            .sync_all()
            .map_err(|source| io(&self.path, source))?;
        Ok(self.path)
    }
}

fn is_dataset_file(name: &str) -> bool {
    FILE_NAMES
        .iter()
        .any(|known| name == *known || name.strip_suffix(".gz") == Some(known))
}

fn io(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

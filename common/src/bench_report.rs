//! What the benchmarks (`cargo bench -p common|worker|coordinator`) share: the machine they
//! ran on, and writing their JSON reports into `target/bench/`.

use std::io;
use std::path::{Path, PathBuf};

/// The CPU's model name, from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .and_then(|rest| rest.split(':').nth(1))
                .map(|name| name.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// The 1, 5 and 15 minute load averages from `/proc/loadavg`, empty where there is none.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The target directory of a bench binary, from its `CARGO_TARGET_TMPDIR` (`target/tmp`),
/// which follows `CARGO_TARGET_DIR`.
pub fn target_dir(target_tmpdir: &str) -> io::Result<PathBuf> {
    Path::new(target_tmpdir)
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| io::Error::other("CARGO_TARGET_TMPDIR has no parent"))
}

/// Writes `json` to `target/bench/NAME.json` under a temporary name first, so that the file
/// appears whole; returns its path.
pub fn write(target_tmpdir: &str, name: &str, json: &str) -> io::Result<PathBuf> {
    let dir = target_dir(target_tmpdir)?.join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    let partial = dir.join(format!(".{name}.json.partial"));
    std::fs::write(&partial, format!("{json}\n"))?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

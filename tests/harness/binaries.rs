//! What the tests run: the workspace's real binaries, built with the tests' profile, and the
//! real MNIST.

use common::fetch::{default_data_dir, ensure_mnist};
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The real MNIST, fetched into the shared cache the first time.
pub fn mnist_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = default_data_dir();
        ensure_mnist(&dir).expect("MNIST is available");
        dir
    })
    .clone()
}

/// Path of a binary of this workspace, built (once per test process) with the profile the
/// tests were built with, so the tests always run the current code.
pub fn binary(name: &str) -> PathBuf {
    static PROFILE_DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = PROFILE_DIR.get_or_init(|| {
        // The test runs as target/<profile>/deps/it-<hash>.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>/deps layout")
            .to_path_buf();
        let mut cargo = Command::new(env!("CARGO"));
        cargo.args([
            "build",
            "--quiet",
            "-p",
            "coordinator",
            "-p",
            "worker",
            "--bins",
        ]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("cargo runs");
        assert!(status.success(), "building the binaries failed");
        profile_dir
    });
    dir.join(name)
}

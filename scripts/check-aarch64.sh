#!/usr/bin/env bash
# Type-checks the crates for aarch64 Linux, where only the portable kernel paths and gemm's
# NEON kernels exist: the x86-only code must stay behind its cfgs. Needs the target's
# standard library (rustup) and a C cross compiler for the build scripts of C dependencies
# (Debian: gcc-aarch64-linux-gnu); installs both when missing. Not part of CI: rustup's
# downloads may not be reachable where CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
    apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross
fi
RUSTFLAGS="${RUSTFLAGS:-} -D warnings" cargo check --target "$target" -p common -p worker -p coordinator

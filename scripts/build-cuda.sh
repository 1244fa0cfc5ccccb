#!/usr/bin/env bash
# Builds the coordinator and worker with CUDA and NCCL (`--features nccl`) on a machine without
# a CUDA installation or a GPU: the compiler, headers and libraries come from NVIDIA's wheels
# on PyPI (fetched with pip), and the driver library, which only a GPU machine has, is linked
# against a stub made here (the real one is loaded at run time).
#
#   scripts/build-cuda.sh [COMPUTE_CAP]     # default 90 (H100/H200); 80 for A100, 89 for L4
#
# The binaries land in ${CARGO_TARGET_DIR:-target}/release. To run them, the GPU machine needs
# its driver and the CUDA 13 runtime, cuBLAS, cuRAND, NVRTC and NCCL libraries on the loader
# path (PyTorch's wheels carry them: see README, "NCCL").
set -euo pipefail
cd "$(dirname "$0")/.."

cap=${1:-90}
cuda=13.0
target=${CARGO_TARGET_DIR:-target}
root=$(realpath -m "$target/cuda-toolkit")

if [ ! -x "$root/nvidia/cu13/bin/nvcc" ]; then
    mkdir -p "$root/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
        --platform manylinux2010_x86_64 -d "$root/wheels" \
        "nvidia-cuda-nvcc==$cuda.*" "nvidia-cuda-crt==$cuda.*" "nvidia-nvvm==$cuda.*" \
        "nvidia-cuda-runtime==$cuda.*" "nvidia-cuda-cccl==$cuda.*" "nvidia-cuda-nvrtc==$cuda.*" \
        "nvidia-cublas==$cuda.*" "nvidia-curand==10.*" "nvidia-nccl-cu13"
    for wheel in "$root"/wheels/*.whl; do
        python3 -m zipfile -e "$wheel" "$root"
    done
    chmod +x "$root"/nvidia/cu13/bin/* "$root"/nvidia/cu13/nvvm/bin/*
fi

# The layout the CUDA build scripts look for: $CUDA_ROOT/{bin,include,lib}.
toolkit=$root/toolkit
mkdir -p "$toolkit/lib"
for dir in bin include nvvm; do
    ln -sfn "$root/nvidia/cu13/$dir" "$toolkit/$dir"
done
lib=$root/nvidia/cu13/lib
ln -sf "$lib/libcudart.so.13" "$toolkit/lib/libcudart.so"
ln -sf "$lib/libcublas.so.13" "$toolkit/lib/libcublas.so"
ln -sf "$lib/libcublasLt.so.13" "$toolkit/lib/libcublasLt.so"
ln -sf "$lib/libcurand.so.10" "$toolkit/lib/libcurand.so"
ln -sf "$lib/libnvrtc.so.13" "$toolkit/lib/libnvrtc.so"
ln -sf "$root/nvidia/nccl/lib/libnccl.so.2" "$toolkit/lib/libnccl.so"

# libcuda.so comes with the driver, not the toolkit wheels: link against a stub that defines
# every driver function cudarc declares, with the real library's soname.
cudarc=$(cargo metadata --format-version 1 --locked --all-features |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
python3 - "$(dirname "$cudarc")/src/driver/sys/mod.rs" >"$toolkit/libcuda_stub.c" <<'EOF'
import re, sys
names = sorted(set(re.findall(r"^\s+fn (cu[A-Za-z0-9_]+)\(", open(sys.argv[1]).read(), re.M)))
print("\n".join(f"void {name}(void) {{}}" for name in names))
EOF
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$toolkit/lib/libcuda.so" "$toolkit/libcuda_stub.c"

export PATH=$toolkit/bin:$PATH CUDA_ROOT=$toolkit CUDA_HOME=$toolkit CUDA_PATH=$toolkit
export CUDA_COMPUTE_CAP=$cap
cargo build --release --locked --features nccl -p coordinator -p worker --bins
echo "built $target/release/coordinator and $target/release/worker for sm_$cap with NCCL"

#!/usr/bin/env bash
# Builds everything bench/gpu/run.sh runs, on a machine without a GPU, into bench/gpu/bin:
# the CUDA `latentflow` binary, the GPU benchmark and the test binaries (kernels, parity),
# stripped, and packs them as bench/gpu/bin.tar.xz (~17 MB, small enough to carry to a GPU
# machine; run.sh unpacks it).
#   eval "$(gpu-kernels/toolchain/setup.sh ~/.cache/latentflow-cuda --env)"; bench/gpu/build.sh
set -euo pipefail
command -v nvcc >/dev/null || { echo "nvcc not found: run gpu-kernels/toolchain/setup.sh first (see the README)" >&2; exit 1; }
dest=bench/gpu/bin
mkdir -p "$dest"
cargo build --release --features cuda -p latentflow-pipelines -p latentflow-bench --bins
rm -f "$dest"/*
cp target/release/latentflow target/release/gpu_train_step target/release/gpu_components target/release/gpu_encoders "$dest/"
# Test binaries: cargo prints their paths as JSON; keep the ones run.sh runs, without the hash.
cargo test --release --features cuda -p latentflow-gpu-kernels -p latentflow-tests --no-run --message-format=json \
  | python3 -c '
import json, shutil, sys
wanted = {"gpu_vs_cpu", "nvrtc_compile", "model_parity", "training_parity"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in wanted:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        print("built", m["target"]["name"])
' "$dest"
# NCCL's world-size-1 checks (feature `nccl`, linking the toolchain's libnccl); the rest of the
# GPU run goes on without them when they do not build.
cargo test --release --features cuda,nccl -p latentflow-gpu-kernels -p latentflow-tests --no-run --message-format=json \
  | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in {"nccl", "nccl_step"}:
        shutil.copy(m["executable"], sys.argv[1] + "/" + m["target"]["name"])
        print("built", m["target"]["name"])
' "$dest" || echo "note: the NCCL tests did not build (is libnccl in the toolchain?)"
strip "$dest"/*
ls -la "$dest"
# One xz stream with a dictionary larger than a binary: the binaries share most of their bytes
# (candle's kernels), so this packs ten of them in ~17 MB instead of ~52 MB with tar -J's 8 MiB
# dictionary, which keeps the carry under the device's 64 MiB. tar -xJf unpacks it as usual.
tar -cf - -C "$dest" . | xz -9 --lzma2=dict=256MiB -T1 >bench/gpu/bin.tar.xz
ls -la bench/gpu/bin.tar.xz
# The Python wheels the GPU machine lacks (diffusers), checked against its package list.
bench/gpu/fetch_wheels.sh

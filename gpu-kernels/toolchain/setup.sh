#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain (nvcc, headers, cuBLAS, cuRAND, NVRTC, runtime, cuDNN 9) from PyPI
# wheels into DIR, so `cargo build --features cuda` works on a machine with no GPU and no system
# CUDA. Every CUDA wheel is pinned to 13.0: the nvcc wheel's unpinned dependencies (nvvm, crt,
# runtime) otherwise pull a newer release whose PTX (ISA 9.5) the 13.0 ptxas, and driver 580,
# reject. A stub libcuda.so (the driver is not on PyPI) satisfies the linker; the real driver is
# used on the GPU machine.
#   usage: gpu-kernels/toolchain/setup.sh DIR          then: eval "$(gpu-kernels/toolchain/setup.sh DIR --env)"
set -euo pipefail
dir=${1:?usage: setup.sh DIR [--env]}
dir=$(mkdir -p "$dir" && cd "$dir" && pwd)
root=$dir/root
print_env() {
  echo "export PATH=$root/bin:\$PATH CUDA_HOME=$root CUDA_PATH=$root CUDA_ROOT=$root NVCC=$root/bin/nvcc"
  echo "export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} CUDARC_CUDA_VERSION=13000"
  echo "export LIBRARY_PATH=$root/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
  # Lets CUDA-built test binaries start here (NVRTC compile tests; GPU tests skip themselves).
  echo "export LD_LIBRARY_PATH=$root/lib:$root/cu13lib:$root/cudnnlib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
}
if [[ ${2:-} == --env ]]; then
  [[ -x $root/bin/nvcc ]] || { echo "no toolchain in $dir: run $0 $dir first" >&2; exit 1; }
  print_env; exit 0
fi
python3 -m venv "$dir/venv"
"$dir/venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 "nvidia-cublas>=13.0,<13.1" nvidia-curand==10.4.0.35 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-nccl-cu13==2.30.7 nvidia-cudnn-cu13==9.13.0.50 >&2
cu=$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cu13)
mkdir -p "$root/lib"
ln -sfn "$cu/bin" "$root/bin"; ln -sfn "$cu/include" "$root/include"; ln -sfn "$cu/nvvm" "$root/nvvm"; ln -sfn "$cu/lib" "$root/cu13lib"
for l in cublas cublasLt curand nvrtc cudart; do
  f=$(ls "$cu"/lib/lib$l.so.* | grep -v alt | head -1)
  ln -sf "$f" "$root/lib/lib$l.so"
done
# NCCL (the `nccl` feature links it): its wheel keeps the library beside the CUDA ones.
nccl=$(ls "$dir"/venv/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.* 2>/dev/null | head -1 || true)
if [[ -n $nccl ]]; then ln -sf "$nccl" "$root/lib/libnccl.so"; else echo "note: no libnccl in the nccl wheel" >&2; fi
# cuDNN (the `cudnn` feature links libcudnn.so.9, which loads its engine libraries from its own
# folder at run time). 9.13 is the oldest cuDNN for CUDA 13, so nothing linked here is missing
# from the GPU machine's (PyTorch's) newer 9.x.
cudnn=$(ls "$dir"/venv/lib/python3*/site-packages/nvidia/cudnn/lib/libcudnn.so.* 2>/dev/null | head -1 || true)
if [[ -n $cudnn ]]; then
  ln -sf "$cudnn" "$root/lib/libcudnn.so"; ln -sfn "$(dirname "$cudnn")" "$root/cudnnlib"
else
  echo "note: no libcudnn in the cudnn wheel" >&2
fi
# Linker stub for the driver API: every cu* entry point that cudarc declares, soname libcuda.so.1.
command -v cargo >/dev/null && (cd "$(dirname "$0")/../.." && cargo fetch --locked >/dev/null 2>&1 || true)
sys=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | head -1 || true)
if [[ -n $sys ]]; then
  grep -oE 'pub unsafe fn cu[A-Za-z0-9_]+' "$sys" | awk '{print $4}' | sort -u | sed 's/.*/void &(void){}/' >"$root/cuda_stub.c"
else
  echo "note: cudarc sources not fetched (no cargo?); the stub holds cuInit only" >&2
  echo 'void cuInit(void){}' >"$root/cuda_stub.c"
fi
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/libcuda.so" "$root/cuda_stub.c"
ln -sf libcuda.so "$root/lib/libcuda.so.1"
"$root/bin/nvcc" --version | tail -2 >&2
print_env

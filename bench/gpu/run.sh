#!/usr/bin/env bash
# Every GPU check and benchmark of latentflow in one call, for a GPU machine with no Rust
# toolchain: run it from the repository root with the binaries `bench/gpu/build.sh` made.
#   bench/gpu/run.sh [--dry-run] [BIN] [OUT_DIR]
#     BIN: a folder or build.sh's .tar.xz (default: bench/gpu/bin, else bench/gpu/bin.tar.xz);
#     OUT_DIR: default $OUT or bench/gpu/out. Carry bench/gpu/wheels (fetch_wheels.sh) with BIN:
#     the machine has no diffusers; its wheels are installed to a temporary path first.
#   --dry-run (on any machine, no GPU): installs the carried wheels the same way, checks their
#     requirements against the machine's package list (check_carry.py), runs pytorch_step.py on
#     the CPU with a tiny UNet and pytorch_components.py's pieces on the CPU (proving every
#     import resolves), lists what the binaries link, and stops before the GPU parts.
# 1. the kernel tests on the GPU (each NVRTC kernel against its CPU reference) and the NVRTC
#    compile test; 2. the parity tests on CUDA (models against the diffusers/transformers
#    goldens, one training step against PyTorch's); 3. the SD2-base UNet training step at 256 px
#    (bf16) at batch 8, 32, 64 and 128 in latentflow, then in PyTorch + diffusers on the same GPU,
#    and the step's pieces timed alone on both sides (gpu_components, pytorch_components.py);
#    4. the encoders alone next to PyTorch's (gpu_encoders, pytorch_encoders.py) and the one-GPU
#    encoder topologies with 1 and 2 workers; 5. the online topology with real-size encoders on one GPU. Writes OUT/summary.md and the raw
#    outputs beside it; exits non-zero if any part failed (every part runs regardless).
set -uo pipefail
dry_run=0
if [[ ${1:-} == --dry-run ]]; then dry_run=1; shift; fi
bin=${1:-bench/gpu/bin}
[[ -z ${1:-} && ! -d $bin && -f bench/gpu/bin.tar.xz ]] && bin=bench/gpu/bin.tar.xz
if ((dry_run)) && [[ ! -e $bin ]]; then
  bin=$(mktemp -d) # no binaries built here: the checks below say so
fi
if [[ -f $bin ]]; then
  unpacked=$(mktemp -d)
  tar -xJf "$bin" -C "$unpacked" || { echo "cannot unpack $bin" >&2; exit 1; }
  bin=$unpacked
fi
bin=$(cd "$bin" && pwd) || { echo "no binaries in ${1:-bench/gpu/bin}: run bench/gpu/build.sh first" >&2; exit 1; }
out=${2:-${OUT:-bench/gpu/out}}
mkdir -p "$out" && out=$(cd "$out" && pwd)
root=$(pwd)
export LATENTFLOW_REPO=$root # the test binaries find tests/fixtures here
status=0
note() { echo "== $*" | tee -a "$out/log.txt"; }
# The whole script fits one device call: each part gets at most its own limit and what is left
# of LATENTFLOW_GPU_BUDGET_S (default 540 s); parts that would get under 20 s are skipped.
deadline=$((SECONDS + ${LATENTFLOW_GPU_BUDGET_S:-540}))
step() { # step NAME TIMEOUT_S COMMAND...: runs, logs, records the exit status
  local name=$1 limit=$2; shift 2
  local left=$((deadline - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "$name skipped: out of time budget" | tee -a "$out/log.txt"; status=1; return
  fi
  note "$name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$((SECONDS - started))" | tee -a "$out/log.txt"
  [[ $rc == 0 ]] || status=1
}

# The carried Python wheels (diffusers and what it needs that the machine lacks), installed to a
# temporary path ahead of the machine's site-packages.
wheels=$root/bench/gpu/wheels
if compgen -G "$wheels/*.whl" >/dev/null; then
  site_extra=$(mktemp -d)
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site_extra" "$wheels"/*.whl \
    >"$out/wheels.txt" 2>&1; then
    export PYTHONPATH=$site_extra${PYTHONPATH:+:$PYTHONPATH}
    echo "installed $(ls "$wheels" | tr '\n' ' ')to $site_extra" | tee -a "$out/log.txt"
  else
    echo "cannot install the carried wheels (see wheels.txt)" | tee -a "$out/log.txt"; status=1
  fi
else
  echo "no wheels in $wheels: run bench/gpu/fetch_wheels.sh and carry them (diffusers is not on the GPU machine)" \
    | tee -a "$out/log.txt"
fi

if ((dry_run)); then
  python3 "$root/bench/gpu/check_carry.py" "$wheels" | tee "$out/carry.txt"; [[ ${PIPESTATUS[0]} == 0 ]] || status=1
  python=${LATENTFLOW_PYTHON:-python3}
  note "pytorch_step.py on the CPU with $python (a tiny UNet, one step)"
  "$python" -c "import diffusers; print('diffusers', diffusers.__version__, 'from', diffusers.__file__)" 2>&1 | tee -a "$out/log.txt"
  "$python" "$root/bench/gpu/pytorch_step.py" --config "$root/bench/gpu/dry-run-unet.json" --device cpu \
    --latent-size 16 --batches 2 --steps 1 --warmup 0 2>&1 | tee "$out/pytorch_step_cpu.txt"
  grep -q step_s_median "$out/pytorch_step_cpu.txt" || status=1
  note "pytorch_components.py on the CPU with $python (batch 1, one run of each piece)"
  "$python" "$root/bench/gpu/pytorch_components.py" --device cpu --batch 1 --iters 1 \
    --step-config "$root/bench/gpu/dry-run-unet.json" 2>&1 | tee "$out/pytorch_components_cpu.txt"
  grep -q '"error"' "$out/pytorch_components_cpu.txt" && status=1
  grep -q '"optimizer step' "$out/pytorch_components_cpu.txt" || status=1
  note "pytorch_encoders.py on the CPU with $python (tiny configs, one pass of each)"
  "$python" "$root/bench/gpu/pytorch_encoders.py" --config-dir "$root/bench/gpu/dry-run-encoders" --device cpu \
    --vae-batch 1 --text-batch 2 --iters 1 2>&1 | tee "$out/pytorch_encoders_cpu.txt"
  grep -q '"error"' "$out/pytorch_encoders_cpu.txt" && status=1
  [[ $(grep -c '"per_s"' "$out/pytorch_encoders_cpu.txt") == 4 ]] || status=1
  note "the topologies run.sh runs, validated (devices as cpu: this machine has no GPU)"
  for topology in online-sd2-base-1gpu text-encode-1gpu vae-encode-1gpu; do
    for workers in 1 2; do
      [[ $topology == online-sd2-base-1gpu && $workers == 1 ]] && continue
      if [[ -x $bin/latentflow ]]; then
        "$bin/latentflow" validate "$root/bench/gpu/$topology.toml" --workers "$workers" \
          --set 'job.devices=["cpu","cpu"]' >"$out/validate-$topology-w$workers.txt" 2>&1 \
          && echo "$topology --workers $workers: valid" | tee -a "$out/log.txt" \
          || { echo "$topology --workers $workers: INVALID (validate-$topology-w$workers.txt)" | tee -a "$out/log.txt"; status=1; }
      fi
    done
  done
  note "what the binaries link (cudarc opens the CUDA libraries at run time)"
  found=0
  for f in "$bin"/*; do
    [[ -f $f && -x $f ]] || continue
    found=1
    echo "$(basename "$f"): $(readelf -d "$f" 2>/dev/null | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')" \
      | tee -a "$out/log.txt"
  done
  ((found)) || echo "no binaries in $bin (bench/gpu/build.sh builds them)" | tee -a "$out/log.txt"
  echo "dry run: status $status" | tee -a "$out/log.txt"
  exit $status
fi

# CUDA libraries: PyTorch's pip packages (cuBLAS, cuRAND, NVRTC, runtime, cuDNN) and the driver.
site=$(python3 -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null || true)
libs=$( { [[ -n $site ]] && find "$site/nvidia" -name 'lib*.so*' -printf '%h\n'; } 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libs}/usr/lib/x86_64-linux-gnu:/usr/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  for l in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libcudnn.so.9; do
    printf '%s: ' "$l"; ldconfig -p | grep -q "$l" && echo system || (IFS=:; for d in $LD_LIBRARY_PATH; do [[ -e $d/$l ]] && { echo "$d"; break; }; done) || echo missing
  done
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1 | tail -1
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# GPU memory in use, sampled every 200 ms while the benchmarks run.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$out/gpu-memory-mib.txt" 2>/dev/null &
smi=$!

cd "$root"
step kernels 90 "$bin/gpu_vs_cpu" --include-ignored --test-threads=1 --nocapture
step nvrtc 60 "$bin/nvrtc_compile" --nocapture
step parity_models 60 "$bin/model_parity" --test-threads=1 --nocapture
step parity_training 60 "$bin/training_parity" one_training_step_end_to_end encoder_rows_reach --nocapture
if [[ -x $bin/nccl ]]; then
  step nccl 60 "$bin/nccl" --include-ignored --nocapture
  step nccl_training_step 60 "$bin/nccl_step" --include-ignored --nocapture
fi
step latentflow_step 180 "$bin/gpu_train_step" --batches 8,32,64,128 --steps 4 --warmup 2 --config-out "$out/unet_config.json"
if [[ -s $out/unet_config.json ]]; then
  step pytorch_step 120 python3 "$root/bench/gpu/pytorch_step.py" --config "$out/unet_config.json" --batches 8,32,64,128 --steps 4 --warmup 2
fi
# The same pieces of the step timed alone on both sides (CUDA events), and PyTorch's kernel
# launches per step: where any remaining gap is.
step components 90 "$bin/gpu_components" --batch 32 --iters 5
step_config=()
[[ -s $out/unet_config.json ]] && step_config=(--step-config "$out/unet_config.json")
step pytorch_components 90 python3 "$root/bench/gpu/pytorch_components.py" --batch 32 --iters 5 "${step_config[@]}"
# The encoders alone, warm, next to PyTorch's (issue 27), then the simplest encoder topologies on
# one GPU with one and with two workers (one worker crashed with CUDA_ERROR_INVALID_CONTEXT).
mkdir -p "$out/encoders"
step encoders 90 "$bin/gpu_encoders" --vae-batch 64 --text-batch 256 --iters 5 --config-dir "$out/encoders"
if [[ -s $out/encoders/text_config.json ]]; then
  step pytorch_encoders 90 python3 "$root/bench/gpu/pytorch_encoders.py" --config-dir "$out/encoders"
fi
for workers in 1 2; do
  for encoder in text vae; do
    mkdir -p "$out/encode-$encoder-w$workers" && cd "$out/encode-$encoder-w$workers"
    step "encode_${encoder}_w$workers" 60 "$bin/latentflow" run "$root/bench/gpu/$encoder-encode-1gpu.toml" \
      --workers "$workers" --profile "$out/encode-$encoder-w$workers-profile.json"
    cd "$root"
  done
done
mkdir -p "$out/online" && cd "$out/online"
step online 180 "$bin/latentflow" run "$root/bench/gpu/online-sd2-base-1gpu.toml" --workers 2 --profile "$out/online-profile.json"
cd "$root"
kill "$smi" 2>/dev/null

python3 "$root/bench/gpu/summarize.py" "$out" | tee "$out/summary.md"
exit $status

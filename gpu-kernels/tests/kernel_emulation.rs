//! Our CUDA kernels run on the CPU, without a GPU: `tests/emulate/*.cpp` compile the kernels' own
//! source (`src/cuda/`) for the host with `host_cuda.h` (each block's threads as host threads
//! meeting at barriers, warp shuffles through slots) and compare the results with
//! double-precision references. `attention_tc.cpp` runs the tensor-core attention kernels
//! (`attention_tc_*`) with `mma.sync` emulated warp-wide from the PTX fragment layouts;
//! `group_norm.cpp` and `layer_norm.cpp` run the norms forward and backward. This catches indexing, masking
//! and reduction mistakes here; `gpu_vs_cpu.rs` checks the real instructions on a GPU.

use std::path::Path;
use std::process::Command;

/// Builds `tests/emulate/<name>.cpp` with the host C++ compiler (`CXX`, default `c++`), runs
/// it and returns its report; panics with the report when a case is out of tolerance.
fn run_emulation(name: &str) -> String {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let binary = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("emulate_{name}"));
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let built = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-pthread", "-w", "-I"])
        .arg(crate_dir.join("src/cuda"))
        .arg(crate_dir.join(format!("tests/emulate/{name}.cpp")))
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{compiler}` (set CXX): {e}"));
    assert!(built.status.success(), "{name}.cpp did not build:\n{}", String::from_utf8_lossy(&built.stderr));
    let run = Command::new(&binary).output().expect("run the emulation");
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{report}");
    assert!(run.status.success(), "{name}: the kernels differ from the reference:\n{report}");
    report
}

#[test]
fn tensor_core_attention_kernels_match_the_reference_under_emulation() {
    assert!(run_emulation("attention_tc").contains("all cases within bf16 tolerance"));
}

#[test]
fn group_norm_kernels_match_the_reference_under_emulation() {
    assert!(run_emulation("group_norm").contains("all cases within tolerance"));
}

#[test]
fn layer_norm_kernels_match_the_reference_under_emulation() {
    assert!(run_emulation("layer_norm").contains("all cases within tolerance"));
}

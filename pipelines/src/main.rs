//! The `latentflow` command line.

fn main() {
    std::process::exit(latentflow_pipelines::cli::main());
}

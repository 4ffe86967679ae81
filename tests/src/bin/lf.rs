//! The `latentflow` command line, built here for the end-to-end tests.

fn main() {
    std::process::exit(latentflow_pipelines::cli::main());
}

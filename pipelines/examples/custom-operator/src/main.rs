//! `latentflow-filtered`: latentflow's command line with `caption_filter` registered.

fn main() {
    let catalog = match latentflow_example_custom_operator::catalog() {
        Ok(catalog) => catalog,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(latentflow_pipelines::cli::EXIT_USAGE);
        }
    };
    std::process::exit(latentflow_pipelines::cli::main_with_catalog(catalog));
}

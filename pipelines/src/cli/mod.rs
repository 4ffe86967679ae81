//! The `latentflow` command line: `run`, `validate`, `operators` and `demo-data`.
//!
//! Exit codes: 0 success, 1 runtime failure, 2 usage or topology error, 130 interrupted.

mod allocator;
mod args;
mod demo_data;
mod operators;
mod run;

use std::ffi::OsString;

use clap::Parser;
use latentflow_engine::Catalog;

pub use args::{Cli, Command, DemoDataArgs, RunArgs, TopologyArgs, ValidateArgs};

/// Success.
pub const EXIT_OK: i32 = 0;
/// A runtime failure.
pub const EXIT_FAILURE: i32 = 1;
/// A usage or topology error.
pub const EXIT_USAGE: i32 = 2;
/// Stopped by Ctrl-C.
pub const EXIT_INTERRUPTED: i32 = 130;

/// Runs the command line with the process's arguments and returns the exit code.
pub fn main() -> i32 {
    main_with(std::env::args_os())
}

/// Runs the command line with the process's arguments over `catalog` instead of latentflow's
/// own operators: a user's binary that adds operators of its own
/// (`latentflow_operators::registry().with(...)`) keeps every command and flag of `latentflow`.
///
/// ```no_run
/// // A user's `main`: latentflow's operators and its own.
/// let catalog = latentflow_operators::registry(); // .with(OperatorEntry::of::<MyConfig>())?
/// std::process::exit(latentflow_pipelines::cli::main_with_catalog(catalog));
/// ```
pub fn main_with_catalog(catalog: Catalog) -> i32 {
    run_cli(std::env::args_os(), &catalog)
}

/// Runs the command line with these arguments (the first is the program name).
pub fn main_with<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I) -> i32 {
    run_cli(args, &latentflow_operators::registry())
}

/// The command line over `catalog`.
fn run_cli<I: IntoIterator<Item = T>, T: Into<OsString> + Clone>(args: I, catalog: &Catalog) -> i32 {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
        }
    };
    init_logging(cli.quiet);
    allocator::keep_large_blocks_on_mmap();
    match cli.command {
        Command::Run(args) => run::run(&args, catalog),
        Command::Validate(args) => run::validate(&args, catalog),
        Command::Operators => operators::list(catalog),
        Command::DemoData(args) => demo_data::write(&args.out, args.n, args.seed),
    }
}

fn init_logging(quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// latentflow: a streaming dataflow engine for pre-training latent diffusion models.
#[derive(Debug, Parser)]
#[command(name = "latentflow", version, about)]
pub struct Cli {
    /// Only log warnings and errors.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a topology.
    Run(RunArgs),
    /// Check a topology and list every problem (exit 0 when valid, 2 otherwise).
    Validate(ValidateArgs),
    /// List the operator types, their inputs, outputs and keys.
    Operators,
    /// Write procedural captioned demo images as parquet (img2dataset layout).
    DemoData(DemoDataArgs),
}

/// `latentflow demo-data`.
#[derive(Debug, Args)]
pub struct DemoDataArgs {
    /// The parquet file to write.
    #[arg(long, value_name = "FILE.parquet")]
    pub out: PathBuf,
    /// Number of rows.
    #[arg(long, default_value_t = 1000)]
    pub n: u64,
    /// Seed (row `k` of a seed is always the same image).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A topology file and overrides.
#[derive(Debug, Args)]
pub struct TopologyArgs {
    /// The topology file (TOML).
    pub topology: PathBuf,
    /// Override a key, e.g. `--set nodes.read.count=2000` or `--set job.seed=1` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// `latentflow validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The topology and overrides.
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Check for this many worker threads per process (batch sizes, placements).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    /// Check for this many processes.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
}

/// `latentflow run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The topology and overrides.
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Worker threads per process.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub workers: u16,
    /// Cluster mode: number of processes.
    #[arg(long, requires_all = ["process_id", "hostfile"])]
    pub processes: Option<usize>,
    /// Cluster mode: this process's index, 0..processes.
    #[arg(long, requires = "processes")]
    pub process_id: Option<usize>,
    /// Cluster mode: a file of `host:port` lines, one per process, in process order.
    #[arg(long, requires = "processes")]
    pub hostfile: Option<PathBuf>,
    /// Write the profile (per-operator counters) as JSON here.
    #[arg(long, value_name = "FILE.json")]
    pub profile: Option<PathBuf>,
    /// Write a Chrome trace of operator activity here (open it in Perfetto).
    #[arg(long, value_name = "FILE.json")]
    pub trace: Option<PathBuf>,
}

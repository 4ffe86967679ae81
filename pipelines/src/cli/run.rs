//! `latentflow run` and `latentflow validate`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use latentflow_engine::{Catalog, ClusterOptions, EngineError, Plan, ProgressMode, RunOptions};

use super::{RunArgs, TopologyArgs, ValidateArgs, EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE};

/// Loads and checks the topology, printing every problem on failure.
fn load(args: &TopologyArgs, catalog: &Catalog) -> Result<Plan, i32> {
    Plan::from_file(&args.topology, &args.overrides, catalog).map_err(|errors| {
        for e in &errors.0 {
            eprintln!("{e}");
        }
        let n = errors.0.len();
        eprintln!("error: {} has {n} problem{}", args.topology.display(), if n == 1 { "" } else { "s" });
        EXIT_USAGE
    })
}

/// `latentflow validate`: exit 0 when valid, 2 with every error listed (also what only a
/// number of workers and processes decides: the sources' share of a trainer's global batch).
pub fn validate(validate: &ValidateArgs, catalog: &Catalog) -> i32 {
    let args = &validate.topology;
    match load(args, catalog) {
        Ok(plan) => {
            let (threads, processes) = (usize::from(validate.workers), validate.processes.max(1));
            let batches = match plan.source_batches(threads, processes) {
                Ok(batches) => batches,
                Err(errors) => {
                    for e in &errors {
                        eprintln!("{}: {e}", args.topology.display());
                    }
                    let n = errors.len();
                    eprintln!("error: {} has {n} problem{}", args.topology.display(), if n == 1 { "" } else { "s" });
                    return EXIT_USAGE;
                }
            };
            println!(
                "{}: valid, {} nodes (on {threads} worker(s) x {processes} process(es))",
                args.topology.display(),
                plan.nodes.len()
            );
            for (i, batch) in batches.iter().enumerate() {
                if let Some(b) = batch {
                    println!("  {} emits {b} rows per epoch on each of its workers", plan.nodes[i].id);
                }
            }
            for node in &plan.nodes {
                let inputs: Vec<&str> = node.inputs.iter().map(|&i| plan.nodes[i].id.as_str()).collect();
                let from = if inputs.is_empty() { String::new() } else { format!(" <- {}", inputs.join(", ")) };
                println!("  {} ({}, {}){from}: {}", node.id, node.type_name, node.placement, node.schema);
            }
            EXIT_OK
        }
        Err(code) => code,
    }
}

/// `latentflow run`.
pub fn run(args: &RunArgs, catalog: &Catalog) -> i32 {
    let plan = match load(&args.topology, catalog) {
        Ok(plan) => plan,
        Err(code) => return code,
    };
    match execute(&plan, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            let usage = e.downcast_ref::<EngineError>().is_some_and(|e| matches!(e, EngineError::Options(_)));
            if usage {
                EXIT_USAGE
            } else {
                EXIT_FAILURE
            }
        }
    }
}

fn execute(plan: &Plan, args: &RunArgs) -> anyhow::Result<i32> {
    let cluster = match (args.processes, args.process_id, &args.hostfile) {
        (Some(n), Some(id), Some(hostfile)) => Some(ClusterOptions::from_hostfile(hostfile, n, id)?),
        _ => None,
    };
    let process = cluster.as_ref().map(|c| (c.process_id, c.processes));
    let options = RunOptions {
        workers: usize::from(args.workers),
        cluster,
        trace: args.trace.is_some(),
        progress: ProgressMode::Auto,
        handle_interrupts: true,
    };
    tracing::info!(job = %plan.job.name, topology = %plan.origin, workers = options.workers, "starting");
    let report = latentflow_engine::run(plan, &options)?;
    print!("{}", report.profile.table());
    if let Some(path) = &args.profile {
        let path = per_process(path, process);
        report.profile.write_json(&path)?;
        tracing::info!("profile written to {}", path.display());
    }
    if let (Some(path), Some(trace)) = (&args.trace, &report.trace) {
        let path = per_process(path, process);
        trace.write(&path).with_context(|| "writing the trace")?;
        tracing::info!(
            "trace written to {} ({} spans; open it in https://ui.perfetto.dev)",
            path.display(),
            trace.len()
        );
        if trace.dropped() > 0 {
            tracing::warn!(
                "the trace is full: it kept the first {} spans and dropped {}",
                trace.len(),
                trace.dropped()
            );
        }
    }
    if report.interrupted {
        eprintln!("interrupted: in-flight work was drained and every operator flushed");
        return Ok(EXIT_INTERRUPTED);
    }
    Ok(EXIT_OK)
}

/// The error and its causes, each cause once: most of our errors already name their cause in
/// their own text, and printing the chain as well said everything two or three times.
fn describe(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// In cluster mode each process writes its own file: `profile.json` becomes `profile.p1.json`.
fn per_process(path: &Path, process: Option<(usize, usize)>) -> PathBuf {
    match process {
        Some((id, n)) if n > 1 => {
            let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let name = match path.extension() {
                Some(ext) => format!("{stem}.p{id}.{}", ext.to_string_lossy()),
                None => format!("{stem}.p{id}"),
            };
            path.with_file_name(name)
        }
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_printed_once() {
        let io = std::io::Error::new(std::io::ErrorKind::IsADirectory, "Is a directory");
        let error = latentflow_engine::EngineError::Io { path: "out/p.json".into(), source: io };
        assert_eq!(describe(&anyhow::Error::new(error)), "out/p.json: Is a directory");
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let wrapped = anyhow::Error::new(io).context("writing the trace");
        assert_eq!(describe(&wrapped), "writing the trace: gone");
    }

    #[test]
    fn cluster_outputs_are_named_per_process() {
        assert_eq!(per_process(Path::new("out/p.json"), Some((1, 2))), PathBuf::from("out/p.p1.json"));
        assert_eq!(per_process(Path::new("p.json"), Some((0, 1))), PathBuf::from("p.json"));
        assert_eq!(per_process(Path::new("p.json"), None), PathBuf::from("p.json"));
    }
}

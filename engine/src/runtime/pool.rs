//! The job's one CPU thread budget (`job.cpu_threads`).
//!
//! Map operators run as jobs on a rayon pool, and the stages' own kernels (the fused attention
//! and norms, candle's matrix products) parallelise with rayon too, from their stage threads.
//! Two pools side by side (a map pool of `cpu_threads` plus rayon's global pool of one thread
//! per core) oversubscribed every core about twice. So the job sizes rayon's *global* pool to
//! `cpu_threads` and runs its map jobs there: everything parallel shares one set of threads. A
//! stage thread that calls into rayon hands the work to that pool and waits, holding no pool
//! thread while it waits (a stage blocked in a collective cannot starve the pool).
//!
//! The global pool can be sized only once per process. The binary runs one job per process;
//! where a process runs several (tests, a Rust program running pipelines one after another),
//! a job whose budget differs from the global pool's size gets a pool of its own for its map
//! operators, as before.

use crate::error::EngineError;

/// Where a job's map operators run.
pub(crate) enum JobPool {
    /// Rayon's global pool, sized to the job's budget.
    Global,
    /// A pool of the job's own (the global one had another size already).
    Own(rayon::ThreadPool),
}

impl JobPool {
    /// The pool for a budget of `threads`.
    pub(crate) fn new(threads: usize) -> Result<JobPool, EngineError> {
        let name = |i: usize| format!("lf-pool-{i}");
        // Fails when the global pool exists already; its size decides below.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(name).build_global();
        if rayon::current_num_threads() == threads && rayon::current_thread_index().is_none() {
            return Ok(JobPool::Global);
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(name)
            .build()
            .map(JobPool::Own)
            .map_err(|e| EngineError::Options(format!("cannot start the thread pool: {e}")))
    }

    /// Runs `job` on the pool.
    pub(crate) fn spawn(&self, job: impl FnOnce() + Send + 'static) {
        match self {
            JobPool::Global => rayon::spawn(job),
            JobPool::Own(pool) => pool.spawn(job),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_jobs_run_on_a_pool_of_the_budgets_size() {
        for threads in [1, 3] {
            let pool = JobPool::new(threads).unwrap();
            let (tx, rx) = std::sync::mpsc::channel();
            pool.spawn(move || tx.send(rayon::current_num_threads()).unwrap());
            assert_eq!(rx.recv().unwrap(), threads);
        }
    }
}

//! Rows per epoch. A trainer's `global_batch_size` is what every epoch brings, whatever the
//! number of workers and processes: a source that leaves its `batch_size` out emits its share
//! of it on each of its workers, and one that sets it is checked against it, before the job
//! starts (or by `latentflow validate --workers N --processes P`), never at the first epoch.

use super::Plan;
use crate::operator::OperatorKind;

impl Plan {
    /// Each node's rows per epoch on each of its workers, by node index (`None` for nodes that
    /// are not sources, and for sources left to their own default when nothing trains), for
    /// `threads` workers per process over `processes` processes. Every mismatch is reported,
    /// with the numbers to set.
    ///
    /// ```
    /// use latentflow_engine::{Catalog, Plan};
    /// # fn demo(catalog: &Catalog, text: &str) {
    /// let plan = Plan::from_toml("t.toml", text, &[], catalog).unwrap();
    /// // global_batch_size = 16 and a source without batch_size on 2 x 2 workers: 4 rows each.
    /// assert_eq!(plan.source_batches(2, 2).unwrap()[0], Some(4));
    /// # }
    /// ```
    pub fn source_batches(&self, threads: usize, processes: usize) -> Result<Vec<Option<usize>>, Vec<String>> {
        let devices = self.job.devices.len();
        let workers = |i: usize| self.nodes[i].placement.workers(threads, processes, devices).len();
        let sources: Vec<usize> =
            (0..self.nodes.len()).filter(|&i| self.nodes[i].kind == OperatorKind::Source).collect();
        let mut batches: Vec<Option<usize>> = (0..self.nodes.len())
            .map(|i| sources.contains(&i).then(|| self.nodes[i].spec.source_batch_size()).flatten())
            .collect();
        let trainers: Vec<(usize, usize)> =
            self.nodes.iter().enumerate().filter_map(|(i, n)| Some((i, n.spec.global_batch_size()?))).collect();
        let Some(&(trainer, global)) = trainers.first() else { return Ok(batches) };
        let trainer_id = &self.nodes[trainer].id;
        let layout = format!("{threads} worker(s) x {processes} process(es)");
        let mut errors = Vec::new();
        for &(other, g) in &trainers[1..] {
            if g != global {
                errors.push(format!(
                    "nodes `{trainer_id}` and `{}` train with global_batch_size {global} and {g}: one job has one step size",
                    self.nodes[other].id
                ));
            }
        }
        let (set, free): (Vec<usize>, Vec<usize>) = sources.iter().partition(|&&i| batches[i].is_some());
        let fixed: usize = set.iter().map(|&i| batches[i].unwrap_or(0) * workers(i)).sum();
        let described = |list: &[usize]| {
            list.iter()
                .map(|&i| {
                    format!("`{}`: batch_size {} x {} worker(s)", self.nodes[i].id, batches[i].unwrap_or(0), workers(i))
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        match free.as_slice() {
            [] if fixed != global => {
                let advice = match set.as_slice() {
                    [one] if global % workers(*one) == 0 => format!(
                        "set batch_size = {} on `{}`, or leave it out so the plan derives it",
                        global / workers(*one),
                        self.nodes[*one].id
                    ),
                    _ => "leave batch_size out of one source so the plan derives it".to_string(),
                };
                errors.push(format!(
                    "`{trainer_id}` has global_batch_size {global}, but the sources bring {fixed} rows per epoch on \
                     {layout} ({}): {advice}",
                    described(&set)
                ));
            }
            [] => {}
            [one] => {
                let w = workers(*one);
                let id = &self.nodes[*one].id;
                if fixed >= global {
                    errors.push(format!(
                        "`{trainer_id}` has global_batch_size {global}, and the other sources already bring {fixed} rows \
                         per epoch ({}), leaving none for `{id}`",
                        described(&set)
                    ));
                } else if (global - fixed) % w != 0 {
                    let share = global - fixed;
                    errors.push(format!(
                        "`{trainer_id}`'s global_batch_size {global} leaves {share} rows per epoch for source `{id}`, \
                         which does not split evenly over its {w} workers ({layout}): use a global_batch_size that makes \
                         it a multiple of {w} (such as {}), or a worker count that divides it",
                        fixed + share.next_multiple_of(w)
                    ));
                } else {
                    batches[*one] = Some((global - fixed) / w);
                }
            }
            many => errors.push(format!(
                "sources {} all leave batch_size to the plan; set it on all of them but one",
                many.iter().map(|&i| format!("`{}`", self.nodes[i].id)).collect::<Vec<_>>().join(", ")
            )),
        }
        if errors.is_empty() {
            Ok(batches)
        } else {
            Err(errors)
        }
    }
}

//! Which rows of a stream are done when they finish out of order (downloads complete in any
//! order): everything below `next` is done, plus the rows in `done_above`. That pair is the
//! source's position, so a resumed run fetches exactly the rows that were not done.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Rows done so far.
///
/// ```
/// use latentflow_operators::url_source::frontier::Frontier;
/// let mut f = Frontier::default();
/// f.mark(1);
/// f.mark(3);
/// assert_eq!((f.next, f.done_above.len()), (0, 2));
/// f.mark(0);
/// assert_eq!((f.next, f.done_above.len()), (2, 1));
/// assert!(f.is_done(3) && !f.is_done(2));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frontier {
    /// Every row below this is done.
    #[serde(rename = "row")]
    pub next: u64,
    /// Rows above `next` that are done.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub done_above: BTreeSet<u64>,
}

impl Frontier {
    /// Row `row` is done.
    pub fn mark(&mut self, row: u64) {
        if row < self.next {
            return;
        }
        self.done_above.insert(row);
        while self.done_above.remove(&self.next) {
            self.next += 1;
        }
    }

    /// True when `row` is done.
    pub fn is_done(&self, row: u64) -> bool {
        row < self.next || self.done_above.contains(&row)
    }
}

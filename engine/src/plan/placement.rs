//! Which workers run a node.

use std::fmt;
use std::str::FromStr;

/// Where a node's instances run. Every worker builds the same graph; batches for a restricted
/// node are routed to the workers that run it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    /// Every worker (the default).
    #[default]
    All,
    /// Only workers that own a device (`job.devices`): thread `i < devices.len()` of each process.
    Gpu,
    /// Only the workers that own `job.devices[N]` (thread `N` of each process): puts encoders and
    /// the trainer on different devices, as the reference puts them on different GPU kinds.
    Device(usize),
}

impl FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Placement::All),
            "gpu" => Ok(Placement::Gpu),
            other => match other.strip_prefix("device:").map(str::parse) {
                Some(Ok(n)) => Ok(Placement::Device(n)),
                _ => Err(format!("unknown placement `{other}`; use \"all\", \"gpu\" or \"device:N\"")),
            },
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::All => f.write_str("all"),
            Placement::Gpu => f.write_str("gpu"),
            Placement::Device(n) => write!(f, "device:{n}"),
        }
    }
}

impl Placement {
    /// The global indices of the workers that run a node with this placement.
    ///
    /// ```
    /// use latentflow_engine::Placement;
    /// // 2 processes x 3 threads, devices owned by threads 0 and 1 of each process.
    /// assert_eq!(Placement::Gpu.workers(3, 2, 2), vec![0, 1, 3, 4]);
    /// assert_eq!(Placement::All.workers(3, 2, 2).len(), 6);
    /// assert_eq!(Placement::Device(1).workers(3, 2, 2), vec![1, 4]);
    /// ```
    pub fn workers(self, threads: usize, processes: usize, devices: usize) -> Vec<usize> {
        (0..threads * processes)
            .filter(|w| match self {
                Placement::All => true,
                Placement::Gpu => w % threads < devices,
                Placement::Device(n) => w % threads == n && n < devices,
            })
            .collect()
    }
}

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
    /// The workers that own `job.devices[A..=B]` (threads `A` to `B` of each process): a group
    /// of devices, such as 6 trainers and 2 encoders on an 8-GPU node (`"devices:0-5"`,
    /// `"devices:6-7"`).
    Devices(usize, usize),
}

impl FromStr for Placement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Placement::All),
            "gpu" => Ok(Placement::Gpu),
            other => {
                let unknown =
                    || format!("unknown placement `{other}`; use \"all\", \"gpu\", \"device:N\" or \"devices:A-B\"");
                if let Some(n) = other.strip_prefix("device:") {
                    return n.parse().map(Placement::Device).map_err(|_| unknown());
                }
                let (a, b) = other.strip_prefix("devices:").and_then(|r| r.split_once('-')).ok_or_else(unknown)?;
                match (a.parse::<usize>(), b.parse::<usize>()) {
                    (Ok(a), Ok(b)) if a <= b => Ok(Placement::Devices(a, b)),
                    (Ok(a), Ok(b)) => {
                        Err(format!("placement `{other}`: the range {a}-{b} is empty; write it low-high"))
                    }
                    _ => Err(unknown()),
                }
            }
        }
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::All => f.write_str("all"),
            Placement::Gpu => f.write_str("gpu"),
            Placement::Device(n) => write!(f, "device:{n}"),
            Placement::Devices(a, b) => write!(f, "devices:{a}-{b}"),
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
    /// // 8 devices per process: trainers on 0-5, encoders on 6-7.
    /// let trainers: Placement = "devices:0-5".parse().unwrap();
    /// assert_eq!(trainers.workers(8, 2, 8), vec![0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]);
    /// assert_eq!("devices:6-7".parse::<Placement>().unwrap().workers(8, 1, 8), vec![6, 7]);
    /// ```
    pub fn workers(self, threads: usize, processes: usize, devices: usize) -> Vec<usize> {
        (0..threads * processes)
            .filter(|w| match self {
                Placement::All => true,
                Placement::Gpu => w % threads < devices,
                Placement::Device(n) => w % threads == n && n < devices,
                Placement::Devices(a, b) => (a..=b).contains(&(w % threads)) && w % threads < devices,
            })
            .collect()
    }
}

//! The shared-memory transport: every rank of the group is a thread of this process. Buffers
//! (and objects, [`Collective::exchange_objects`]) move by ownership through one mailbox;
//! nothing is copied or serialised.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use super::{AbortCheck, Collective, CollectiveError, Endpoint, ABORT_POLL};

/// The group's mailbox: `(round, to, from) -> buffer`, and which ranks have left.
struct Hub {
    group: String,
    size: usize,
    state: Mutex<State>,
    changed: Condvar,
    abort: AbortCheck,
}

/// What one rank hands another in a round.
enum Parcel {
    Bytes(Vec<u8>),
    Object(Box<dyn Any + Send>),
}

#[derive(Default)]
struct State {
    mail: BTreeMap<(u64, usize, usize), Parcel>,
    /// Ranks whose handle was dropped, with the round they had reached.
    left: BTreeMap<usize, u64>,
}

/// `size` handles sharing one mailbox; `abort` ends a wait when the job failed elsewhere.
pub(crate) fn group(name: &str, size: usize, abort: AbortCheck) -> Vec<Collective> {
    let hub = Arc::new(Hub { group: name.to_string(), size, state: Mutex::default(), changed: Condvar::new(), abort });
    (0..size)
        .map(|rank| {
            Collective::new(name, rank, size, Box::new(LocalEndpoint { hub: Arc::clone(&hub), rank, round: 0 }))
        })
        .collect()
}

struct LocalEndpoint {
    hub: Arc<Hub>,
    rank: usize,
    /// The next round this rank will start (what its peers may still wait for after it leaves).
    round: u64,
}

impl Endpoint for LocalEndpoint {
    fn exchange(&mut self, round: u64, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        let incoming = self.swap(round, outgoing.into_iter().map(Parcel::Bytes).collect())?;
        incoming
            .into_iter()
            .enumerate()
            .map(|(from, parcel)| match parcel {
                Parcel::Bytes(bytes) => Ok(bytes),
                Parcel::Object(_) => Err(self.out_of_step(from, round)),
            })
            .collect()
    }

    fn exchange_objects(
        &mut self,
        round: u64,
        outgoing: Vec<Box<dyn Any + Send>>,
    ) -> Option<Result<Vec<Box<dyn Any + Send>>, CollectiveError>> {
        let incoming = match self.swap(round, outgoing.into_iter().map(Parcel::Object).collect()) {
            Ok(incoming) => incoming,
            Err(e) => return Some(Err(e)),
        };
        Some(
            incoming
                .into_iter()
                .enumerate()
                .map(|(from, parcel)| match parcel {
                    Parcel::Object(object) => Ok(object),
                    Parcel::Bytes(_) => Err(self.out_of_step(from, round)),
                })
                .collect(),
        )
    }

    fn moves_objects(&self) -> bool {
        true
    }
}

impl LocalEndpoint {
    /// Hands `outgoing[r]` to rank `r` and waits for one parcel from every rank.
    fn swap(&mut self, round: u64, outgoing: Vec<Parcel>) -> Result<Vec<Parcel>, CollectiveError> {
        let hub = &self.hub;
        let rank = self.rank;
        self.round = round + 1;
        let mut state = hub.state.lock().expect("collective lock");
        for (to, buffer) in outgoing.into_iter().enumerate() {
            state.mail.insert((round, to, rank), buffer);
        }
        hub.changed.notify_all();
        loop {
            let arrived = state.mail.range((round, rank, 0)..(round, rank + 1, 0)).count();
            if arrived == hub.size {
                let incoming =
                    (0..hub.size).map(|from| state.mail.remove(&(round, rank, from)).expect("arrived")).collect();
                return Ok(incoming);
            }
            let gone: Vec<usize> = (0..hub.size)
                .filter(|from| !state.mail.contains_key(&(round, rank, *from)))
                .filter(|from| state.left.get(from).is_some_and(|&reached| reached <= round))
                .collect();
            if !gone.is_empty() {
                return Err(CollectiveError::Disconnected {
                    group: hub.group.clone(),
                    rank,
                    reason: format!("rank(s) {gone:?} left the group before round {round}"),
                });
            }
            if (hub.abort)() {
                return Err(CollectiveError::Aborted { group: hub.group.clone(), rank });
            }
            state = hub.changed.wait_timeout(state, ABORT_POLL).expect("collective lock").0;
        }
    }

    /// Rank `from` sent bytes where objects were exchanged, or the other way round.
    fn out_of_step(&self, from: usize, round: u64) -> CollectiveError {
        CollectiveError::Mismatch {
            group: self.hub.group.clone(),
            rank: self.rank,
            message: format!("rank {from} called a different collective in round {round}"),
        }
    }
}

impl Drop for LocalEndpoint {
    fn drop(&mut self) {
        if let Ok(mut state) = self.hub.state.lock() {
            state.left.insert(self.rank, self.round);
        }
        self.hub.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn a_rank_that_leaves_ends_its_peers_wait() {
        let mut handles = group("g", 2, Arc::new(|| false));
        let mut survivor = handles.remove(0);
        let waiter = std::thread::spawn(move || survivor.barrier().map_err(|e| e.to_string()));
        drop(handles); // rank 1 never calls
        let err = waiter.join().unwrap().unwrap_err();
        assert!(err.contains("rank(s) [1] left the group before round 0"), "{err}");
    }

    #[test]
    fn a_failed_job_aborts_the_wait() {
        let failed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&failed);
        let mut handles = group("g", 2, Arc::new(move || flag.load(Ordering::SeqCst)));
        let mut survivor = handles.remove(0);
        let waiter = std::thread::spawn(move || survivor.barrier().map_err(|e| e.to_string()));
        std::thread::sleep(std::time::Duration::from_millis(150));
        failed.store(true, Ordering::SeqCst);
        let err = waiter.join().unwrap().unwrap_err();
        assert!(err.contains("aborted at rank 0"), "{err}");
        drop(handles);
    }
}

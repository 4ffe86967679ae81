//! The transport across processes: flat byte buffers over timely's own channels. A small
//! operator on each worker owns the channel; the rank's thread hands it outgoing buffers and
//! gets back what arrived. Peers in this process receive the buffer itself (timely moves it
//! without serialising); peers in other processes get its bytes behind a 32-byte header.

use std::collections::BTreeMap;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use timely::communication::{Bytesable, Pull, Push};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::Scope;
use timely::scheduling::SyncActivator;

use super::{AbortCheck, Collective, CollectiveError, Endpoint, ABORT_POLL};

/// One buffer from rank `from` to rank `to` in exchange `round`.
pub(crate) struct Message {
    round: u64,
    from: u64,
    to: u64,
    payload: Vec<u8>,
}

const HEADER: usize = 32;

impl Bytesable for Message {
    fn from_bytes(bytes: timely::bytes::arc::Bytes) -> Self {
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let len = word(3) as usize;
        Message { round: word(0), from: word(1), to: word(2), payload: bytes[HEADER..HEADER + len].to_vec() }
    }

    fn length_in_bytes(&self) -> usize {
        // Padded to 8 bytes, as timely's own containers are.
        HEADER + self.payload.len().div_ceil(8) * 8
    }

    fn into_bytes<W: std::io::Write>(&self, writer: &mut W) {
        let len = self.payload.len();
        for word in [self.round, self.from, self.to, len as u64] {
            writer.write_all(&word.to_le_bytes()).expect("write collective header");
        }
        writer.write_all(&self.payload).expect("write collective payload");
        writer.write_all(&[0u8; 8][..len.div_ceil(8) * 8 - len]).expect("write collective padding");
    }
}

/// Builds the collective operator for group `name` on this worker. Every worker builds one (the
/// graph must be the same everywhere); `members` are the global worker indices of the ranks, and
/// the handle comes back only on a member.
pub(crate) fn build(scope: Scope<'_, u64>, name: &str, members: &[usize], abort: AbortCheck) -> Option<Collective> {
    let worker = scope.worker();
    let builder = OperatorBuilder::new(format!("collective {name}"), scope);
    let info = builder.operator_info();
    let identifier = worker.new_identifier();
    let (mut pushers, mut puller) = worker.allocate::<Message>(identifier, info.address.clone());
    let rank = members.iter().position(|&w| w == worker.index());
    let link = rank.map(|_| {
        let (request_tx, request_rx) = crossbeam_channel::unbounded::<Message>();
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded::<Message>();
        let activator = worker.sync_activator_for(info.address.to_vec());
        ((request_tx, reply_rx, activator), (request_rx, reply_tx))
    });
    let (endpoint_side, operator_side) = match link {
        Some((e, o)) => (Some(e), Some(o)),
        None => (None, None),
    };
    let workers = members.to_vec();
    builder.build_reschedule(move |_caps| {
        move |_frontiers| {
            let Some((requests, replies)) = operator_side.as_ref() else {
                return false; // not a member: nothing will ever arrive
            };
            let mut touched = Vec::new();
            let mut open = true;
            loop {
                match requests.try_recv() {
                    Ok(message) => {
                        let target = workers[message.to as usize];
                        pushers[target].send(message);
                        touched.push(target);
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            touched.sort_unstable();
            touched.dedup();
            for target in touched {
                pushers[target].done();
            }
            while let Some(message) = puller.recv() {
                let _ = replies.send(message);
            }
            open
        }
    });
    let (requests, replies, activator) = endpoint_side?;
    let rank = rank.expect("a member");
    let endpoint = NetworkEndpoint {
        group: name.to_string(),
        rank,
        size: members.len(),
        requests,
        replies,
        activator,
        arrived: BTreeMap::new(),
        abort,
    };
    Some(Collective::new(name, rank, members.len(), Box::new(endpoint)))
}

struct NetworkEndpoint {
    group: String,
    rank: usize,
    size: usize,
    requests: Sender<Message>,
    replies: Receiver<Message>,
    activator: SyncActivator,
    /// Buffers that arrived for rounds not collected yet, by `(round, from)`.
    arrived: BTreeMap<(u64, usize), Vec<u8>>,
    abort: AbortCheck,
}

impl NetworkEndpoint {
    fn lost(&self, reason: &str) -> CollectiveError {
        CollectiveError::Disconnected { group: self.group.clone(), rank: self.rank, reason: reason.to_string() }
    }
}

impl Drop for NetworkEndpoint {
    fn drop(&mut self) {
        // Closing the request channel lets the operator finish, so the dataflow can end.
        let (closed, _) = crossbeam_channel::bounded(0);
        drop(std::mem::replace(&mut self.requests, closed));
        let _ = self.activator.activate();
    }
}

impl Endpoint for NetworkEndpoint {
    fn exchange(&mut self, round: u64, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, CollectiveError> {
        for (to, payload) in outgoing.into_iter().enumerate() {
            if to == self.rank {
                self.arrived.insert((round, to), payload);
                continue;
            }
            let message = Message { round, from: self.rank as u64, to: to as u64, payload };
            self.requests.send(message).map_err(|_| self.lost("this worker's collective operator ended"))?;
        }
        self.activator.activate().map_err(|_| self.lost("this worker has shut down"))?;
        loop {
            if self.arrived.range((round, 0)..(round + 1, 0)).count() == self.size {
                let incoming =
                    (0..self.size).map(|from| self.arrived.remove(&(round, from)).expect("arrived")).collect();
                return Ok(incoming);
            }
            match self.replies.recv_timeout(ABORT_POLL) {
                Ok(message) => {
                    self.arrived.insert((message.round, message.from as usize), message.payload);
                }
                Err(RecvTimeoutError::Timeout) if (self.abort)() => {
                    return Err(CollectiveError::Aborted { group: self.group.clone(), rank: self.rank });
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(self.lost("this worker's collective operator ended")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_bytes() {
        let message = Message { round: 7, from: 1, to: 3, payload: vec![1, 2, 3, 4, 5] };
        let mut bytes = Vec::new();
        message.into_bytes(&mut bytes);
        assert_eq!(bytes.len(), message.length_in_bytes());
        assert_eq!(bytes.len(), HEADER + 8);
        let back = Message::from_bytes(timely::bytes::arc::BytesMut::from(bytes).freeze());
        assert_eq!((back.round, back.from, back.to, back.payload), (7, 1, 3, vec![1, 2, 3, 4, 5]));
    }
}

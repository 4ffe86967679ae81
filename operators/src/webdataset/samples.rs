//! Pairing tar members into samples by key, as webdataset defines it: a sample is every member
//! whose path shares the part before the first dot of its last component (`a/b/000123.jpg` and
//! `a/b/000123.txt` are sample `a/b/000123`). Members need not be adjacent: a sample is complete
//! once it has an image and a caption, and waits for them until its shard ends; members that
//! come after their sample was emitted are ignored, so samples are never mixed.
//!
//! The reader's position is `(shard, offset, skip)`: reading resumes at `offset`, the first
//! member of a sample not yet handed out, skipping the samples in `skip` (handed out, with a
//! member at or after `offset`). In a shard whose samples are adjacent `skip` is empty.

use std::collections::{HashMap, HashSet, VecDeque};

use latentflow_engine::{OpContext, OpError};
use serde::{Deserialize, Serialize};

use super::members::{Event, MemberStream, ReadOptions};
use super::shards::Shard;

/// Image member extensions (lower case).
const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// A complete sample.
#[derive(Debug)]
pub struct Sample {
    /// Its webdataset key (`000000123`).
    pub key: String,
    /// The caption (`.txt`), empty when the sample had none.
    pub caption: String,
    /// The encoded image.
    pub image: Vec<u8>,
    /// Offset of its first member in the shard.
    first_start: u64,
    /// Offset of its last member read.
    last_start: u64,
}

#[derive(Debug, Default)]
struct Partial {
    caption: Option<String>,
    image: Option<Vec<u8>>,
    too_large: bool,
    first_start: u64,
    last_start: u64,
}

/// Where the reader stands: see the module docs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderPosition {
    /// Index into this worker's shard list.
    pub shard: usize,
    /// Byte offset in that shard to read from.
    pub offset: u64,
    /// Samples handed out that have members at or after `offset`: `(key, offset of their last
    /// member)`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip: Vec<(String, u64)>,
}

struct OpenShard {
    stream: MemberStream,
    /// Incomplete samples by key, and their keys in order of first member.
    partial: HashMap<String, Partial>,
    order: VecDeque<String>,
    /// Samples complete (handed out or waiting in `ready`): later members of theirs are ignored.
    done: HashSet<String>,
    /// Samples handed out, with the offset of their last member, while that is >= the resume offset.
    handed: Vec<(String, u64)>,
    /// Offset past the last member read.
    offset: u64,
    ended: bool,
}

/// One worker's shards, read in order as a stream of samples.
pub struct SampleReader {
    shards: Vec<Shard>,
    options: ReadOptions,
    client: Option<reqwest::blocking::Client>,
    at: usize,
    open: Option<OpenShard>,
    ready: VecDeque<Sample>,
    /// Where the next open starts (after a seek).
    resume: Option<ReaderPosition>,
}

impl SampleReader {
    /// A reader over `shards`; `client` is needed when any of them is a URL.
    pub fn new(shards: Vec<Shard>, options: ReadOptions, client: Option<reqwest::blocking::Client>) -> Self {
        SampleReader { shards, options, client, at: 0, open: None, ready: VecDeque::new(), resume: None }
    }

    /// The shards, for messages.
    pub fn shard(&self, index: usize) -> Option<&Shard> {
        self.shards.get(index)
    }

    /// Continues from `position` (taken by [`SampleReader::position`]).
    pub fn seek(&mut self, position: ReaderPosition) {
        self.open = None;
        self.ready.clear();
        self.at = position.shard;
        self.resume = Some(position);
    }

    /// Where to continue after the samples handed out so far.
    pub fn position(&self) -> ReaderPosition {
        let Some(open) = &self.open else {
            return self.resume.clone().unwrap_or(ReaderPosition { shard: self.at, offset: 0, skip: Vec::new() });
        };
        let waiting = open.order.iter().filter_map(|k| open.partial.get(k).map(|p| p.first_start));
        let offset = waiting.chain(self.ready.iter().map(|s| s.first_start)).min().unwrap_or(open.offset);
        let skip = open.handed.iter().filter(|(_, last)| *last >= offset).cloned().collect();
        ReaderPosition { shard: self.at, offset, skip }
    }

    /// The next sample, or `None` after the last shard. Shards that cannot be opened, damaged
    /// shards and incomplete samples are rejected on `ctx` and reading goes on.
    pub fn next_sample(&mut self, ctx: &mut OpContext) -> Result<Option<Sample>, OpError> {
        loop {
            if let Some(sample) = self.ready.pop_front() {
                if let Some(open) = self.open.as_mut() {
                    open.handed.push((sample.key.clone(), sample.last_start));
                    // Keep only what a position can still need.
                    if open.handed.len() > 1024 {
                        let offset = self.position().offset;
                        self.open.as_mut().expect("open").handed.retain(|(_, last)| *last >= offset);
                    }
                }
                return Ok(Some(sample));
            }
            if self.open.as_ref().is_some_and(|o| o.ended) {
                self.open = None;
                self.at += 1;
            }
            if self.open.is_none() && !self.open_next(ctx) {
                return Ok(None);
            }
            self.read_one(ctx);
        }
    }

    /// Opens the shard at `self.at` (or the next one that opens); false after the last.
    fn open_next(&mut self, ctx: &mut OpContext) -> bool {
        while self.at < self.shards.len() {
            let resume = self.resume.take().filter(|r| r.shard == self.at).unwrap_or_default();
            let shard = &self.shards[self.at];
            match MemberStream::open(shard, resume.offset, &self.options, self.client.as_ref()) {
                Ok(stream) => {
                    let done: HashSet<String> = resume.skip.iter().map(|(k, _)| k.clone()).collect();
                    self.open = Some(OpenShard {
                        stream,
                        partial: HashMap::new(),
                        order: VecDeque::new(),
                        done,
                        handed: resume.skip,
                        offset: resume.offset,
                        ended: false,
                    });
                    return true;
                }
                Err(failure) => {
                    tracing::warn!(node = ctx.node(), shard = %shard, "{}", failure.message);
                    ctx.reject(shard.to_string(), failure.reason);
                    self.at += 1;
                }
            }
        }
        false
    }

    /// Reads one event of the open shard.
    fn read_one(&mut self, ctx: &mut OpContext) {
        let open = self.open.as_mut().expect("an open shard");
        match open.stream.next() {
            Event::Member(member) => {
                open.offset = member.end;
                let (key, extension) = split_name(&member.name);
                if open.done.contains(key) {
                    return;
                }
                let extension = extension.to_ascii_lowercase();
                let is_image = IMAGE_EXTENSIONS.contains(&extension.as_str());
                if !is_image && extension != "txt" {
                    // `.json`, `.cls` and the like: nothing this source emits. A member that is
                    // only that (no image or caption yet) does not open a sample.
                    if let Some(p) = open.partial.get_mut(key) {
                        p.last_start = member.start;
                    }
                    return;
                }
                let partial = open.partial.entry(key.to_string()).or_insert_with(|| {
                    open.order.push_back(key.to_string());
                    Partial { first_start: member.start, ..Partial::default() }
                });
                partial.last_start = member.start;
                match member.data {
                    None => partial.too_large = true,
                    Some(data) if is_image => {
                        if partial.image.is_none() {
                            partial.image = Some(data);
                        }
                    }
                    Some(data) => partial.caption = Some(String::from_utf8_lossy(&data).trim().to_string()),
                }
                if partial.image.is_some() && partial.caption.is_some() {
                    let key = key.to_string();
                    let partial = open.partial.remove(&key).expect("present");
                    open.order.retain(|k| *k != key);
                    open.done.insert(key.clone());
                    self.ready.push_back(complete(key, partial));
                }
            }
            Event::End => self.flush(ctx, None),
            Event::Damaged { offset, reason, message } => {
                let shard = self.shards[self.at].to_string();
                tracing::warn!(node = ctx.node(), %shard, offset, "{reason}: {message}");
                self.flush(ctx, Some(reason));
                ctx.reject(format!("{shard}@{offset}"), reason);
            }
        }
    }

    /// The shard ended: samples still incomplete are handed out without a caption when they have
    /// an image, else rejected. When it broke (`damage`), they are rejected for that reason: their
    /// missing members may be in the part that could not be read.
    fn flush(&mut self, ctx: &mut OpContext, damage: Option<&'static str>) {
        let open = self.open.as_mut().expect("an open shard");
        open.ended = true;
        let mut without_caption = 0;
        for key in std::mem::take(&mut open.order) {
            let Some(mut partial) = open.partial.remove(&key) else { continue };
            open.done.insert(key.clone());
            if let Some(reason) = damage {
                ctx.reject(crate::keys::key_of(&key).to_string(), reason);
            } else if partial.too_large {
                ctx.reject(crate::keys::key_of(&key).to_string(), "too_large");
            } else if partial.image.is_none() {
                ctx.reject(crate::keys::key_of(&key).to_string(), "no_image");
            } else {
                without_caption += u64::from(partial.caption.is_none());
                partial.caption.get_or_insert_with(String::new);
                self.ready.push_back(complete(key, partial));
            }
        }
        ctx.count("samples_without_caption", without_caption);
    }
}

fn complete(key: String, partial: Partial) -> Sample {
    Sample {
        key,
        caption: partial.caption.unwrap_or_default(),
        image: partial.image.unwrap_or_default(),
        first_start: partial.first_start,
        last_start: partial.last_start,
    }
}

/// `a/b/000123.seg.png` -> (`a/b/000123`, `seg.png`): the key ends at the first dot of the last
/// path component.
pub fn split_name(name: &str) -> (&str, &str) {
    let component = name.rfind('/').map_or(0, |i| i + 1);
    match name[component..].find('.') {
        Some(dot) => (&name[..component + dot], &name[component + dot + 1..]),
        None => (name, ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_end_at_the_first_dot_of_the_last_component() {
        assert_eq!(split_name("000123.jpg"), ("000123", "jpg"));
        assert_eq!(split_name("a.b/000123.seg.png"), ("a.b/000123", "seg.png"));
        assert_eq!(split_name("README"), ("README", ""));
    }
}

//! Reading one shard's tar members as a stream, from a byte offset: a local file is seeked, a URL
//! is asked for `Range: bytes=OFFSET-`. A thread per open shard reads members ahead into a small
//! channel, so neither a shard nor more than a few members are ever held in memory. Every member
//! carries its byte range, which is what a resume position names.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};

use super::shards::Shard;

/// Members read ahead of the source.
const READ_AHEAD: usize = 16;

/// A regular file inside a shard.
#[derive(Debug)]
pub struct Member {
    /// Its path in the archive (`000000123.jpg`).
    pub name: String,
    /// Its content; `None` when larger than the member limit (the sample is then rejected).
    pub data: Option<Vec<u8>>,
    /// Offset of its first header block (pax or long-name headers included) in the shard.
    pub start: u64,
    /// Offset just past its padded data: where the next member starts.
    pub end: u64,
}

/// What the reader thread sends.
#[derive(Debug)]
pub enum Event {
    /// The next member.
    Member(Member),
    /// The shard ended cleanly (its end-of-archive blocks were read).
    End,
    /// The rest of the shard cannot be read: truncated, corrupt or a broken connection.
    Damaged {
        /// Where reading stopped.
        offset: u64,
        /// `truncated_shard`, `corrupt_shard` or `shard_read_error`.
        reason: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// A shard that could not be opened at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFailure {
    /// A stable reason (`shard_http_404`, `shard_connect`, `shard_missing`, ...).
    pub reason: String,
    /// What went wrong.
    pub message: String,
}

/// How shards are read.
#[derive(Clone, Debug)]
pub struct ReadOptions {
    /// Members larger than this are skipped (their sample is rejected as `too_large`).
    pub max_member_bytes: u64,
}

/// The members of one shard from `offset` on, read on their own thread.
pub struct MemberStream {
    events: Receiver<Event>,
}

impl MemberStream {
    /// Opens `shard` at `offset` (a member boundary from an earlier read, or 0).
    pub fn open(
        shard: &Shard,
        offset: u64,
        options: &ReadOptions,
        client: Option<&reqwest::blocking::Client>,
    ) -> Result<MemberStream, OpenFailure> {
        let reader: Box<dyn Read + Send> = match shard {
            Shard::File(path) => {
                let fail = |e: std::io::Error| OpenFailure {
                    reason: "shard_missing".into(),
                    message: format!("{}: {e}", path.display()),
                };
                let mut file = File::open(path).map_err(fail)?;
                file.seek(SeekFrom::Start(offset)).map_err(fail)?;
                Box::new(BufReader::with_capacity(1 << 20, file))
            }
            Shard::Url(url) => Box::new(open_url(url, offset, client.expect("a client for URLs"))?),
        };
        let (tx, events) = crossbeam_channel::bounded(READ_AHEAD);
        let max = options.max_member_bytes;
        std::thread::Builder::new()
            .name("lf-wds-shard".into())
            .spawn(move || read_members(reader, offset, max, &tx))
            .map_err(|e| OpenFailure { reason: "shard_read_error".into(), message: e.to_string() })?;
        Ok(MemberStream { events })
    }

    /// The next event; a reader thread that vanished reads as damage.
    pub fn next(&self) -> Event {
        self.events.recv().unwrap_or_else(|_| Event::Damaged {
            offset: 0,
            reason: "shard_read_error",
            message: "the shard's reader thread ended without a word".into(),
        })
    }
}

fn open_url(url: &str, offset: u64, client: &reqwest::blocking::Client) -> Result<impl Read + Send, OpenFailure> {
    let mut request = client.get(url);
    if offset > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={offset}-"));
    }
    let response = request.send().map_err(|e| OpenFailure {
        reason: format!("shard_{}", crate::http::error_reason(&e)),
        message: format!("{url}: {}", crate::http::error_text(&e)),
    })?;
    let status = response.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(OpenFailure {
            reason: format!("shard_{}", crate::http::status_reason(status)),
            message: format!("{url}: HTTP {status}"),
        });
    }
    let mut reader: Box<dyn Read + Send> = Box::new(response);
    if offset > 0 && status != 206 {
        // The server ignored the range: skip to the offset ourselves.
        let skipped = std::io::copy(&mut (&mut reader).take(offset), &mut std::io::sink()).map_err(|e| {
            OpenFailure { reason: "shard_read_error".into(), message: format!("{url}: skipping to byte {offset}: {e}") }
        })?;
        if skipped < offset {
            return Err(OpenFailure {
                reason: "truncated_shard".into(),
                message: format!("{url}: shorter than the resume offset {offset}"),
            });
        }
    }
    Ok(BufReader::with_capacity(1 << 20, reader))
}

/// Counts the bytes the tar parser consumed, to tell a clean end (end-of-archive blocks read)
/// from a stream that stopped at a member boundary, and notes whether the stream ran out.
struct Counting<R> {
    inner: R,
    read: Arc<AtomicU64>,
    eof: Arc<AtomicBool>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        if n == 0 && !buf.is_empty() {
            self.eof.store(true, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// The reason for an error of the tar parser: the stream ran out (`truncated_shard`), the
/// bytes are not a tar archive (`corrupt_shard`), or reading failed (`shard_read_error`).
fn damage(error: &std::io::Error, eof: &AtomicBool) -> &'static str {
    if eof.load(Ordering::Relaxed) || error.kind() == std::io::ErrorKind::UnexpectedEof {
        return "truncated_shard";
    }
    match error.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::Other | std::io::ErrorKind::InvalidInput => {
            "corrupt_shard"
        }
        _ => "shard_read_error",
    }
}

fn read_members(reader: Box<dyn Read + Send>, base: u64, max_member_bytes: u64, tx: &Sender<Event>) {
    let (read, eof) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
    let mut archive = tar::Archive::new(Counting { inner: reader, read: Arc::clone(&read), eof: Arc::clone(&eof) });
    let mut next_start = base;
    let send = |event| tx.send(event).is_ok();
    let entries = match archive.entries() {
        Ok(entries) => entries,
        Err(e) => {
            send(Event::Damaged { offset: base, reason: damage(&e, &eof), message: e.to_string() });
            return;
        }
    };
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                send(Event::Damaged { offset: next_start, reason: damage(&e, &eof), message: e.to_string() });
                return;
            }
        };
        let size = entry.size();
        let data_at = base + entry.raw_file_position();
        let end = data_at + size.div_ceil(512) * 512;
        let start = next_start;
        next_start = end;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let data = if size > max_member_bytes {
            None
        } else {
            let mut data = Vec::with_capacity(size as usize);
            if let Err(e) = entry.read_to_end(&mut data) {
                send(Event::Damaged { offset: start, reason: damage(&e, &eof), message: format!("{name}: {e}") });
                return;
            }
            if (data.len() as u64) < size {
                let message = format!("{name}: {} of its {size} bytes", data.len());
                send(Event::Damaged { offset: start, reason: "truncated_shard", message });
                return;
            }
            Some(data)
        };
        if !send(Event::Member(Member { name, data, start, end })) {
            return; // the source moved on
        }
    }
    // The parser stops at the first zero block, or quietly at the end of the stream: only the
    // first means the archive was complete.
    if base + read.load(Ordering::Relaxed) < next_start + 512 {
        send(Event::Damaged {
            offset: next_start,
            reason: "truncated_shard",
            message: format!("the archive ends at byte {next_start} without its end-of-archive blocks"),
        });
        return;
    }
    send(Event::End);
}

//! `webdataset_source`: image + caption samples from webdataset tar shards (what img2dataset's
//! `--output_format webdataset` writes: `KEY.jpg` + `KEY.txt` + `KEY.json`), local or over
//! HTTP(S), streamed member by member. Shards are split across workers (optionally in a seeded
//! order), samples can be shuffled in a window, and a position names (shard, byte offset) so a
//! run resumes exactly where it stood.

pub mod members;
pub mod samples;
pub mod shards;

use std::time::Duration;

use bytesize::ByteSize;
use latentflow_engine::{
    Batch, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports,
    Source,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::keys::KeyHasher;
use crate::rng::Rng;
use crate::source_rows;
use members::ReadOptions;
use samples::{ReaderPosition, Sample, SampleReader};
use shards::Shard;

/// Config of `webdataset_source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebdatasetSourceConfig {
    /// A `.tar` file, a folder of them, a glob or an http(s) URL, with brace notation
    /// (`https://host/laion/{00000..41407}.tar`).
    pub path: String,
    /// Rows per epoch on each worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Read the shards in an order shuffled with the job seed (default: as listed).
    #[serde(default)]
    pub shuffle_shards: bool,
    /// Shuffle windows of this many samples with the job seed (0: shard order).
    #[serde(default)]
    pub shuffle_buffer: usize,
    /// A window also ends once its images hold this many bytes. Default 256 MiB.
    #[serde(default = "default_shuffle_buffer_bytes")]
    pub shuffle_buffer_bytes: ByteSize,
    /// Connect and per-read timeout for URLs, in seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Members larger than this are skipped and their sample rejected (`too_large`).
    #[serde(default = "default_max_member_bytes")]
    pub max_member_bytes: ByteSize,
}

fn default_shuffle_buffer_bytes() -> ByteSize {
    ByteSize::mib(256)
}
fn default_timeout_s() -> f64 {
    30.0
}
fn default_max_member_bytes() -> ByteSize {
    ByteSize::mib(64)
}

impl OperatorConfig for WebdatasetSourceConfig {
    const TYPE: &'static str = "webdataset_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "image + caption samples from webdataset tar shards, local or over HTTP";
    const EXAMPLE: &'static str = "path = \"data/shards/{00000..00009}.tar\"\nshuffle_buffer = 1000";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("path", "a .tar file, a folder of them, a glob or an http(s) URL; brace notation {00000..41407} and {a,b} expands to several"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
        ("shuffle_shards", "read the shards in an order shuffled with the job seed (default false)"),
        ("shuffle_buffer", "shuffle windows of this many samples with the job seed (default 0: shard order)"),
        ("shuffle_buffer_bytes", "a window also ends once its images hold this many bytes (default \"256 MiB\")"),
        ("timeout_s", "connect and per-read timeout for URLs, in seconds (default 30)"),
        ("max_member_bytes", "skip larger members and reject their sample as too_large (default \"64 MiB\")"),
    ];
}

impl NodeSpec for WebdatasetSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors: Vec<KeyError> =
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1_000_000)).into_iter().collect();
        errors.extend(KeyError::check_range("shuffle_buffer", self.shuffle_buffer, 0, 10_000_000));
        errors.extend(KeyError::check_range(
            "shuffle_buffer_bytes",
            self.shuffle_buffer_bytes.as_u64(),
            1 << 10,
            1 << 36,
        ));
        errors.extend(KeyError::check_range("max_member_bytes", self.max_member_bytes.as_u64(), 1 << 10, 1 << 34));
        if !(self.timeout_s > 0.0 && self.timeout_s <= 3600.0) {
            errors.push(KeyError::new("timeout_s", format!("must be in (0, 3600], got {}", self.timeout_s)));
        }
        if let Err(message) = shards::list(&self.path) {
            errors.push(KeyError::new("path", message));
        }
        errors
    }

    fn ports(&self) -> Ports {
        source_rows::ports()
    }

    fn source_batch_size(&self) -> Option<usize> {
        self.batch_size
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let mut all = shards::list(&self.path).map_err(OpError::msg)?;
        if self.shuffle_shards {
            Rng::new(ctx.job.seed, SHARD_ORDER_STREAM).shuffle(&mut all);
        }
        let (shard, shards) = (ctx.worker.shard, ctx.worker.shards.max(1));
        let mine: Vec<Shard> =
            all.into_iter().enumerate().filter(|(i, _)| i % shards == shard).map(|(_, s)| s).collect();
        Ok(OperatorImpl::Source(Box::new(WebdatasetSource {
            config: Self { batch_size: Some(source_rows::batch_size(ctx, self.batch_size)), ..self.clone() },
            shards: Some(mine),
            reader: None,
            keys: KeyHasher::default(),
            seed: ctx.job.seed,
            worker_shard: shard as u64,
            window: None,
        })))
    }
}

/// The random stream of the shard order ("wdsorder").
const SHARD_ORDER_STREAM: u64 = 0x7764_736f_7264_6572;

/// The `webdataset_source` source.
pub struct WebdatasetSource {
    config: WebdatasetSourceConfig,
    /// This worker's shards, until `start` makes the reader.
    shards: Option<Vec<Shard>>,
    reader: Option<SampleReader>,
    keys: KeyHasher,
    seed: u64,
    worker_shard: u64,
    /// The shuffle window being emitted: the reader's position at its start, samples emitted
    /// from it, and the samples still to emit (in emission order, reversed).
    window: Option<(ReaderPosition, u64, Vec<Sample>)>,
}

impl WebdatasetSource {
    fn reader(&mut self) -> Result<&mut SampleReader, OpError> {
        if self.reader.is_none() {
            let shards = self.shards.take().unwrap_or_default();
            let timeout = Duration::from_secs_f64(self.config.timeout_s);
            let client = if shards.iter().any(|s| matches!(s, Shard::Url(_))) {
                Some(crate::http::blocking_client(timeout, 5).map_err(OpError::msg)?)
            } else {
                None
            };
            let options = ReadOptions { max_member_bytes: self.config.max_member_bytes.as_u64() };
            self.reader = Some(SampleReader::new(shards, options, client));
        }
        Ok(self.reader.as_mut().expect("made"))
    }

    /// Fills the next shuffle window (the same samples on every run) and permutes it with a
    /// generator seeded by (job seed, worker, where the window starts).
    fn fill_window(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        let (size, max_bytes) = (self.config.shuffle_buffer, self.config.shuffle_buffer_bytes.as_u64());
        let reader = self.reader()?;
        let start = reader.position();
        let (mut samples, mut bytes) = (Vec::new(), 0u64);
        while samples.len() < size && bytes < max_bytes {
            let Some(sample) = reader.next_sample(ctx)? else { break };
            bytes += sample.image.len() as u64;
            samples.push(sample);
        }
        let salt = (start.shard as u64) << 40 ^ start.offset ^ self.worker_shard << 56;
        Rng::new(self.seed ^ 0x7764_735f_7368_7566, salt).shuffle(&mut samples);
        samples.reverse(); // emitted by popping from the end
        self.window = Some((start, 0, samples));
        Ok(())
    }

    fn next_sample(&mut self, ctx: &mut OpContext) -> Result<Option<Sample>, OpError> {
        if self.config.shuffle_buffer == 0 {
            return self.reader()?.next_sample(ctx);
        }
        if self.window.as_ref().is_none_or(|w| w.2.is_empty()) {
            self.fill_window(ctx)?;
        }
        let window = self.window.as_mut().expect("filled");
        Ok(window.2.pop().inspect(|_| window.1 += 1))
    }
}

/// A saved position: the reader's, and how many samples of the shuffle window it starts were
/// already emitted.
#[derive(Serialize, Deserialize)]
struct SavedPosition {
    #[serde(flatten)]
    reader: ReaderPosition,
    #[serde(default)]
    emitted_in_window: u64,
}

impl Source for WebdatasetSource {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        self.reader().map(|_| ())
    }

    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let batch_size = self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE);
        let (mut keys, mut captions, mut images) = (Vec::new(), Vec::new(), Vec::new());
        while keys.len() < batch_size {
            let Some(sample) = self.next_sample(ctx)? else { break };
            keys.push(self.keys.key(&sample.key));
            captions.push(sample.caption);
            images.push(ByteBuf::from(sample.image));
        }
        ctx.count("key_hash_collisions", self.keys.take_collisions());
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(source_rows::batch(keys, captions, images)?))
    }

    fn position(&self) -> serde_json::Value {
        let saved = match (&self.window, &self.reader) {
            (Some((start, emitted, _)), _) if self.config.shuffle_buffer > 0 => {
                SavedPosition { reader: start.clone(), emitted_in_window: *emitted }
            }
            (_, Some(reader)) => SavedPosition { reader: reader.position(), emitted_in_window: 0 },
            _ => SavedPosition { reader: ReaderPosition::default(), emitted_in_window: 0 },
        };
        let mut position = serde_json::to_value(&saved).expect("position serialises");
        // Which shard that is, for people reading checkpoints.
        if let Some(shard) = self.reader.as_ref().and_then(|r| r.shard(saved.reader.shard)) {
            position["shard_name"] = shard.to_string().into();
        }
        position
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        let saved: SavedPosition = serde_json::from_value(position.clone())
            .map_err(|e| OpError::msg(format!("bad webdataset_source position {position}: {e}")))?;
        self.window = None;
        self.reader()?.seek(saved.reader);
        if self.config.shuffle_buffer > 0 && saved.emitted_in_window > 0 {
            // Rebuild the window silently (its rejections were counted before) and skip ahead.
            self.fill_window(&mut OpContext::detached("seek"))?;
            if let Some((_, done, samples)) = self.window.as_mut() {
                for _ in 0..saved.emitted_in_window.min(samples.len() as u64) {
                    samples.pop();
                }
                *done = saved.emitted_in_window;
            }
        }
        Ok(())
    }
}

/// Writing shards, for tests and benchmarks.
pub mod write {
    use std::path::Path;

    /// A tar archive of `members` (`(name, content)`), in the given order, with the
    /// end-of-archive blocks.
    ///
    /// ```
    /// let tar = latentflow_operators::webdataset::write::tar(&[("0.txt", b"a cat".as_slice())]);
    /// // A header block, a data block, and the two zero blocks that end an archive.
    /// assert_eq!(tar.len(), 4 * 512);
    /// ```
    pub fn tar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in members {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            builder.append_data(&mut header, name, *data).expect("in memory");
        }
        builder.into_inner().expect("in memory")
    }

    /// Writes [`tar`] of `members` to `path`.
    pub fn shard(path: &Path, members: &[(&str, &[u8])]) -> std::io::Result<()> {
        std::fs::write(path, tar(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use latentflow_engine::{JobConfig, WorkerInfo};

    fn png(seed: u8) -> Vec<u8> {
        let image = image::RgbImage::from_fn(4, 4, |x, y| image::Rgb([seed, x as u8, y as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// Members of samples `keys`: image, caption and json each.
    fn members(keys: std::ops::Range<u32>) -> Vec<(String, Vec<u8>)> {
        keys.flat_map(|k| {
            [
                (format!("{k:09}.jpg"), png(k as u8)),
                (format!("{k:09}.txt"), format!("caption {k}").into_bytes()),
                (format!("{k:09}.json"), format!("{{\"key\": \"{k:09}\"}}").into_bytes()),
            ]
        })
        .collect()
    }

    fn write(path: &std::path::Path, members: &[(String, Vec<u8>)]) {
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
        write::shard(path, &refs).unwrap();
    }

    fn source(config: &WebdatasetSourceConfig, shard: usize, shards: usize) -> Box<dyn Source> {
        let job = JobConfig::default();
        let worker = WorkerInfo { shard, shards, ..WorkerInfo::single() };
        let ctx = InstanceContext { node: "wds", job: &job, worker, batch_size: None };
        match config.instantiate(&ctx).unwrap() {
            OperatorImpl::Source(s) => s,
            _ => unreachable!(),
        }
    }

    fn config(path: String) -> WebdatasetSourceConfig {
        toml::from_str(&format!("path = {path:?}\nbatch_size = 3")).unwrap()
    }

    /// A row as (key, caption, first pixel's red value).
    type Row = (i64, String, u8);

    /// Every row, and the rejections as (key, reason).
    fn read_all(source: &mut dyn Source) -> (Vec<Row>, Vec<(String, String)>) {
        let mut ctx = OpContext::detached("wds");
        source.start(&mut ctx).unwrap();
        let mut rows = Vec::new();
        while let Some(batch) = source.next_batch(&mut ctx).unwrap() {
            rows.extend(rows_of(&batch));
        }
        (rows, ctx.take_rejections().into_iter().map(|r| (r.key, r.reason)).collect())
    }

    fn rows_of(batch: &Batch) -> Vec<Row> {
        let (keys, captions, images) =
            (batch.i64s("key").unwrap(), batch.strs("caption").unwrap(), batch.bytes("image").unwrap());
        (0..keys.len())
            .map(|i| {
                let pixels = image::load_from_memory(&images[i]).unwrap().to_rgb8();
                (keys[i], captions[i].clone(), pixels.get_pixel(0, 0)[0])
            })
            .collect()
    }

    fn expected(keys: std::ops::Range<u32>) -> Vec<Row> {
        keys.map(|k| (i64::from(k), format!("caption {k}"), k as u8)).collect()
    }

    #[test]
    fn adjacent_and_interleaved_members_pair_by_key() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("00000.tar"), &members(0..5));
        // Interleaved: every image first, then every caption and json in reverse order.
        let mut shuffled = members(5..10);
        let (images, rest): (Vec<_>, Vec<_>) = shuffled.drain(..).partition(|(n, _)| n.ends_with(".jpg"));
        let interleaved: Vec<_> = images.into_iter().chain(rest.into_iter().rev()).collect();
        write(&dir.path().join("00001.tar"), &interleaved);
        let path = format!("{}/{{00000..00001}}.tar", dir.path().display());
        let (mut rows, rejected) = read_all(source(&config(path), 0, 1).as_mut());
        assert!(rejected.is_empty(), "{rejected:?}");
        rows.sort();
        assert_eq!(rows, expected(0..10), "captions stay with their images");
    }

    #[test]
    fn a_truncated_shard_yields_what_came_before_and_counts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let whole = {
            let m = members(0..6);
            let refs: Vec<(&str, &[u8])> = m.iter().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
            write::tar(&refs)
        };
        // Cut in the middle of sample 4's image.
        let cut = whole.windows(13).position(|w| w == b"000000004.jpg").unwrap() + 700;
        std::fs::write(dir.path().join("a.tar"), &whole[..cut]).unwrap();
        write(&dir.path().join("b.tar"), &members(10..12));
        let (rows, rejected) = read_all(source(&config(dir.path().display().to_string()), 0, 1).as_mut());
        let mut want = expected(0..4);
        want.extend(expected(10..12));
        assert_eq!(rows, want, "the job goes on with the next shard");
        // Sample 4, whose caption is past the cut, and the rest of the shard.
        assert_eq!(rejected.len(), 2, "{rejected:?}");
        assert_eq!(rejected[0], ("4".to_string(), "truncated_shard".to_string()));
        assert!(rejected[1].0.contains("a.tar@") && rejected[1].1 == "truncated_shard", "{rejected:?}");

        // Cut exactly at a member boundary: no end-of-archive blocks, still truncated.
        let boundary = whole.windows(13).position(|w| w == b"000000002.jpg").unwrap();
        let boundary = boundary - boundary % 512;
        std::fs::write(dir.path().join("a.tar"), &whole[..boundary]).unwrap();
        let (rows, rejected) = read_all(source(&config(dir.path().join("a.tar").display().to_string()), 0, 1).as_mut());
        assert_eq!(rows, expected(0..2));
        assert_eq!(rejected.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(), ["truncated_shard"]);
    }

    #[test]
    fn shards_split_across_workers_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        for s in 0..4u32 {
            let mut m = members(s * 5..s * 5 + 5);
            if s == 2 {
                m.reverse(); // json and captions before images
            }
            write(&dir.path().join(format!("{s:05}.tar")), &m);
        }
        let path = dir.path().display().to_string();
        for shuffle in [0, 4] {
            let mut cfg = config(path.clone());
            cfg.shuffle_shards = true;
            cfg.shuffle_buffer = shuffle;
            let mut all = Vec::new();
            for shard in 0..2 {
                let (rows, rejected) = read_all(source(&cfg, shard, 2).as_mut());
                assert!(rejected.is_empty());
                // Resume after each batch: the rest read by a new instance is the same.
                for stop_after in 1..4 {
                    let mut first = source(&cfg, shard, 2);
                    let mut ctx = OpContext::detached("wds");
                    first.start(&mut ctx).unwrap();
                    let mut head = Vec::new();
                    for _ in 0..stop_after {
                        head.extend(rows_of(&first.next_batch(&mut ctx).unwrap().unwrap()));
                    }
                    let position = first.position();
                    let mut resumed = source(&cfg, shard, 2);
                    resumed.start(&mut ctx).unwrap();
                    resumed.seek(&position).unwrap();
                    while let Some(batch) = resumed.next_batch(&mut ctx).unwrap() {
                        head.extend(rows_of(&batch));
                    }
                    assert_eq!(head, rows, "shuffle {shuffle}, worker {shard}, resumed after {stop_after} batches");
                }
                all.extend(rows);
            }
            all.sort();
            assert_eq!(all, expected(0..20), "every sample once over the two workers");
        }
    }

    #[test]
    fn a_missing_caption_and_an_image_less_sample() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = members(0..3);
        m.retain(|(n, _)| n != "000000001.txt" && n != "000000002.jpg");
        write(&dir.path().join("a.tar"), &m);
        let (rows, rejected) = read_all(source(&config(dir.path().display().to_string()), 0, 1).as_mut());
        assert_eq!(rows, [(0, "caption 0".to_string(), 0), (1, String::new(), 1)]);
        assert_eq!(rejected, [("2".to_string(), "no_image".to_string())]);
    }
}

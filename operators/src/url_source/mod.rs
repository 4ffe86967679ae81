//! `url_source`: reads metadata parquet (LAION's `URL`, `TEXT`, `hash`, or img2dataset's `url`,
//! `caption`, `key`, and numeric filter columns) and downloads each image during the job, with
//! `concurrency` requests in flight per worker. Every row ends as an image or as a rejection
//! with its reason. Downloads finish in any order; the position records which rows are done, so
//! a resumed run fetches only the rows that were not.

pub mod fetch;
pub mod frontier;

use std::sync::Arc;
use std::time::Duration;

use bytesize::ByteSize;
use latentflow_engine::{
    Batch, ByteBudget, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl,
    OperatorKind, Ports, Source,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;

use crate::parquet_source::{FilterSpec, ParquetSource, ParquetSourceConfig};
use crate::source_rows;
use crate::tables::files::{expand, open_metadata};
use fetch::{Failure, FetchOptions};
use frontier::Frontier;

/// Config of `url_source`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UrlSourceConfig {
    /// Metadata parquet: a file, a folder (every `.parquet` below it) or a glob.
    pub path: String,
    /// URL column (default `URL`, else `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_column: Option<String>,
    /// Caption column (default `TEXT`, else `caption`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_column: Option<String>,
    /// Key column, integer or string (default `hash`, else `key`, else rows are numbered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_column: Option<String>,
    /// Rows per epoch on each worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Keep rows whose `width` column (`WIDTH` in LAION) is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_width: Option<f64>,
    /// Keep rows whose `height` column is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_height: Option<f64>,
    /// Range filters on numeric columns (`punsafe`, `AESTHETIC_SCORE`, ...), before any download.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<FilterSpec>,
    /// Requests in flight per worker.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Seconds for a whole request, body included.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: f64,
    /// Retries for timeouts, 429 and 5xx (never for other 4xx).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Seconds before the first retry; each later one waits twice as long.
    #[serde(default = "default_retry_backoff_s")]
    pub retry_backoff_s: f64,
    /// Redirects followed before `too_many_redirects`.
    #[serde(default = "default_max_redirects")]
    pub max_redirects: usize,
    /// Bodies larger than this are `too_large` (reading stops there).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Skip images whose response carries `X-Robots-Tag: noai` or `noimageai` (img2dataset's
    /// default courtesy to site owners who opted out).
    #[serde(default = "default_true")]
    pub skip_noai: bool,
}

fn default_concurrency() -> usize {
    64
}
fn default_timeout_s() -> f64 {
    10.0
}
fn default_retries() -> u32 {
    2
}
fn default_retry_backoff_s() -> f64 {
    0.5
}
fn default_max_redirects() -> usize {
    5
}
fn default_max_bytes() -> ByteSize {
    ByteSize::mib(20)
}
fn default_true() -> bool {
    true
}

impl OperatorConfig for UrlSourceConfig {
    const TYPE: &'static str = "url_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "metadata parquet (URL + caption) -> images downloaded during the job";
    const EXAMPLE: &'static str = "path = \"laion/*.parquet\"\nconcurrency = 64\ntimeout_s = 10";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("path", "metadata parquet: a file, a folder of them (recursive) or a glob"),
        ("url_column", "URL column (default \"URL\", else \"url\")"),
        ("caption_column", "caption column (default \"TEXT\", else \"caption\")"),
        ("key_column", "key column, integer or string (default \"hash\", else \"key\", else rows are numbered per file)"),
        ("batch_size", "rows per epoch on each worker (default 32; left out in a training job: the trainer's global_batch_size split over the source's workers)"),
        ("min_width", "keep rows whose `width` column is at least this (before downloading)"),
        ("min_height", "keep rows whose `height` column is at least this (before downloading)"),
        ("filter", "[[nodes.ID.filter]] tables: column, min, max (e.g. punsafe, AESTHETIC_SCORE), before downloading"),
        ("concurrency", "requests in flight per worker (default 64)"),
        ("timeout_s", "seconds for a whole request, body included (default 10)"),
        ("retries", "retries for timeouts, 429 and 5xx, never for other 4xx (default 2)"),
        ("retry_backoff_s", "seconds before the first retry, doubling after (default 0.5; a Retry-After up to 10 s wins)"),
        ("max_redirects", "redirects followed before the row is rejected as too_many_redirects (default 5)"),
        ("max_bytes", "larger bodies are rejected as too_large; reading stops there (default \"20 MiB\")"),
        ("skip_noai", "skip responses with X-Robots-Tag noai or noimageai (default true)"),
    ];
}

/// The columns a file's schema resolves the defaults to.
struct Columns {
    url: String,
    caption: String,
    key: Option<String>,
}

impl UrlSourceConfig {
    /// Picks the default column names the first file has.
    fn columns(&self, first: &std::path::Path) -> Result<Columns, String> {
        let meta = open_metadata(first)?;
        let has = |name: &str| meta.schema().index_of(name).is_ok();
        let pick = |given: &Option<String>, choices: [&str; 2]| -> String {
            given.clone().unwrap_or_else(|| choices.into_iter().find(|c| has(c)).unwrap_or(choices[0]).to_string())
        };
        let key = self.key_column.clone().or_else(|| ["hash", "key"].into_iter().find(|c| has(c)).map(str::to_string));
        Ok(Columns {
            url: pick(&self.url_column, ["URL", "url"]),
            caption: pick(&self.caption_column, ["TEXT", "caption"]),
            key,
        })
    }

    /// The metadata reader's config (a `parquet_source` whose image column holds URLs).
    fn rows(&self, columns: Columns) -> ParquetSourceConfig {
        ParquetSourceConfig {
            path: self.path.clone(),
            image_column: columns.url,
            caption_column: columns.caption,
            key_column: columns.key,
            batch_size: self.batch_size,
            min_width: self.min_width,
            min_height: self.min_height,
            filter: self.filter.clone(),
            shuffle_buffer: 0,
            shuffle_buffer_bytes: ByteSize::mib(1),
            extra_columns: Vec::new(),
        }
    }

    fn fetch_options(&self) -> FetchOptions {
        FetchOptions {
            retries: self.retries,
            backoff: Duration::from_secs_f64(self.retry_backoff_s),
            max_bytes: self.max_bytes.as_u64(),
            skip_noai: self.skip_noai,
        }
    }
}

impl NodeSpec for UrlSourceConfig {
    fn validate(&self) -> Vec<KeyError> {
        let mut errors: Vec<KeyError> = [
            self.batch_size.and_then(|b| KeyError::check_range("batch_size", b, 1, 1_000_000)),
            KeyError::check_range("concurrency", self.concurrency, 1, 4096),
            KeyError::check_range("retries", self.retries, 0, 10),
            KeyError::check_range("max_redirects", self.max_redirects, 0, 50),
            KeyError::check_range("max_bytes", self.max_bytes.as_u64(), 1 << 10, 1 << 32),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !(self.timeout_s > 0.0 && self.timeout_s <= 600.0) {
            errors.push(KeyError::new("timeout_s", format!("must be in (0, 600], got {}", self.timeout_s)));
        }
        if !(0.0..=60.0).contains(&self.retry_backoff_s) {
            errors.push(KeyError::new("retry_backoff_s", format!("must be in [0, 60], got {}", self.retry_backoff_s)));
        }
        match expand(&self.path, &["parquet"]) {
            Err(message) => errors.push(KeyError::new("path", message)),
            Ok(files) => match self.columns(&files[0]) {
                Err(message) => errors.push(KeyError::new("path", message)),
                Ok(columns) => {
                    // The metadata reader checks the columns as parquet_source would; its keys
                    // are named as this operator's.
                    for mut error in self.rows(columns).validate_urls() {
                        error.key = match error.key.as_str() {
                            "image_column" => "url_column".into(),
                            other => other.into(),
                        };
                        error.message = error.message.replace("image column", "URL column");
                        errors.push(error);
                    }
                }
            },
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
        let files = expand(&self.path, &["parquet"]).map_err(OpError::msg)?;
        let columns = self.columns(&files[0]).map_err(OpError::msg)?;
        let config = Self { batch_size: Some(source_rows::batch_size(ctx, self.batch_size)), ..self.clone() };
        let rows =
            ParquetSource::of_urls(config.rows(columns), files, ctx.job.seed, ctx.worker.shard, ctx.worker.shards);
        Ok(OperatorImpl::Source(Box::new(UrlSource {
            config,
            rows,
            running: None,
            frontier: Frontier::default(),
            pulled: 0,
            rows_ended: false,
        })))
    }
}

/// A finished download.
struct Done {
    row: u64,
    key: i64,
    caption: String,
    url: String,
    outcome: Result<Vec<u8>, Failure>,
    retries: u32,
}

/// What exists only while the source runs: the runtime its downloads run on.
struct Running {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    options: Arc<FetchOptions>,
    budget: ByteBudget,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    in_flight: usize,
}

impl Drop for Running {
    fn drop(&mut self) {
        // Images downloaded but never handed on give their bytes back; downloads still running
        // give theirs back as the runtime drops them.
        while let Ok(done) = self.done_rx.try_recv() {
            if let Ok(image) = done.outcome {
                self.budget.release(image.len() as u64);
            }
        }
    }
}

/// The `url_source` source.
pub struct UrlSource {
    config: UrlSourceConfig,
    rows: ParquetSource,
    running: Option<Running>,
    /// Rows done (handed on or rejected); its complement below `pulled` is in flight.
    frontier: Frontier,
    /// Stream rows read from the metadata so far.
    pulled: u64,
    rows_ended: bool,
}

impl UrlSource {
    /// Rows read ahead of the oldest one not done: the most a position can list as done above it.
    fn lookahead(&self) -> u64 {
        (self.config.concurrency as u64 * 4).max(256)
    }

    fn running(&mut self, ctx: &OpContext) -> Result<&mut Running, OpError> {
        if self.running.is_none() {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name(format!("lf-url-{}", ctx.node()))
                .enable_all()
                .build()
                .map_err(|e| OpError::msg(format!("cannot start the download runtime: {e}")))?;
            let timeout = Duration::from_secs_f64(self.config.timeout_s);
            let client = crate::http::client(timeout, self.config.max_redirects, self.config.concurrency)
                .map_err(OpError::msg)?;
            let (done_tx, done_rx) = mpsc::unbounded_channel();
            self.running = Some(Running {
                runtime,
                client,
                options: Arc::new(self.config.fetch_options()),
                budget: ctx.byte_budget(),
                done_tx,
                done_rx,
                in_flight: 0,
            });
        }
        Ok(self.running.as_mut().expect("started"))
    }

    /// Starts downloads while fewer than `concurrency` are in flight, the job has byte budget
    /// left (one is always allowed when none runs) and the rows stay within the lookahead.
    fn launch(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        let (concurrency, lookahead) = (self.config.concurrency, self.lookahead());
        loop {
            let running = self.running(ctx)?;
            let (in_flight, exhausted) = (running.in_flight, running.in_flight > 0 && running.budget.is_exhausted());
            if self.rows_ended || in_flight >= concurrency || exhausted || self.pulled >= self.frontier.next + lookahead
            {
                return Ok(());
            }
            // Rows done before a resume are skipped, their rejections with them.
            let mut scratch = OpContext::detached(ctx.node());
            let Some((row, metadata)) = self.rows.next_row(&mut scratch)? else {
                self.rows_ended = true;
                return Ok(());
            };
            self.pulled = row + 1;
            if self.frontier.is_done(row) {
                continue;
            }
            for rejection in scratch.take_rejections() {
                ctx.reject(rejection.key, rejection.reason);
            }
            let Some(metadata) = metadata else {
                self.frontier.mark(row);
                continue;
            };
            let running = self.running.as_mut().expect("started");
            running.in_flight += 1;
            let (client, options, budget, tx) =
                (running.client.clone(), Arc::clone(&running.options), running.budget.clone(), running.done_tx.clone());
            let url = String::from_utf8_lossy(&metadata.image).into_owned();
            running.runtime.spawn(async move {
                let (outcome, retries) = fetch::fetch(&client, &url, &options, &budget).await;
                let _ = tx.send(Done { row, key: metadata.key, caption: metadata.caption, url, outcome, retries });
            });
        }
    }
}

/// How often a wait for downloads looks whether the job was stopped.
const STOP_POLL: Duration = Duration::from_millis(100);

impl Source for UrlSource {
    fn start(&mut self, ctx: &mut OpContext) -> Result<(), OpError> {
        self.running(ctx).map(|_| ())
    }

    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        let batch_size = self.config.batch_size.unwrap_or(source_rows::DEFAULT_BATCH_SIZE);
        let (mut keys, mut captions, mut images) = (Vec::new(), Vec::new(), Vec::new());
        let mut handed_bytes = 0u64;
        while keys.len() < batch_size {
            self.launch(ctx)?;
            let running = self.running.as_mut().expect("started");
            if running.in_flight == 0 {
                if self.rows_ended {
                    break;
                }
                continue; // rows rejected by the filters: read on
            }
            let (runtime, done_rx) = (&running.runtime, &mut running.done_rx);
            // The timer is made inside the runtime, which drives it.
            let waited = runtime.block_on(async { tokio::time::timeout(STOP_POLL, done_rx.recv()).await });
            let Ok(done) = waited else {
                if ctx.stop_requested() {
                    break; // hand on what is done; the rest is fetched again after a resume
                }
                continue;
            };
            let done = done.expect("the source holds a sender");
            running.in_flight -= 1;
            self.frontier.mark(done.row);
            ctx.count("http_retries", u64::from(done.retries));
            match done.outcome {
                Ok(image) => {
                    handed_bytes += image.len() as u64;
                    keys.push(done.key);
                    captions.push(done.caption);
                    images.push(ByteBuf::from(image));
                }
                Err(failure) => {
                    tracing::debug!(node = ctx.node(), key = done.key, url = %done.url, reason = failure.reason, "{}", failure.detail);
                    ctx.reject(done.key.to_string(), failure.reason);
                }
            }
        }
        if let Some(running) = self.running.as_mut() {
            // From here the batch itself counts against the budget.
            running.budget.release(handed_bytes);
        }
        if keys.is_empty() && self.rows_ended && self.running.as_ref().is_none_or(|r| r.in_flight == 0) {
            return Ok(None);
        }
        Ok(Some(source_rows::batch(keys, captions, images)?))
    }

    fn position(&self) -> serde_json::Value {
        serde_json::to_value(&self.frontier).expect("position serialises")
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        let frontier: Frontier = serde_json::from_value(position.clone())
            .map_err(|e| OpError::msg(format!("bad url_source position {position}: {e}")))?;
        self.rows.seek_row(frontier.next);
        self.pulled = frontier.next;
        self.rows_ended = false;
        self.frontier = frontier;
        Ok(())
    }
}

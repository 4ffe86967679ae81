//! Test-only operators. Each takes a `probe` name and records what the engine did to it in a
//! global [`Probe`], so a test can check scheduling, epochs, flushes and in-flight counts from
//! the operators' side, independently of the engine's own counters.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use latentflow_engine::{
    Batch, Catalog, Column, ColumnType, Field, InstanceContext, Map, NodeSpec, OpContext, OpError, OperatorConfig,
    OperatorEntry, OperatorImpl, OperatorKind, Ports, Sink, Source, Stage,
};
use latentflow_operators::bytes_source::BytesSource;
use latentflow_operators::BytesSourceConfig;
use serde::{Deserialize, Serialize};

/// What the test operators saw.
#[derive(Debug, Default)]
pub struct Probe {
    /// Rows produced by `probe_source` and not yet consumed by `probe_sink`.
    pub in_flight: AtomicI64,
    /// The most rows ever in that state.
    pub max_in_flight: AtomicI64,
    /// Keys consumed by `probe_sink`, per worker.
    pub keys: Mutex<BTreeMap<usize, Vec<i64>>>,
    /// `(worker, epoch)` of every `end_epoch` call on sinks and stages.
    pub epochs_ended: Mutex<Vec<(usize, u64)>>,
    /// `finish` calls.
    pub finishes: AtomicU64,
    /// Epochs seen by `probe_sink` with the keys in them.
    pub epoch_keys: Mutex<BTreeMap<u64, BTreeSet<i64>>>,
    /// The rayon pools `epoch_sum` ran in: (on a pool thread, that pool's thread count).
    pub stage_pools: Mutex<BTreeSet<(bool, usize)>>,
}

/// The probe named `name` (created on first use).
pub fn probe(name: &str) -> Arc<Probe> {
    static PROBES: OnceLock<Mutex<HashMap<String, Arc<Probe>>>> = OnceLock::new();
    let probes = PROBES.get_or_init(Default::default);
    Arc::clone(probes.lock().expect("probes").entry(name.to_string()).or_default())
}

/// Every real operator plus the test operators.
pub fn catalog() -> Catalog {
    let mut entries = latentflow_operators::registry().entries().to_vec();
    entries.extend([
        OperatorEntry::of::<ProbeSourceConfig>(),
        OperatorEntry::of::<ProbeSinkConfig>(),
        OperatorEntry::of::<EpochSumConfig>(),
        OperatorEntry::of::<FailAtConfig>(),
        OperatorEntry::of::<NeedsPixelsConfig>(),
    ]);
    Catalog::new(entries)
}

/// Where a test operator panics (`panic_in`): in `start`, mid-run (`process`: a source's second
/// batch, a stage's or sink's second batch), in `end_epoch`, or at `finish` (a source: where its
/// data ends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PanicIn {
    /// In `start`.
    Start,
    /// On the second batch.
    Process,
    /// In `end_epoch`.
    EndEpoch,
    /// In `finish` (a source: at the end of its data).
    Finish,
}

fn panic_if(configured: Option<PanicIn>, here: PanicIn) {
    if configured == Some(here) {
        panic!("test operator panics in {here:?}");
    }
}

/// `probe_source`: `bytes_source` that counts the rows it produces into its probe.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSourceConfig {
    /// Probe name.
    pub probe: String,
    /// Rows in total.
    pub count: u64,
    /// Rows per epoch per worker.
    pub batch_size: usize,
    /// Panic there.
    #[serde(default)]
    pub panic_in: Option<PanicIn>,
}

impl OperatorConfig for ProbeSourceConfig {
    const TYPE: &'static str = "probe_source";
    const KIND: OperatorKind = OperatorKind::Source;
    const SUMMARY: &'static str = "test: demo rows, counted into a probe";
    const EXAMPLE: &'static str = "probe = \"p\"\ncount = 10\nbatch_size = 2";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("probe", "probe name"),
        ("count", "rows"),
        ("batch_size", "rows per epoch"),
        ("panic_in", "start, process or finish"),
    ];
}

impl NodeSpec for ProbeSourceConfig {
    fn ports(&self) -> Ports {
        BytesSourceConfig::default().ports()
    }

    fn instantiate(&self, ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let config = BytesSourceConfig { count: self.count, batch_size: Some(self.batch_size), payload_bytes: 8 };
        let inner = BytesSource::new(config, ctx.job.seed, ctx.worker.shard as u64, ctx.worker.shards as u64);
        Ok(OperatorImpl::Source(Box::new(ProbeSource {
            inner,
            probe: probe(&self.probe),
            panic_in: self.panic_in,
            batches: 0,
        })))
    }
}

struct ProbeSource {
    inner: BytesSource,
    probe: Arc<Probe>,
    panic_in: Option<PanicIn>,
    batches: u64,
}

impl Source for ProbeSource {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        panic_if(self.panic_in, PanicIn::Start);
        Ok(())
    }

    fn next_batch(&mut self, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        self.batches += 1;
        if self.batches == 2 {
            panic_if(self.panic_in, PanicIn::Process);
        }
        let batch = self.inner.next_batch(ctx)?;
        if batch.is_none() {
            panic_if(self.panic_in, PanicIn::Finish);
        }
        if let Some(b) = &batch {
            let now = self.probe.in_flight.fetch_add(b.rows() as i64, SeqCst) + b.rows() as i64;
            self.probe.max_in_flight.fetch_max(now, SeqCst);
        }
        Ok(batch)
    }

    fn position(&self) -> serde_json::Value {
        self.inner.position()
    }

    fn seek(&mut self, position: &serde_json::Value) -> Result<(), OpError> {
        self.inner.seek(position)
    }
}

/// `probe_sink`: records keys, epochs and flushes; optionally slow.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeSinkConfig {
    /// Probe name.
    pub probe: String,
    /// Milliseconds to sleep per batch.
    #[serde(default)]
    pub delay_ms: u64,
    /// Panic there.
    #[serde(default)]
    pub panic_in: Option<PanicIn>,
}

impl OperatorConfig for ProbeSinkConfig {
    const TYPE: &'static str = "probe_sink";
    const KIND: OperatorKind = OperatorKind::Sink;
    const SUMMARY: &'static str = "test: records keys, epochs and flushes into a probe";
    const EXAMPLE: &'static str = "probe = \"p\"";
    const KEYS: &'static [(&'static str, &'static str)] =
        &[("probe", "probe name"), ("delay_ms", "sleep per batch"), ("panic_in", "where to panic")];
}

impl NodeSpec for ProbeSinkConfig {
    fn ports(&self) -> Ports {
        Ports { requires: vec![Field::new("key", ColumnType::I64)], ..Ports::default() }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Sink(Box::new(ProbeSink {
            probe: probe(&self.probe),
            delay: Duration::from_millis(self.delay_ms),
            panic_in: self.panic_in,
            batches: 0,
        })))
    }
}

struct ProbeSink {
    probe: Arc<Probe>,
    delay: Duration,
    panic_in: Option<PanicIn>,
    batches: u64,
}

impl Sink for ProbeSink {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        panic_if(self.panic_in, PanicIn::Start);
        Ok(())
    }

    fn write(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<(), OpError> {
        self.batches += 1;
        if self.batches == 2 {
            panic_if(self.panic_in, PanicIn::Process);
        }
        std::thread::sleep(self.delay);
        let keys = batch.i64s("key")?;
        self.probe.keys.lock().expect("probe").entry(ctx.worker().index).or_default().extend_from_slice(keys);
        self.probe.epoch_keys.lock().expect("probe").entry(ctx.epoch()).or_default().extend(keys.iter().copied());
        self.probe.in_flight.fetch_sub(keys.len() as i64, SeqCst);
        Ok(())
    }

    fn end_epoch(&mut self, epoch: u64, ctx: &mut OpContext) -> Result<(), OpError> {
        panic_if(self.panic_in, PanicIn::EndEpoch);
        self.probe.epochs_ended.lock().expect("probe").push((ctx.worker().index, epoch));
        Ok(())
    }

    fn finish(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        panic_if(self.panic_in, PanicIn::Finish);
        self.probe.finishes.fetch_add(1, SeqCst);
        Ok(())
    }
}

/// `epoch_sum`: a stage that emits, at the end of each epoch, one row whose `key` is the sum of
/// the epoch's keys; at `finish` it emits the grand total; after `stop_after` rows it asks the
/// job to stop.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochSumConfig {
    /// Ask the job to stop after this many rows (never by default).
    #[serde(default)]
    pub stop_after: Option<u64>,
    /// Panic there.
    #[serde(default)]
    pub panic_in: Option<PanicIn>,
    /// Record the rayon pool each batch ran in under this probe.
    #[serde(default)]
    pub probe: Option<String>,
}

impl OperatorConfig for EpochSumConfig {
    const TYPE: &'static str = "epoch_sum";
    const KIND: OperatorKind = OperatorKind::Stage;
    const SUMMARY: &'static str = "test: per-epoch sums of `key`, total at finish";
    const EXAMPLE: &'static str = "";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("stop_after", "request a stop after this many rows"),
        ("panic_in", "where to panic"),
        ("probe", "probe name"),
    ];
}

impl NodeSpec for EpochSumConfig {
    fn ports(&self) -> Ports {
        Ports {
            requires: vec![Field::new("key", ColumnType::I64)],
            adds: vec![Field::new("key", ColumnType::I64)],
            removes: vec!["caption".into(), "image".into()],
        }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        let (stop_after, panic_in, probe) = (self.stop_after, self.panic_in, self.probe.as_deref().map(probe));
        Ok(OperatorImpl::Stage(Box::new(EpochSum { stop_after, panic_in, probe, ..EpochSum::default() })))
    }
}

#[derive(Default)]
struct EpochSum {
    stop_after: Option<u64>,
    panic_in: Option<PanicIn>,
    probe: Option<Arc<Probe>>,
    batches: u64,
    rows: u64,
    epoch_sum: i64,
    total: i64,
}

impl Stage for EpochSum {
    fn start(&mut self, _ctx: &mut OpContext) -> Result<(), OpError> {
        panic_if(self.panic_in, PanicIn::Start);
        Ok(())
    }

    fn process(&mut self, batch: Batch, ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        self.batches += 1;
        if self.batches == 2 {
            panic_if(self.panic_in, PanicIn::Process);
        }
        if let Some(p) = &self.probe {
            let pool = (rayon::current_thread_index().is_some(), rayon::current_num_threads());
            p.stage_pools.lock().expect("probe").insert(pool);
        }
        let keys = batch.i64s("key")?;
        self.epoch_sum += keys.iter().sum::<i64>();
        self.rows += keys.len() as u64;
        if self.stop_after.is_some_and(|n| self.rows >= n) {
            ctx.request_stop();
        }
        Ok(None)
    }

    fn end_epoch(&mut self, _epoch: u64, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        panic_if(self.panic_in, PanicIn::EndEpoch);
        let sum = std::mem::take(&mut self.epoch_sum);
        self.total += sum;
        Ok(Some(Batch::new().with("key", Column::I64(vec![sum]))?))
    }

    fn finish(&mut self, _ctx: &mut OpContext) -> Result<Option<Batch>, OpError> {
        panic_if(self.panic_in, PanicIn::Finish);
        // A negative key marks the total, so tests can tell it from the per-epoch sums.
        Ok(Some(Batch::new().with("key", Column::I64(vec![-self.total]))?))
    }
}

/// `fail_at`: a map that fails on the row with key `key`, rejects odd keys when `reject_odd` is
/// set, and with `delay_even_epochs_ms` sleeps on the batches of even epochs, so that the pool
/// finishes later epochs first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailAtConfig {
    /// Fail on this key.
    #[serde(default)]
    pub key: Option<i64>,
    /// Reject rows with odd keys (reason `odd_key`).
    #[serde(default)]
    pub reject_odd: bool,
    /// Milliseconds to sleep on each batch of an even epoch.
    #[serde(default)]
    pub delay_even_epochs_ms: u64,
    /// Panic on `key` instead of returning an error.
    #[serde(default)]
    pub panic: bool,
}

impl OperatorConfig for FailAtConfig {
    const TYPE: &'static str = "fail_at";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str = "test: fails on one key, rejects odd keys";
    const EXAMPLE: &'static str = "key = 3";
    const KEYS: &'static [(&'static str, &'static str)] = &[
        ("key", "fail on this key"),
        ("reject_odd", "reject odd keys"),
        ("delay_even_epochs_ms", "sleep on even epochs"),
        ("panic", "panic on `key` instead of failing"),
    ];
}

impl NodeSpec for FailAtConfig {
    fn ports(&self) -> Ports {
        Ports { requires: vec![Field::new("key", ColumnType::I64)], ..Ports::default() }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Map(Arc::new(self.clone())))
    }
}

impl Map for FailAtConfig {
    fn map(&self, mut batch: Batch, ctx: &mut OpContext) -> Result<Batch, OpError> {
        if ctx.epoch() % 2 == 0 {
            std::thread::sleep(Duration::from_millis(self.delay_even_epochs_ms));
        }
        let keys = batch.i64s("key")?.to_vec();
        if let Some(k) = self.key.filter(|k| keys.contains(k)) {
            if self.panic {
                panic!("row {k} is poison");
            }
            return Err(OpError::msg(format!("row {k} is poison")));
        }
        let keep: Vec<bool> = keys.iter().map(|k| !(self.reject_odd && k % 2 == 1)).collect();
        for (k, _) in keys.iter().zip(&keep).filter(|(_, keep)| !**keep) {
            ctx.reject(k.to_string(), "odd_key");
        }
        batch.retain_rows(&keep);
        Ok(batch)
    }
}

/// `needs_pixels`: a map that requires a `pixels` u8 tensor column (for type-mismatch tests).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeedsPixelsConfig {}

impl OperatorConfig for NeedsPixelsConfig {
    const TYPE: &'static str = "needs_pixels";
    const KIND: OperatorKind = OperatorKind::Map;
    const SUMMARY: &'static str = "test: requires `pixels`";
    const EXAMPLE: &'static str = "";
    const KEYS: &'static [(&'static str, &'static str)] = &[];
}

impl NodeSpec for NeedsPixelsConfig {
    fn ports(&self) -> Ports {
        Ports { requires: vec![Field::new("pixels", ColumnType::U8Tensor)], ..Ports::default() }
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Map(Arc::new(latentflow_operators::checksum::Checksum)))
    }
}

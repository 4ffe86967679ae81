//! `null_sink`: consumes and drops batches (the engine counts them), optionally slowly, to
//! stand in for a slow consumer when testing backpressure.

use std::time::Duration;

use latentflow_engine::{
    Batch, InstanceContext, KeyError, NodeSpec, OpContext, OpError, OperatorConfig, OperatorImpl, OperatorKind, Ports,
    Sink,
};
use serde::{Deserialize, Serialize};

/// Config of `null_sink`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NullSinkConfig {
    /// Milliseconds to sleep per batch (simulates a slow consumer; 0 by default).
    pub delay_ms: u64,
}

impl OperatorConfig for NullSinkConfig {
    const TYPE: &'static str = "null_sink";
    const KIND: OperatorKind = OperatorKind::Sink;
    const SUMMARY: &'static str = "drops every batch; the profile counts them";
    const EXAMPLE: &'static str = "delay_ms = 0";
    const KEYS: &'static [(&'static str, &'static str)] =
        &[("delay_ms", "milliseconds to sleep per batch, to simulate a slow consumer (default 0)")];
}

impl NodeSpec for NullSinkConfig {
    fn validate(&self) -> Vec<KeyError> {
        KeyError::check_range("delay_ms", self.delay_ms, 0, 600_000).into_iter().collect()
    }

    fn ports(&self) -> Ports {
        Ports::default()
    }

    fn instantiate(&self, _ctx: &InstanceContext<'_>) -> Result<OperatorImpl, OpError> {
        Ok(OperatorImpl::Sink(Box::new(NullSink { delay: Duration::from_millis(self.delay_ms) })))
    }
}

/// The `null_sink` sink.
#[derive(Debug)]
pub struct NullSink {
    delay: Duration,
}

impl Sink for NullSink {
    fn write(&mut self, _batch: Batch, _ctx: &mut OpContext) -> Result<(), OpError> {
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_absurd_delays() {
        let errors = NullSinkConfig { delay_ms: 10_000_000 }.validate();
        assert_eq!(errors[0].message, "must be between 0 and 600000, got 10000000");
    }
}

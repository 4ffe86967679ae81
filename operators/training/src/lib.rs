//! Training math for the UNet: the DDPM noise schedule, the loss with its options (min-SNR,
//! noise offset, caption dropout), AdamW with PyTorch's semantics, learning-rate schedules,
//! gradient clipping and accumulation, EMA, and checkpoints that resume exactly.
//!
//! It builds on `latentflow-models` and sees neither the engine nor any operator; the `train`
//! operator drives it.

pub mod adamw;
pub mod buckets;
pub mod checkpoint;
pub mod durable;
pub mod ema;
pub mod grads;
pub mod loss_plot;
pub mod lr;
pub mod options;
pub mod pipeline_folder;
pub mod sampling;
pub mod schedule;
pub mod trainer;

pub use adamw::{AdamW, AdamWConfig};
pub use ema::Ema;
pub use lr::{LrDecay, LrSchedule};
pub use options::{Precision, TrainingOptions};
pub use schedule::{NoiseSchedule, Prediction, SchedulerConfig};
pub use trainer::{Draws, Replicas, Shard, StepReport, Trainer, TrainerState};

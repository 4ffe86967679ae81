//! The ops, each with its CPU reference beside its CUDA launcher.

pub mod adamw;
pub mod attention;
pub mod ema;
pub mod group_norm_silu;
pub mod noising;
pub mod normalize;

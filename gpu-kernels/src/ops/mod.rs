//! The ops, each with its CPU reference beside its CUDA launcher.

pub mod adamw;
pub mod attention;
pub mod conv;
pub mod ema;
pub mod grad_norm;
pub mod group_norm;
pub mod layer_norm;
pub mod noising;
pub mod normalize;

//! The ops, each with its CPU reference.

pub mod normalize;

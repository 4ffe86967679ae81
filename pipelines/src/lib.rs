//! # latentflow-pipelines
//!
//! latentflow's pipelines defined in Rust, the topology files under `topologies/`, and the
//! `latentflow` command line ([`cli`]).

pub mod cli;
pub mod demo;

//! Cairn's load generator.
pub mod cpu;
pub mod rng;
pub mod spec;
pub mod timer;
pub mod verify;

//! Cairn load generator.

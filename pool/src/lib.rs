//! cairn-pool

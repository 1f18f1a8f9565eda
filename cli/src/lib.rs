//! cairn-cli

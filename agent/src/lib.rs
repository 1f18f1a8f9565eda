//! cairn-agent

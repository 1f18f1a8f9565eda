//! cairn-sanity-tests

//! cairn-csi

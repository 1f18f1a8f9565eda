//! cairn-nvmf

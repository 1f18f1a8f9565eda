//! Cairn system tests.
//!
//! [`vm`] boots a small Debian 12 guest (kernel 6.1, QEMU 7.2 under TCG)
//! whose kernel NVMe/TCP initiator and tools (`nvme`, `fio`, `mkfs.*`)
//! exercise Cairn targets running on the host. See `vm/README.md` for the
//! scripts underneath.

pub mod csi;
pub mod vm;

pub use vm::{Vm, VmError, VmOutput, GUEST_ADDR, HOST_ADDR_FROM_GUEST};

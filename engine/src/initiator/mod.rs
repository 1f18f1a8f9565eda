//! NVMe-oF/TCP initiator.

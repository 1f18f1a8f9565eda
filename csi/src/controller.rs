//! The CSI Controller service.

//! StorageClass parameters the controller accepts, and their parsing.

/// Every StorageClass parameter key CreateVolume accepts; any other key is
/// rejected with INVALID_ARGUMENT.
pub const PARAMETERS: &[&str] = &[
    "repl",
    "protocol",
    "thin",
    "fsType",
    "ctrlLossTmo",
    "reconnectDelay",
    "keepAliveTmo",
    "nrIoQueues",
];

//! The NVMe-oF/TCP target.
//!
//! An acceptor thread hands each new TCP connection (one NVMe queue) to a
//! reactor, round robin; from then on the reactor owns the socket, the
//! queue's state and the device channels it opens. The registry of
//! subsystems is shared by all reactors behind a lock taken only when a
//! queue connects or the control plane changes it, never per I/O.
//!
//! ```text
//!  acceptor ──TcpStream──▶ reactor i: conn::serve ─┬─ reader: PDUs → commands
//!                                                  ├─ spawned I/O tasks → IoChannel
//!                                                  └─ writer: batched writev
//! ```
//!
//! What the Linux host (6.1) gets, in the order it asks:
//! ICResp with PFV 0, CPDA 0, the digests it asked for and MAXH2CDATA
//! (128 KiB by default); Connect returns the controller id (CNTLID is
//! dynamic); CAP (MQES = queue depth - 1, CSS = NVM only, so the host uses
//! CC.CSS = NVM and never needs command-set profiles), VS 1.3, CC/CSTS with
//! enable and shutdown; Identify controller with SGL support, IOCCSZ for
//! 8 KiB in-capsule data, MDTS 1 MiB, KAS, CMIC multi-controller, OAES
//! namespace notices; Identify CNS 0/2/3 (NGUID, UUID and CSI descriptors),
//! 5/6/8 for CSI 0 (zeroed NVM structures: no limits), Invalid Field for
//! other command sets; Set Features number of queues (granted up to
//! `max_io_queues`), async event configuration, keep-alive timer; Get Log
//! Page error, SMART (read by the host's hwmon), firmware slot, changed
//! namespaces and, on the discovery controller, the discovery log (one
//! entry per subsystem the host may connect to, plus the discovery
//! subsystem itself, with the address the host reached us on). Async event
//! requests are held, up to four; when a namespace grows
//! ([`Target::notice_resized`]) one completes with a namespace attribute
//! notice, and the Changed Namespace List names the namespace until the host
//! reads it. Set Features volatile write cache off makes every write of that
//! controller FUA (and write zeroes and deallocate flushed) before it
//! completes.
//!
//! Control calls ([`Target::add_subsystem`] and friends) may come from any
//! thread. Removing a subsystem or a keep-alive timeout disconnects queues
//! from outside their reactor by shutting the socket down, which completes the
//! reactor's pending receive.

mod conn;
mod ctrl;
pub mod status;
pub mod transport;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use cairn_bdev::{BlockDevice, DeviceInfo};
use uuid::Uuid;

use crate::reactor::{ReactorError, Reactors};
pub(crate) use ctrl::Controller;

/// Target settings.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Address to listen on (port 8420 by default; port 0 picks one).
    pub listen: SocketAddr,
    /// Number of reactor threads (when the target starts its own).
    pub reactors: usize,
    /// I/O queues a controller may have.
    pub max_io_queues: u16,
    /// Entries per queue (MQES + 1).
    pub queue_depth: u16,
    /// Largest in-capsule data on I/O queues, in bytes.
    pub max_incapsule: u32,
    /// Largest data in one H2CData PDU (MAXH2CDATA).
    pub maxh2cdata: u32,
    /// Largest transfer, as a power of two of 4 KiB (MDTS).
    pub mdts: u8,
    /// How long the target's own reactors poll after network activity
    /// before they sleep (zero: never poll). See `reactor::polling`.
    pub busy_poll: std::time::Duration,
}

impl Default for TargetConfig {
    fn default() -> Self {
        TargetConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], cairn_nvmf::DEFAULT_PORT)),
            reactors: 1,
            max_io_queues: 8,
            queue_depth: 128,
            max_incapsule: 8192,
            maxh2cdata: 128 * 1024,
            mdts: 8,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }
}

/// How long reactors poll after network activity unless configured: longer
/// than a host at queue depth 1 takes to send its next command.
pub const DEFAULT_BUSY_POLL: std::time::Duration = std::time::Duration::from_micros(50);

/// A namespace to export.
#[derive(Clone)]
pub struct NamespaceConfig {
    /// Namespace id, 1 or more.
    pub nsid: u32,
    /// Namespace UUID (and NGUID) reported to hosts.
    pub uuid: Uuid,
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for NamespaceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceConfig")
            .field("nsid", &self.nsid)
            .field("uuid", &self.uuid)
            .finish()
    }
}

/// An NVM subsystem to export.
#[derive(Debug, Clone)]
pub struct SubsystemConfig {
    pub nqn: String,
    /// Serial number (up to 20 ASCII characters).
    pub serial: String,
    /// Model number; "Cairn" if None.
    pub model: Option<String>,
    pub namespaces: Vec<NamespaceConfig>,
    /// Host NQNs allowed to connect; None allows any host.
    pub allowed_hosts: Option<Vec<String>>,
}

/// What the target exports, as listed by [`Target::list_subsystems`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemInfo {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// `(nsid, uuid)` of each namespace.
    pub namespaces: Vec<(u32, Uuid)>,
    pub allowed_hosts: Option<Vec<String>>,
    /// Connected controllers.
    pub controllers: usize,
}

/// Errors of target control operations.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Reactor(#[from] ReactorError),
    #[error("subsystem {nqn} already exists")]
    Exists { nqn: String },
    #[error("subsystem {nqn} not found")]
    NotFound { nqn: String },
    #[error("invalid NQN {nqn:?}")]
    InvalidNqn { nqn: String },
    #[error("invalid namespace {nsid}: {reason}")]
    InvalidNamespace { nsid: u32, reason: &'static str },
    #[error("the target has been shut down")]
    Shutdown,
}

/// A handle to stop one connection from any thread.
pub(crate) struct ConnHandle {
    fd: Mutex<Option<RawFd>>,
}

impl ConnHandle {
    fn new(fd: RawFd) -> Arc<Self> {
        Arc::new(ConnHandle {
            fd: Mutex::new(Some(fd)),
        })
    }

    /// Shuts the socket down: the reactor's pending receive completes and the
    /// queue tears itself down.
    pub(crate) fn kill(&self) {
        let fd = self.fd.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: the fd is open: the owner clears it under this lock
            // before closing the socket.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
    }

    /// Called by the owner just before it closes the socket.
    fn closed(&self) {
        *self.fd.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

pub(crate) struct Namespace {
    pub nsid: u32,
    pub uuid: Uuid,
    pub device: Arc<dyn BlockDevice>,
    pub info: DeviceInfo,
    /// The size hosts were last told of, in blocks.
    pub noticed_blocks: AtomicU64,
}

pub(crate) struct Subsystem {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub namespaces: Vec<Namespace>,
    pub allowed: RwLock<Option<Vec<String>>>,
    pub ctrls: Mutex<HashMap<u16, Arc<Controller>>>,
}

impl Subsystem {
    pub fn host_allowed(&self, host: &str) -> bool {
        match &*self.allowed.read().unwrap_or_else(|e| e.into_inner()) {
            None => true,
            Some(list) => list.iter().any(|h| h == host),
        }
    }

    fn kill_all(&self) {
        let ctrls: Vec<_> = self
            .ctrls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, c)| c)
            .collect();
        for c in ctrls {
            c.kill();
        }
    }
}

/// State shared by the acceptor, all reactors and the control API.
pub(crate) struct Shared {
    pub cfg: TargetConfig,
    pub local: SocketAddr,
    pub subsystems: RwLock<HashMap<String, Arc<Subsystem>>>,
    pub conns: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    pub next_cntlid: AtomicU16,
    pub genctr: AtomicU64,
    pub stopped: AtomicBool,
    pub epoch: std::time::Instant,
}

impl Shared {
    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(nqn)
            .cloned()
    }

    /// A controller id no live controller uses (1..=0xFFEF).
    pub fn alloc_cntlid(&self) -> u16 {
        loop {
            let id = self.next_cntlid.fetch_add(1, Ordering::Relaxed);
            if (1..=0xffef).contains(&id) {
                return id;
            }
        }
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// A running NVMe-oF/TCP target.
pub struct Target {
    shared: Arc<Shared>,
    reactors: Arc<Reactors>,
    owns_reactors: bool,
    listener_fd: RawFd,
    acceptor: Mutex<Option<JoinHandle<()>>>,
}

impl Target {
    /// Starts a target with its own `cfg.reactors` reactors.
    pub fn start(cfg: TargetConfig) -> Result<Target, TargetError> {
        let reactors = Arc::new(Reactors::start_polling(
            cfg.reactors,
            "nvmf-reactor",
            cfg.busy_poll,
        )?);
        Self::start_inner(cfg, reactors, true)
    }

    /// Starts a target whose queues run on existing reactors.
    pub fn start_on(cfg: TargetConfig, reactors: Arc<Reactors>) -> Result<Target, TargetError> {
        Self::start_inner(cfg, reactors, false)
    }

    fn start_inner(
        mut cfg: TargetConfig,
        reactors: Arc<Reactors>,
        owns_reactors: bool,
    ) -> Result<Target, TargetError> {
        cfg.queue_depth = cfg.queue_depth.clamp(2, 1024);
        cfg.max_io_queues = cfg.max_io_queues.clamp(1, 0xfffe);
        cfg.maxh2cdata = cfg.maxh2cdata.max(cairn_nvmf::pdu::MIN_MAXH2CDATA) & !3;
        cfg.max_incapsule = cfg.max_incapsule.min(60 * 1024) & !15;
        let listener = TcpListener::bind(cfg.listen).map_err(|source| TargetError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let local = listener.local_addr().map_err(|source| TargetError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            cfg,
            local,
            subsystems: RwLock::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_cntlid: AtomicU16::new(1),
            genctr: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            epoch: std::time::Instant::now(),
        });
        let listener_fd = listener.as_raw_fd();
        let acceptor = {
            let shared = shared.clone();
            let reactors = reactors.clone();
            std::thread::Builder::new()
                .name("nvmf-acceptor".into())
                .spawn(move || accept_loop(listener, shared, reactors))
                .map_err(|source| TargetError::Bind {
                    addr: local,
                    source,
                })?
        };
        tracing::info!(addr = %local, "NVMe-oF/TCP target listening");
        Ok(Target {
            shared,
            reactors,
            owns_reactors,
            listener_fd,
            acceptor: Mutex::new(Some(acceptor)),
        })
    }

    /// The address the target listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// The reactors serving this target.
    pub fn reactors(&self) -> &Arc<Reactors> {
        &self.reactors
    }

    /// Exports a subsystem.
    pub fn add_subsystem(&self, cfg: SubsystemConfig) -> Result<(), TargetError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(TargetError::Shutdown);
        }
        if !cfg.nqn.starts_with("nqn.")
            || cfg.nqn.len() > 223
            || cfg.nqn == cairn_nvmf::DISCOVERY_NQN
        {
            return Err(TargetError::InvalidNqn { nqn: cfg.nqn });
        }
        let mut namespaces: Vec<Namespace> = Vec::with_capacity(cfg.namespaces.len());
        for n in cfg.namespaces {
            if n.nsid == 0 || n.nsid == u32::MAX || n.nsid > 1024 {
                return Err(TargetError::InvalidNamespace {
                    nsid: n.nsid,
                    reason: "namespace ids are 1..=1024",
                });
            }
            if namespaces.iter().any(|m| m.nsid == n.nsid) {
                return Err(TargetError::InvalidNamespace {
                    nsid: n.nsid,
                    reason: "duplicate namespace id",
                });
            }
            let info = n.device.info();
            if info.block_size != 512 && info.block_size != 4096 {
                return Err(TargetError::InvalidNamespace {
                    nsid: n.nsid,
                    reason: "block size must be 512 or 4096",
                });
            }
            namespaces.push(Namespace {
                nsid: n.nsid,
                uuid: n.uuid,
                device: n.device,
                noticed_blocks: AtomicU64::new(info.num_blocks),
                info,
            });
        }
        namespaces.sort_by_key(|n| n.nsid);
        let sub = Arc::new(Subsystem {
            nqn: cfg.nqn.clone(),
            serial: cfg.serial,
            model: cfg.model.unwrap_or_else(|| "Cairn".to_owned()),
            namespaces,
            allowed: RwLock::new(cfg.allowed_hosts),
            ctrls: Mutex::new(HashMap::new()),
        });
        let mut subs = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if subs.contains_key(&cfg.nqn) {
            return Err(TargetError::Exists { nqn: cfg.nqn });
        }
        subs.insert(cfg.nqn.clone(), sub);
        self.shared.genctr.fetch_add(1, Ordering::Relaxed);
        tracing::info!(nqn = %cfg.nqn, "subsystem added");
        Ok(())
    }

    /// Stops exporting a subsystem and disconnects its controllers.
    pub fn remove_subsystem(&self, nqn: &str) -> Result<(), TargetError> {
        let sub = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(nqn)
            .ok_or_else(|| TargetError::NotFound { nqn: nqn.into() })?;
        self.shared.genctr.fetch_add(1, Ordering::Relaxed);
        sub.kill_all();
        tracing::info!(nqn, "subsystem removed");
        Ok(())
    }

    /// Replaces the allow-list of a subsystem (None allows any host).
    /// Controllers of hosts no longer allowed are disconnected.
    pub fn set_allowed_hosts(
        &self,
        nqn: &str,
        hosts: Option<Vec<String>>,
    ) -> Result<(), TargetError> {
        let sub = self
            .shared
            .subsystem(nqn)
            .ok_or_else(|| TargetError::NotFound { nqn: nqn.into() })?;
        *sub.allowed.write().unwrap_or_else(|e| e.into_inner()) = hosts;
        self.shared.genctr.fetch_add(1, Ordering::Relaxed);
        let refused: Vec<_> = {
            let ctrls = sub.ctrls.lock().unwrap_or_else(|e| e.into_inner());
            ctrls
                .values()
                .filter(|c| !sub.host_allowed(&c.hostnqn))
                .cloned()
                .collect()
        };
        for c in refused {
            c.kill();
        }
        Ok(())
    }

    /// Tells hosts of namespaces whose device changed size since the last
    /// call (a nexus or a shared replica grew): every controller of the
    /// subsystem records the namespace in its Changed Namespace List and
    /// completes an Async Event Request with a namespace attribute notice
    /// (if the host enabled them). Returns the namespaces that changed.
    pub fn notice_resized(&self) -> usize {
        let subs: Vec<Arc<Subsystem>> = self
            .shared
            .subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut changed = 0;
        for sub in subs {
            for n in &sub.namespaces {
                let now = n.device.info().num_blocks;
                if n.noticed_blocks.swap(now, Ordering::AcqRel) == now {
                    continue;
                }
                changed += 1;
                tracing::info!(nqn = %sub.nqn, nsid = n.nsid, blocks = now, "namespace resized, notifying hosts");
                let ctrls: Vec<_> = sub
                    .ctrls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .values()
                    .cloned()
                    .collect();
                for c in ctrls {
                    c.namespace_changed(n.nsid);
                }
            }
        }
        changed
    }

    /// The exported subsystems, sorted by NQN.
    pub fn list_subsystems(&self) -> Vec<SubsystemInfo> {
        let subs = self
            .shared
            .subsystems
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SubsystemInfo> = subs
            .values()
            .map(|s| SubsystemInfo {
                nqn: s.nqn.clone(),
                serial: s.serial.clone(),
                model: s.model.clone(),
                namespaces: s.namespaces.iter().map(|n| (n.nsid, n.uuid)).collect(),
                allowed_hosts: s.allowed.read().unwrap_or_else(|e| e.into_inner()).clone(),
                controllers: s.ctrls.lock().unwrap_or_else(|e| e.into_inner()).len(),
            })
            .collect();
        out.sort_by(|a, b| a.nqn.cmp(&b.nqn));
        out
    }

    /// Stops accepting, disconnects every queue and, if the target started
    /// its own reactors, stops them.
    pub fn shutdown(&self) {
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        // SAFETY: the listener is open until the acceptor thread, joined
        // below, drops it; shutting it down makes its accept() fail.
        unsafe {
            libc::shutdown(self.listener_fd, libc::SHUT_RDWR);
        }
        if let Some(t) = self
            .acceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = t.join();
        }
        let subs: Vec<_> = self
            .shared
            .subsystems
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, s)| s)
            .collect();
        for s in subs {
            s.kill_all();
        }
        let conns: Vec<_> = self
            .shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for c in conns {
            c.kill();
        }
        if self.owns_reactors {
            self.reactors.shutdown();
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, reactors: Arc<Reactors>) {
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.stopped.load(Ordering::Acquire) {
                    return;
                }
                tracing::warn!(error = %e, "accept failed");
                // Out of descriptors and similar: do not spin.
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
        };
        if shared.stopped.load(Ordering::Acquire) {
            return;
        }
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let handle = ConnHandle::new(stream.as_raw_fd());
        shared
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, handle.clone());
        let idx = reactors.next_index();
        let sh = shared.clone();
        let spawned = reactors.spawn(idx, move || async move {
            match monoio::net::TcpStream::from_std(stream) {
                Ok(s) => conn::serve(s, peer, sh.clone(), handle.clone()).await,
                Err(e) => tracing::warn!(error = %e, "adopting connection failed"),
            }
            handle.closed();
            sh.conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        });
        if spawned.is_err() {
            shared
                .conns
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        }
    }
}

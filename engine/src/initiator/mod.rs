//! The NVMe-oF/TCP initiator: a remote namespace as a
//! [`cairn_bdev::BlockDevice`].
//!
//! [`NvmfDevice::connect`] sets up the admin queue over a blocking socket on
//! the calling (control) thread: ICReq, Connect, enabling the controller
//! through Property Set, Identify, and Set Features for the number of I/O
//! queues; a small thread sends Keep Alive every KATO/2 and reconnects the
//! admin queue if it drops. [`BlockDevice::open_channel`], called on a
//! reactor, connects one I/O queue and hands its socket to that reactor:
//! from then on commands, data and completions never leave the reactor.
//!
//! ```no_run
//! # fn demo() -> Result<(), cairn_engine::initiator::InitiatorError> {
//! use cairn_bdev::BlockDevice;
//! use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
//! let opts = InitiatorOptions::new(
//!     "127.0.0.1:8420".parse().unwrap(),
//!     "nqn.2024-01.dev.cairn:replica:00000000-0000-0000-0000-000000000000",
//!     "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001",
//! );
//! let dev = NvmfDevice::connect(opts)?;
//! println!("{} blocks of {} bytes", dev.info().num_blocks, dev.info().block_size);
//! # Ok(()) }
//! ```

mod channel;
mod sync_queue;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use cairn_bdev::{BdevError, BlockDevice, DeviceInfo, IoChannel};
use cairn_nvmf::cmd::{admin, fabrics, prop, ConnectData, Sqe};
use cairn_nvmf::identify::{cns, fid};
use cairn_nvmf::pdu::{Digests, TermError};
use cairn_nvmf::status::Sct;
use cairn_nvmf::Status;
use uuid::Uuid;

pub use channel::NvmfChannel;
use channel::QueueParts;
use sync_queue::SyncQueue;

/// How to reach and use a remote namespace.
#[derive(Debug, Clone)]
pub struct InitiatorOptions {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    /// Host identifier sent in Connect.
    pub hostid: [u8; 16],
    /// Namespace to use.
    pub nsid: u32,
    /// I/O queues to ask for.
    pub io_queues: u16,
    /// Entries per I/O queue (at most the controller's MQES + 1).
    pub queue_depth: u16,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Keep-alive timeout; zero disables keep-alive.
    pub kato: Duration,
    /// Connect and admin command timeout.
    pub timeout: Duration,
}

impl InitiatorOptions {
    /// Options with defaults: nsid 1, 4 I/O queues of depth 128, no digests,
    /// KATO 5 s, timeout 5 s.
    pub fn new(addr: SocketAddr, subnqn: &str, hostnqn: &str) -> Self {
        InitiatorOptions {
            addr,
            subnqn: subnqn.to_owned(),
            hostnqn: hostnqn.to_owned(),
            hostid: *Uuid::new_v5(&Uuid::NAMESPACE_OID, hostnqn.as_bytes()).as_bytes(),
            nsid: 1,
            io_queues: 4,
            queue_depth: 128,
            header_digest: false,
            data_digest: false,
            kato: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }

    fn digests(&self) -> Digests {
        Digests {
            header: self.header_digest,
            data: self.data_digest,
        }
    }
}

/// Errors of connecting to a remote controller.
#[derive(Debug, thiserror::Error)]
pub enum InitiatorError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("transport error: {0}")]
    Transport(#[from] TermError),
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
    #[error("connect refused with status {status:?} (result {result:#x})")]
    Connect { status: Status, result: u32 },
    #[error("{op} failed with status {status:?}")]
    Command { op: &'static str, status: Status },
    #[error("namespace {nsid} does not exist")]
    NoNamespace { nsid: u32 },
    #[error("controller did not become ready")]
    NotReady,
    #[error("no I/O queue left (the controller granted {granted})")]
    NoQueue { granted: u16 },
}

impl From<InitiatorError> for BdevError {
    fn from(e: InitiatorError) -> Self {
        BdevError::Unavailable {
            reason: e.to_string(),
        }
    }
}

/// The one place an NVMe status from a remote controller becomes a block
/// device error (the inverse of the target's mapping).
pub(crate) fn status_error(
    status: Status,
    op: &'static str,
    lba: u64,
    blocks: u64,
    capacity: u64,
) -> Result<(), BdevError> {
    if status.is_success() {
        return Ok(());
    }
    Err(match (status.sct, status.sc) {
        (Sct::Generic, 0x80) => BdevError::OutOfRange {
            lba,
            blocks,
            capacity,
        },
        (Sct::Generic, 0x81) => BdevError::NoSpace,
        (Sct::Generic, 0x20) => BdevError::ReadOnly,
        (Sct::Generic, 0x01) => BdevError::Unsupported { op },
        (Sct::Media, 0x81) => BdevError::Integrity { lba },
        (Sct::Path, _) | (Sct::Generic, 0x82) | (Sct::Generic, 0x22) => BdevError::Unavailable {
            reason: format!("{op}: controller status {status:?}"),
        },
        _ => BdevError::Io {
            op,
            source: std::io::Error::other(format!("NVMe status {status:?}")),
        },
    })
}

struct Admin {
    q: Option<SyncQueue>,
    cntlid: u16,
    granted: u16,
    ioccsz: u32,
    maxh2cdata: u32,
    max_transfer: usize,
    mqes: u16,
}

pub(crate) struct DevInner {
    opts: InitiatorOptions,
    /// Geometry at connect; `num_blocks` below is the live size.
    info: DeviceInfo,
    /// Namespace size in blocks, shared with the I/O queues and updated by
    /// [`NvmfDevice::rescan`].
    num_blocks: Arc<std::sync::atomic::AtomicU64>,
    uuid: Option<Uuid>,
    /// The namespace's EUI64 at connect: a Cairn replica's incarnation.
    eui64: u64,
    admin: Mutex<Admin>,
    used_qids: Mutex<Vec<u16>>,
    stop: AtomicBool,
    keepalive: Mutex<Option<JoinHandle<()>>>,
}

impl DevInner {
    pub(crate) fn release_qid(&self, qid: u16) {
        self.used_qids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&q| q != qid);
    }

    fn admin_cmd(
        &self,
        sqe: Sqe,
        data_in: usize,
        what: &'static str,
    ) -> Result<(u64, Vec<u8>), InitiatorError> {
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let q =
            a.q.as_mut()
                .ok_or(InitiatorError::Protocol("admin queue down"))?;
        match q.submit(sqe, None, data_in) {
            Ok((cqe, data)) if cqe.status.is_success() => Ok((cqe.result, data)),
            Ok((cqe, _)) => Err(InitiatorError::Command {
                op: what,
                status: cqe.status,
            }),
            Err(e) => {
                a.q = None;
                Err(e)
            }
        }
    }

    fn keep_alive_loop(weak: Weak<DevInner>, period: Duration) {
        loop {
            std::thread::park_timeout(period);
            let Some(dev) = weak.upgrade() else { return };
            if dev.stop.load(Ordering::Acquire) {
                return;
            }
            let mut sqe = Sqe::default();
            sqe.set_opcode(admin::KEEP_ALIVE);
            if dev.admin_cmd(sqe, 0, "keep alive").is_err() {
                tracing::warn!(nqn = %dev.opts.subnqn, "keep-alive failed, reconnecting");
                if let Err(e) = dev.reconnect_admin() {
                    tracing::warn!(nqn = %dev.opts.subnqn, error = %e, "reconnect failed");
                }
            }
        }
    }

    /// Connects I/O queue `qid` to the current association (blocking),
    /// reconnecting the admin queue first if it is down.
    pub(crate) fn connect_io(&self, qid: u16) -> Result<QueueParts, InitiatorError> {
        match self.try_connect_io(qid) {
            Ok(p) => Ok(p),
            Err(InitiatorError::Connect { .. }) => {
                // The association is gone (the controller dropped it): start
                // a new one and try again.
                self.reconnect_admin()?;
                self.try_connect_io(qid)
            }
            Err(e) => Err(e),
        }
    }

    fn try_connect_io(&self, qid: u16) -> Result<QueueParts, InitiatorError> {
        let down = self
            .admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .q
            .is_none();
        if down {
            self.reconnect_admin()?;
        }
        let (cntlid, ioccsz, maxh2cdata, max_transfer, mqes) = {
            let a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
            (a.cntlid, a.ioccsz, a.maxh2cdata, a.max_transfer, a.mqes)
        };
        let opts = &self.opts;
        let depth = opts.queue_depth.clamp(2, mqes.saturating_add(1).max(2));
        let data = ConnectData {
            hostid: opts.hostid,
            cntlid,
            subnqn: opts.subnqn.clone(),
            hostnqn: opts.hostnqn.clone(),
        };
        let (q, _) = SyncQueue::connect(
            opts.addr,
            opts.timeout,
            opts.digests(),
            qid,
            depth - 1,
            0,
            &data,
        )?;
        Ok(QueueParts {
            sock: q.sock,
            layout: q.layout,
            lim: q.lim,
            qid,
            nsid: opts.nsid,
            block_size: self.info.block_size,
            num_blocks: self.num_blocks.clone(),
            depth,
            max_incapsule: (ioccsz as usize * 16).saturating_sub(64),
            maxh2cdata: maxh2cdata as usize,
            max_transfer,
        })
    }

    /// Connects (or reconnects) the admin queue and enables the controller.
    fn reconnect_admin(&self) -> Result<(), InitiatorError> {
        let admin = connect_admin(&self.opts)?;
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        *a = admin;
        Ok(())
    }
}

fn prop_get(q: &mut SyncQueue, offset: u32, wide: bool) -> Result<u64, InitiatorError> {
    let mut sqe = Sqe::default();
    sqe.set_opcode(fabrics::OPCODE);
    sqe.0[4] = fabrics::PROPERTY_GET;
    sqe.0[40] = u8::from(wide);
    sqe.0[44..48].copy_from_slice(&offset.to_le_bytes());
    let (cqe, _) = q.submit(sqe, None, 0)?;
    if !cqe.status.is_success() {
        return Err(InitiatorError::Command {
            op: "property get",
            status: cqe.status,
        });
    }
    Ok(cqe.result)
}

fn admin_sync(
    q: &mut SyncQueue,
    sqe: Sqe,
    data_in: usize,
    op: &'static str,
) -> Result<(u64, Vec<u8>), InitiatorError> {
    let (cqe, data) = q.submit(sqe, None, data_in)?;
    if !cqe.status.is_success() {
        return Err(InitiatorError::Command {
            op,
            status: cqe.status,
        });
    }
    Ok((cqe.result, data))
}

fn identify_sqe(cns_v: u8, nsid: u32) -> Sqe {
    let mut sqe = Sqe::default();
    sqe.set_opcode(admin::IDENTIFY);
    sqe.set_nsid(nsid);
    sqe.set_cdw(10, u32::from(cns_v));
    sqe
}

fn connect_admin(opts: &InitiatorOptions) -> Result<Admin, InitiatorError> {
    let data = ConnectData {
        hostid: opts.hostid,
        cntlid: 0xffff,
        subnqn: opts.subnqn.clone(),
        hostnqn: opts.hostnqn.clone(),
    };
    let kato = u32::try_from(opts.kato.as_millis()).unwrap_or(u32::MAX);
    let (mut q, cntlid) =
        SyncQueue::connect(opts.addr, opts.timeout, opts.digests(), 0, 31, kato, &data)?;
    let cap = prop_get(&mut q, prop::CAP, true)?;
    let mqes = (cap & 0xffff) as u16;
    // CC: enable, NVM command set, 4 KiB pages, IOSQES 6, IOCQES 4.
    let cc: u64 = 1 | (6 << 16) | (4 << 20);
    let mut sqe = Sqe::default();
    sqe.set_opcode(fabrics::OPCODE);
    sqe.0[4] = fabrics::PROPERTY_SET;
    sqe.0[44..48].copy_from_slice(&prop::CC.to_le_bytes());
    sqe.0[48..56].copy_from_slice(&cc.to_le_bytes());
    admin_sync(&mut q, sqe, 0, "property set")?;
    let deadline = std::time::Instant::now() + opts.timeout;
    loop {
        let csts = prop_get(&mut q, prop::CSTS, false)?;
        if csts & 1 == 1 {
            break;
        }
        if csts & 2 != 0 || std::time::Instant::now() > deadline {
            return Err(InitiatorError::NotReady);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, id) = admin_sync(&mut q, identify_sqe(cns::CONTROLLER, 0), 4096, "identify")?;
    let mdts = id[77];
    let ioccsz = u32::from_le_bytes([id[1792], id[1793], id[1794], id[1795]]);
    let max_transfer = if mdts == 0 {
        16 << 20
    } else {
        (4096usize << mdts.min(12)).min(16 << 20)
    };
    let mut sqe = Sqe::default();
    sqe.set_opcode(admin::SET_FEATURES);
    let n = u32::from(opts.io_queues.max(1) - 1);
    sqe.set_cdw(10, u32::from(fid::NUM_QUEUES));
    sqe.set_cdw(11, n | (n << 16));
    let (res, _) = admin_sync(&mut q, sqe, 0, "set features")?;
    let granted = ((res & 0xffff).min((res >> 16) & 0xffff) + 1) as u16;
    Ok(Admin {
        maxh2cdata: q.maxh2cdata,
        q: Some(q),
        cntlid,
        granted,
        ioccsz,
        max_transfer,
        mqes,
    })
}

/// A namespace of a remote NVMe-oF/TCP controller.
#[derive(Clone)]
pub struct NvmfDevice {
    inner: Arc<DevInner>,
}

impl NvmfDevice {
    /// Connects the admin queue, enables the controller and identifies the
    /// namespace. Blocks; call it from a control thread.
    pub fn connect(opts: InitiatorOptions) -> Result<NvmfDevice, InitiatorError> {
        let mut admin = connect_admin(&opts)?;
        let q = admin
            .q
            .as_mut()
            .ok_or(InitiatorError::Protocol("admin queue down"))?;
        let (_, ns) = admin_sync(q, identify_sqe(cns::NAMESPACE, opts.nsid), 4096, "identify")?;
        let nsze = u64::from_le_bytes(ns[0..8].try_into().unwrap_or_default());
        if nsze == 0 {
            return Err(InitiatorError::NoNamespace { nsid: opts.nsid });
        }
        let flbas = usize::from(ns[26] & 0xf);
        let lbaf = u32::from_le_bytes(
            ns[128 + flbas * 4..132 + flbas * 4]
                .try_into()
                .unwrap_or_default(),
        );
        let lbads = (lbaf >> 16) & 0xff;
        if !(9..=12).contains(&lbads) {
            return Err(InitiatorError::Protocol("unsupported block size"));
        }
        let dealloc_reads_zeroes = ns[33] & 0x7 == 1;
        let eui64 = u64::from_be_bytes(ns[120..128].try_into().unwrap_or_default());
        let uuid = admin_sync(
            q,
            identify_sqe(cns::NS_DESC_LIST, opts.nsid),
            4096,
            "identify",
        )
        .ok()
        .and_then(|(_, d)| find_uuid(&d));
        let mut sqe = identify_sqe(cns::CONTROLLER, 0);
        sqe.set_cdw(10, u32::from(cns::CONTROLLER));
        let (_, id) = admin_sync(q, sqe, 4096, "identify")?;
        let vwc = id[525] & 1 == 1;
        let info = DeviceInfo {
            block_size: 1 << lbads,
            num_blocks: nsze,
            volatile_write_cache: vwc,
            dealloc_reads_zeroes,
        };
        let inner = Arc::new(DevInner {
            opts,
            num_blocks: Arc::new(std::sync::atomic::AtomicU64::new(info.num_blocks)),
            info,
            uuid,
            eui64,
            admin: Mutex::new(admin),
            used_qids: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            keepalive: Mutex::new(None),
        });
        if !inner.opts.kato.is_zero() {
            let weak = Arc::downgrade(&inner);
            let period = inner.opts.kato / 2;
            let t = std::thread::Builder::new()
                .name("nvmf-keepalive".into())
                .spawn(move || DevInner::keep_alive_loop(weak, period))?;
            *inner.keepalive.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        }
        Ok(NvmfDevice { inner })
    }

    /// The namespace UUID the controller reports, if any.
    pub fn uuid(&self) -> Option<Uuid> {
        self.inner.uuid
    }

    /// The controller id of the current association.
    pub fn cntlid(&self) -> u16 {
        self.inner
            .admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cntlid
    }

    /// I/O queues the controller granted.
    pub fn granted_queues(&self) -> u16 {
        self.inner
            .admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .granted
    }

    /// Whether the admin queue is connected.
    pub fn is_connected(&self) -> bool {
        self.inner
            .admin
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .q
            .is_some()
    }

    /// Reconnects the admin queue (a new association); existing I/O
    /// channels of the old one stop working and must be reopened.
    pub fn reconnect(&self) -> Result<(), InitiatorError> {
        self.inner.reconnect_admin()
    }

    /// Sends an admin command and returns its result and `data_in` bytes of
    /// data (identify, log pages). Blocks.
    pub fn admin_command(
        &self,
        sqe: Sqe,
        data_in: usize,
    ) -> Result<(u64, Vec<u8>), InitiatorError> {
        self.inner.admin_cmd(sqe, data_in, "admin command")
    }

    /// Identifies the namespace again and takes its current size (after the
    /// remote volume grew); returns it in blocks. Blocks on the admin queue.
    pub fn rescan(&self) -> Result<u64, InitiatorError> {
        let nsid = self.inner.opts.nsid;
        let (_, ns) = self
            .inner
            .admin_cmd(identify_sqe(cns::NAMESPACE, nsid), 4096, "identify")?;
        let nsze = u64::from_le_bytes(ns[0..8].try_into().unwrap_or_default());
        if nsze == 0 {
            return Err(InitiatorError::NoNamespace { nsid });
        }
        self.inner.num_blocks.store(nsze, Ordering::Release);
        Ok(nsze)
    }

    /// Reads `len` bytes of log page `lid` from byte `offset`.
    pub fn get_log_page(&self, lid: u8, offset: u64, len: u32) -> Result<Vec<u8>, InitiatorError> {
        let sqe = get_log_page_sqe(lid, offset, len);
        let (_, d) = self.inner.admin_cmd(sqe, len as usize, "get log page")?;
        Ok(d)
    }

    /// Opens an I/O queue on the calling reactor. Blocks for the connection
    /// handshake (one round trip).
    pub fn open_io_channel(&self) -> Result<NvmfChannel, InitiatorError> {
        let granted = {
            let a = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
            if a.q.is_none() {
                return Err(InitiatorError::Protocol("admin queue down"));
            }
            a.granted
        };
        let qid = {
            let mut used = self
                .inner
                .used_qids
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let Some(qid) = (1..=granted).find(|q| !used.contains(q)) else {
                return Err(InitiatorError::NoQueue { granted });
            };
            used.push(qid);
            qid
        };
        let parts = match self.inner.connect_io(qid) {
            Ok(p) => p,
            Err(e) => {
                self.inner.release_qid(qid);
                return Err(e);
            }
        };
        NvmfChannel::start(parts, self.inner.clone()).map_err(|e| {
            self.inner.release_qid(qid);
            InitiatorError::Io(std::io::Error::other(e.to_string()))
        })
    }

    /// Disconnects the admin queue and stops keep-alive.
    pub fn disconnect(&self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(t) = self
            .inner
            .keepalive
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            t.thread().unpark();
            let _ = t.join();
        }
        let mut a = self.inner.admin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = a.q.take() {
            let _ = q.sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A Get Log Page command for `len` bytes (a multiple of 4) at `offset`.
pub fn get_log_page_sqe(lid: u8, offset: u64, len: u32) -> Sqe {
    let numd = (len / 4).max(1) - 1;
    let mut sqe = Sqe::default();
    sqe.set_opcode(admin::GET_LOG_PAGE);
    sqe.set_nsid(u32::MAX);
    sqe.set_cdw(10, u32::from(lid) | ((numd & 0xffff) << 16));
    sqe.set_cdw(11, numd >> 16);
    sqe.set_cdw(12, offset as u32);
    sqe.set_cdw(13, (offset >> 32) as u32);
    sqe
}

fn find_uuid(d: &[u8]) -> Option<Uuid> {
    let mut o = 0;
    while o + 4 <= d.len() {
        let (nidt, nidl) = (d[o], usize::from(d[o + 1]));
        if nidt == 0 {
            return None;
        }
        let nid = d.get(o + 4..o + 4 + nidl)?;
        if nidt == 3 && nidl == 16 {
            return Uuid::from_slice(nid).ok();
        }
        o += 4 + nidl;
    }
    None
}

impl BlockDevice for NvmfDevice {
    fn incarnation(&self) -> Option<u64> {
        (self.inner.eui64 != 0).then_some(self.inner.eui64)
    }

    fn refresh(&self) -> Result<(), BdevError> {
        self.rescan()
            .map(|_| ())
            .map_err(|e| BdevError::Unavailable {
                reason: format!("rescanning the namespace: {e}"),
            })
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            num_blocks: self.inner.num_blocks.load(Ordering::Acquire),
            ..self.inner.info.clone()
        }
    }

    /// Opens a new I/O queue owned by the calling reactor (must be called on
    /// a monoio reactor thread).
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(self.open_io_channel()?))
    }
}

impl Drop for DevInner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let mut a = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = a.q.take() {
            let _ = q.sock.shutdown(std::net::Shutdown::Both);
        }
    }
}

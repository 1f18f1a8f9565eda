//! Controllers: the state one host's association holds (registers, features,
//! keep-alive), shared by its admin queue and I/O queues, and the admin
//! command set, as plain synchronous functions over that state.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use cairn_nvmf::cmd::{prop, Command};
use cairn_nvmf::identify::{self as id, cns, fid, lid};
use cairn_nvmf::Status;

use super::{ConnHandle, Shared, Subsystem};

/// Firmware revision reported in identify and the firmware log.
pub(crate) const FIRMWARE: &str = env!("CARGO_PKG_VERSION");

/// Largest log page transfer (a host asking for more is refused rather
/// than making the target allocate it).
const MAX_LOG_LEN: u32 = 1 << 20;

/// CAP.TO: worst-case ready time in 500 ms units.
const CAP_TIMEOUT: u64 = 15;

/// Outstanding asynchronous event requests per controller (AERL + 1).
pub(crate) const MAX_AERS: usize = 4;

/// Async Event Configuration bit enabling namespace attribute notices.
const AEC_NS_ATTR: u32 = 1 << 8;

/// A controller's asynchronous events: the host's outstanding Async Event
/// Requests and the notice waiting for one.
///
/// A namespace that changes (it grew) joins `changed` and, when the host
/// enabled namespace attribute notices, makes a notice pending. A pending
/// notice completes the oldest AER; then notices are masked until the host
/// reads the Changed Namespace List without Retain Asynchronous Event, which
/// clears the list, as the specification orders (the Linux host reads it
/// after each notice and then rescans every namespace).
#[derive(Default)]
struct Events {
    /// Command ids of outstanding AERs, oldest first.
    aers: VecDeque<u16>,
    /// Namespaces changed since the host last cleared the log.
    changed: Vec<u32>,
    notice_pending: bool,
    notice_masked: bool,
    /// The admin queue's event task, woken when a notice is raised from
    /// another thread.
    waker: Option<Waker>,
}

pub(crate) struct Controller {
    pub cntlid: u16,
    /// None for a discovery controller.
    pub subsys: Option<Arc<Subsystem>>,
    pub hostnqn: String,
    pub kato_ms: AtomicU32,
    cc: AtomicU32,
    csts: AtomicU32,
    aec: AtomicU32,
    /// Granted I/O queues (0: the host has not asked; the maximum applies).
    io_queues: AtomicU32,
    /// Volatile write cache enabled (the host may turn it off: then every
    /// write is durable before it completes).
    wce: AtomicBool,
    events: Mutex<Events>,
    /// The admin queue's submission queue head, for AER completions.
    pub admin_sqhd: AtomicU16,
    /// Time of the last admin command, ms since the target's epoch.
    pub last_ms: AtomicU64,
    pub dead: AtomicBool,
    pub queues: Mutex<HashMap<u16, Arc<ConnHandle>>>,
}

/// The answer to an admin command.
pub(crate) struct Reply {
    pub status: Status,
    pub result: u64,
    pub data: Option<Vec<u8>>,
}

impl Reply {
    pub fn status(status: Status) -> Self {
        Reply {
            status,
            result: 0,
            data: None,
        }
    }
    pub fn ok(result: u64) -> Self {
        Reply {
            status: Status::SUCCESS,
            result,
            data: None,
        }
    }
    fn data(data: Vec<u8>) -> Self {
        Reply {
            status: Status::SUCCESS,
            result: 0,
            data: Some(data),
        }
    }
}

impl Controller {
    pub fn new(
        cntlid: u16,
        subsys: Option<Arc<Subsystem>>,
        hostnqn: String,
        kato_ms: u32,
        now_ms: u64,
    ) -> Self {
        Controller {
            cntlid,
            subsys,
            hostnqn,
            kato_ms: AtomicU32::new(kato_ms),
            cc: AtomicU32::new(0),
            csts: AtomicU32::new(0),
            aec: AtomicU32::new(0),
            io_queues: AtomicU32::new(0),
            wce: AtomicBool::new(true),
            events: Mutex::new(Events::default()),
            admin_sqhd: AtomicU16::new(0),
            last_ms: AtomicU64::new(now_ms),
            dead: AtomicBool::new(false),
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Disconnects every queue of this controller and forgets it.
    pub fn kill(&self) {
        if self.dead.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(s) = &self.subsys {
            let mut ctrls = s.ctrls.lock().unwrap_or_else(|e| e.into_inner());
            if ctrls
                .get(&self.cntlid)
                .is_some_and(|c| std::ptr::eq(Arc::as_ptr(c), self))
            {
                ctrls.remove(&self.cntlid);
            }
        }
        let queues: Vec<_> = self
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        for q in queues {
            q.kill();
        }
        self.wake_events();
    }

    fn events(&self) -> MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether writes must be durable before they complete: the host turned
    /// the volatile write cache off.
    pub fn write_through(&self) -> bool {
        !self.wce.load(Ordering::Acquire)
    }

    /// Holds an Async Event Request; false when AERL are outstanding.
    pub fn hold_aer(&self, cid: u16) -> bool {
        let mut ev = self.events();
        if ev.aers.len() >= MAX_AERS {
            return false;
        }
        ev.aers.push_back(cid);
        true
    }

    /// Records that namespace `nsid` changed and wakes the admin queue's
    /// event task if a notice is due. Any thread.
    pub fn namespace_changed(&self, nsid: u32) {
        let enabled = self.aec.load(Ordering::Acquire) & AEC_NS_ATTR != 0;
        let waker = {
            let mut ev = self.events();
            if !ev.changed.contains(&nsid) {
                ev.changed.push(nsid);
            }
            if !enabled || ev.notice_masked {
                return;
            }
            ev.notice_pending = true;
            ev.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Completions due now, as `(cid, dword 0)`; with `waker`, registers it
    /// for the next notice when none is due.
    pub fn due_events(&self, waker: Option<&Waker>) -> Vec<(u16, u32)> {
        let mut ev = self.events();
        let mut out = Vec::new();
        if ev.notice_pending {
            if let Some(cid) = ev.aers.pop_front() {
                ev.notice_pending = false;
                ev.notice_masked = true;
                out.push((cid, id::AEN_NS_ATTR_CHANGED));
            }
        }
        if out.is_empty() {
            if let Some(w) = waker {
                ev.waker = Some(w.clone());
            }
        }
        out
    }

    /// Wakes the event task so that it sees the controller is dead.
    fn wake_events(&self) {
        if let Some(w) = self.events().waker.take() {
            w.wake();
        }
    }

    /// The Changed Namespace List; read without `rae` it is cleared and
    /// notices are unmasked.
    fn changed_ns_page(&self, rae: bool) -> Vec<u8> {
        let mut ev = self.events();
        let page = id::changed_ns_log(&ev.changed).to_vec();
        if !rae {
            ev.changed.clear();
            ev.notice_masked = false;
        }
        page
    }

    pub fn ready(&self) -> bool {
        self.csts.load(Ordering::Acquire) & 1 == 1
    }

    /// I/O queues the host may connect.
    pub fn max_qid(&self, shared: &Shared) -> u16 {
        match self.io_queues.load(Ordering::Acquire) {
            0 => shared.cfg.max_io_queues,
            n => n as u16,
        }
    }

    fn cap(&self, shared: &Shared) -> u64 {
        let mqes = u64::from(shared.cfg.queue_depth - 1);
        // MQES, CQR, TO, CSS = NVM command set.
        mqes | (1 << 16) | (CAP_TIMEOUT << 24) | (1 << 37)
    }

    fn property_get(&self, shared: &Shared, wide: bool, offset: u32) -> Reply {
        let v = match (offset, wide) {
            (prop::CAP, true) => self.cap(shared),
            (prop::VS, false) => u64::from(id::NVME_VERSION),
            (prop::CC, false) => u64::from(self.cc.load(Ordering::Acquire)),
            (prop::CSTS, false) => u64::from(self.csts.load(Ordering::Acquire)),
            _ => return Reply::status(Status::INVALID_FIELD),
        };
        Reply::ok(v)
    }

    fn property_set(&self, wide: bool, offset: u32, value: u64) -> Reply {
        if offset != prop::CC || wide {
            return Reply::status(Status::INVALID_FIELD);
        }
        let new = value as u32;
        let old = self.cc.swap(new, Ordering::AcqRel);
        let en = new & 1 == 1;
        let shn = (new >> 14) & 0x3;
        let mut csts = self.csts.load(Ordering::Acquire);
        if en && old & 1 == 0 {
            // IOSQES 6 and IOCQES 4 are the only sizes NVMe/TCP allows.
            let iosqes = (new >> 16) & 0xf;
            let iocqes = (new >> 20) & 0xf;
            if (iosqes != 0 && iosqes != 6) || (iocqes != 0 && iocqes != 4) {
                csts |= 1 << 1; // CFS
            } else {
                csts |= 1;
            }
        } else if !en {
            csts &= !1;
        }
        if shn != 0 {
            csts = (csts & !(0x3 << 2)) | (0x2 << 2); // shutdown complete
        } else {
            csts &= !(0x3 << 2);
        }
        self.csts.store(csts, Ordering::Release);
        Reply::ok(0)
    }

    fn identify(&self, shared: &Shared, cns_v: u8, nsid: u32, csi: u8, subnqn: &str) -> Reply {
        let sub = self.subsys.as_deref();
        let ns_of = |nsid: u32| sub.and_then(|s| s.namespaces.iter().find(|n| n.nsid == nsid));
        // The device's live size: a namespace may have grown online.
        let ident = |n: &super::Namespace| id::NamespaceIdentity {
            block_size: n.info.block_size,
            num_blocks: n.device.info().num_blocks,
            uuid: *n.uuid.as_bytes(),
            dealloc_reads_zeroes: n.info.dealloc_reads_zeroes,
            write_protected: false,
            eui64: n.device.incarnation().unwrap_or(0),
        };
        match cns_v {
            cns::CONTROLLER => {
                let (serial, model) = match sub {
                    Some(s) => (s.serial.as_str(), s.model.as_str()),
                    None => ("discovery", "Cairn"),
                };
                let nn = sub
                    .and_then(|s| s.namespaces.iter().map(|n| n.nsid).max())
                    .unwrap_or(0)
                    .max(if sub.is_some() { 1 } else { 0 });
                let vwc =
                    sub.is_some_and(|s| s.namespaces.iter().any(|n| n.info.volatile_write_cache));
                let b = id::identify_controller(&id::ControllerIdentity {
                    serial,
                    model,
                    firmware: FIRMWARE,
                    cntlid: self.cntlid,
                    subnqn,
                    discovery: sub.is_none(),
                    mdts: shared.cfg.mdts,
                    nn,
                    vwc,
                    max_incapsule: shared.cfg.max_incapsule,
                    maxcmd: shared.cfg.queue_depth,
                });
                Reply::data(b.to_vec())
            }
            cns::NAMESPACE => match ns_of(nsid) {
                Some(n) => Reply::data(id::identify_namespace(&ident(n)).to_vec()),
                // An inactive but valid id reads as zeros.
                None if sub.is_some() && nsid != 0 && nsid != u32::MAX && nsid <= 1024 => {
                    Reply::data(vec![0u8; id::IDENTIFY_LEN])
                }
                None => Reply::status(Status::INVALID_NS),
            },
            cns::ACTIVE_NS_LIST | cns::CS_ACTIVE_NS_LIST => {
                if cns_v == cns::CS_ACTIVE_NS_LIST && csi != id::CSI_NVM {
                    return Reply::data(vec![0u8; id::IDENTIFY_LEN]);
                }
                if nsid >= 0xffff_fffe {
                    return Reply::status(Status::INVALID_NS);
                }
                let ids: Vec<u32> = sub
                    .map(|s| s.namespaces.iter().map(|n| n.nsid).collect())
                    .unwrap_or_default();
                Reply::data(id::active_ns_list(&ids, nsid).to_vec())
            }
            cns::NS_DESC_LIST => match ns_of(nsid) {
                Some(n) => Reply::data(id::ns_descriptors(n.uuid.as_bytes()).to_vec()),
                None => Reply::status(Status::INVALID_NS),
            },
            cns::CS_NAMESPACE => {
                if csi != id::CSI_NVM {
                    return Reply::status(Status::INVALID_FIELD);
                }
                match ns_of(nsid) {
                    // The NVM command set specific structure: all defaults.
                    Some(_) => Reply::data(vec![0u8; id::IDENTIFY_LEN]),
                    None => Reply::status(Status::INVALID_NS),
                }
            }
            cns::CS_CONTROLLER => {
                if csi != id::CSI_NVM || sub.is_none() {
                    return Reply::status(Status::INVALID_FIELD);
                }
                // NVM command set controller limits: zero means no limit.
                Reply::data(vec![0u8; id::IDENTIFY_LEN])
            }
            cns::CS_INDEP_NAMESPACE => match ns_of(nsid) {
                Some(n) => Reply::data(id::identify_ns_cs_indep(&ident(n)).to_vec()),
                None => Reply::status(Status::INVALID_NS),
            },
            _ => Reply::status(Status::INVALID_FIELD),
        }
    }

    fn discovery_page(&self, shared: &Shared, local: SocketAddr) -> Vec<u8> {
        let subs = shared.subsystems.read().unwrap_or_else(|e| e.into_inner());
        let mut entries: Vec<id::DiscoveryEntry> = subs
            .values()
            .filter(|s| s.host_allowed(&self.hostnqn))
            .map(|s| id::DiscoveryEntry {
                subnqn: s.nqn.clone(),
                traddr: local.ip().to_string(),
                trsvcid: local.port().to_string(),
                ipv6: local.is_ipv6(),
                portid: 1,
                discovery: false,
            })
            .collect();
        drop(subs);
        entries.sort_by(|a, b| a.subnqn.cmp(&b.subnqn));
        entries.push(id::DiscoveryEntry {
            subnqn: cairn_nvmf::DISCOVERY_NQN.to_owned(),
            traddr: local.ip().to_string(),
            trsvcid: local.port().to_string(),
            ipv6: local.is_ipv6(),
            portid: 1,
            discovery: true,
        });
        id::discovery_log(shared.genctr.load(Ordering::Relaxed), &entries)
    }

    fn log_page(
        &self,
        shared: &Shared,
        local: SocketAddr,
        lid_v: u8,
        rae: bool,
        len: u32,
        offset: u64,
    ) -> Reply {
        if !offset.is_multiple_of(4) || len > MAX_LOG_LEN {
            return Reply::status(Status::INVALID_FIELD);
        }
        let page: Vec<u8> = match (lid_v, self.subsys.is_some()) {
            (lid::DISCOVERY, false) => self.discovery_page(shared, local),
            (lid::ERROR, _) => vec![0u8; 64],
            (lid::SMART, true) => id::smart_log(&id::HealthCounters::default()).to_vec(),
            (lid::FIRMWARE_SLOT, true) => id::firmware_log(FIRMWARE).to_vec(),
            (lid::CHANGED_NS, true) => self.changed_ns_page(rae),
            _ => return Reply::status(Status::INVALID_LOG_PAGE),
        };
        if offset > page.len() as u64 {
            return Reply::status(Status::INVALID_FIELD);
        }
        let start = offset as usize;
        let mut out = vec![0u8; len as usize];
        let n = (page.len() - start).min(out.len());
        out[..n].copy_from_slice(&page[start..start + n]);
        Reply::data(out)
    }

    fn features(&self, shared: &Shared, cmd: &Command) -> Reply {
        let vwc_present = self
            .subsys
            .as_deref()
            .is_some_and(|s| s.namespaces.iter().any(|n| n.info.volatile_write_cache));
        match *cmd {
            Command::GetFeatures { fid: f, .. } => match f {
                fid::NUM_QUEUES if self.subsys.is_some() => {
                    let n = u64::from(self.max_qid(shared).saturating_sub(1));
                    Reply::ok(n | (n << 16))
                }
                fid::KEEP_ALIVE => Reply::ok(u64::from(self.kato_ms.load(Ordering::Acquire))),
                // The host's hwmon reads the over-temperature threshold.
                fid::TEMP_THRESHOLD if self.subsys.is_some() => Reply::ok(343),
                fid::ASYNC_EVENT => Reply::ok(u64::from(self.aec.load(Ordering::Acquire))),
                fid::VOLATILE_WC if vwc_present => {
                    Reply::ok(u64::from(self.wce.load(Ordering::Acquire)))
                }
                _ => Reply::status(Status::INVALID_FIELD),
            },
            Command::SetFeatures {
                fid: f,
                save,
                cdw11,
            } => {
                if save {
                    return Reply::status(Status::FEATURE_NOT_SAVEABLE);
                }
                match f {
                    fid::NUM_QUEUES if self.subsys.is_some() => {
                        let nsq = cdw11 & 0xffff;
                        let ncq = cdw11 >> 16;
                        if nsq == 0xffff || ncq == 0xffff {
                            return Reply::status(Status::INVALID_FIELD);
                        }
                        let want = nsq.min(ncq) + 1;
                        let grant = want.min(u32::from(shared.cfg.max_io_queues));
                        self.io_queues.store(grant, Ordering::Release);
                        let n = u64::from(grant - 1);
                        Reply::ok(n | (n << 16))
                    }
                    fid::KEEP_ALIVE => {
                        self.kato_ms.store(cdw11, Ordering::Release);
                        Reply::ok(0)
                    }
                    // Cairn has no sensor to alarm on; accepted and ignored.
                    fid::TEMP_THRESHOLD if self.subsys.is_some() => Reply::ok(0),
                    fid::ASYNC_EVENT => {
                        self.aec.store(cdw11, Ordering::Release);
                        Reply::ok(0)
                    }
                    fid::VOLATILE_WC if vwc_present => {
                        self.wce.store(cdw11 & 1 == 1, Ordering::Release);
                        Reply::ok(0)
                    }
                    _ => Reply::status(Status::INVALID_FIELD),
                }
            }
            _ => Reply::status(Status::INVALID_FIELD),
        }
    }

    /// Executes an admin command other than Connect and Async Event Request.
    pub fn admin(&self, shared: &Shared, local: SocketAddr, cmd: &Command) -> Reply {
        self.last_ms.store(shared.now_ms(), Ordering::Release);
        let subnqn = self
            .subsys
            .as_deref()
            .map(|s| s.nqn.as_str())
            .unwrap_or(cairn_nvmf::DISCOVERY_NQN);
        match *cmd {
            Command::PropertyGet { wide, offset } => self.property_get(shared, wide, offset),
            Command::PropertySet {
                wide,
                offset,
                value,
            } => self.property_set(wide, offset, value),
            Command::Identify {
                cns: c, nsid, csi, ..
            } => self.identify(shared, c, nsid, csi, subnqn),
            Command::GetLogPage {
                lid: l,
                rae,
                len,
                offset,
                ..
            } => self.log_page(shared, local, l, rae, len, offset),
            Command::GetFeatures { .. } | Command::SetFeatures { .. } => self.features(shared, cmd),
            Command::KeepAlive => Reply::ok(0),
            // Commands complete too fast to abort: "not aborted".
            Command::Abort { .. } => Reply::ok(1),
            Command::Disconnect => Reply::ok(0),
            _ => Reply::status(Status::INVALID_OPCODE),
        }
    }
}

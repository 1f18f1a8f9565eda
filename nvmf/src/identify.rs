//! Data structures a controller returns: identify controller and namespace,
//! namespace lists and identification descriptors, log pages, and the
//! checks an I/O command must pass against its namespace. Byte offsets follow
//! NVMe Base 1.4/2.0 and NVMe over Fabrics 1.1.

use crate::cmd::Rw;
use crate::status::Status;

/// Length of identify data structures.
pub const IDENTIFY_LEN: usize = 4096;

/// Identify CNS values.
pub mod cns {
    pub const NAMESPACE: u8 = 0x00;
    pub const CONTROLLER: u8 = 0x01;
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    pub const NS_DESC_LIST: u8 = 0x03;
    pub const CS_NAMESPACE: u8 = 0x05;
    pub const CS_CONTROLLER: u8 = 0x06;
    pub const CS_ACTIVE_NS_LIST: u8 = 0x07;
    pub const CS_INDEP_NAMESPACE: u8 = 0x08;
}

/// Log page identifiers.
pub mod lid {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NS: u8 = 0x04;
    pub const DISCOVERY: u8 = 0x70;
}

/// Feature identifiers.
pub mod fid {
    pub const TEMP_THRESHOLD: u8 = 0x04;
    pub const VOLATILE_WC: u8 = 0x06;
    pub const NUM_QUEUES: u8 = 0x07;
    pub const ASYNC_EVENT: u8 = 0x0B;
    pub const KEEP_ALIVE: u8 = 0x0F;
}

/// Command set identifier of the NVM command set.
pub const CSI_NVM: u8 = 0;
/// Version 1.3.0, what the Linux target reports; with it the Linux host asks
/// for namespace identification descriptors.
pub const NVME_VERSION: u32 = 0x0001_0300;
/// OAES bit: namespace attribute notices.
pub const OAES_NS_ATTR: u32 = 1 << 8;
/// Dword 0 of the Async Event Request completion announcing a namespace
/// attribute change: event type Notice (2), information Namespace Attribute
/// Changed (0x00), log page Changed Namespace List (0x04).
pub const AEN_NS_ATTR_CHANGED: u32 = 0x02 | ((lid::CHANGED_NS as u32) << 16);

fn put_str(b: &mut [u8], s: &str) {
    b.fill(b' ');
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn put_cstr(b: &mut [u8], s: &str) {
    b.fill(0);
    let n = s.len().min(b.len() - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
}

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Inputs of the identify controller structure.
#[derive(Debug, Clone)]
pub struct ControllerIdentity<'a> {
    pub serial: &'a str,
    pub model: &'a str,
    pub firmware: &'a str,
    pub cntlid: u16,
    pub subnqn: &'a str,
    /// Discovery controller (otherwise an I/O controller).
    pub discovery: bool,
    /// Max data transfer size as a power of two of 4 KiB pages (0 = none).
    pub mdts: u8,
    /// Highest namespace id.
    pub nn: u32,
    /// Whether any namespace has a volatile write cache.
    pub vwc: bool,
    /// Largest in-capsule data on I/O queues, bytes.
    pub max_incapsule: u32,
    /// Maximum outstanding commands per queue.
    pub maxcmd: u16,
}

/// Builds the identify controller data structure.
pub fn identify_controller(c: &ControllerIdentity<'_>) -> [u8; IDENTIFY_LEN] {
    let mut b = [0u8; IDENTIFY_LEN];
    // vid and ssvid stay 0: Cairn has no PCI vendor id.
    put_str(&mut b[4..24], c.serial);
    put_str(&mut b[24..64], c.model);
    put_str(&mut b[64..72], c.firmware);
    b[72] = 6; // rab
               // cmic: the subsystem may have several controllers (hosts reconnect
               // while an old association lingers; several paths later), as the Linux
               // target reports.
    if !c.discovery {
        b[76] = 0x02;
    }
    b[77] = c.mdts;
    put16(&mut b, 78, c.cntlid);
    put32(&mut b, 80, NVME_VERSION);
    b[111] = if c.discovery { 2 } else { 1 }; // cntrltype
    if !c.discovery {
        put32(&mut b, 92, OAES_NS_ATTR);
        b[258] = 3; // acl: 4 concurrent aborts
        b[259] = 3; // aerl: 4 outstanding AERs
        b[260] = 0x03; // frmw: 1 slot, slot 1 read-only
        b[261] = 0x04; // lpa: extended data for Get Log Page
        b[262] = 0; // elpe: 1 error log entry
        put16(&mut b, 266, 343); // wctemp
        put16(&mut b, 268, 373); // cctemp
    } else {
        b[259] = 3;
        b[261] = 0x04;
    }
    put16(&mut b, 320, 1); // kas: 100 ms granularity
    b[512] = 0x66; // sqes
    b[513] = 0x44; // cqes
    put16(&mut b, 514, c.maxcmd);
    if !c.discovery {
        put32(&mut b, 516, c.nn);
        // oncs: compare, dataset management, write zeroes.
        put16(&mut b, 520, 0x01 | 0x04 | 0x08);
        // vwc: present bit, and flush with NSID FFFFFFFFh supported.
        b[525] = u8::from(c.vwc) | 0x06;
    }
    // sgls: SGLs supported; offset addressing for in-capsule data.
    put32(&mut b, 536, 1 | (1 << 20));
    put_cstr(&mut b[768..1024], c.subnqn);
    let ioccsz = (64 + c.max_incapsule) / 16;
    put32(&mut b, 1792, ioccsz);
    put32(&mut b, 1796, 1); // iorcsz: 16 bytes
    b[1803] = 1; // msdbd
    b
}

/// Inputs of the identify namespace structure.
#[derive(Debug, Clone, Copy)]
pub struct NamespaceIdentity {
    pub block_size: u32,
    pub num_blocks: u64,
    pub uuid: [u8; 16],
    pub dealloc_reads_zeroes: bool,
    pub write_protected: bool,
    /// Reported as the EUI64 (0: none): the device's incarnation, which
    /// changes whenever it may have lost completed writes.
    pub eui64: u64,
}

/// Builds the identify namespace data structure.
pub fn identify_namespace(n: &NamespaceIdentity) -> [u8; IDENTIFY_LEN] {
    let mut b = [0u8; IDENTIFY_LEN];
    put64(&mut b, 0, n.num_blocks);
    put64(&mut b, 8, n.num_blocks);
    put64(&mut b, 16, n.num_blocks);
    b[25] = 0; // nlbaf: one format
    b[26] = 0; // flbas: format 0
               // dlfeat: write zeroes may deallocate; deallocated blocks read zeros.
    b[33] = 0x08 | u8::from(n.dealloc_reads_zeroes);
    b[30] = 0x01; // nmic: may be shared by several controllers
    b[99] = u8::from(n.write_protected); // nsattr
    b[104..120].copy_from_slice(&n.uuid); // nguid
    b[120..128].copy_from_slice(&n.eui64.to_be_bytes()); // eui64
    let lbads = n.block_size.trailing_zeros();
    put32(&mut b, 128, lbads << 16);
    b
}

/// Builds the I/O command set independent identify namespace structure.
pub fn identify_ns_cs_indep(n: &NamespaceIdentity) -> [u8; IDENTIFY_LEN] {
    let mut b = [0u8; IDENTIFY_LEN];
    b[8] = u8::from(n.write_protected); // nsattr
    b[14] = 1; // nstat: ready
    b
}

/// Builds the namespace identification descriptor list: NGUID, UUID, CSI.
pub fn ns_descriptors(uuid: &[u8; 16]) -> [u8; IDENTIFY_LEN] {
    let mut b = [0u8; IDENTIFY_LEN];
    let mut o = 0;
    for (nidt, nid) in [(2u8, &uuid[..]), (3u8, &uuid[..]), (4u8, &[CSI_NVM][..])] {
        b[o] = nidt;
        b[o + 1] = nid.len() as u8;
        b[o + 4..o + 4 + nid.len()].copy_from_slice(nid);
        o += 4 + nid.len();
    }
    b
}

/// Builds an active namespace id list: ids greater than `after`, ascending.
pub fn active_ns_list(ids: &[u32], after: u32) -> [u8; IDENTIFY_LEN] {
    let mut b = [0u8; IDENTIFY_LEN];
    let mut sorted: Vec<u32> = ids.iter().copied().filter(|&i| i > after).collect();
    sorted.sort_unstable();
    for (i, id) in sorted.iter().take(IDENTIFY_LEN / 4).enumerate() {
        put32(&mut b, i * 4, *id);
    }
    b
}

/// Builds the firmware slot information log page.
pub fn firmware_log(firmware: &str) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0] = 1; // active slot 1
    put_str(&mut b[8..16], firmware);
    b
}

/// Counters for the SMART / health log page.
#[derive(Debug, Clone, Copy, Default)]
pub struct HealthCounters {
    pub data_units_read: u64,
    pub data_units_written: u64,
    pub host_reads: u64,
    pub host_writes: u64,
    pub power_on_hours: u64,
}

/// Builds the SMART / health information log page.
pub fn smart_log(c: &HealthCounters) -> [u8; 512] {
    let mut b = [0u8; 512];
    put16(&mut b, 1, 313); // composite temperature, kelvin
    b[3] = 100; // available spare
    b[4] = 10; // spare threshold
    put64(&mut b, 32, c.data_units_read);
    put64(&mut b, 48, c.data_units_written);
    put64(&mut b, 64, c.host_reads);
    put64(&mut b, 80, c.host_writes);
    put64(&mut b, 128, c.power_on_hours);
    b
}

/// Builds the changed namespace list log page.
pub fn changed_ns_log(ids: &[u32]) -> [u8; IDENTIFY_LEN] {
    let mut b = [0u8; IDENTIFY_LEN];
    if ids.len() > IDENTIFY_LEN / 4 {
        put32(&mut b, 0, 0xffff_ffff);
    } else {
        for (i, id) in ids.iter().enumerate() {
            put32(&mut b, i * 4, *id);
        }
    }
    b
}

/// One discovery log entry.
#[derive(Debug, Clone)]
pub struct DiscoveryEntry {
    pub subnqn: String,
    pub traddr: String,
    pub trsvcid: String,
    pub ipv6: bool,
    pub portid: u16,
    /// A discovery subsystem (otherwise an NVM subsystem).
    pub discovery: bool,
}

/// Length of the discovery log page header and of each entry.
pub const DISCOVERY_RECORD_LEN: usize = 1024;

/// Builds the whole discovery log page (header and entries).
pub fn discovery_log(genctr: u64, entries: &[DiscoveryEntry]) -> Vec<u8> {
    let mut b = vec![0u8; DISCOVERY_RECORD_LEN * (1 + entries.len())];
    put64(&mut b, 0, genctr);
    put64(&mut b, 8, entries.len() as u64);
    put16(&mut b, 16, 0); // recfmt
    for (i, e) in entries.iter().enumerate() {
        let r = &mut b[DISCOVERY_RECORD_LEN * (i + 1)..DISCOVERY_RECORD_LEN * (i + 2)];
        r[0] = 3; // trtype: TCP
        r[1] = if e.ipv6 { 2 } else { 1 }; // adrfam
        r[2] = if e.discovery { 3 } else { 2 }; // subtype
        r[3] = 0x02; // treq: secure channel not required
        put16(r, 4, e.portid);
        put16(r, 6, 0xffff); // cntlid: dynamic
        put16(r, 8, 32); // asqsz
        put_str(&mut r[32..64], &e.trsvcid);
        put_cstr(&mut r[256..512], &e.subnqn);
        put_str(&mut r[512..768], &e.traddr);
        r[768] = 0; // tsas.tcp.sectype: none
    }
    b
}

/// Geometry an I/O command is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NsGeometry {
    pub block_size: u32,
    pub num_blocks: u64,
}

/// Checks a read/write/compare against its namespace and the SGL length,
/// returning the transfer length in bytes.
pub fn check_rw(rw: &Rw, ns: Option<NsGeometry>, sgl_len: u32) -> Result<u32, Status> {
    let Some(g) = ns else {
        return Err(Status::INVALID_NS);
    };
    check_range(rw.slba, u64::from(rw.blocks), g)?;
    let bytes = u64::from(rw.blocks) * u64::from(g.block_size);
    if bytes != u64::from(sgl_len) {
        return Err(Status::SGL_DATA_LENGTH);
    }
    u32::try_from(bytes).map_err(|_| Status::SGL_DATA_LENGTH)
}

/// Checks that `blocks` blocks at `slba` lie in the namespace.
pub fn check_range(slba: u64, blocks: u64, g: NsGeometry) -> Result<(), Status> {
    match slba.checked_add(blocks) {
        Some(end) if end <= g.num_blocks => Ok(()),
        _ => Err(Status::LBA_RANGE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: NsGeometry = NsGeometry {
        block_size: 512,
        num_blocks: 1000,
    };

    fn rw(slba: u64, blocks: u32) -> Rw {
        Rw {
            nsid: 1,
            slba,
            blocks,
            fua: false,
        }
    }

    #[test]
    fn missing_namespace_is_invalid_ns() {
        assert_eq!(check_rw(&rw(0, 1), None, 512), Err(Status::INVALID_NS));
    }

    #[test]
    fn lba_past_end_is_lba_out_of_range() {
        assert_eq!(check_rw(&rw(999, 1), Some(G), 512), Ok(512));
        assert_eq!(check_rw(&rw(999, 2), Some(G), 1024), Err(Status::LBA_RANGE));
        assert_eq!(
            check_rw(&rw(u64::MAX, 2), Some(G), 1024),
            Err(Status::LBA_RANGE)
        );
    }

    #[test]
    fn sgl_length_must_match_blocks() {
        assert_eq!(
            check_rw(&rw(0, 2), Some(G), 512),
            Err(Status::SGL_DATA_LENGTH)
        );
    }

    #[test]
    fn controller_identity_fields() {
        let b = identify_controller(&ControllerIdentity {
            serial: "abc",
            model: "Cairn",
            firmware: "0.1.0",
            cntlid: 7,
            subnqn: "nqn.x",
            discovery: false,
            mdts: 8,
            nn: 4,
            vwc: false,
            max_incapsule: 8192,
            maxcmd: 128,
        });
        assert_eq!(&b[4..8], b"abc ");
        assert_eq!(&b[24..30], b"Cairn ");
        assert_eq!(u16::from_le_bytes([b[78], b[79]]), 7);
        assert_eq!(b[111], 1);
        assert_eq!(&b[768..774], b"nqn.x\0");
        assert_eq!(u32::from_le_bytes(b[1792..1796].try_into().unwrap()), 516);
        assert_eq!(b[512], 0x66);
        // SGL support is mandatory for the Linux fabrics host.
        assert_eq!(b[536] & 0x3, 1);
    }

    #[test]
    fn namespace_descriptors_carry_uuid() {
        let u = [9u8; 16];
        let b = ns_descriptors(&u);
        assert_eq!((b[0], b[1]), (2, 16));
        assert_eq!((b[20], b[21]), (3, 16));
        assert_eq!(&b[24..40], &u);
        assert_eq!((b[40], b[41], b[44]), (4, 1, 0));
    }

    #[test]
    fn namespace_identity_block_size() {
        let b = identify_namespace(&NamespaceIdentity {
            block_size: 4096,
            num_blocks: 10,
            uuid: [1; 16],
            dealloc_reads_zeroes: true,
            write_protected: false,
            eui64: 0x0102_0304_0506_0708,
        });
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 10);
        assert_eq!(b[120..128], [1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(b[130], 12);
        assert_eq!(b[33], 0x09);
    }

    #[test]
    fn active_list_is_sorted_and_after() {
        let b = active_ns_list(&[5, 1, 3], 1);
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 5);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0);
    }

    #[test]
    fn discovery_log_layout() {
        let b = discovery_log(
            3,
            &[DiscoveryEntry {
                subnqn: "nqn.a".into(),
                traddr: "127.0.0.1".into(),
                trsvcid: "8420".into(),
                ipv6: false,
                portid: 1,
                discovery: false,
            }],
        );
        assert_eq!(b.len(), 2048);
        assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 1);
        let r = &b[1024..];
        assert_eq!((r[0], r[1], r[2]), (3, 1, 2));
        assert_eq!(&r[32..37], b"8420 ");
        assert_eq!(&r[256..262], b"nqn.a\0");
        assert_eq!(&r[512..522], b"127.0.0.1 ");
    }
}

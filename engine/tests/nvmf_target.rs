//! The NVMe-oF/TCP target against Cairn's own initiator and against a raw
//! socket speaking (and breaking) the protocol, all over loopback.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cairn_bdev::ram::RamDevice;
use cairn_bdev::{BdevError, BlockDevice, IoBuf};
use cairn_engine::initiator::{InitiatorError, InitiatorOptions, NvmfDevice};
use cairn_engine::reactor::Reactors;
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use cairn_nvmf::cmd::{admin, fabrics, io, prop, ConnectData, Sqe};
use cairn_nvmf::pdu::{self, CommonHeader, Digests, IcReq, IcResp, PduType, TxLayout};
use cairn_nvmf::{Cqe, Status};
use uuid::Uuid;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
const BLOCKS: u64 = 64 * 1024; // 32 MiB of 512-byte blocks

struct Fixture {
    target: Target,
    nqn: String,
    uuid: Uuid,
}

fn fixture(allowed: Option<Vec<String>>) -> Result<Fixture> {
    let target = Target::start(TargetConfig {
        listen: "127.0.0.1:0".parse()?,
        reactors: 1,
        max_io_queues: 4,
        ..TargetConfig::default()
    })?;
    let uuid = Uuid::new_v4();
    let nqn = cairn_nvmf::volume_nqn(&uuid);
    target.add_subsystem(SubsystemConfig {
        nqn: nqn.clone(),
        serial: "cairn-test-1".into(),
        model: None,
        namespaces: vec![NamespaceConfig {
            nsid: 1,
            uuid,
            device: Arc::new(RamDevice::new(512, BLOCKS)),
        }],
        allowed_hosts: allowed,
    })?;
    Ok(Fixture { target, nqn, uuid })
}

fn opts(f: &Fixture, host: &str) -> InitiatorOptions {
    let mut o = InitiatorOptions::new(f.target.local_addr(), &f.nqn, host);
    o.timeout = Duration::from_secs(3);
    o
}

fn pattern(len: usize, seed: u8) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8;
    }
    b
}

/// Writes and reads back 4 KiB, 128 KiB and 1 MiB over two I/O queues,
/// then flush, write zeroes and deallocate.
fn io_roundtrip(digests: bool) -> Result<()> {
    let f = fixture(None)?;
    let mut o = opts(&f, HOST);
    o.header_digest = digests;
    o.data_digest = digests;
    let dev = NvmfDevice::connect(o)?;
    let info = dev.info();
    ensure!(
        info.block_size == 512 && info.num_blocks == BLOCKS,
        "{info:?}"
    );
    ensure!(
        dev.uuid() == Some(f.uuid),
        "namespace uuid {:?}",
        dev.uuid()
    );
    ensure!(dev.granted_queues() == 4);
    let client = Reactors::start(1, "client")?;
    let d = dev.clone();
    let out: Result<(), String> = client.run(0, move || async move {
        let q1 = d.open_channel().map_err(|e| e.to_string())?;
        let q2 = d.open_channel().map_err(|e| e.to_string())?;
        let mut lba = 8u64;
        for (i, len) in [4096usize, 128 * 1024, 1024 * 1024].into_iter().enumerate() {
            let data = pattern(len, i as u8 + 1);
            let (r, _) = q1.write(lba, data.clone(), false).await;
            r.map_err(|e| format!("write {len}: {e}"))?;
            // Read back through the other queue.
            let (r, got) = q2.read(lba, IoBuf::zeroed(len)).await;
            r.map_err(|e| format!("read {len}: {e}"))?;
            if got.as_slice() != data.as_slice() {
                return Err(format!("data mismatch at {len} bytes"));
            }
            lba += (len / 512) as u64 + 8;
        }
        q1.flush().await.map_err(|e| e.to_string())?;
        q1.write_zeroes(8, 8).await.map_err(|e| e.to_string())?;
        let (r, got) = q2.read(8, IoBuf::zeroed(4096)).await;
        r.map_err(|e| e.to_string())?;
        if got.iter().any(|&b| b != 0) {
            return Err("write zeroes left data".into());
        }
        q2.deallocate(24, 256).await.map_err(|e| e.to_string())?;
        let (r, got) = q1.read(24, IoBuf::zeroed(128 * 1024)).await;
        r.map_err(|e| e.to_string())?;
        if got.iter().any(|&b| b != 0) {
            return Err("deallocated blocks do not read as zeros".into());
        }
        // Many commands in flight on one queue.
        let q1 = &q1;
        let futs: Vec<_> = (0..64u64)
            .map(|i| async move {
                let (r, _) = q1.write(4096 + i * 8, pattern(4096, i as u8), false).await;
                r
            })
            .collect();
        for r in futures::future::join_all(futs).await {
            r.map_err(|e| e.to_string())?;
        }
        let futs: Vec<_> = (0..64u64)
            .map(|i| async move { (i, q1.read(4096 + i * 8, IoBuf::zeroed(4096)).await) })
            .collect();
        for (i, (r, got)) in futures::future::join_all(futs).await {
            r.map_err(|e| e.to_string())?;
            if got.as_slice() != pattern(4096, i as u8).as_slice() {
                return Err(format!("parallel read {i} mismatch"));
            }
        }
        Ok(())
    })?;
    out.map_err(anyhow::Error::msg)?;
    client.shutdown();
    dev.disconnect();
    Ok(())
}

#[test]
fn identify_multi_queue_io_without_digests() -> Result<()> {
    io_roundtrip(false)
}

#[test]
fn identify_multi_queue_io_with_digests() -> Result<()> {
    io_roundtrip(true)
}

#[test]
fn host_not_on_allow_list_is_refused() -> Result<()> {
    let f = fixture(Some(vec![HOST.to_owned()]))?;
    let other = "nqn.2014-08.org.nvmexpress:uuid:99999999-0000-0000-0000-000000000000";
    match NvmfDevice::connect(opts(&f, other)) {
        Err(InitiatorError::Connect { status, .. }) => {
            ensure!(status == Status::CONNECT_INVALID_HOST, "{status:?}")
        }
        Err(e) => anyhow::bail!("unexpected error {e}"),
        Ok(_) => anyhow::bail!("a host not on the allow list connected"),
    }
    let dev = NvmfDevice::connect(opts(&f, HOST))?;
    ensure!(dev.info().num_blocks == BLOCKS);
    // Revoking the host drops its controller.
    f.target.set_allowed_hosts(&f.nqn, Some(vec![]))?;
    wait_for(|| f.target.list_subsystems()[0].controllers == 0)?;
    Ok(())
}

fn wait_for(mut cond: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    anyhow::bail!("condition not met in 5 s")
}

/// A host speaking NVMe/TCP over a blocking socket, byte by byte.
struct Raw {
    s: TcpStream,
    cid: u16,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Result<Raw> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut r = Raw { s, cid: 0 };
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            digests: Digests::default(),
            maxr2t: 0,
        };
        r.s.write_all(&req.encode())?;
        let mut b = [0u8; 128];
        r.s.read_exact(&mut b)?;
        let resp = IcResp::parse(&b)?;
        ensure!(resp.maxh2cdata >= 4096);
        Ok(r)
    }

    fn send(&mut self, mut sqe: Sqe, data: &[u8], in_capsule: bool) -> Result<u16> {
        self.cid += 1;
        sqe.set_cid(self.cid);
        sqe.set_sgl(data.len() as u32, in_capsule && !data.is_empty());
        let mut out = Vec::new();
        let n = if in_capsule { data.len() } else { 0 };
        TxLayout::default().encode_header(&mut out, PduType::CapsuleCmd, 0, &sqe.0, n);
        if in_capsule {
            out.extend_from_slice(data);
        }
        self.s.write_all(&out)?;
        Ok(self.cid)
    }

    /// Reads one PDU: (type, header, data).
    fn recv(&mut self) -> Result<(u8, Vec<u8>, Vec<u8>)> {
        let mut ch = [0u8; 8];
        self.s.read_exact(&mut ch)?;
        let h = CommonHeader::parse(&ch)?;
        let mut rest = vec![0u8; h.plen as usize - 8];
        self.s.read_exact(&mut rest)?;
        let mut hdr = ch.to_vec();
        hdr.extend_from_slice(&rest[..usize::from(h.hlen) - 8]);
        let data = if h.pdo > 0 {
            rest[usize::from(h.pdo) - 8..].to_vec()
        } else {
            rest[usize::from(h.hlen) - 8..].to_vec()
        };
        Ok((h.pdu_type, hdr, data))
    }

    /// Sends a command and waits for its response, collecting C2H data.
    fn cmd(&mut self, sqe: Sqe, data: &[u8], in_len: usize) -> Result<(Cqe, Vec<u8>)> {
        let mut s = sqe;
        if in_len > 0 {
            s.set_sgl(in_len as u32, false);
        }
        let cid = if in_len > 0 {
            self.cid += 1;
            s.set_cid(self.cid);
            let mut out = Vec::new();
            TxLayout::default().encode_header(&mut out, PduType::CapsuleCmd, 0, &s.0, 0);
            self.s.write_all(&out)?;
            self.cid
        } else {
            self.send(s, data, true)?
        };
        let mut got = Vec::new();
        loop {
            let (t, hdr, d) = self.recv()?;
            match PduType::from_u8(t) {
                Some(PduType::C2hData) => got.extend_from_slice(&d),
                Some(PduType::CapsuleResp) => {
                    let c = Cqe::parse(&hdr[8..]).context("cqe")?;
                    ensure!(c.cid == cid, "cid {} != {cid}", c.cid);
                    return Ok((c, got));
                }
                other => anyhow::bail!("unexpected PDU {other:?}"),
            }
        }
    }

    fn fabrics_connect(&mut self, nqn: &str, qid: u16, cntlid: u16, kato: u32) -> Result<Cqe> {
        let mut sqe = Sqe::default();
        sqe.set_opcode(fabrics::OPCODE);
        sqe.0[4] = fabrics::CONNECT;
        sqe.0[42..44].copy_from_slice(&qid.to_le_bytes());
        sqe.0[44..46].copy_from_slice(&31u16.to_le_bytes());
        sqe.0[48..52].copy_from_slice(&kato.to_le_bytes());
        let data = ConnectData {
            hostid: [1; 16],
            cntlid,
            subnqn: nqn.into(),
            hostnqn: HOST.into(),
        }
        .encode();
        Ok(self.cmd(sqe, &data, 0)?.0)
    }

    fn enable(&mut self) -> Result<()> {
        let mut sqe = Sqe::default();
        sqe.set_opcode(fabrics::OPCODE);
        sqe.0[4] = fabrics::PROPERTY_SET;
        sqe.0[44..48].copy_from_slice(&prop::CC.to_le_bytes());
        sqe.0[48..52].copy_from_slice(&(1u32 | (6 << 16) | (4 << 20)).to_le_bytes());
        let (c, _) = self.cmd(sqe, &[], 0)?;
        ensure!(c.status.is_success());
        Ok(())
    }

    fn expect_closed(&mut self) -> Result<()> {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Ok(_) => anyhow::bail!("connection still sending"),
            Err(e) => anyhow::bail!("connection not closed: {e}"),
        }
    }
}

#[test]
fn discovery_log_page_lists_the_subsystem() -> Result<()> {
    let f = fixture(None)?;
    let mut r = Raw::connect(f.target.local_addr())?;
    let c = r.fabrics_connect(cairn_nvmf::DISCOVERY_NQN, 0, 0xffff, 0)?;
    ensure!(c.status.is_success(), "{:?}", c.status);
    r.enable()?;
    let mut id = Sqe::default();
    id.set_opcode(admin::IDENTIFY);
    id.set_cdw(10, 1);
    let (c, data) = r.cmd(id, &[], 4096)?;
    ensure!(c.status.is_success() && data.len() == 4096);
    ensure!(data[111] == 2, "discovery controller type");
    ensure!(&data[768..768 + 36] == cairn_nvmf::DISCOVERY_NQN.as_bytes());
    let (c, log) = r.cmd(
        cairn_engine::initiator::get_log_page_sqe(0x70, 0, 4096),
        &[],
        4096,
    )?;
    ensure!(c.status.is_success());
    let numrec = u64::from_le_bytes(log[8..16].try_into()?);
    ensure!(numrec == 2, "numrec {numrec}");
    let e = &log[1024..2048];
    ensure!(e[0] == 3 && e[2] == 2, "trtype/subtype {} {}", e[0], e[2]);
    let nqn = &e[256..256 + f.nqn.len()];
    ensure!(nqn == f.nqn.as_bytes());
    let port = f.target.local_addr().port().to_string();
    ensure!(e[32..32 + port.len()] == *port.as_bytes());
    ensure!(&e[512..521] == b"127.0.0.1");
    Ok(())
}

#[test]
fn malformed_pdu_gets_termination_and_others_keep_working() -> Result<()> {
    let f = fixture(None)?;
    let mut r = Raw::connect(f.target.local_addr())?;
    // A capsule whose header length is wrong.
    let mut bad = vec![0u8; 72];
    CommonHeader {
        pdu_type: PduType::CapsuleCmd as u8,
        flags: 0,
        hlen: 60,
        pdo: 0,
        plen: 72,
    }
    .write(&mut bad);
    r.s.write_all(&bad)?;
    let (t, hdr, echo) = r.recv()?;
    ensure!(t == PduType::C2hTermReq as u8, "type {t}");
    let term = pdu::TermReq::parse(&hdr)?;
    ensure!(term.fes == pdu::Fes::InvalidHeaderField as u16 && term.fei == 2);
    ensure!(echo[..8] == bad[..8]);
    r.expect_closed()?;

    // A data offset past the PDU.
    let mut r = Raw::connect(f.target.local_addr())?;
    CommonHeader {
        pdu_type: PduType::CapsuleCmd as u8,
        flags: 0,
        hlen: 72,
        pdo: 250,
        plen: 100,
    }
    .write(&mut bad);
    r.s.write_all(&bad)?;
    r.s.write_all(&[0u8; 28])?;
    let (t, hdr, _) = r.recv()?;
    ensure!(t == PduType::C2hTermReq as u8);
    ensure!(pdu::TermReq::parse(&hdr)?.fei == 3);
    r.expect_closed()?;

    // The target still serves a well-behaved host.
    let dev = NvmfDevice::connect(opts(&f, HOST))?;
    ensure!(dev.info().num_blocks == BLOCKS);
    Ok(())
}

#[test]
fn io_errors_carry_nvme_status() -> Result<()> {
    let f = fixture(None)?;
    let mut a = Raw::connect(f.target.local_addr())?;
    let c = a.fabrics_connect(&f.nqn, 0, 0xffff, 0)?;
    ensure!(c.status.is_success());
    let cntlid = c.result as u16;
    a.enable()?;
    let mut q = Raw::connect(f.target.local_addr())?;
    let c = q.fabrics_connect(&f.nqn, 1, cntlid, 0)?;
    ensure!(c.status.is_success(), "io connect {:?}", c.status);

    let read = |nsid: u32, slba: u64, blocks: u32| {
        let mut s = Sqe::default();
        s.set_opcode(io::READ);
        s.set_nsid(nsid);
        s.set_cdw(10, slba as u32);
        s.set_cdw(11, (slba >> 32) as u32);
        s.set_cdw(12, blocks - 1);
        s
    };
    // Past the end.
    let (c, _) = q.cmd(read(1, BLOCKS - 1, 2), &[], 1024)?;
    ensure!(c.status == Status::LBA_RANGE, "{:?}", c.status);
    // A namespace that does not exist.
    let (c, _) = q.cmd(read(7, 0, 1), &[], 512)?;
    ensure!(c.status == Status::INVALID_NS, "{:?}", c.status);
    // An unknown opcode.
    let mut s = Sqe::default();
    s.set_opcode(0x7e);
    s.set_nsid(1);
    let (c, _) = q.cmd(s, &[], 0)?;
    ensure!(c.status == Status::INVALID_OPCODE, "{:?}", c.status);
    // Larger than MDTS (1 MiB): refused, nothing allocated.
    let (c, _) = q.cmd(read(1, 0, 4096), &[], 2 << 20)?;
    ensure!(c.status == Status::INVALID_FIELD, "{:?}", c.status);
    // A good read still works on the same queue.
    let (c, d) = q.cmd(read(1, 0, 8), &[], 4096)?;
    ensure!(c.status.is_success() && d.len() == 4096);
    // An H2CData longer than MAXH2CDATA terminates the queue.
    let mut s = Sqe::default();
    s.set_opcode(io::WRITE);
    s.set_nsid(1);
    s.set_cdw(12, 2047);
    q.send(s, &vec![0u8; 1 << 20], false)?;
    let (t, hdr, _) = q.recv()?;
    ensure!(t == PduType::R2t as u8, "expected R2T, got {t}");
    let r2t = pdu::DataHeader::parse(&hdr)?;
    ensure!(r2t.len == 1 << 20);
    let mut h2c = Vec::new();
    let len = 256 * 1024;
    let dh = pdu::DataHeader {
        cccid: r2t.cccid,
        ttag: r2t.ttag,
        offset: 0,
        len,
    };
    TxLayout::default().encode_header(&mut h2c, PduType::H2cData, 0, &dh.bytes(), len as usize);
    q.s.write_all(&h2c)?;
    let (t, hdr, _) = q.recv()?;
    ensure!(t == PduType::C2hTermReq as u8, "type {t}");
    ensure!(pdu::TermReq::parse(&hdr)?.fes == pdu::Fes::DataLimitExceeded as u16);
    Ok(())
}

#[test]
fn removing_a_subsystem_disconnects_the_host() -> Result<()> {
    let f = fixture(None)?;
    let dev = NvmfDevice::connect(opts(&f, HOST))?;
    let client = Reactors::start(1, "client")?;
    let d = dev.clone();
    let target = Arc::new(f.target);
    let t2 = target.clone();
    let nqn = f.nqn.clone();
    let out: Result<(), String> = client.run(0, move || async move {
        let q = d.open_channel().map_err(|e| e.to_string())?;
        let (r, _) = q.read(0, IoBuf::zeroed(4096)).await;
        r.map_err(|e| e.to_string())?;
        t2.remove_subsystem(&nqn).map_err(|e| e.to_string())?;
        // The queue's socket closes; I/O fails as unavailable.
        for _ in 0..500 {
            let (r, _) = q.read(0, IoBuf::zeroed(4096)).await;
            match r {
                Err(BdevError::Unavailable { .. }) => return Ok(()),
                Err(e) => return Err(format!("unexpected error {e}")),
                Ok(()) => monoio::time::sleep(Duration::from_millis(10)).await,
            }
        }
        Err("I/O still succeeds after removal".into())
    })?;
    out.map_err(anyhow::Error::msg)?;
    ensure!(target.list_subsystems().is_empty());
    client.shutdown();
    Ok(())
}

#[test]
fn keep_alive_timeout_drops_a_silent_host() -> Result<()> {
    let f = fixture(None)?;
    let mut a = Raw::connect(f.target.local_addr())?;
    let c = a.fabrics_connect(&f.nqn, 0, 0xffff, 300)?;
    ensure!(c.status.is_success());
    ensure!(f.target.list_subsystems()[0].controllers == 1);
    let t = Instant::now();
    a.expect_closed()?;
    let waited = t.elapsed();
    ensure!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "dropped after {waited:?}"
    );
    ensure!(f.target.list_subsystems()[0].controllers == 0);

    // A host that keeps alive stays connected past the timeout.
    let mut o = opts(&f, HOST);
    o.kato = Duration::from_millis(300);
    let dev = NvmfDevice::connect(o)?;
    std::thread::sleep(Duration::from_millis(900));
    ensure!(f.target.list_subsystems()[0].controllers == 1);
    ensure!(dev.is_connected());
    Ok(())
}

#[test]
fn channel_reconnects_after_the_connection_drops() -> Result<()> {
    let f = fixture(None)?;
    let dev = NvmfDevice::connect(opts(&f, HOST))?;
    let client = Reactors::start(1, "client")?;
    let d = dev.clone();
    let target = Arc::new(f.target);
    let t2 = target.clone();
    let nqn = f.nqn.clone();
    let out: Result<(), String> = client.run(0, move || async move {
        let q = d.open_channel().map_err(|e| e.to_string())?;
        let (r, _) = q.write(0, pattern(4096, 7), false).await;
        r.map_err(|e| e.to_string())?;
        // Revoke the host: every queue of its controller is disconnected.
        t2.set_allowed_hosts(&nqn, Some(vec![]))
            .map_err(|e| e.to_string())?;
        let mut saw_failure = false;
        for _ in 0..500 {
            let (r, _) = q.read(0, IoBuf::zeroed(4096)).await;
            if r.is_err() {
                saw_failure = true;
                break;
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        if !saw_failure {
            return Err("I/O kept working after the host was revoked".into());
        }
        t2.set_allowed_hosts(&nqn, None)
            .map_err(|e| e.to_string())?;
        // The same channel comes back by itself.
        for _ in 0..100 {
            let (r, got) = q.read(0, IoBuf::zeroed(4096)).await;
            if r.is_ok() {
                if got.as_slice() != pattern(4096, 7).as_slice() {
                    return Err("data changed across reconnect".into());
                }
                return Ok(());
            }
            monoio::time::sleep(Duration::from_millis(50)).await;
        }
        Err("channel did not reconnect".into())
    })?;
    out.map_err(anyhow::Error::msg)?;
    client.shutdown();
    Ok(())
}

fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a full rusage into the pointer we own.
    let ru = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr());
        ru.assume_init()
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn idle_target_and_initiator_use_no_cpu() -> Result<()> {
    let f = fixture(None)?;
    let dev = NvmfDevice::connect(opts(&f, HOST))?;
    let client = Reactors::start(1, "client")?;
    let d = dev.clone();
    // Keep an open I/O queue on the client reactor while idle.
    let (tx, rx) = flume::bounded::<()>(1);
    client.spawn(0, move || async move {
        let q = d.open_channel().expect("open channel");
        let (r, _) = q.read(0, IoBuf::zeroed(4096)).await;
        r.expect("read");
        let _ = rx.recv_async().await;
        drop(q);
    })?;
    std::thread::sleep(Duration::from_millis(200));
    let before = cpu_time();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_time() - before;
    drop(tx);
    eprintln!("idle target + initiator CPU over 1 s: {used:?}");
    ensure!(
        used < Duration::from_millis(30),
        "idle target and initiator used {used:?} of CPU in 1 s"
    );
    client.shutdown();
    Ok(())
}

/// A RAM device with a volatile write cache, modelled: a write that is not
/// FUA stays in the cache (lost on power failure) until a flush. It can also
/// grow, as a nexus or a shared replica does online.
struct CacheDev {
    ram: RamDevice,
    blocks: std::sync::atomic::AtomicU64,
    /// LBAs written (or zeroed, or deallocated) since the last flush and not
    /// FUA: what a power failure now would lose.
    volatile: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl CacheDev {
    fn new(blocks: u64, capacity: u64) -> Arc<CacheDev> {
        Arc::new(CacheDev {
            ram: RamDevice::new(512, capacity),
            blocks: blocks.into(),
            volatile: Default::default(),
        })
    }

    fn volatile(&self) -> usize {
        self.volatile.lock().unwrap().len()
    }
}

impl BlockDevice for CacheDev {
    fn info(&self) -> cairn_bdev::DeviceInfo {
        cairn_bdev::DeviceInfo {
            num_blocks: self.blocks.load(std::sync::atomic::Ordering::Acquire),
            volatile_write_cache: true,
            ..self.ram.info()
        }
    }

    fn open_channel(&self) -> Result<Box<dyn cairn_bdev::IoChannel>, BdevError> {
        Ok(Box::new(CacheChan {
            ram: self.ram.open_channel()?,
            volatile: self.volatile.clone(),
        }))
    }
}

struct CacheChan {
    ram: Box<dyn cairn_bdev::IoChannel>,
    volatile: Arc<std::sync::Mutex<Vec<u64>>>,
}

impl cairn_bdev::IoChannel for CacheChan {
    fn read(&self, lba: u64, buf: IoBuf) -> cairn_bdev::IoFuture<'_, cairn_bdev::BufResult> {
        self.ram.read(lba, buf)
    }

    fn write(
        &self,
        lba: u64,
        buf: IoBuf,
        fua: bool,
    ) -> cairn_bdev::IoFuture<'_, cairn_bdev::BufResult> {
        if !fua {
            self.volatile.lock().unwrap().push(lba);
        }
        self.ram.write(lba, buf, fua)
    }

    fn flush(&self) -> cairn_bdev::IoFuture<'_, Result<(), BdevError>> {
        self.volatile.lock().unwrap().clear();
        self.ram.flush()
    }

    fn write_zeroes(
        &self,
        lba: u64,
        blocks: u64,
    ) -> cairn_bdev::IoFuture<'_, Result<(), BdevError>> {
        self.volatile.lock().unwrap().push(lba);
        self.ram.write_zeroes(lba, blocks)
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> cairn_bdev::IoFuture<'_, Result<(), BdevError>> {
        self.volatile.lock().unwrap().push(lba);
        self.ram.deallocate(lba, blocks)
    }
}

fn cache_fixture(dev: Arc<CacheDev>) -> Result<Fixture> {
    let target = Target::start(TargetConfig {
        listen: "127.0.0.1:0".parse()?,
        reactors: 1,
        max_io_queues: 2,
        ..TargetConfig::default()
    })?;
    let uuid = Uuid::new_v4();
    let nqn = cairn_nvmf::volume_nqn(&uuid);
    target.add_subsystem(SubsystemConfig {
        nqn: nqn.clone(),
        serial: "cairn-test-2".into(),
        model: None,
        namespaces: vec![NamespaceConfig {
            nsid: 1,
            uuid,
            device: dev,
        }],
        allowed_hosts: None,
    })?;
    Ok(Fixture { target, nqn, uuid })
}

fn features_sqe(opcode: u8, fid: u8, cdw11: u32) -> Sqe {
    let mut sqe = Sqe::default();
    sqe.set_opcode(opcode);
    sqe.set_cdw(10, u32::from(fid));
    sqe.set_cdw(11, cdw11);
    sqe
}

const FID_VWC: u8 = 0x06;
const FID_ASYNC_EVENT: u8 = 0x0B;

/// With the volatile write cache turned off by Set Features, every write the
/// host sends without FUA is durable when it completes: a power failure right
/// after the completions loses nothing.
#[test]
fn volatile_write_cache_off_makes_writes_durable_before_completion() -> Result<()> {
    let cache = CacheDev::new(BLOCKS, BLOCKS);
    let f = cache_fixture(cache.clone())?;
    let dev = NvmfDevice::connect(opts(&f, HOST))?;
    let (_, id) = dev.admin_command(
        {
            let mut s = Sqe::default();
            s.set_opcode(admin::IDENTIFY);
            s.set_cdw(10, 1);
            s
        },
        4096,
    )?;
    ensure!(id[525] & 1 == 1, "identify: no volatile write cache");
    let (wce, _) = dev.admin_command(features_sqe(admin::GET_FEATURES, FID_VWC, 0), 0)?;
    ensure!(wce & 1 == 1, "write cache not enabled at start: {wce}");
    let client = Reactors::start(1, "client")?;
    let write_some = |n: u64, seed: u8| -> Result<()> {
        let d = dev.clone();
        let r: Result<(), String> = client.run(0, move || async move {
            let q = d.open_channel().map_err(|e| e.to_string())?;
            for i in 0..n {
                let (r, _) = q.write(i * 8, pattern(4096, seed ^ i as u8), false).await;
                r.map_err(|e| e.to_string())?;
            }
            q.write_zeroes(1024, 8).await.map_err(|e| e.to_string())?;
            q.deallocate(2048, 8).await.map_err(|e| e.to_string())?;
            Ok(())
        })?;
        r.map_err(anyhow::Error::msg)
    };
    // The cache is on: the writes are acknowledged from the cache.
    write_some(4, 1)?;
    ensure!(
        cache.volatile() == 6,
        "cache on: {} volatile",
        cache.volatile()
    );
    let (_, _) = dev.admin_command(features_sqe(admin::SET_FEATURES, FID_VWC, 0), 0)?;
    let (wce, _) = dev.admin_command(features_sqe(admin::GET_FEATURES, FID_VWC, 0), 0)?;
    ensure!(
        wce & 1 == 0,
        "get features after turning the cache off: {wce}"
    );
    // Everything acknowledged before is flushed by the host, as it would.
    let d = dev.clone();
    client.run(0, move || async move {
        let q = d.open_channel().expect("channel");
        q.flush().await.expect("flush");
    })?;
    write_some(32, 7)?;
    let lost = cache.volatile();
    println!("acknowledged writes a power failure would lose with the cache off: {lost}");
    ensure!(lost == 0, "{lost} acknowledged writes still volatile");
    // The data is what was written.
    let d = dev.clone();
    let changed: usize = client.run(0, move || async move {
        let q = d.open_channel().expect("channel");
        let mut bad = 0;
        for i in 0..32u64 {
            let (r, got) = q.read(i * 8, IoBuf::zeroed(4096)).await;
            if r.is_err() || got.as_slice() != pattern(4096, 7 ^ i as u8).as_slice() {
                bad += 1;
            }
        }
        bad
    })?;
    println!("acknowledged writes read back changed: {changed}");
    ensure!(changed == 0);
    // And on again: writes are cached again.
    dev.admin_command(features_sqe(admin::SET_FEATURES, FID_VWC, 1), 0)?;
    write_some(2, 9)?;
    ensure!(cache.volatile() == 4, "cache back on: {}", cache.volatile());
    Ok(())
}

/// Identify advertises namespace attribute notices (OAES); when the
/// namespace grows, a held Async Event Request completes with the notice,
/// the Changed Namespace List names the namespace once, and Identify
/// reports the new size, which is what the Linux host needs to rescan.
#[test]
fn namespace_growth_completes_an_async_event_request() -> Result<()> {
    let cache = CacheDev::new(BLOCKS, 2 * BLOCKS);
    let f = cache_fixture(cache.clone())?;
    let mut r = Raw::connect(f.target.local_addr())?;
    let c = r.fabrics_connect(&f.nqn, 0, 0xffff, 0)?;
    ensure!(c.status.is_success(), "{:?}", c.status);
    r.enable()?;
    let mut id = Sqe::default();
    id.set_opcode(admin::IDENTIFY);
    id.set_cdw(10, 1);
    let (c, data) = r.cmd(id, &[], 4096)?;
    ensure!(c.status.is_success());
    let oaes = u32::from_le_bytes(data[92..96].try_into()?);
    ensure!(oaes & (1 << 8) != 0, "OAES {oaes:#x}");
    let (c, _) = r.cmd(
        features_sqe(admin::SET_FEATURES, FID_ASYNC_EVENT, 1 << 8),
        &[],
        0,
    )?;
    ensure!(c.status.is_success(), "{:?}", c.status);
    let mut aer = Sqe::default();
    aer.set_opcode(admin::ASYNC_EVENT);
    let aer_cid = r.send(aer, &[], false)?;
    // A command after the AER is answered while the AER stays held.
    let (c, log) = r.cmd(
        cairn_engine::initiator::get_log_page_sqe(0x04, 0, 4096),
        &[],
        4096,
    )?;
    ensure!(c.status.is_success() && log.iter().all(|&b| b == 0));

    cache
        .blocks
        .store(2 * BLOCKS, std::sync::atomic::Ordering::Release);
    ensure!(f.target.notice_resized() == 1);
    let (t, hdr, _) = r.recv()?;
    ensure!(t == PduType::CapsuleResp as u8, "PDU type {t}");
    let c = Cqe::parse(&hdr[8..]).context("cqe")?;
    ensure!(c.cid == aer_cid && c.status.is_success(), "{c:?}");
    ensure!(
        c.result as u32 == 0x0004_0002,
        "AER dword 0 {:#x}",
        c.result as u32
    );
    let (c, log) = r.cmd(
        cairn_engine::initiator::get_log_page_sqe(0x04, 0, 4096),
        &[],
        4096,
    )?;
    ensure!(c.status.is_success());
    let first = u32::from_le_bytes(log[0..4].try_into()?);
    ensure!(
        first == 1 && log[4..].iter().all(|&b| b == 0),
        "log {first}"
    );
    // Read without RAE: cleared.
    let (_, log) = r.cmd(
        cairn_engine::initiator::get_log_page_sqe(0x04, 0, 4096),
        &[],
        4096,
    )?;
    ensure!(log.iter().all(|&b| b == 0), "changed list not cleared");
    let mut idns = Sqe::default();
    idns.set_opcode(admin::IDENTIFY);
    idns.set_nsid(1);
    let (_, ns) = r.cmd(idns, &[], 4096)?;
    ensure!(u64::from_le_bytes(ns[0..8].try_into()?) == 2 * BLOCKS);
    // Nothing changed since: no namespace to tell about.
    ensure!(f.target.notice_resized() == 0);
    Ok(())
}

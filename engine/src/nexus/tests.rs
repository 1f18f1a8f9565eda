use super::*;
use cairn_bdev::ram::RamDevice;
use cairn_bdev::{BufResult, IoBuf, IoFuture};
use std::time::Instant;

/// A child whose reads and writes fail while `broken` is set, and never
/// complete while `hang` is set.
struct Faulty {
    inner: RamDevice,
    broken: Arc<std::sync::atomic::AtomicBool>,
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl Faulty {
    fn failing(inner: RamDevice, broken: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Faulty {
            inner,
            broken,
            hang: Arc::default(),
        }
    }

    fn hanging(inner: RamDevice, hang: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Faulty {
            inner,
            broken: Arc::default(),
            hang,
        }
    }
}

impl BlockDevice for Faulty {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(FaultyChannel {
            inner: self.inner.open_channel()?,
            broken: self.broken.clone(),
            hang: self.hang.clone(),
        }))
    }
}

struct FaultyChannel {
    inner: Box<dyn IoChannel>,
    broken: Arc<std::sync::atomic::AtomicBool>,
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl FaultyChannel {
    /// What a read or write does instead of reaching the device, if anything.
    fn fault<'a>(&self, buf: IoBuf) -> Result<IoFuture<'a, BufResult>, IoBuf> {
        if self.hang.load(Ordering::SeqCst) {
            return Ok(Box::pin(std::future::pending()));
        }
        if self.broken.load(Ordering::SeqCst) {
            let e = BdevError::io("test", std::io::Error::other("injected"));
            return Ok(Box::pin(std::future::ready((Err(e), buf))));
        }
        Err(buf)
    }
}

impl IoChannel for FaultyChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        self.fault(buf)
            .unwrap_or_else(|buf| self.inner.read(lba, buf))
    }
    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        self.fault(buf)
            .unwrap_or_else(|buf| self.inner.write(lba, buf, fua))
    }
    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        self.inner.flush()
    }
    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        self.inner.write_zeroes(lba, blocks)
    }
    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        self.inner.deallocate(lba, blocks)
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build()
        .unwrap()
        .block_on(f)
}

/// Every I/O allocates its future; past 1 KiB glibc's malloc leaves its
/// per-thread cache, which cost writes about 8 % of their CPU. The rare
/// paths (fan-out, remote timeout, range lock, health wait, pause) are boxed
/// only when taken to keep the common ones under that.
#[test]
fn io_futures_stay_small() {
    let nexus = Nexus::new(
        512 * 1024,
        vec![("a".into(), Arc::new(RamDevice::new(512, 2048)))],
    )
    .unwrap();
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let write = ch.write(8, IoBuf::zeroed(4096), false);
        let read = ch.read(8, IoBuf::zeroed(4096));
        let (w, r) = (
            std::mem::size_of_val(&*write),
            std::mem::size_of_val(&*read),
        );
        eprintln!("nexus futures: write {w} bytes, read {r} bytes");
        assert!(w <= 1024, "a nexus write future is {w} bytes");
        assert!(r <= 1024, "a nexus read future is {r} bytes");
        let ((wr, _), (rr, _)) = (write.await, read.await);
        wr.unwrap();
        rr.unwrap();
    });
}

#[test]
fn mirrors_writes_and_survives_a_failing_child() {
    let a = RamDevice::new(512, 2048);
    let b = RamDevice::new(512, 2048);
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = Faulty::failing(b.clone(), broken.clone());
    let nexus = Nexus::new(
        512 * 1024,
        vec![
            ("a".into(), Arc::new(a.clone())),
            ("b".into(), Arc::new(flaky)),
        ],
    )
    .unwrap();
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let data = IoBuf::from_slice(&[7u8; 4096]);
        let (r, _) = ch.write(8, data, false).await;
        r.unwrap();
        // Both legs hold the data.
        for leg in [&a, &b] {
            let c = leg.open_channel().unwrap();
            let (r, got) = c.read(8, IoBuf::zeroed(4096)).await;
            r.unwrap();
            assert!(got.iter().all(|&x| x == 7));
        }
        // Break one leg: writes and reads go on from the other.
        broken.store(true, Ordering::SeqCst);
        let (r, _) = ch.write(16, IoBuf::from_slice(&[9u8; 512]), false).await;
        r.unwrap();
        assert_eq!(nexus.children()[1].state(), ChildState::Faulted);
        for _ in 0..4 {
            let (r, got) = ch.read(16, IoBuf::zeroed(512)).await;
            r.unwrap();
            assert!(got.iter().all(|&x| x == 9));
        }
        // Request errors are the request's, not a child's.
        let (r, _) = ch.read(1024, IoBuf::zeroed(512)).await;
        assert!(matches!(r, Err(BdevError::OutOfRange { .. })));
        assert_eq!(nexus.children()[0].state(), ChildState::Healthy);
    });
}

#[test]
fn grows_online_within_its_children() {
    let a: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(512, 2048));
    let nexus = Nexus::new(512 * 1024, vec![("a".into(), a)]).unwrap();
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let (r, _) = ch.write(1500, IoBuf::zeroed(512), false).await;
        assert!(matches!(r, Err(BdevError::OutOfRange { .. })));
        nexus.resize(512 * 2048).unwrap();
        assert_eq!(nexus.info().num_blocks, 2048);
        let (r, _) = ch.write(1500, IoBuf::zeroed(512), false).await;
        r.unwrap();
    });
    assert!(matches!(
        nexus.resize(512 * 4096),
        Err(NexusError::TooSmall { .. })
    ));
    assert!(matches!(
        nexus.resize(512 * 10),
        Err(NexusError::Shrink { .. })
    ));
}

#[test]
fn refuses_mismatched_children() {
    let a: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(512, 100));
    let b: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(4096, 100));
    assert!(matches!(
        Nexus::new(512 * 100, vec![("a".into(), a.clone()), ("b".into(), b)]),
        Err(NexusError::BlockSize { .. })
    ));
    assert!(matches!(
        Nexus::new(512 * 101, vec![("a".into(), a)]),
        Err(NexusError::TooSmall { .. })
    ));
    assert!(matches!(Nexus::new(1, vec![]), Err(NexusError::NoChildren)));
}

const BS: usize = 512;

/// A nexus of `size_bytes` over `children`, with [`small_segments`] and
/// no health recorder.
fn small_nexus(size_bytes: u64, children: Vec<(String, Arc<dyn BlockDevice>)>) -> Nexus {
    Nexus::with_options(Uuid::new_v4(), size_bytes, children, small_segments(), None).unwrap()
}

fn small_segments() -> NexusConfig {
    NexusConfig {
        segment_bytes: 64 << 10,
        rebuild_concurrency: 2,
        pause: Duration::from_millis(500),
        io_timeout: Duration::from_millis(300),
        health_timeout: Duration::from_millis(500),
        ..NexusConfig::default()
    }
}

/// A block whose every byte says which write put it there.
fn tagged(lba: u64, seq: u32) -> IoBuf {
    let mut b = IoBuf::zeroed(BS);
    let tag = (lba << 32) | u64::from(seq);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (tag >> ((i % 8) * 8)) as u8 ^ (i as u8);
    }
    b
}

/// Reads every block of `dev` and returns the contents.
async fn contents(dev: &dyn BlockDevice) -> Vec<u8> {
    let ch = dev.open_channel().unwrap();
    let len = dev.info().size_bytes() as usize;
    let (r, buf) = ch.read(0, IoBuf::zeroed(len)).await;
    r.unwrap();
    buf.to_vec()
}

/// Writes `count` tagged blocks at pseudo-random LBAs through `ch`,
/// recording the last tag of each block in `model`.
async fn tagged_writes(
    ch: &dyn IoChannel,
    blocks: u64,
    count: u32,
    seed: u64,
    model: &mut std::collections::HashMap<u64, u32>,
) {
    let mut x = seed;
    for seq in 0..count {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let lba = (x >> 33) % blocks;
        let (r, _) = ch.write(lba, tagged(lba, seq), false).await;
        r.unwrap();
        model.insert(lba, seq);
    }
}

async fn verify(ch: &dyn IoChannel, model: &std::collections::HashMap<u64, u32>) {
    for (&lba, &seq) in model {
        let (r, got) = ch.read(lba, IoBuf::zeroed(BS)).await;
        r.unwrap();
        assert_eq!(got.as_slice(), tagged(lba, seq).as_slice(), "block {lba}");
    }
}

#[test]
fn rebuild_under_writes_leaves_children_identical() {
    let blocks = 8192u64; // 4 MiB, 64 segments
    let a = RamDevice::new(512, blocks);
    let b = RamDevice::new(512, blocks);
    let nexus = Arc::new(
        Nexus::with_options(
            Uuid::new_v4(),
            blocks * 512,
            vec![("replica:///a".into(), Arc::new(a.clone()))],
            NexusConfig {
                rebuild_rate: 16 << 20,
                ..small_segments()
            },
            None,
        )
        .unwrap(),
    );
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let mut model = std::collections::HashMap::new();
        tagged_writes(ch.as_ref(), blocks, 3000, 1, &mut model).await;
        nexus
            .add_child("replica:///b", Arc::new(b.clone()))
            .unwrap();
        assert_eq!(nexus.children()[1].state(), ChildState::Rebuilding);
        let started = Instant::now();
        let rebuild = monoio::spawn(rebuild::run(nexus.clone(), "replica:///b".into()));
        // Keep writing while the rebuild copies (rate-limited to last
        // about a quarter of a second).
        tagged_writes(ch.as_ref(), blocks, 3000, 2, &mut model).await;
        let copied = rebuild.await.unwrap();
        // 4 MiB at 16 MiB/s: the limit holds from the first segment on.
        assert!(
            started.elapsed() >= Duration::from_millis(240),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(copied, blocks * 512);
        assert_eq!(nexus.children()[1].state(), ChildState::Healthy);
        assert_eq!(nexus.children()[1].last_rebuild_bytes(), blocks * 512);
        tagged_writes(ch.as_ref(), blocks, 500, 3, &mut model).await;
        verify(ch.as_ref(), &model).await;
        assert!(contents(&a).await == contents(&b).await, "children differ");
    });
}

#[test]
fn partial_resync_copies_only_what_was_written_while_away() {
    let blocks = 8192u64;
    let a = RamDevice::new(512, blocks);
    let b = RamDevice::new(512, blocks);
    let nexus = Arc::new(small_nexus(
        blocks * 512,
        vec![
            ("replica:///a".into(), Arc::new(a.clone())),
            ("replica:///b".into(), Arc::new(b.clone())),
        ],
    ));
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let mut model = std::collections::HashMap::new();
        tagged_writes(ch.as_ref(), blocks, 1000, 1, &mut model).await;
        nexus.fault_child("replica:///b").unwrap();
        // The last healthy child cannot be faulted by request.
        assert!(matches!(
            nexus.fault_child("replica:///a"),
            Err(NexusError::LastHealthy { .. })
        ));
        // Three blocks in three segments (128 blocks each), one spanning two.
        for lba in [0u64, 1000, 5119] {
            let (r, _) = ch.write(lba, tagged(lba, 9), false).await;
            r.unwrap();
            model.insert(lba, 9);
        }
        // One write spanning two segments.
        let mut two = IoBuf::zeroed(2 * BS);
        two[..BS].copy_from_slice(&tagged(255, 9));
        two[BS..].copy_from_slice(&tagged(256, 9));
        let (r, _) = ch.write(255, two, false).await;
        r.unwrap();
        model.insert(255, 9);
        model.insert(256, 9);
        let seg = 64 << 10;
        // Segments 0, 7, 39, and 1 and 2.
        assert_eq!(nexus.children()[1].stale_bytes(seg), 5 * seg);
        assert!(nexus.online_child("replica:///b", None).unwrap());
        let copied = rebuild::run(nexus.clone(), "replica:///b".into())
            .await
            .unwrap();
        assert_eq!(copied, 5 * seg, "only the segments written while away");
        assert_eq!(nexus.children()[1].state(), ChildState::Healthy);
        verify(ch.as_ref(), &model).await;
        assert!(contents(&a).await == contents(&b).await, "children differ");
    });
}

/// Records health in memory, completing each record after a delay.
#[derive(Default)]
struct SlowRecorder {
    records: std::sync::Mutex<Vec<(HealthRecord, Instant)>>,
    fail: std::sync::atomic::AtomicBool,
}

impl HealthRecorder for Arc<SlowRecorder> {
    fn record(&self, rec: HealthRecord, done: HealthDone) {
        let me = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            if me.fail.load(Ordering::SeqCst) {
                done(Err("store down".into()));
                return;
            }
            me.records.lock().unwrap().push((rec, Instant::now()));
            done(Ok(()));
        });
    }
}

#[test]
fn a_degraded_write_is_acknowledged_only_after_its_health_record() {
    let a = RamDevice::new(512, 2048);
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = Faulty::failing(RamDevice::new(512, 2048), broken.clone());
    let recorder = Arc::new(SlowRecorder::default());
    let id = Uuid::new_v4();
    let nexus = Nexus::with_options(
        id,
        512 * 2048,
        vec![
            ("replica:///a".into(), Arc::new(a)),
            ("replica:///b".into(), Arc::new(flaky)),
        ],
        small_segments(),
        Some(Arc::new(recorder.clone())),
    )
    .unwrap();
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let (r, _) = ch.write(0, IoBuf::zeroed(512), false).await;
        r.unwrap();
        // The creation record is informational: writes do not wait for it.
        while recorder.records.lock().unwrap().is_empty() {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
        broken.store(true, Ordering::SeqCst);
        let (r, _) = ch.write(1, IoBuf::zeroed(512), false).await;
        let acked = Instant::now();
        r.unwrap();
        let records = recorder.records.lock().unwrap().clone();
        let degraded = records
            .iter()
            .find(|(r, _)| r.healthy == vec!["replica:///a".to_owned()])
            .expect("the shrunken healthy set was recorded");
        assert!(degraded.1 <= acked, "acknowledged before the record");
        assert_eq!(degraded.0.nexus, id);
        assert!(!degraded.0.clean_shutdown);
        // A record from creation names both children, with a lower
        // generation.
        let first = records.iter().find(|(r, _)| r.healthy.len() == 2).unwrap();
        assert!(first.0.generation < degraded.0.generation);
        assert_eq!(first.0.instance, degraded.0.instance);
    });
}

#[test]
fn a_degraded_write_fails_when_its_health_cannot_be_recorded() {
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = Faulty::failing(RamDevice::new(512, 2048), broken.clone());
    let recorder = Arc::new(SlowRecorder::default());
    let nexus = Nexus::with_options(
        Uuid::new_v4(),
        512 * 2048,
        vec![
            ("replica:///a".into(), Arc::new(RamDevice::new(512, 2048))),
            ("replica:///b".into(), Arc::new(flaky)),
        ],
        small_segments(),
        Some(Arc::new(recorder.clone())),
    )
    .unwrap();
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        recorder.fail.store(true, Ordering::SeqCst);
        broken.store(true, Ordering::SeqCst);
        let (r, _) = ch.write(1, IoBuf::zeroed(512), false).await;
        assert!(matches!(r, Err(BdevError::Unavailable { .. })), "{r:?}");
        assert!(!nexus.health_durable());
    });
}

#[test]
fn a_remote_child_that_stops_answering_is_faulted_after_the_timeout() {
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let remote = Faulty::hanging(RamDevice::new(512, 2048), hang.clone());
    let nexus = small_nexus(
        512 * 2048,
        vec![
            ("replica:///a".into(), Arc::new(RamDevice::new(512, 2048))),
            ("nvmf://127.0.0.1:1/remote".into(), Arc::new(remote)),
        ],
    );
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        hang.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let (r, _) = ch.write(3, IoBuf::from_slice(&[5u8; 512]), false).await;
        r.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(300));
        let remote = &nexus.children()[1];
        assert_eq!(remote.state(), ChildState::Faulted);
        assert!(
            remote.fault_reason().contains("no answer"),
            "{}",
            remote.fault_reason()
        );
        // Reads come from the healthy child at once.
        let (r, got) = ch.read(3, IoBuf::zeroed(512)).await;
        r.unwrap();
        assert!(got.iter().all(|&x| x == 5));
    });
}

#[test]
fn io_to_a_failing_last_child_waits_for_it_within_the_pause() {
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flaky = Faulty::failing(RamDevice::new(512, 2048), broken.clone());
    let nexus = small_nexus(512 * 2048, vec![("replica:///a".into(), Arc::new(flaky))]);
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        broken.store(true, Ordering::SeqCst);
        let heal = broken.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            heal.store(false, Ordering::SeqCst);
        });
        // A blip shorter than the pause: the write waits and succeeds.
        let (r, _) = ch.write(0, IoBuf::from_slice(&[1u8; 512]), false).await;
        r.unwrap();
        assert_eq!(nexus.children()[0].state(), ChildState::Healthy);
        // An outage longer than the pause fails the I/O, and the child
        // stays healthy: it still holds every acknowledged write.
        broken.store(true, Ordering::SeqCst);
        let t = Instant::now();
        let (r, _) = ch.read(0, IoBuf::zeroed(512)).await;
        assert!(matches!(r, Err(BdevError::Io { .. })), "{r:?}");
        assert!(t.elapsed() >= Duration::from_millis(500));
        assert_eq!(nexus.children()[0].state(), ChildState::Healthy);
    });
}

#[test]
fn three_children_local_and_remote_fault_resync_and_replace() {
    let blocks = 8192u64;
    let a = RamDevice::new(512, blocks);
    let b_ram = RamDevice::new(512, blocks);
    let c_ram = RamDevice::new(512, blocks);
    let d = RamDevice::new(512, blocks);
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let b = Faulty::failing(b_ram.clone(), broken.clone());
    let c = Faulty::hanging(c_ram.clone(), hang.clone());
    let nexus = Arc::new(small_nexus(
        blocks * 512,
        vec![
            ("replica:///a".into(), Arc::new(a.clone())),
            ("replica:///b".into(), Arc::new(b)),
            ("nvmf://127.0.0.3:4420/c".into(), Arc::new(c)),
        ],
    ));
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let mut model = std::collections::HashMap::new();
        tagged_writes(ch.as_ref(), blocks, 1000, 1, &mut model).await;

        // b fails I/O, c stops answering: both leave, writes go on.
        broken.store(true, Ordering::SeqCst);
        hang.store(true, Ordering::SeqCst);
        tagged_writes(ch.as_ref(), blocks, 50, 2, &mut model).await;
        let states: Vec<_> = nexus.children().iter().map(|c| c.state()).collect();
        assert_eq!(
            states,
            vec![
                ChildState::Healthy,
                ChildState::Faulted,
                ChildState::Faulted
            ]
        );

        // Both come back and resync from their stale maps while writes
        // continue.
        broken.store(false, Ordering::SeqCst);
        hang.store(false, Ordering::SeqCst);
        assert!(nexus.online_child("replica:///b", None).unwrap());
        assert!(nexus.online_child("nvmf://127.0.0.3:4420/c", None).unwrap());
        let rb = monoio::spawn(rebuild::run(nexus.clone(), "replica:///b".into()));
        let rc = monoio::spawn(rebuild::run(
            nexus.clone(),
            "nvmf://127.0.0.3:4420/c".into(),
        ));
        tagged_writes(ch.as_ref(), blocks, 500, 3, &mut model).await;
        let (cb, cc) = (rb.await.unwrap(), rc.await.unwrap());
        assert!(
            cb < blocks * 512 && cc < blocks * 512,
            "resyncs were partial"
        );

        // c is replaced by a new child d, copied whole.
        nexus.remove_child("nvmf://127.0.0.3:4420/c").unwrap();
        nexus
            .add_child("replica:///d", Arc::new(d.clone()))
            .unwrap();
        let rd = monoio::spawn(rebuild::run(nexus.clone(), "replica:///d".into()));
        tagged_writes(ch.as_ref(), blocks, 500, 4, &mut model).await;
        assert_eq!(rd.await.unwrap(), blocks * 512);
        let uris: Vec<_> = nexus
            .children()
            .iter()
            .map(|c| c.uri().to_owned())
            .collect();
        assert_eq!(uris, vec!["replica:///a", "replica:///b", "replica:///d"]);
        assert!(nexus
            .children()
            .iter()
            .all(|c| c.state() == ChildState::Healthy));
        verify(ch.as_ref(), &model).await;
        let want = contents(&a).await;
        assert!(contents(&b_ram).await == want, "b differs");
        assert!(contents(&d).await == want, "d differs");
    });
}

/// A child whose writes fail with "no space" while `full` is set (an
/// over-committed thin pool); reads and everything else work.
struct Full {
    inner: RamDevice,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl BlockDevice for Full {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(FullChannel {
            inner: self.inner.open_channel()?,
            full: self.full.clone(),
        }))
    }
}

struct FullChannel {
    inner: Box<dyn IoChannel>,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl IoChannel for FullChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        self.inner.read(lba, buf)
    }
    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        if self.full.load(Ordering::SeqCst) {
            return Box::pin(std::future::ready((Err(BdevError::NoSpace), buf)));
        }
        self.inner.write(lba, buf, fua)
    }
    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        self.inner.flush()
    }
    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        self.inner.write_zeroes(lba, blocks)
    }
    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        self.inner.deallocate(lba, blocks)
    }
}

/// A write one child refuses for want of space (and the others take) leaves
/// that child out of the read path: every read of the block answers what
/// the mirror acknowledged, whichever child it goes to.
#[test]
fn a_child_that_refuses_a_write_is_no_longer_read() {
    let a = RamDevice::new(512, 2048);
    let b = RamDevice::new(512, 2048);
    let full = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let nexus = small_nexus(
        512 * 2048,
        vec![
            ("replica:///a".into(), Arc::new(a.clone())),
            (
                "replica:///b".into(),
                Arc::new(Full {
                    inner: b.clone(),
                    full: full.clone(),
                }),
            ),
        ],
    );
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let (r, _) = ch.write(8, tagged(8, 1), false).await;
        r.unwrap();
        full.store(true, Ordering::SeqCst);
        let (r, _) = ch.write(8, tagged(8, 2), false).await;
        // What the host was told decides what the block must read back as
        // (a failed write may have left either; the count below then only
        // accepts the old one, and the distinct answers say more).
        let acked = if r.is_ok() { 2 } else { 1 };
        let mut answers = std::collections::BTreeSet::new();
        let mut wrong = 0;
        for _ in 0..16 {
            let (r, got) = ch.read(8, IoBuf::zeroed(BS)).await;
            r.unwrap();
            answers.insert(got.to_vec());
            if got.as_slice() != tagged(8, acked).as_slice() {
                wrong += 1;
            }
        }
        eprintln!(
            "write on a full child: {:?}; distinct answers for one block: {}; reads not matching the acknowledged write: {wrong}",
            r.as_ref().err(),
            answers.len()
        );
        assert_eq!(
            answers.len(),
            1,
            "the mirror answers two contents for one block"
        );
        assert_eq!(wrong, 0);
        // The refusing child is out of the read path until it is resynced.
        assert_eq!(nexus.children()[1].state(), ChildState::Faulted);
        assert!(nexus.children()[1].stale_bytes(64 << 10) > 0);
    });
}

/// A rebuild leaves a thin replica thin: what the source never wrote is
/// not written to the new child, and the children still read alike.
#[test]
fn a_rebuilt_thin_replica_allocates_only_what_was_written() {
    let blocks = (64u64 << 20) / 512; // 64 MiB
    let a = RamDevice::new(512, blocks);
    let b = RamDevice::new(512, blocks);
    let nexus = Arc::new(small_nexus(
        blocks * 512,
        vec![("replica:///a".into(), Arc::new(a.clone()))],
    ));
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        // 4 MiB written, in 64 KiB pieces spread over the volume.
        let piece = 64 << 10;
        for i in 0..64u64 {
            let lba = i * (blocks / 64);
            let (r, _) = ch
                .write(lba, IoBuf::from_slice(&vec![(i as u8) | 1; piece]), false)
                .await;
            r.unwrap();
        }
        nexus
            .add_child("replica:///b", Arc::new(b.clone()))
            .unwrap();
        rebuild::run(nexus.clone(), "replica:///b".into())
            .await
            .unwrap();
        let (src, dst) = (a.allocated_bytes(), b.allocated_bytes());
        eprintln!(
            "thin rebuild: source allocates {src} bytes, the rebuilt child {dst} of {}",
            blocks * 512
        );
        assert_eq!(src, 4 << 20);
        assert!(
            dst <= src + (src / 10),
            "the rebuilt child allocates {dst} bytes"
        );
        assert!(contents(&a).await == contents(&b).await, "children differ");
        // A resync over a region the source has since deallocated leaves
        // zeroes there, not the child's old data.
        nexus.fault_child("replica:///b").unwrap();
        ch.deallocate(0, 128).await.unwrap();
        assert!(nexus.online_child("replica:///b", None).unwrap());
        rebuild::run(nexus.clone(), "replica:///b".into())
            .await
            .unwrap();
        let (r, got) = b.open_channel().unwrap().read(0, IoBuf::zeroed(BS)).await;
        r.unwrap();
        assert!(got.iter().all(|&x| x == 0), "the resync left stale data");
        assert!(contents(&a).await == contents(&b).await, "children differ");
    });
}

/// A replica as the nexus sees it: a RAM device with an incarnation.
struct Incarnate {
    inner: RamDevice,
    incarnation: u64,
}

impl BlockDevice for Incarnate {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        self.inner.open_channel()
    }
    fn incarnation(&self) -> Option<u64> {
        Some(self.incarnation)
    }
}

/// A remote child whose engine restarted while it was away lost writes it
/// had completed but not made durable; brought back, it is copied whole,
/// and no acknowledged write is lost or changed.
#[test]
fn a_child_that_restarted_while_away_is_resynced_whole() {
    let blocks = 8192u64;
    let a = RamDevice::new(512, blocks);
    let b = RamDevice::new(512, blocks);
    let uri = "nvmf://127.0.0.1:8420/nqn.2024-01.dev.cairn:replica:b";
    let nexus = Arc::new(small_nexus(
        blocks * 512,
        vec![
            ("replica:///a".into(), Arc::new(a.clone())),
            (
                uri.into(),
                Arc::new(Incarnate {
                    inner: b.clone(),
                    incarnation: 1,
                }),
            ),
        ],
    ));
    block_on(async {
        let ch = nexus.open_channel().unwrap();
        let mut model = std::collections::HashMap::new();
        tagged_writes(ch.as_ref(), blocks, 1000, 1, &mut model).await;
        // The child's node loses power: the writes in its cache are gone
        // (here: every block it held reads zeroes again), and it is
        // faulted for not answering.
        nexus.fault_child(uri).unwrap();
        b.open_channel()
            .unwrap()
            .deallocate(0, blocks)
            .await
            .unwrap();
        tagged_writes(ch.as_ref(), blocks, 10, 2, &mut model).await;
        // It comes back, restarted: a new incarnation.
        let back: Arc<dyn BlockDevice> = Arc::new(Incarnate {
            inner: b.clone(),
            incarnation: 2,
        });
        assert!(nexus.online_child(uri, Some(back)).unwrap());
        let copied = rebuild::run(nexus.clone(), uri.into()).await.unwrap();
        // Every block must read back as acknowledged from the child alone.
        let bch = b.open_channel().unwrap();
        let mut lost = 0;
        for (&lba, &seq) in &model {
            let (r, got) = bch.read(lba, IoBuf::zeroed(BS)).await;
            r.unwrap();
            if got.as_slice() != tagged(lba, seq).as_slice() {
                lost += 1;
            }
        }
        eprintln!(
            "restarted child: copied {copied} bytes; acknowledged blocks lost or changed on it: {lost} of {}",
            model.len()
        );
        assert_eq!(lost, 0);
        assert_eq!(copied, blocks * 512, "copied whole");
        assert!(contents(&a).await == contents(&b).await, "children differ");
        // The same incarnation coming back is resynced from its map alone.
        nexus.fault_child(uri).unwrap();
        tagged_writes(ch.as_ref(), blocks, 1, 3, &mut model).await;
        let same: Arc<dyn BlockDevice> = Arc::new(Incarnate {
            inner: b.clone(),
            incarnation: 2,
        });
        assert!(nexus.online_child(uri, Some(same)).unwrap());
        let copied = rebuild::run(nexus.clone(), uri.into()).await.unwrap();
        assert_eq!(copied, 64 << 10);
        verify(ch.as_ref(), &model).await;
    });
}

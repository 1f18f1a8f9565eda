//! A device model: any [`BlockDevice`] made to behave like an NVMe SSD.
//!
//! On a 2-core development machine a RAM device answers in nanoseconds, so
//! every benchmark is bound by CPU and says nothing about, say, whether two
//! replicas double read IOPS. [`ModelDevice`] adds what a real SSD has: a
//! fixed service latency per I/O and a ceiling on IOPS and bandwidth. The
//! ceiling is a token bucket (in its GCRA form: one atomic "theoretical
//! arrival time" shared by every channel of the device), so it holds for the
//! device as a whole however many reactors use it. I/Os in flight overlap,
//! as on an SSD with internal parallelism: latency `L` and rate `R` give
//! `min(R, QD / L)` IOPS.
//!
//! Waiting never spins: an I/O runs on the inner device at once, then sleeps
//! on a [`PreciseTimer`] until its modelled completion time. Channels must be
//! used on a monoio io_uring runtime.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_bdev::{BdevError, BlockDevice, BufResult, DeviceInfo, IoBuf, IoChannel, IoFuture};
use serde::{Deserialize, Serialize};

use crate::spec::{parse_count, parse_duration, parse_size, SpecError};
use crate::timer::PreciseTimer;

/// How a [`ModelDevice`] behaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelParams {
    /// Service latency of a read (seconds, in JSON).
    #[serde(with = "crate::spec::secs")]
    pub read_latency: Duration,
    /// Service latency of a write, flush, write-zeroes or deallocate.
    #[serde(with = "crate::spec::secs")]
    pub write_latency: Duration,
    /// Ceiling on I/Os per second, if any.
    pub max_iops: Option<u64>,
    /// Ceiling on bytes per second, if any.
    pub max_bandwidth: Option<u64>,
    /// I/Os that may start at once after an idle spell (the bucket's size):
    /// the device's internal parallelism. It also lets the device catch up
    /// after its user was late to submit, as an SSD with free slots would.
    pub burst: u32,
    /// How late a completion may be so that several share one wake-up of
    /// the reactor (see [`PreciseTimer::with_slack`]); completions are never
    /// early. Zero is exact, and costs one wake-up per I/O.
    #[serde(with = "crate::spec::secs")]
    pub slack: Duration,
}

impl Default for ModelParams {
    /// No added latency and no limits (the inner device as it is), with a
    /// burst of 32 for when limits are added.
    fn default() -> Self {
        ModelParams {
            read_latency: Duration::ZERO,
            write_latency: Duration::ZERO,
            max_iops: None,
            max_bandwidth: None,
            burst: 32,
            slack: Duration::ZERO,
        }
    }
}

impl ModelParams {
    /// A data-centre TLC NVMe SSD in round numbers: 80 µs reads, 20 µs
    /// writes (into its power-protected cache), 500K IOPS, 3 GiB/s.
    pub fn datacenter_nvme() -> Self {
        ModelParams {
            read_latency: Duration::from_micros(80),
            write_latency: Duration::from_micros(20),
            max_iops: Some(500_000),
            max_bandwidth: Some(3 << 30),
            burst: 32,
            slack: Duration::from_micros(20),
        }
    }

    /// The time one I/O of `bytes` occupies the rate limit, in nanoseconds.
    fn cost_ns(&self, bytes: u64) -> u64 {
        let by_iops = self.max_iops.map_or(0.0, |r| 1e9 / r.max(1) as f64);
        let by_bw = self
            .max_bandwidth
            .map_or(0.0, |r| bytes as f64 * 1e9 / r.max(1) as f64);
        by_iops.max(by_bw).round() as u64
    }
}

impl fmt::Display for ModelParams {
    /// `read 80us, write 20us, 500000 IOPS, 3072 MiB/s, burst 32, slack 20us`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "read {}us, write {}us, ",
            self.read_latency.as_micros(),
            self.write_latency.as_micros()
        )?;
        match self.max_iops {
            Some(r) => write!(f, "{r} IOPS, ")?,
            None => f.write_str("unlimited IOPS, ")?,
        }
        match self.max_bandwidth {
            Some(b) => write!(f, "{} MiB/s, ", b >> 20)?,
            None => f.write_str("unlimited MiB/s, ")?,
        }
        write!(
            f,
            "burst {}, slack {}us",
            self.burst,
            self.slack.as_micros()
        )
    }
}

impl FromStr for ModelParams {
    type Err = SpecError;

    /// Parses `key=value` pairs separated by commas, on top of
    /// [`ModelParams::default`]: `lat` (both latencies), `read_lat`,
    /// `write_lat`, `iops` (`200k`), `bw` (bytes per second: `2g`),
    /// `burst`, `slack`. `nvme` alone means [`ModelParams::datacenter_nvme`], and may
    /// be followed by overrides: `nvme,iops=100k`.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let mut p = ModelParams::default();
        for part in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (k, v) = match part.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None if part == "nvme" => {
                    p = ModelParams::datacenter_nvme();
                    continue;
                }
                None => {
                    return Err(SpecError::MissingValue {
                        option: part.to_owned(),
                    })
                }
            };
            match k {
                "lat" | "latency" => {
                    p.read_latency = parse_duration(v)?;
                    p.write_latency = p.read_latency;
                }
                "read_lat" | "rlat" => p.read_latency = parse_duration(v)?,
                "slack" => p.slack = parse_duration(v)?,
                "write_lat" | "wlat" => p.write_latency = parse_duration(v)?,
                "iops" => p.max_iops = Some(parse_count(k, v)?).filter(|&n| n > 0),
                "bw" | "bandwidth" => p.max_bandwidth = Some(parse_size(v)?).filter(|&n| n > 0),
                "burst" => {
                    let n = parse_count(k, v)?;
                    p.burst =
                        u32::try_from(n)
                            .ok()
                            .filter(|&b| b > 0)
                            .ok_or(SpecError::OutOfRange {
                                option: "burst",
                                value: n,
                                reason: "must be 1..=4294967295",
                            })?;
                }
                _ => {
                    return Err(SpecError::UnknownOption {
                        option: k.to_owned(),
                    })
                }
            }
        }
        Ok(p)
    }
}

/// The shared token bucket.
struct Limiter {
    base: Instant,
    /// Theoretical arrival time of the next I/O, in ns since `base`.
    tat: AtomicU64,
}

impl Limiter {
    /// Reserves room for one I/O costing `cost` ns and returns when it may
    /// start being serviced.
    fn reserve(&self, cost: u64, burst: u32) -> Instant {
        let now = self.base.elapsed().as_nanos() as u64;
        if cost == 0 {
            return self.base + Duration::from_nanos(now);
        }
        let tolerance = cost.saturating_mul(u64::from(burst.saturating_sub(1)));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = now.max(tat.saturating_sub(tolerance));
            let next = tat.max(start) + cost;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return self.base + Duration::from_nanos(start),
                Err(t) => tat = t,
            }
        }
    }
}

/// A [`BlockDevice`] that serves I/O from an inner device with a modelled
/// latency and rate limit. See the module documentation.
pub struct ModelDevice {
    inner: Arc<dyn BlockDevice>,
    params: ModelParams,
    limiter: Arc<Limiter>,
}

impl ModelDevice {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn BlockDevice>, params: ModelParams) -> Self {
        ModelDevice {
            inner,
            params,
            limiter: Arc::new(Limiter {
                base: Instant::now(),
                tat: AtomicU64::new(0),
            }),
        }
    }

    /// How this device behaves.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }
}

impl BlockDevice for ModelDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let timer = PreciseTimer::with_slack(self.params.slack)
            .map_err(|e| BdevError::io("timerfd_create", e))?;
        Ok(Box::new(ModelChannel {
            inner: self.inner.open_channel()?,
            params: self.params.clone(),
            limiter: self.limiter.clone(),
            timer,
        }))
    }
}

struct ModelChannel {
    inner: Box<dyn IoChannel>,
    params: ModelParams,
    limiter: Arc<Limiter>,
    timer: PreciseTimer,
}

impl ModelChannel {
    /// When an I/O of `bytes` issued now completes.
    fn deadline(&self, bytes: u64, latency: Duration) -> Instant {
        let start = self
            .limiter
            .reserve(self.params.cost_ns(bytes), self.params.burst);
        start + latency
    }
}

impl IoChannel for ModelChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        let deadline = self.deadline(buf.len() as u64, self.params.read_latency);
        Box::pin(async move {
            let _in_flight = cairn_bdev::file::InFlight::new();
            let res = self.inner.read(lba, buf).await;
            self.timer.sleep_until(deadline).await;
            res
        })
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        let deadline = self.deadline(buf.len() as u64, self.params.write_latency);
        Box::pin(async move {
            let _in_flight = cairn_bdev::file::InFlight::new();
            let res = self.inner.write(lba, buf, fua).await;
            self.timer.sleep_until(deadline).await;
            res
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        let deadline = self.deadline(0, self.params.write_latency);
        Box::pin(async move {
            let _in_flight = cairn_bdev::file::InFlight::new();
            let res = self.inner.flush().await;
            self.timer.sleep_until(deadline).await;
            res
        })
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        // Zeroing moves no data: it costs an I/O, not bandwidth.
        let deadline = self.deadline(0, self.params.write_latency);
        Box::pin(async move {
            let _in_flight = cairn_bdev::file::InFlight::new();
            let res = self.inner.write_zeroes(lba, blocks).await;
            self.timer.sleep_until(deadline).await;
            res
        })
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        let deadline = self.deadline(0, self.params.write_latency);
        Box::pin(async move {
            let _in_flight = cairn_bdev::file::InFlight::new();
            let res = self.inner.deallocate(lba, blocks).await;
            self.timer.sleep_until(deadline).await;
            res
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_parse_and_print() {
        let p: ModelParams = "read_lat=80us,write_lat=20us,iops=200k,bw=2g,burst=16,slack=5us"
            .parse()
            .unwrap();
        assert_eq!(p.slack, Duration::from_micros(5));
        assert_eq!(p.read_latency, Duration::from_micros(80));
        assert_eq!(p.write_latency, Duration::from_micros(20));
        assert_eq!(p.max_iops, Some(200_000));
        assert_eq!(p.max_bandwidth, Some(2 << 30));
        assert_eq!(p.burst, 16);
        assert_eq!(
            p.to_string(),
            "read 80us, write 20us, 200000 IOPS, 2048 MiB/s, burst 16, slack 5us"
        );
        let q: ModelParams = "nvme,iops=100k".parse().unwrap();
        assert_eq!(q.max_iops, Some(100_000));
        assert_eq!(q.read_latency, Duration::from_micros(80));
        let l: ModelParams = "lat=1ms".parse().unwrap();
        assert_eq!(l.write_latency, Duration::from_millis(1));
        assert_eq!(l.max_iops, None);
        assert!(matches!(
            "speed=9".parse::<ModelParams>(),
            Err(SpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            "lat=fast".parse::<ModelParams>(),
            Err(SpecError::InvalidDuration { .. })
        ));
        assert!(matches!(
            "burst=0".parse::<ModelParams>(),
            Err(SpecError::OutOfRange { .. })
        ));
    }

    #[test]
    fn cost_is_the_tighter_limit() {
        let p = ModelParams {
            max_iops: Some(1_000_000),
            max_bandwidth: Some(1 << 30),
            ..ModelParams::default()
        };
        assert_eq!(p.cost_ns(512), 1000);
        // 1 MiB at 1 GiB/s takes 1/1024 s.
        assert_eq!(p.cost_ns(1 << 20), 976_563);
        assert_eq!(ModelParams::default().cost_ns(4096), 0);
    }

    #[test]
    fn limiter_spaces_starts_and_allows_a_burst() {
        let l = Limiter {
            base: Instant::now(),
            tat: AtomicU64::new(0),
        };
        // Without burst, 100 back-to-back reservations of 1 ms each span
        // about 99 ms of start times.
        let first = l.reserve(1_000_000, 1);
        let mut last = first;
        for _ in 0..99 {
            last = l.reserve(1_000_000, 1);
        }
        let span = last - first;
        assert!(span >= Duration::from_millis(98), "{span:?}");
        assert!(span <= Duration::from_millis(100), "{span:?}");

        // With a burst of 10 after an idle spell, 10 start at once.
        let l = Limiter {
            base: Instant::now(),
            tat: AtomicU64::new(0),
        };
        std::thread::sleep(Duration::from_millis(20));
        let now = Instant::now();
        let starts: Vec<Instant> = (0..11).map(|_| l.reserve(1_000_000, 10)).collect();
        assert!(starts[..10]
            .iter()
            .all(|s| *s <= now + Duration::from_millis(2)));
        assert!(starts[10] >= now + Duration::from_micros(500));
    }
}

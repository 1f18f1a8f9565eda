//! What to run: a [`JobSpec`], and the fio-like short syntax that builds one
//! (`--rw randread --bs 4k --iodepth 64 --numjobs 2 --runtime 10s`).
//!
//! Sizes take binary suffixes (`4k` = 4096, `1m`, `2g`, `1t`, an optional
//! trailing `b`/`ib`); durations take `ns`, `us`, `ms`, `s`, `m`, `h` (a bare
//! number is seconds, as in fio). Counts take decimal suffixes (`100k`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a job description could not be parsed or is not runnable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A size such as `4k` did not parse.
    #[error("invalid size {input:?} (expected e.g. 512, 4k, 128k, 1m, 2g)")]
    InvalidSize { input: String },
    /// A duration such as `10s` did not parse.
    #[error("invalid duration {input:?} (expected e.g. 500ms, 10s, 1m)")]
    InvalidDuration { input: String },
    /// A plain number did not parse.
    #[error("invalid number {input:?} for {option}")]
    InvalidNumber { option: String, input: String },
    /// An access pattern name is not known.
    #[error(
        "unknown pattern {input:?} (expected randread, randwrite, randrw, read, write, seqread, seqwrite)"
    )]
    UnknownPattern { input: String },
    /// An option name is not known.
    #[error("unknown option {option:?}")]
    UnknownOption { option: String },
    /// An option was given without its value.
    #[error("option {option:?} needs a value")]
    MissingValue { option: String },
    /// A value parsed but lies outside what the option allows.
    #[error("{option} = {value} is out of range: {reason}")]
    OutOfRange {
        option: &'static str,
        value: u64,
        reason: &'static str,
    },
}

/// The access pattern of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// Uniformly random reads.
    RandRead,
    /// Uniformly random writes.
    RandWrite,
    /// Uniformly random offsets, each I/O a read with probability
    /// `read_pct` percent, else a write.
    RandRw { read_pct: u8 },
    /// Sequential reads, wrapping at the end of the range.
    SeqRead,
    /// Sequential writes, wrapping at the end of the range.
    SeqWrite,
}

impl Pattern {
    /// Whether offsets are chosen at random.
    pub fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::RandRead | Pattern::RandWrite | Pattern::RandRw { .. }
        )
    }

    /// Percentage of I/Os that are reads.
    pub fn read_pct(self) -> u8 {
        match self {
            Pattern::RandRead | Pattern::SeqRead => 100,
            Pattern::RandWrite | Pattern::SeqWrite => 0,
            Pattern::RandRw { read_pct } => read_pct,
        }
    }

    /// The fio name of the pattern (`randrw` without its mix).
    pub fn fio_name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
            Pattern::RandRw { .. } => "randrw",
            Pattern::SeqRead => "read",
            Pattern::SeqWrite => "write",
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::RandRw { read_pct } => write!(f, "randrw{read_pct}"),
            p => f.write_str(p.fio_name()),
        }
    }
}

impl FromStr for Pattern {
    type Err = SpecError;

    /// Accepts fio's names (`randread`, `randwrite`, `randrw`, `read`,
    /// `write`), `seqread`/`seqwrite`, and `randrwNN` for a read mix of NN %.
    fn from_str(s: &str) -> Result<Self, SpecError> {
        let lower = s.trim().to_ascii_lowercase();
        let p = match lower.as_str() {
            "randread" => Pattern::RandRead,
            "randwrite" => Pattern::RandWrite,
            "randrw" | "randreadwrite" => Pattern::RandRw { read_pct: 50 },
            "read" | "seqread" => Pattern::SeqRead,
            "write" | "seqwrite" => Pattern::SeqWrite,
            other => {
                let pct = other
                    .strip_prefix("randrw")
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|&n| n <= 100);
                match pct {
                    Some(read_pct) => Pattern::RandRw { read_pct },
                    None => {
                        return Err(SpecError::UnknownPattern {
                            input: s.to_owned(),
                        })
                    }
                }
            }
        };
        Ok(p)
    }
}

/// One benchmark job: `jobs` threads, each keeping `queue_depth` I/Os of
/// `block_size` bytes in flight for `ramp + runtime`, of which only the
/// `runtime` part is measured.
///
/// The byte range `offset .. offset + size` is split evenly between the job
/// threads, so sequential jobs stream through disjoint regions and verify
/// jobs never race each other on a block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// A label for reports.
    pub name: String,
    /// The access pattern.
    pub pattern: Pattern,
    /// Bytes per I/O: a multiple of the device's block size.
    pub block_size: u32,
    /// I/Os in flight per job thread.
    pub queue_depth: u32,
    /// Job threads.
    pub jobs: u32,
    /// Measured run time (seconds, in JSON).
    #[serde(with = "secs")]
    pub runtime: Duration,
    /// Warm-up time before measuring (seconds, in JSON).
    #[serde(with = "secs")]
    pub ramp: Duration,
    /// Start of the range, in bytes.
    pub offset: u64,
    /// Length of the range, in bytes; `None` runs to the end of the device.
    pub size: Option<u64>,
    /// Tag every written block and check every read one.
    pub verify: bool,
    /// Stop each job thread after this many I/Os (ramp included), if set.
    pub io_limit: Option<u64>,
    /// Pin job thread `i` to CPU `cpus[i % cpus.len()]`; empty leaves the
    /// scheduler free.
    pub cpus: Vec<usize>,
    /// Keep going after an I/O error instead of stopping the job thread.
    pub continue_on_error: bool,
    /// Seed of the offset generators: equal seeds give equal offsets.
    pub seed: u64,
    /// How long a job thread keeps polling for completions after network
    /// activity before it sleeps (seconds, in JSON); zero sleeps at once.
    /// Only NVMe-oF targets are affected: local devices never note network
    /// activity.
    #[serde(with = "secs", default = "default_busy_poll")]
    pub busy_poll: Duration,
}

fn default_busy_poll() -> Duration {
    cairn_engine::target::DEFAULT_BUSY_POLL
}

impl Default for JobSpec {
    fn default() -> Self {
        JobSpec {
            name: String::from("job"),
            pattern: Pattern::RandRead,
            block_size: 4096,
            queue_depth: 32,
            jobs: 1,
            runtime: Duration::from_secs(10),
            ramp: Duration::ZERO,
            offset: 0,
            size: None,
            verify: false,
            io_limit: None,
            cpus: Vec::new(),
            continue_on_error: false,
            seed: 0x00c0_ffee,
            busy_poll: default_busy_poll(),
        }
    }
}

/// Option names [`JobSpec::set`] understands (without leading dashes).
pub const JOB_OPTIONS: &[&str] = &[
    "name",
    "rw",
    "readwrite",
    "rwmixread",
    "bs",
    "blocksize",
    "iodepth",
    "qd",
    "numjobs",
    "jobs",
    "runtime",
    "ramp_time",
    "ramp",
    "offset",
    "size",
    "verify",
    "number_ios",
    "ios",
    "cpus_allowed",
    "cpus",
    "continue_on_error",
    "seed",
    "busy_poll",
];

/// Options that are flags: they may appear without a value.
const FLAG_OPTIONS: &[&str] = &["verify", "continue_on_error"];

impl JobSpec {
    /// Parses a whole fio-like argument list, e.g.
    /// `["--rw", "randread", "--bs=4k", "--iodepth", "64"]`, on top of the
    /// defaults. Every argument must be a job option.
    pub fn from_args<I, S>(args: I) -> Result<JobSpec, SpecError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut spec = JobSpec::default();
        let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let mut i = 0;
        while i < args.len() {
            let (key, inline) = split_option(&args[i]);
            i += 1;
            let value = match inline {
                Some(v) => Some(v.to_owned()),
                None if FLAG_OPTIONS.contains(&key) => match args.get(i) {
                    Some(v) if parse_bool(v).is_some() => {
                        i += 1;
                        Some(v.clone())
                    }
                    _ => None,
                },
                None => {
                    let v = args.get(i).ok_or_else(|| SpecError::MissingValue {
                        option: key.to_owned(),
                    })?;
                    i += 1;
                    Some(v.clone())
                }
            };
            spec.set(key, value.as_deref())?;
        }
        spec.validate()?;
        Ok(spec)
    }

    /// Sets one option by its fio name (leading dashes allowed). `value` may
    /// be `None` only for flags (`verify`, `continue_on_error`).
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), SpecError> {
        let key = key.trim_start_matches('-');
        let missing = || SpecError::MissingValue {
            option: key.to_owned(),
        };
        let v = value.map(str::trim);
        match key {
            "name" => self.name = v.ok_or_else(missing)?.to_owned(),
            "rw" | "readwrite" => {
                let p: Pattern = v.ok_or_else(missing)?.parse()?;
                // `--rwmixread` may come first; keep its mix.
                self.pattern = match (p, self.pattern) {
                    (Pattern::RandRw { .. }, Pattern::RandRw { read_pct })
                        if v.ok_or_else(missing)?.eq_ignore_ascii_case("randrw") =>
                    {
                        Pattern::RandRw { read_pct }
                    }
                    (p, _) => p,
                };
            }
            "rwmixread" => {
                let v = parse_count(key, v.ok_or_else(missing)?)?;
                let read_pct =
                    u8::try_from(v)
                        .ok()
                        .filter(|&p| p <= 100)
                        .ok_or(SpecError::OutOfRange {
                            option: "rwmixread",
                            value: v,
                            reason: "a percentage is at most 100",
                        })?;
                self.pattern = Pattern::RandRw { read_pct };
            }
            "bs" | "blocksize" => {
                let v = parse_size(v.ok_or_else(missing)?)?;
                self.block_size = u32::try_from(v).map_err(|_| SpecError::OutOfRange {
                    option: "bs",
                    value: v,
                    reason: "at most 4 GiB per I/O",
                })?;
            }
            "iodepth" | "qd" => self.queue_depth = parse_u32(key, v.ok_or_else(missing)?)?,
            "numjobs" | "jobs" => self.jobs = parse_u32(key, v.ok_or_else(missing)?)?,
            "runtime" => self.runtime = parse_duration(v.ok_or_else(missing)?)?,
            "ramp_time" | "ramp" => self.ramp = parse_duration(v.ok_or_else(missing)?)?,
            "offset" => self.offset = parse_size(v.ok_or_else(missing)?)?,
            "size" => self.size = Some(parse_size(v.ok_or_else(missing)?)?),
            "verify" => self.verify = parse_flag(key, value)?,
            "continue_on_error" => self.continue_on_error = parse_flag(key, value)?,
            "number_ios" | "ios" => {
                let n = parse_count(key, v.ok_or_else(missing)?)?;
                self.io_limit = (n > 0).then_some(n);
            }
            "cpus_allowed" | "cpus" => self.cpus = parse_cpu_list(v.ok_or_else(missing)?)?,
            "seed" => self.seed = parse_count(key, v.ok_or_else(missing)?)?,
            "busy_poll" => self.busy_poll = parse_duration(v.ok_or_else(missing)?)?,
            _ => {
                return Err(SpecError::UnknownOption {
                    option: key.to_owned(),
                })
            }
        }
        Ok(())
    }

    /// Whether option `key` (leading dashes allowed) is a job flag, which
    /// may stand without a value.
    pub fn is_flag(key: &str) -> bool {
        FLAG_OPTIONS.contains(&key.trim_start_matches('-'))
    }

    /// Whether `key` (leading dashes allowed) is a job option.
    pub fn is_option(key: &str) -> bool {
        JOB_OPTIONS.contains(&key.trim_start_matches('-'))
    }

    /// Checks the values that do not depend on the device.
    pub fn validate(&self) -> Result<(), SpecError> {
        let out = |option, value: u64, reason| {
            Err(SpecError::OutOfRange {
                option,
                value,
                reason,
            })
        };
        if self.block_size == 0 || !self.block_size.is_multiple_of(512) {
            return out(
                "bs",
                self.block_size.into(),
                "must be a non-zero multiple of 512",
            );
        }
        if self.queue_depth == 0 || self.queue_depth > 65_536 {
            return out("iodepth", self.queue_depth.into(), "must be 1..=65536");
        }
        if self.jobs == 0 || self.jobs > 1024 {
            return out("numjobs", self.jobs.into(), "must be 1..=1024");
        }
        if self.runtime.is_zero() && self.io_limit.is_none() {
            return out("runtime", 0, "must be non-zero unless number_ios is set");
        }
        if let Some(&cpu) = self.cpus.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
            return out("cpus_allowed", cpu as u64, "CPU number too large");
        }
        Ok(())
    }

    /// A short description such as `randread 4k qd32x2`.
    pub fn describe(&self) -> String {
        format!(
            "{} {} qd{}x{}",
            self.pattern,
            format_size(u64::from(self.block_size)),
            self.queue_depth,
            self.jobs
        )
    }
}

/// Durations as (fractional) seconds in JSON, which reads better than
/// serde's `{secs, nanos}`.
pub(crate) mod secs {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(D::Error::custom)
    }
}

/// Splits `--key=value` / `--key` into the key without dashes and the inline value.
fn split_option(arg: &str) -> (&str, Option<&str>) {
    let arg = arg.trim_start_matches('-');
    match arg.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (arg, None),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" | "crc32c" | "md5" | "meta" | "pattern" => Some(true),
        "0" | "false" | "no" | "off" | "none" => Some(false),
        _ => None,
    }
}

fn parse_flag(key: &str, value: Option<&str>) -> Result<bool, SpecError> {
    match value {
        None => Ok(true),
        Some(v) => parse_bool(v).ok_or_else(|| SpecError::InvalidNumber {
            option: key.to_owned(),
            input: v.to_owned(),
        }),
    }
}

fn parse_u32(key: &str, v: &str) -> Result<u32, SpecError> {
    let n = parse_count(key, v)?;
    u32::try_from(n).map_err(|_| SpecError::InvalidNumber {
        option: key.to_owned(),
        input: v.to_owned(),
    })
}

/// Parses a count with optional decimal suffix: `64`, `100k`, `2m`, `1g`.
pub fn parse_count(option: &str, input: &str) -> Result<u64, SpecError> {
    let err = || SpecError::InvalidNumber {
        option: option.to_owned(),
        input: input.to_owned(),
    };
    let s = input.trim().to_ascii_lowercase();
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'k') => (&s[..s.len() - 1], 1_000u64),
        Some(b'm') => (&s[..s.len() - 1], 1_000_000),
        Some(b'g') => (&s[..s.len() - 1], 1_000_000_000),
        _ => (s.as_str(), 1),
    };
    let n = if let Some(hex) = digits.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).map_err(|_| err())?
    } else {
        digits.parse::<u64>().map_err(|_| err())?
    };
    n.checked_mul(mult).ok_or_else(err)
}

/// Parses a byte size: `512`, `4k`, `128K`, `1m`, `1MiB`, `2g`, `1t`. The
/// suffixes are binary (k = 1024), as in fio.
pub fn parse_size(input: &str) -> Result<u64, SpecError> {
    let err = || SpecError::InvalidSize {
        input: input.to_owned(),
    };
    let s = input.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => return Err(err()),
    };
    if num.is_empty() {
        return Err(err());
    }
    if let Some((whole, frac)) = num.split_once('.') {
        // Fractions such as 1.5g, exact to the byte only when they divide evenly.
        let whole: u64 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| err())?
        };
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let frac_n: u128 = frac.parse().map_err(|_| err())?;
        let denom = 10u128.pow(frac.len() as u32);
        let total = (u128::from(whole) << shift) + ((frac_n << shift) / denom);
        return u64::try_from(total).map_err(|_| err());
    }
    let n: u64 = num.parse().map_err(|_| err())?;
    n.checked_mul(1u64 << shift).ok_or_else(err)
}

/// Parses a duration: `500ms`, `10s`, `1m`, `2h`, `250us`, `100ns`, or a bare
/// number of seconds. Fractions are allowed (`1.5s`).
pub fn parse_duration(input: &str) -> Result<Duration, SpecError> {
    let err = || SpecError::InvalidDuration {
        input: input.to_owned(),
    };
    let s = input.trim().to_ascii_lowercase();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let nanos_per: f64 = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "" | "s" | "sec" => 1e9,
        "m" | "min" => 60e9,
        "h" => 3600e9,
        _ => return Err(err()),
    };
    if num.is_empty() || num.bytes().filter(|&b| b == b'.').count() > 1 || num == "." {
        return Err(err());
    }
    if !num.contains('.') {
        let n: u64 = num.parse().map_err(|_| err())?;
        let nanos = u128::from(n) * nanos_per as u128;
        let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| err())?;
        return Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32));
    }
    let n: f64 = num.parse().map_err(|_| err())?;
    let nanos = n * nanos_per;
    if !nanos.is_finite() || !(0.0..=1e18).contains(&nanos) {
        return Err(err());
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}

/// Parses a CPU list: `0`, `0,2`, `0-3`, `0-1,4`.
pub fn parse_cpu_list(input: &str) -> Result<Vec<usize>, SpecError> {
    let err = || SpecError::InvalidNumber {
        option: String::from("cpus_allowed"),
        input: input.to_owned(),
    };
    let mut cpus = Vec::new();
    for part in input.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| err())?;
                let b: usize = b.trim().parse().map_err(|_| err())?;
                if a > b || b >= libc::CPU_SETSIZE as usize {
                    return Err(err());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().map_err(|_| err())?),
        }
    }
    if cpus.is_empty() {
        return Err(err());
    }
    Ok(cpus)
}

/// Formats a byte count the way fio prints block sizes: `512`, `4k`, `1m`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: &[(u32, &str)] = &[(40, "t"), (30, "g"), (20, "m"), (10, "k")];
    for &(shift, unit) in UNITS {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128K").unwrap(), 128 * 1024);
        assert_eq!(parse_size("1m").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("4kb").unwrap(), 4096);
        for bad in [
            "",
            "k",
            "4x",
            "-1",
            "4kk",
            "99999999999999999999",
            "1.k",
            "16777216t",
        ] {
            assert!(
                matches!(parse_size(bad), Err(SpecError::InvalidSize { .. })),
                "{bad:?} parsed"
            );
        }
        assert_eq!(format_size(4096), "4k");
        assert_eq!(format_size(1 << 20), "1m");
        assert_eq!(format_size(1536), "1536");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("80us").unwrap(), Duration::from_micros(80));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "s", "10x", "1..2s", "-1s", "ms10", "."] {
            assert!(
                matches!(parse_duration(bad), Err(SpecError::InvalidDuration { .. })),
                "{bad:?} parsed"
            );
        }
    }

    #[test]
    fn patterns() {
        assert_eq!("randread".parse::<Pattern>().unwrap(), Pattern::RandRead);
        assert_eq!("write".parse::<Pattern>().unwrap(), Pattern::SeqWrite);
        assert_eq!(
            "randrw70".parse::<Pattern>().unwrap(),
            Pattern::RandRw { read_pct: 70 }
        );
        assert!(matches!(
            "randrw101".parse::<Pattern>(),
            Err(SpecError::UnknownPattern { .. })
        ));
        assert!(matches!(
            "trim".parse::<Pattern>(),
            Err(SpecError::UnknownPattern { .. })
        ));
        assert_eq!(Pattern::RandRw { read_pct: 70 }.to_string(), "randrw70");
    }

    #[test]
    fn fio_style_arguments() {
        let spec = JobSpec::from_args([
            "--rw",
            "randread",
            "--bs",
            "4k",
            "--iodepth",
            "64",
            "--numjobs",
            "2",
            "--runtime",
            "10s",
            "--ramp_time=500ms",
            "--size=1g",
            "--verify",
            "--cpus_allowed",
            "0-1",
        ])
        .unwrap();
        assert_eq!(spec.pattern, Pattern::RandRead);
        assert_eq!(spec.block_size, 4096);
        assert_eq!(spec.queue_depth, 64);
        assert_eq!(spec.jobs, 2);
        assert_eq!(spec.runtime, Duration::from_secs(10));
        assert_eq!(spec.ramp, Duration::from_millis(500));
        assert_eq!(spec.size, Some(1 << 30));
        assert!(spec.verify);
        assert_eq!(spec.cpus, vec![0, 1]);
        assert_eq!(spec.describe(), "randread 4k qd64x2");

        // The mix may come before or after the pattern.
        let a = JobSpec::from_args(["--rwmixread", "70", "--rw", "randrw"]).unwrap();
        let b = JobSpec::from_args(["--rw=randrw", "--rwmixread=70"]).unwrap();
        assert_eq!(a.pattern, Pattern::RandRw { read_pct: 70 });
        assert_eq!(b.pattern, a.pattern);
        let c = JobSpec::from_args(["--verify", "0", "--rw", "write"]).unwrap();
        assert!(!c.verify);
        assert_eq!(c.pattern, Pattern::SeqWrite);
    }

    #[test]
    fn argument_errors_are_typed() {
        assert!(matches!(
            JobSpec::from_args(["--bs"]),
            Err(SpecError::MissingValue { .. })
        ));
        assert!(matches!(
            JobSpec::from_args(["--frobnicate", "1"]),
            Err(SpecError::UnknownOption { .. })
        ));
        assert!(matches!(
            JobSpec::from_args(["--bs", "1000"]),
            Err(SpecError::OutOfRange { option: "bs", .. })
        ));
        assert!(matches!(
            JobSpec::from_args(["--iodepth", "0"]),
            Err(SpecError::OutOfRange {
                option: "iodepth",
                ..
            })
        ));
        assert!(matches!(
            JobSpec::from_args(["--iodepth", "lots"]),
            Err(SpecError::InvalidNumber { .. })
        ));
        assert!(matches!(
            JobSpec::from_args(["--rwmixread", "120"]),
            Err(SpecError::OutOfRange { .. })
        ));
        assert!(matches!(
            JobSpec::from_args(["--runtime", "0", "--ramp", "1s"]),
            Err(SpecError::OutOfRange {
                option: "runtime",
                ..
            })
        ));
        assert!(matches!(
            JobSpec::from_args(["--cpus", "3-1"]),
            Err(SpecError::InvalidNumber { .. })
        ));
    }
}

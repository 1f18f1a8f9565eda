//! CPU accounting and pinning.
//!
//! A benchmark wants the CPU cost per I/O of both sides: the load generator
//! (this process, or just its job threads when the engine runs in the same
//! process) and the engine (another process, read from `/proc/PID/stat`).

use std::io;
use std::time::Duration;

/// Which clock [`getrusage`] reads.
#[derive(Debug, Clone, Copy)]
enum Who {
    Process,
    Thread,
}

fn timeval(tv: libc::timeval) -> Duration {
    Duration::from_secs(tv.tv_sec.max(0) as u64) + Duration::from_micros(tv.tv_usec.max(0) as u64)
}

fn getrusage(who: Who) -> io::Result<Duration> {
    let which = match who {
        Who::Process => libc::RUSAGE_SELF,
        Who::Thread => libc::RUSAGE_THREAD,
    };
    // SAFETY: rusage is plain old data, for which all-zero bytes are valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage through the pointer, which points
    // at a live local.
    let rc = unsafe { libc::getrusage(which, &mut ru) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timeval(ru.ru_utime) + timeval(ru.ru_stime))
}

/// User plus system CPU time of this whole process so far.
pub fn process_cpu() -> io::Result<Duration> {
    getrusage(Who::Process)
}

/// User plus system CPU time of the calling thread so far.
pub fn thread_cpu() -> io::Result<Duration> {
    getrusage(Who::Thread)
}

/// User plus system CPU time of process `pid` (all its threads) so far.
pub fn pid_cpu(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&stat, clock_ticks()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected format of /proc/{pid}/stat"),
        )
    })
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// Reads utime + stime (fields 14 and 15) of a `/proc/PID/stat` line. The
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted after its last `)`.
fn parse_stat_cpu(stat: &str, ticks_per_sec: u64) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = utime + stime;
    let tps = ticks_per_sec.max(1);
    Some(
        Duration::from_secs(ticks / tps)
            + Duration::from_nanos((ticks % tps) * 1_000_000_000 / tps),
    )
}

/// The calling thread's id (as in `/proc/self/task/TID`).
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::gettid() };
    tid as u32
}

/// User plus system CPU time of thread `tid` of this process so far. Read
/// from `/proc/self/task/TID/schedstat` (nanoseconds) where the kernel has
/// it, else from `.../stat` (clock ticks).
pub fn tid_cpu(tid: u32) -> io::Result<Duration> {
    let dir = format!("/proc/self/task/{tid}");
    if let Ok(s) = std::fs::read_to_string(format!("{dir}/schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse().ok()) {
            return Ok(Duration::from_nanos(ns));
        }
    }
    let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
    parse_stat_cpu(&stat, clock_ticks()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected format of {dir}/stat"),
        )
    })
}

/// The summed CPU time of threads `tids` of this process ([`tid_cpu`]).
pub fn threads_cpu(tids: &[u32]) -> io::Result<Duration> {
    tids.iter()
        .try_fold(Duration::ZERO, |acc, &t| Ok(acc + tid_cpu(t)?))
}

/// Like [`threads_cpu`], plus the io_uring worker threads the kernel
/// started for those threads (`iou-wrk-TID`): work io_uring cannot do
/// without blocking (e.g. reads of a tmpfs file) runs there, and is part
/// of the cost of the I/O. Workers that exited are no longer counted, so
/// sample this around spells shorter than a worker's idle timeout (5 s of
/// idleness), as a benchmark run is.
pub fn threads_cpu_with_workers(tids: &[u32]) -> io::Result<Duration> {
    let mut total = threads_cpu(tids)?;
    let names: Vec<String> = tids.iter().map(|t| format!("iou-wrk-{t}")).collect();
    for e in std::fs::read_dir("/proc/self/task")?.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if tids.contains(&tid) {
            continue;
        }
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        if names.iter().any(|n| n == comm.trim_end()) {
            // A worker that exited meanwhile is simply not counted.
            total += tid_cpu(tid).unwrap_or_default();
        }
    }
    Ok(total)
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("CPU {cpu} is beyond CPU_SETSIZE"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bit array, for which all-zero bytes are
    // the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` was checked to be below CPU_SETSIZE, the number of bits
    // in the set, so the bit index stays inside it.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe a live, initialised cpu_set_t;
    // pid 0 means the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        let line =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 1 0 5 0 0";
        assert_eq!(parse_stat_cpu(line, 100), Some(Duration::from_secs(4)));
        assert_eq!(parse_stat_cpu("1234 (x) S 1 2", 100), None);
        assert_eq!(parse_stat_cpu("garbage", 100), None);
    }

    #[test]
    fn own_cpu_time_is_readable_and_grows() {
        let pid = std::process::id();
        let before = thread_cpu().unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        // Spin until this thread has used 60 ms of CPU (or 5 s went by).
        while thread_cpu().unwrap() - before < Duration::from_millis(60)
            && t.elapsed() < Duration::from_secs(5)
        {
            for _ in 0..10_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        assert!(thread_cpu().unwrap() - before >= Duration::from_millis(60));
        assert!(process_cpu().unwrap() >= thread_cpu().unwrap());
        // /proc counts in clock ticks (usually 10 ms); 60 ms of CPU shows.
        assert!(pid_cpu(pid).unwrap() >= Duration::from_millis(20));
        assert!(pid_cpu(u32::MAX).is_err());
        let mine = tid_cpu(current_tid()).unwrap();
        assert!(mine >= Duration::from_millis(50), "{mine:?}");
        assert!(threads_cpu(&[current_tid(), current_tid()]).unwrap() >= mine * 2);
        assert!(tid_cpu(u32::MAX).is_err());
    }
}

//! What a server's processes did, from `/proc`: bytes written to disk (`write_bytes` of
//! `/proc/PID/io`) and CPU time (`utime + stime` of `/proc/PID/stat`), summed over a set of
//! processes, before and after a run.

use std::collections::HashMap;

/// Counters of one process, or their sum over several.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Usage {
    /// Bytes the processes caused to be written to storage (`write_bytes`: counted when a page
    /// of the page cache is dirtied, so a page rewritten after its fdatasync counts again, as
    /// the disk writes it again).
    pub(crate) write_bytes: u64,
    /// CPU time in user and kernel mode, in microseconds.
    pub(crate) cpu_us: u64,
}

/// The counters of each process of a set at one moment.
pub(crate) type Sample = HashMap<u32, Usage>;

/// Clock ticks a second, the unit of `/proc/PID/stat`'s times.
fn ticks_per_second() -> u64 {
    // SAFETY: sysconf(3) reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// The counters of `pid`, or `None` when it is gone (or `/proc/PID/io` is not readable).
fn usage(pid: u32) -> Option<Usage> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let write_bytes = io
        .lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ...": COMM may hold spaces, so count fields after the last ')'.
    // utime and stime are fields 14 and 15 of the line, the 12th and 13th after COMM.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Usage {
        write_bytes,
        cpu_us: (utime + stime) * 1_000_000 / ticks_per_second(),
    })
}

/// The counters of each of `pids` that is still there.
pub(crate) fn sample(pids: &[u32]) -> Sample {
    pids.iter()
        .filter_map(|&pid| Some((pid, usage(pid)?)))
        .collect()
}

/// What the processes of `after` did since `before`, summed. A process that started in
/// between counts from zero (a new PostgreSQL backend); one that ended in between is not in
/// `after` and its last part is lost (its counters go with it): callers take `after` right at
/// the end of the run so that nothing of interest ends first.
pub(crate) fn delta(before: &Sample, after: &Sample) -> Usage {
    let mut sum = Usage::default();
    for (pid, now) in after {
        let then = before.get(pid).copied().unwrap_or_default();
        sum.write_bytes += now.write_bytes.saturating_sub(then.write_bytes);
        sum.cpu_us += now.cpu_us.saturating_sub(then.cpu_us);
    }
    sum
}

/// What a process is, from its command line: PostgreSQL names its processes there
/// (`postgres: walwriter`, `postgres: checkpointer`, `postgres: USER DB 127.0.0.1(PORT) idle`
/// for a backend); anything else is named by its program (the postmaster: `postgres`).
fn role(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    let cmdline = cmdline.trim();
    match cmdline.strip_prefix("postgres: ") {
        Some(rest) if rest.contains('(') => "backend".to_string(),
        Some(rest) => rest.trim().to_string(),
        None => {
            let program = cmdline.split_whitespace().next().unwrap_or("?");
            let program = program.rsplit('/').next().unwrap_or(program);
            if program == "postgres" {
                "postmaster".to_string()
            } else {
                program.to_string()
            }
        }
    }
}

/// [`delta`], per kind of process ([`role`]: `walwriter`, `checkpointer`, `backend`, ...), to
/// show where a server's bytes and CPU went.
pub(crate) fn delta_by_role(
    before: &Sample,
    after: &Sample,
) -> std::collections::BTreeMap<String, Usage> {
    let mut roles = std::collections::BTreeMap::<String, Usage>::new();
    for (pid, now) in after {
        let then = before.get(pid).copied().unwrap_or_default();
        let sum = roles.entry(role(*pid)).or_default();
        sum.write_bytes += now.write_bytes.saturating_sub(then.write_bytes);
        sum.cpu_us += now.cpu_us.saturating_sub(then.cpu_us);
    }
    roles
}

/// Bytes the whole block device holding `dir` has written so far (sectors written, the 7th
/// field of `/sys/dev/block/MAJ:MIN/stat`, in 512-byte units), or `None` when not readable.
///
/// Why, beside `write_bytes`: on this kernel (6.x, large page-cache folios) `write_bytes` is
/// charged a whole folio when any byte of it is dirtied: an 8 KiB overwrite plus fdatasync in
/// a 1 MiB file counts 1,024 KiB, though the disk writes a few blocks. A file written in big
/// pieces first (a PostgreSQL WAL segment, zero-filled at creation; a reused SQLite WAL) and
/// then overwritten in place by small commits is counted far above what reaches the disk,
/// while etcd's WAL (preallocated with fallocate, then appended) is not. The device counters
/// see what reached the disk, but from every process of the machine: a cross-check, noisy on
/// a shared machine.
pub(crate) fn device_bytes_written(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(dir).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    let sectors: u64 = stat.split_whitespace().nth(6)?.parse().ok()?;
    Some(sectors * 512)
}

//! CPU time, memory and fd limits of a process, from /proc and getrusage.

use std::time::Instant;

/// CPU seconds (user + system) of a process from /proc/PID/stat.
pub fn proc_cpu_secs(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime = field 14, stime = field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / tck.max(1.0))
}

/// A field of /proc/PID/status in kB (e.g. "VmRSS"), or a count ("Threads").
pub fn status_field(pid: &str, name: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// Number of open fds of a process.
pub fn fd_count(pid: &str) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// Soft and hard "Max open files" of another process (from /proc/PID/limits).
pub fn nofile_limits(pid: i32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let v: Vec<&str> = line.split_whitespace().collect();
    let n = v.len();
    let parse = |x: &str| {
        if x == "unlimited" {
            Some(u64::MAX)
        } else {
            x.parse().ok()
        }
    };
    Some((
        parse(v.get(n.wrapping_sub(3))?)?,
        parse(v.get(n.wrapping_sub(2))?)?,
    ))
}

/// Own CPU seconds (user, system).
pub fn self_cpu() -> (f64, f64) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

/// A CPU-time sample of the server, the sender, this tool and the machine,
/// for percentages over a wall span.
#[derive(Clone)]
pub struct CpuMark {
    at: Instant,
    server: Option<f64>,
    sender: Option<f64>,
    own: f64,
    machine: Option<(u64, u64, u64)>,
    threads: Vec<(i32, String, f64)>,
}

/// Percent of one core (so up to 100 × cores) over a span.
#[derive(Clone, Debug, Default)]
pub struct CpuPct {
    pub server: Option<f64>,
    pub sender: Option<f64>,
    pub own: f64,
    /// Whole machine: all non-idle time, and the softirq part of it.
    pub machine_busy: Option<f64>,
    pub machine_softirq: Option<f64>,
    /// Busiest server threads (name, %).
    pub server_threads: Vec<(String, f64)>,
}

impl CpuPct {
    /// Machine time not accounted to the server, sender, this tool or
    /// softirq: other processes (ffmpeg samples, other tenants).
    pub fn others(&self) -> Option<f64> {
        let busy = self.machine_busy?;
        let ours = self.server.unwrap_or(0.0) + self.sender.unwrap_or(0.0) + self.own;
        Some((busy - ours - self.machine_softirq.unwrap_or(0.0)).max(0.0))
    }
}

impl CpuMark {
    pub fn now(server_pid: Option<i32>, sender_pid: Option<i32>) -> Self {
        let (u, s) = self_cpu();
        Self {
            at: Instant::now(),
            server: server_pid.and_then(proc_cpu_secs),
            sender: sender_pid.and_then(proc_cpu_secs),
            own: u + s,
            machine: machine_cpu(),
            threads: server_pid.map(thread_cpu).unwrap_or_default(),
        }
    }

    pub fn pct_since(&self, later: &CpuMark) -> CpuPct {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let d = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => Some(100.0 * (b - a) / wall),
            _ => None,
        };
        let cores = cores() as f64;
        let (busy, soft) = match (self.machine, later.machine) {
            (Some(a), Some(b)) if b.2 > a.2 => {
                let t = (b.2 - a.2) as f64;
                (
                    Some(100.0 * cores * (b.0 - a.0) as f64 / t),
                    Some(100.0 * cores * (b.1 - a.1) as f64 / t),
                )
            }
            _ => (None, None),
        };
        let mut threads: Vec<(String, f64)> = later
            .threads
            .iter()
            .map(|(tid, name, secs)| {
                let before = self
                    .threads
                    .iter()
                    .find(|t| t.0 == *tid)
                    .map_or(0.0, |t| t.2);
                (format!("{name}/{tid}"), 100.0 * (secs - before) / wall)
            })
            .collect();
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        threads.truncate(6);
        CpuPct {
            server: d(self.server, later.server),
            sender: d(self.sender, later.sender),
            own: 100.0 * (later.own - self.own) / wall,
            machine_busy: busy,
            machine_softirq: soft,
            server_threads: threads,
        }
    }
}

/// Raises this process's open-file soft limit to the hard limit, and the hard
/// limit itself to `want` if needed (needs CAP_SYS_RESOURCE). Returns
/// (soft, hard, note).
pub fn raise_nofile(want: u64) -> (u64, u64, String) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let mut note = format!("start soft={} hard={}", lim.rlim_cur, lim.rlim_max);
    if lim.rlim_max < want {
        let raised = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: want as libc::rlim_t,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            note.push_str(&format!("; raised hard to {want}"));
        } else {
            note.push_str(&format!(
                "; could not raise hard to {want}: {}",
                std::io::Error::last_os_error()
            ));
        }
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            note.push_str(&format!("; soft raised to {}", lim.rlim_max));
        }
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    }
    (lim.rlim_cur, lim.rlim_max, note)
}

/// Raises another process's open-file limits to `want` with prlimit(2).
pub fn raise_other_nofile(pid: i32, want: u64) -> Result<(), std::io::Error> {
    let new = libc::rlimit {
        rlim_cur: want as libc::rlim_t,
        rlim_max: want as libc::rlim_t,
    };
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Machine-wide CPU jiffies from /proc/stat: (busy, softirq, total).
pub fn machine_cpu() -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest counted in user)
    if v.len() < 8 {
        return None;
    }
    let idle = v[3] + v[4];
    let total: u64 = v[..8].iter().sum();
    Some((total - idle, v[6], total))
}

pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// CPU seconds of each thread of a process: (tid, name, secs).
pub fn thread_cpu(pid: i32) -> Vec<(i32, String, f64)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    for e in dir.flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        let secs = match (
            f.get(11).and_then(|x| x.parse::<f64>().ok()),
            f.get(12).and_then(|x| x.parse::<f64>().ok()),
        ) {
            (Some(u), Some(s)) => (u + s) / tck.max(1.0),
            _ => continue,
        };
        out.push((tid, name, secs));
    }
    out
}

/// Selected TCP counters of this network namespace (/proc/net/snmp and
/// /proc/net/netstat).
pub fn tcp_counters() -> Vec<(String, u64)> {
    const WANT: [&str; 7] = [
        "ListenOverflows",
        "ListenDrops",
        "RetransSegs",
        "TCPMemoryPressures",
        "TCPTimeouts",
        "TCPAbortOnMemory",
        "TCPBacklogDrop",
    ];
    let mut out = Vec::new();
    for file in ["/proc/net/snmp", "/proc/net/netstat"] {
        let Ok(s) = std::fs::read_to_string(file) else {
            continue;
        };
        let lines: Vec<&str> = s.lines().collect();
        for pair in lines.chunks(2) {
            let [names, values] = pair else { continue };
            for (n, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if WANT.contains(&n) {
                    if let Ok(v) = v.parse() {
                        out.push((n.to_owned(), v));
                    }
                }
            }
        }
    }
    out
}

/// "TCP: inuse .. mem N" of /proc/net/sockstat: TCP buffer memory in pages.
pub fn tcp_mem_pages() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = s.lines().find(|l| l.starts_with("TCP:"))?;
    let v: Vec<&str> = line.split_whitespace().collect();
    let i = v.iter().position(|x| *x == "mem")?;
    v.get(i + 1)?.parse().ok()
}

//! CPU and memory of a process (and of its hottest thread) from /proc, and
//! the open-file limit.

use std::collections::HashMap;
use std::time::Instant;

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime in ticks, from a /proc/.../stat file.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let s = std::fs::read_to_string(path).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_string();
    let f: Vec<&str> = s[close + 2..].split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0; utime=14, stime=15.
    let ut: u64 = f.get(11)?.parse().ok()?;
    let st: u64 = f.get(12)?.parse().ok()?;
    Some((comm, ut + st))
}

/// A point-in-time CPU reading of a process and each of its threads.
pub struct CpuSnap {
    at: Instant,
    total: u64,
    threads: HashMap<u32, (String, u64)>,
}

pub fn snap(pid: u32) -> Option<CpuSnap> {
    let (_, total) = stat_ticks(&format!("/proc/{pid}/stat"))?;
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for e in dir.flatten() {
            let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if let Some(v) = stat_ticks(&format!("/proc/{pid}/task/{tid}/stat")) {
                threads.insert(tid, v);
            }
        }
    }
    Some(CpuSnap {
        at: Instant::now(),
        total,
        threads,
    })
}

/// CPU use between two readings: the process in % of one core, and its
/// busiest thread (name, % of one core).
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    pub percent: f64,
    pub hottest_thread: String,
    pub hottest_percent: f64,
}

pub fn cpu_between(a: &CpuSnap, b: &CpuSnap) -> CpuUse {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
    let hz = clk_tck();
    let pct = |ticks: u64| ticks as f64 / hz / secs * 100.0;
    let mut out = CpuUse {
        percent: pct(b.total.saturating_sub(a.total)),
        ..Default::default()
    };
    for (tid, (name, t1)) in &b.threads {
        let t0 = a.threads.get(tid).map_or(0, |v| v.1);
        let p = pct(t1.saturating_sub(t0));
        if p > out.hottest_percent {
            out.hottest_percent = p;
            out.hottest_thread = name.clone();
        }
    }
    out
}

/// CPU between two readings grouped by thread name (per-stream names such as
/// `mp3-stream_ab12` fold into `mp3-*`), busiest first, % of one core.
pub fn cpu_by_thread_group(a: &CpuSnap, b: &CpuSnap) -> Vec<(String, f64, usize)> {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
    let hz = clk_tck();
    let mut groups: HashMap<String, (f64, usize)> = HashMap::new();
    for (tid, (name, t1)) in &b.threads {
        let t0 = a.threads.get(tid).map_or(0, |v| v.1);
        let key = match name.rsplit_once('-') {
            Some((head, tail)) if tail.chars().any(|c| c.is_ascii_digit() || c == '_') => {
                format!("{head}-*")
            }
            _ => name.clone(),
        };
        let e = groups.entry(key).or_insert((0.0, 0));
        e.0 += t1.saturating_sub(t0) as f64 / hz / secs * 100.0;
        e.1 += 1;
    }
    let mut v: Vec<(String, f64, usize)> =
        groups.into_iter().map(|(k, (p, n))| (k, p, n)).collect();
    v.sort_by(|x, y| y.1.partial_cmp(&x.1).unwrap_or(std::cmp::Ordering::Equal));
    v
}

/// Resident set size in kB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Raises the soft open-file limit to the hard limit; returns the new limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a valid, live struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// Busy CPU ticks of the whole machine (all cores), and when they were read.
pub struct SysSnap {
    at: Instant,
    busy: u64,
}

pub fn sys_snap() -> Option<SysSnap> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some(SysSnap {
        at: Instant::now(),
        busy: total.saturating_sub(idle),
    })
}

/// Whole-machine CPU between two readings, in % of one core.
pub fn sys_between(a: &SysSnap, b: &SysSnap) -> f64 {
    let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-6);
    b.busy.saturating_sub(a.busy) as f64 / clk_tck() / secs * 100.0
}

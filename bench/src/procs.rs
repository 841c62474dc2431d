//! Where the CPU goes: per-process CPU time of the nodes' server processes, read from
//! `/proc`, and their grouping by role (apply / receiver, writers, walsender, walwriter,
//! checkpointer, client backends, other) so a workload's cost can be split per process
//! kind and projected onto machines with more cores.
//!
//! Why `/proc` and not `pg_stat_*`: PostgreSQL 15 has no per-process CPU counters, and a
//! process that starts during the interval (native's apply worker after `ENABLE`) must be
//! counted from zero; one that exits during it is lost (none of the measured ones do).
//!
//! Processes that exit meanwhile (pgbench's sessions end before the second snapshot) are
//! not lost: the postmaster reaps them, so their CPU shows in its `cutime + cstime`,
//! reported as the pseudo-process "exited processes" (pid = −postmaster pid).
//!
//! Invariants: ticks are user + system clock ticks (1/100 s on Linux); a snapshot only
//! holds direct children of the given nodes' postmasters (and the reaped-children
//! pseudo-process), labelled with the node's index as "A", "B", "C".

use pg_test::Node;
use std::collections::HashMap;

/// What process `pid` used so far: user and system CPU ticks (1/100 s), and how often the
/// kernel took the CPU away from it while it could still run (`nonvoluntary_ctxt_switches`:
/// preemption by a process it woke, or by another one). The system time includes what
/// those switches and the interrupts served in its time cost, which depends on the
/// machine's other load as much as on the process's own work.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub user: u64,
    pub system: u64,
    pub preempted: u64,
}

pub fn usage(pid: i32) -> Option<Usage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let preempted = status
        .lines()
        .find_map(|l| l.strip_prefix("nonvoluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Some(Usage {
        user: f.get(11)?.parse().ok()?,
        system: f.get(12)?.parse().ok()?,
        preempted,
    })
}

/// One server process as seen in a [`snapshot`].
#[derive(Clone, Debug)]
pub struct Proc {
    /// "A", "B", ... (index of its node in the snapshot's list).
    pub node: String,
    /// Process title (`/proc/<pid>/cmdline`).
    pub title: String,
    pub ticks: u64,
}

/// CPU time of every child process of the nodes' postmasters, by pid.
pub fn snapshot(nodes: &[&Node]) -> HashMap<i32, Proc> {
    let parents: Vec<(i32, String)> = nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some((n.postmaster_pid()?, ((b'A' + i as u8) as char).to_string())))
        .collect();
    let mut out = HashMap::new();
    for (pm, node) in &parents {
        // Fields after the command: ... utime(14) stime(15) cutime(16) cstime(17).
        let reaped = std::fs::read_to_string(format!("/proc/{pm}/stat"))
            .ok()
            .and_then(|stat| {
                let f: Vec<u64> = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .skip(13)
                    .take(2)
                    .filter_map(|v| v.parse().ok())
                    .collect();
                Some(f.iter().sum::<u64>())
            })
            .unwrap_or(0);
        out.insert(
            -pm,
            Proc {
                node: node.clone(),
                title: "exited processes".into(),
                ticks: reaped,
            },
        );
    }
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command: state ppid ... utime(14) stime(15).
        let Some(rest) = stat.rsplit_once(')').map(|x| x.1) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ppid: i32 = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        let Some((_, node)) = parents.iter().find(|(p, _)| *p == ppid) else {
            continue;
        };
        let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .replace('\0', " ")
            .trim()
            .to_string();
        out.insert(
            pid,
            Proc {
                node: node.clone(),
                title,
                ticks,
            },
        );
    }
    out
}

/// `BENCH_PIN=1`: workload 4b runs with the writer node on a CPU of its own (see
/// [`pin`]), as if each node had its own machine.
pub fn pin_asked() -> bool {
    std::env::var("BENCH_PIN").is_ok_and(|v| v == "1")
}

/// Set the CPU affinity of `node`'s postmaster and every process it has started (they
/// are all its direct children; the ones it starts later inherit it) to `cpus` (a
/// `taskset` list, e.g. "0" or "0,1"). A process that exits meanwhile is skipped.
pub fn pin(node: &Node, cpus: &str) {
    let Some(pm) = node.postmaster_pid() else {
        return;
    };
    let mut pids = vec![pm];
    pids.extend(snapshot(&[node]).keys().copied().filter(|&p| p > 0));
    for pid in pids {
        taskset(cpus, pid as u32);
    }
}

/// Set this process's CPU affinity (what the pgbench it starts inherits) to `cpus`.
pub fn pin_self(cpus: &str) {
    assert!(
        taskset(cpus, std::process::id()),
        "taskset -p -c {cpus} (util-linux)"
    );
}

/// `BENCH_PIN_CLIENT=<cpu>` (with `BENCH_PIN=1`): the CPU pgbench runs on in workload 4b:
/// "1" with the peers, "0" beside the writer's server (the peers then cannot take CPU
/// from the writer or its clients). Unset or "both": 4b runs in each placement, "1" first
/// (the two give different answers on 2 cores: docs/benchmarks.md, session 20).
pub fn client_cpus() -> Vec<String> {
    match std::env::var("BENCH_PIN_CLIENT").as_deref() {
        Ok("both") | Err(_) => vec!["1".into(), "0".into()],
        Ok(cpu) => vec![cpu.to_string()],
    }
}

/// `BENCH_PEERS_NICE=<n>` (with `BENCH_PIN=1`): the nice value the peers' processes get
/// while workload 4b runs pinned, so that pgbench, which shares CPU 1 with them, is not
/// starved by them (as if the peers had machines of their own too). `None` when unset.
pub fn peers_nice() -> Option<i32> {
    std::env::var("BENCH_PEERS_NICE").ok()?.parse().ok()
}

/// Set the nice value of `node`'s postmaster and of every process it has started (the
/// ones it starts later inherit it) to `nice`. A process that exits meanwhile is skipped.
pub fn renice(node: &Node, nice: i32) {
    let Some(pm) = node.postmaster_pid() else {
        return;
    };
    let mut pids = vec![pm];
    pids.extend(snapshot(&[node]).keys().copied().filter(|&p| p > 0));
    for pid in pids {
        // Every thread of the process (`-p` alone would change the main one only; the
        // server's processes have one thread, so this is the process).
        let _ = std::process::Command::new("renice")
            .args(["-n", &nice.to_string(), "-p", &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `taskset -a -p -c <cpus> <pid>`: whether it succeeded.
fn taskset(cpus: &str, pid: u32) -> bool {
    std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Waits (at most 10 s) until no child of the nodes' postmasters is exiting (a process
/// whose command line is already gone), so that a snapshot taken next neither misses a
/// session that is about to be reaped nor charges an earlier workload's sessions, reaped
/// during the next interval, to that interval.
pub fn settle(nodes: &[&Node]) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < std::time::Duration::from_secs(10) {
        let exiting = snapshot(nodes)
            .iter()
            .any(|(pid, p)| *pid > 0 && p.title.is_empty());
        if !exiting {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The role of a server process, from its title.
pub fn role(title: &str) -> String {
    let t = title.to_ascii_lowercase();
    if t.is_empty() {
        // A process exiting right now has no command line any more.
        "exiting processes"
    } else if t == "exited processes" {
        "exited processes (mostly pgbench's sessions)"
    } else if t.contains("walsender") {
        "walsender"
    } else if t.contains("walwriter") || t.contains("wal writer") {
        "walwriter"
    } else if t.contains("checkpointer") || t.contains("background writer") {
        "checkpointer+bgwriter"
    } else if t.contains("writer") {
        // Parallel apply's writer processes (bdr.writers_per_peer > 1).
        "writers"
    } else if t.contains("bdr apply")
        || t.contains("logical replication worker")
        || t.contains("pglogical apply")
    {
        "apply/receiver"
    } else if t.contains("autovacuum") {
        "autovacuum"
    } else if t.contains("bdrtest") || t.contains("idle") {
        "client backends"
    } else {
        // The process kind, without its arguments: "other (bdr supervisor)".
        let kind: Vec<&str> = t
            .trim_start_matches("postgres: ")
            .split_whitespace()
            .take(2)
            .collect();
        return format!("other ({})", kind.join(" "));
    }
    .to_string()
}

/// CPU seconds used between two snapshots, summed per "<node> <role>", largest first.
/// Processes that appeared meanwhile count from zero.
pub fn by_role(before: &HashMap<i32, Proc>, after: &HashMap<i32, Proc>) -> Vec<(String, f64)> {
    let mut sums: HashMap<String, u64> = HashMap::new();
    for (pid, p) in after {
        let t0 = before.get(pid).map(|b| b.ticks).unwrap_or(0);
        *sums
            .entry(format!("{} {}", p.node, role(&p.title)))
            .or_default() += p.ticks.saturating_sub(t0);
    }
    let mut v: Vec<(String, f64)> = sums
        .into_iter()
        .map(|(k, t)| (k, t as f64 / 100.0))
        .collect();
    v.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    v
}

/// Per-process CPU seconds between two snapshots, largest first, as "  1.23 s  A: title".
pub fn by_process(before: &HashMap<i32, Proc>, after: &HashMap<i32, Proc>) -> String {
    let mut used: Vec<(f64, String)> = after
        .iter()
        .map(|(pid, p)| {
            let t0 = before.get(pid).map(|b| b.ticks).unwrap_or(0);
            (
                p.ticks.saturating_sub(t0) as f64 / 100.0,
                format!("{}: {}", p.node, p.title),
            )
        })
        .filter(|(s, _)| *s > 0.0)
        .collect();
    used.sort_by(|x, y| y.0.total_cmp(&x.0));
    used.iter()
        .map(|(s, t)| format!("  {s:5.2} s  {t}\n"))
        .collect()
}

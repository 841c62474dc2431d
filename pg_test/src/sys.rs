//! Operating-system plumbing for the harness: where the PostgreSQL programs are, running
//! them as the right OS user, handing out TCP ports, and watching/reaping server processes.
//!
//! Why a module of its own: these are the parts that differ between a developer laptop
//! (non-root, any user) and CI or a container (root), and the parts that make parallel
//! tests in one process interfere with each other (ports, zombie processes).
//!
//! Invariants:
//! - PostgreSQL programs never run as root: as euid 0 they run as the `postgres` OS user
//!   through `runuser -u postgres --`; otherwise directly as the current user.
//! - A port is handed out at most once per process ([`free_port`], [`claim_port`]), and
//!   ports come from below the kernel's ephemeral range when possible, so a client
//!   connection's local port cannot occupy a node's port between two starts.
//! - Reaping is always by explicit PID with `WNOHANG`, never `waitpid(-1)`, so it cannot
//!   steal the exit status of a `Command` another test thread is waiting for.

use std::collections::HashSet;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, OnceLock};

/// The OS user servers run as when the harness runs as root.
pub const PG_OS_USER: &str = "postgres";

/// `pg_config` to ask for the binaries: `$PG_CONFIG`, else Debian's PostgreSQL 15.
pub fn pg_config() -> String {
    std::env::var("PG_CONFIG").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into())
}

/// Directory holding initdb, pg_ctl and postgres (`pg_config --bindir`, asked once).
pub fn pg_bindir() -> PathBuf {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR
        .get_or_init(|| {
            let pg_config = pg_config();
            let out = Command::new(&pg_config)
                .arg("--bindir")
                .output()
                .unwrap_or_else(|e| panic!("running {pg_config} --bindir: {e} (set PG_CONFIG)"));
            assert!(
                out.status.success(),
                "{pg_config} --bindir failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A command for a PostgreSQL program (`initdb`, `pg_ctl`, `postgres`, ...), run as the
/// `postgres` OS user when we are root.
pub fn pg_command(program: &str) -> Command {
    let bin = pg_bindir().join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", PG_OS_USER, "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// Run `cmd`; `Err` with its exit status, stdout and stderr unless it succeeded.
pub(crate) fn run(mut cmd: Command, what: &str) -> Result<Output, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Give the postgres OS user `path` and everything below it (when we are root).
pub(crate) fn chown_postgres(path: &Path) {
    if is_root() {
        let _ = Command::new("chown")
            .args(["-R", &format!("{PG_OS_USER}:{PG_OS_USER}")])
            .arg(path)
            .status();
    }
}

/// Let every user list and traverse `dir` (adds a+rx, keeps the other bits). Used as root
/// on the base directory, so the postgres OS user can reach the clusters below it.
pub(crate) fn make_world_accessible(dir: &Path) {
    if let Ok(meta) = fs::metadata(dir) {
        let mut perms = meta.permissions();
        perms.set_mode(perms.mode() | 0o755);
        let _ = fs::set_permissions(dir, perms);
    }
}

/// `Err` explaining the problem unless the OS user the servers run as can write in `dir`.
pub(crate) fn check_server_user_can_write(dir: &Path) -> Result<(), String> {
    if !is_root() {
        return Ok(());
    }
    let ok = Command::new("runuser")
        .args(["-u", PG_OS_USER, "--", "test", "-w"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "the {PG_OS_USER} OS user cannot write in {} (a parent directory is not \
             traversable by it?); set BDR_TEST_DIR to a directory under /tmp",
            dir.display()
        ))
    }
}

/// Whether this PostgreSQL build has the `output_plugin_libraries` setting (15.19+), which
/// must list every logical decoding output plugin a slot may use. Asked once, from
/// `postgres --describe-config`.
pub fn has_output_plugin_libraries() -> bool {
    static CACHE: OnceLock<bool> = OnceLock::new();
    *CACHE.get_or_init(|| {
        pg_command("postgres")
            .arg("--describe-config")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l.split('\t').next() == Some("output_plugin_libraries"))
            })
            .unwrap_or(false)
    })
}

// ---------------------------------------------------------------------------------------
// Ports

struct PortState {
    used: HashSet<u16>,
    // xorshift state for picking candidate ports.
    rng: u64,
}

static PORTS: Mutex<Option<PortState>> = Mutex::new(None);

/// Lowest port we hand out from the preferred (non-ephemeral) range.
const LOW_PORT: u16 = 15000;

fn ephemeral_low() -> u16 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// Whether nothing listens on (or is bound to) 127.0.0.1:`port` right now.
pub fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn with_ports<R>(f: impl FnOnce(&mut PortState) -> R) -> R {
    let mut guard = PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let state = guard.get_or_insert_with(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        PortState {
            used: HashSet::new(),
            // Random picks, seeded differently in every process, so two processes (two
            // test binaries, a bench next to the tests) rarely want the same port.
            rng: ((u64::from(std::process::id()) << 32) ^ nanos) | 1,
        }
    });
    f(state)
}

/// A port nobody is bound to now and this process has not handed out before. Preferably
/// below the ephemeral range (where outgoing connections take their local ports from);
/// falls back to a kernel-chosen port when that range is exhausted.
pub fn free_port() -> u16 {
    with_ports(|st| {
        let high = ephemeral_low().saturating_sub(1);
        if high > LOW_PORT {
            let span = u64::from(high - LOW_PORT) + 1;
            for _ in 0..1000 {
                st.rng ^= st.rng << 13;
                st.rng ^= st.rng >> 7;
                st.rng ^= st.rng << 17;
                let port = LOW_PORT + (st.rng % span) as u16;
                if !st.used.contains(&port) && port_is_free(port) {
                    st.used.insert(port);
                    return port;
                }
            }
        }
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("bind 127.0.0.1:0")
                .port();
            if st.used.insert(port) {
                return port;
            }
        }
    })
}

/// Take `port` if it is free and not yet handed out in this process.
pub fn claim_port(port: u16) -> bool {
    with_ports(|st| {
        if !st.used.contains(&port) && port_is_free(port) {
            st.used.insert(port);
            true
        } else {
            false
        }
    })
}

// ---------------------------------------------------------------------------------------
// Processes

/// Make this process the reaper of orphaned descendants. pg_ctl daemonises the postmaster,
/// so without this a killed postmaster is re-parented to PID 1, which in a container may
/// never reap it: the zombie keeps its PID "alive" and PostgreSQL's lock-file check then
/// refuses to start the node again.
pub(crate) fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reap `pid` if it is an exited child of ours (never blocks, never touches other PIDs).
pub(crate) fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with WNOHANG.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// Whether `pid` exists and is not a zombie (reaping it first if it is our zombie child).
pub(crate) fn pid_alive(pid: i32) -> bool {
    reap(pid);
    // SAFETY: signal 0 only checks for existence.
    (unsafe { libc::kill(pid, 0) } == 0) && !is_zombie(pid)
}

/// Direct children of `pid` (from /proc).
pub(crate) fn child_pids(pid: i32) -> Vec<i32> {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else {
        return Vec::new();
    };
    s.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether `pid` has exited: no such process, or a zombie not yet reaped.
pub fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Private (anonymous) resident memory of a process in kB (0 if it is gone). Unlike
/// VmHWM it does not count shared buffers the process touched.
pub fn rss_anon_kb(pid: i32) -> i64 {
    status_number(pid, "RssAnon:").unwrap_or(0)
}

/// How many times process `pid` gave up the CPU of its own accord so far (its sleeps:
/// `voluntary_ctxt_switches`); `None` if it is gone.
pub fn voluntary_switches(pid: i32) -> Option<i64> {
    status_number(pid, "voluntary_ctxt_switches:")
}

/// The number after `field` in `/proc/<pid>/status` (`None`: no such process or field).
fn status_number(pid: i32, field: &str) -> Option<i64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// How many dynamic shared memory segments of `min_kb..=max_kb` process `pid` has mapped
/// (POSIX segments, `/dev/shm/PostgreSQL.<handle>`, PostgreSQL's default
/// `dynamic_shared_memory_type`). The size tells bdr's segments from PostgreSQL's own
/// (e.g. the statistics' 1 MB area).
pub fn dsm_mappings(pid: i32, min_kb: u64, max_kb: u64) -> usize {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let mut segs: Vec<&str> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, path) = (f.next()?, f.nth(4)?);
            let (a, b) = range.split_once('-')?;
            let kb = (u64::from_str_radix(b, 16).ok()? - u64::from_str_radix(a, 16).ok()?) / 1024;
            (path.starts_with("/dev/shm/PostgreSQL.") && (min_kb..=max_kb).contains(&kb))
                .then_some(path)
        })
        .collect();
    segs.sort_unstable();
    segs.dedup();
    segs.len()
}

/// SIGKILL one process of a test server (a backend or background worker: its crash, as
/// the postmaster sees it). The servers run as this user, or as root's `postgres` user,
/// which root may signal. False if the process was not there.
pub fn kill9_pid(pid: i32) -> bool {
    // SAFETY: a signal to a process of our own test server.
    unsafe { libc::kill(pid, libc::SIGKILL) == 0 }
}

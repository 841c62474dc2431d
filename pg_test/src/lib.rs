//! Multi-node test harness: real PostgreSQL postmasters on 127.0.0.1, started with
//! `initdb` and `pg_ctl`, each with the bdr extension preloaded.
//!
//! Why this way: replication is about processes, WAL, crashes and commit order. Mocks
//! would test our assumptions instead of PostgreSQL's behaviour, so every multi-node test
//! runs real servers, kills them for real (`SIGKILL` of the postmaster) and waits with
//! bounded polls.
//!
//! Invariants:
//! - Every wait is bounded ([`wait_until`]); a timeout fails the test with what was awaited.
//! - A cluster's scratch directory is removed when its test passes and kept (with each
//!   node's log tail printed) when it fails, or always with `BDR_TEST_KEEP=1`.
//! - Servers never run as root: as root, the harness runs them as the `postgres` OS user.

pub mod bdr;

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use postgres;
use postgres::{Client, NoTls};

/// The test database created on every node.
pub const DEFAULT_DB: &str = "bdrtest";

static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
static CLUSTER_SEQ: AtomicUsize = AtomicUsize::new(0);

/// A port nobody listens on now and this process has not handed out before.
fn free_port() -> u16 {
    let mut guard = PORTS.lock().unwrap();
    let used = guard.get_or_insert_with(HashSet::new);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if used.insert(port) {
            return port;
        }
    }
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Directory holding initdb, pg_ctl and postgres.
pub fn pg_bindir() -> PathBuf {
    let pg_config = std::env::var("PG_CONFIG")
        .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
    let out = Command::new(&pg_config)
        .arg("--bindir")
        .output()
        .unwrap_or_else(|e| panic!("running {pg_config}: {e}"));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A command for a PostgreSQL program, run as `postgres` when we are root.
fn pg_command(program: &str) -> Command {
    let bin = pg_bindir().join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

fn run(mut cmd: Command, what: &str) -> Result<Output, String> {
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

/// Give the postgres OS user the directory (when we are root).
fn chown_postgres(path: &Path) {
    if is_root() {
        let _ = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path)
            .status();
    }
}

/// Render a server error with severity, SQLSTATE, message, detail and hint.
pub fn db_error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!(
                "{}: {} (SQLSTATE {})",
                db.severity(),
                db.message(),
                db.code().code()
            );
            if let Some(d) = db.detail() {
                s.push_str(&format!("\nDETAIL: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("\nHINT: {h}"));
            }
            s
        }
        None => e.to_string(),
    }
}

/// Poll `f` every 50 ms until it returns true; `Err` after `timeout`.
pub fn try_wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        if f() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "timed out after {:?} waiting for: {what}",
                start.elapsed()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Poll `f` until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) -> Duration {
    try_wait_until(what, timeout, f).unwrap_or_else(|e| panic!("{e}"))
}

/// One postmaster.
pub struct Node {
    name: String,
    port: u16,
    dir: PathBuf,
    dbname: String,
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn datadir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }
    pub fn dbname(&self) -> &str {
        &self.dbname
    }
    /// libpq DSN of this node's test database.
    pub fn dsn(&self) -> String {
        self.dsn_for(&self.dbname)
    }
    pub fn dsn_for(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={db} user=postgres",
            self.port
        )
    }
    /// The psql command line a person would use.
    pub fn psql_cmd(&self) -> String {
        format!("psql \"{}\"", self.dsn())
    }

    /// Connect to the test database, retrying for a few seconds while the server starts.
    pub fn connect(&self) -> Client {
        self.connect_db(&self.dbname)
    }

    pub fn connect_db(&self, db: &str) -> Client {
        let dsn = self.dsn_for(db);
        let mut last = String::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            match Client::connect(&dsn, NoTls) {
                Ok(c) => return c,
                Err(e) => last = db_error_text(&e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "cannot connect to {} ({dsn}): {last}\n{}",
            self.name,
            self.log_tail(30)
        )
    }

    /// Run SQL (one or more statements); panics with the server's error on failure.
    pub fn execute(&self, sql: &str) {
        self.connect()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("on {}: {sql}\n{}", self.name, db_error_text(&e)));
    }

    pub fn try_execute(&self, sql: &str) -> Result<(), postgres::Error> {
        self.connect().batch_execute(sql)
    }

    /// First column of the first row of `sql`.
    pub fn query_scalar<T>(&self, sql: &str) -> T
    where
        T: for<'a> postgres::types::FromSql<'a>,
    {
        self.connect()
            .query_one(sql, &[])
            .unwrap_or_else(|e| panic!("on {}: {sql}\n{}", self.name, db_error_text(&e)))
            .get(0)
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut c = pg_command("pg_ctl");
        c.arg("-D").arg(self.datadir()).args(args);
        c
    }

    /// Start the server; `Err` with pg_ctl's output and the log tail if it does not come up.
    pub fn try_start(&self) -> Result<(), String> {
        let mut c = self.pg_ctl(&["-w", "-t", "60", "start"]);
        c.arg("-l").arg(self.log_path());
        run(c, &format!("pg_ctl start {}", self.name))
            .map(|_| ())
            .map_err(|e| format!("{e}\n--- log tail ---\n{}", self.log_tail(20)))
    }

    pub fn start(&self) {
        self.try_start().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Fast shutdown (clean).
    pub fn stop(&self) {
        let pid = self.postmaster_pid();
        run(self.pg_ctl(&["-w", "-m", "fast", "stop"]), "pg_ctl stop")
            .unwrap_or_else(|e| panic!("{e}"));
        if let Some(p) = pid {
            reap(p);
        }
    }

    /// Immediate shutdown: no checkpoint, crash recovery on next start.
    pub fn stop_immediate(&self) {
        let pid = self.postmaster_pid();
        let _ = run(
            self.pg_ctl(&["-w", "-m", "immediate", "stop"]),
            "pg_ctl stop",
        );
        if let Some(p) = pid {
            reap(p);
        }
    }

    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    pub fn reload(&self) {
        run(self.pg_ctl(&["reload"]), "pg_ctl reload").unwrap_or_else(|e| panic!("{e}"));
    }

    /// PID of the postmaster, from postmaster.pid, if the file exists.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let s = fs::read_to_string(self.datadir().join("postmaster.pid")).ok()?;
        s.lines().next()?.trim().parse().ok()
    }

    /// Whether the postmaster process exists (a killed one not yet reaped by its parent
    /// is a zombie and counts as gone).
    pub fn is_running(&self) -> bool {
        // SAFETY: kill with signal 0 only checks for existence.
        self.postmaster_pid()
            .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid))
    }

    /// SIGKILL the postmaster and every process of this server, as a crash would, and wait
    /// until they are all gone. The next `start()` runs crash recovery.
    pub fn kill9(&self) {
        let Some(pid) = self.postmaster_pid() else {
            panic!("{} has no postmaster.pid", self.name)
        };
        let children = child_pids(pid);
        // SAFETY: sending SIGKILL to processes of our own test server.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            for c in &children {
                libc::kill(*c, libc::SIGKILL);
            }
        }
        wait_until(
            &format!("{} processes to exit after SIGKILL", self.name),
            Duration::from_secs(30),
            || {
                std::iter::once(pid)
                    .chain(children.iter().copied())
                    .all(|p| {
                        reap(p);
                        // SAFETY: existence check only.
                        (unsafe { libc::kill(p, 0) }) != 0
                    })
            },
        );
    }

    /// Append a setting to postgresql.conf (effective after reload or restart).
    pub fn set_conf(&self, key: &str, value: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.datadir().join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(f, "{key} = {value}").unwrap();
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let s = fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole server log.
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }
}

/// Make this process the reaper of orphaned descendants. pg_ctl daemonises the postmaster,
/// so without this a killed postmaster is re-parented to PID 1, which in a container may
/// never reap it: the zombie keeps its PID "alive" and PostgreSQL's lock-file check then
/// refuses to start the node again.
fn become_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) only sets a flag on this process.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
}

/// Reap `pid` if it is an exited child of ours (never blocks, never touches other PIDs,
/// so it cannot steal the exit status of a `Command` another test thread waits for).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with WNOHANG.
    unsafe {
        libc::waitpid(pid, &mut status, libc::WNOHANG);
    }
}

/// Private (anonymous) resident memory of a process in kB (0 if it is gone). Unlike
/// VmHWM it does not count shared buffers the process touched.
pub fn rss_anon_kb(pid: i32) -> i64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn child_pids(pid: i32) -> Vec<i32> {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) else {
        return Vec::new();
    };
    s.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn is_zombie(pid: i32) -> bool {
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

/// Options for a cluster; see [`Cluster::builder`].
pub struct ClusterBuilder {
    nodes: usize,
    name: String,
    preload_bdr: bool,
    conf: Vec<(String, String)>,
    dbname: String,
    base_dir: Option<PathBuf>,
    base_port: Option<u16>,
    node_names: Vec<String>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    /// Used in the scratch directory's name.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    /// `shared_preload_libraries = 'bdr'` (default true).
    pub fn preload_bdr(mut self, yes: bool) -> Self {
        self.preload_bdr = yes;
        self
    }
    /// An extra postgresql.conf line (later lines override earlier ones).
    pub fn conf(mut self, key: &str, value: &str) -> Self {
        self.conf.push((key.into(), value.into()));
        self
    }
    pub fn dbname(mut self, db: &str) -> Self {
        self.dbname = db.into();
        self
    }
    /// Put the nodes in exactly this directory (persistent clusters: the demo).
    pub fn dir(mut self, dir: &Path) -> Self {
        self.base_dir = Some(dir.into());
        self
    }
    /// Try consecutive ports from here first.
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = Some(port);
        self
    }
    /// Node names (default node1..nodeN).
    pub fn node_names(mut self, names: &[&str]) -> Self {
        self.node_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn start(self) -> Cluster {
        become_subreaper();
        let base = self.base_dir.clone().unwrap_or_else(|| {
            let root = PathBuf::from(
                std::env::var("BDR_TEST_DIR").unwrap_or_else(|_| "/tmp/bdr_pgtest".into()),
            );
            root.join(format!(
                "{}-{}-{}",
                self.name,
                std::process::id(),
                CLUSTER_SEQ.fetch_add(1, Ordering::SeqCst)
            ))
        });
        if base.exists() {
            fs::remove_dir_all(&base).unwrap_or_else(|e| panic!("clearing {base:?}: {e}"));
        }
        fs::create_dir_all(&base).unwrap_or_else(|e| panic!("creating {base:?}: {e}"));
        // The postgres user must be able to reach the directory.
        let mut p = base.clone();
        while let Some(parent) = p.parent() {
            if parent.as_os_str().is_empty() || parent == Path::new("/") {
                break;
            }
            if parent.starts_with("/tmp") {
                let _ = Command::new("chmod").arg("a+rx").arg(parent).status();
            }
            p = parent.to_path_buf();
        }
        let mut cluster = Cluster {
            nodes: Vec::new(),
            base,
            persistent: self.base_dir.is_some(),
        };
        for i in 0..self.nodes {
            let name = self
                .node_names
                .get(i)
                .cloned()
                .unwrap_or_else(|| format!("node{}", i + 1));
            let port = match self.base_port {
                Some(bp) if port_is_free(bp + i as u16) => bp + i as u16,
                _ => free_port(),
            };
            let node = Node {
                dir: cluster.base.join(&name),
                name,
                port,
                dbname: self.dbname.clone(),
            };
            self.init_node(&node);
            cluster.nodes.push(node);
        }
        for node in &cluster.nodes {
            if let Err(e) = node.try_start() {
                // Another process may have taken the port since we picked it: retry once.
                if e.contains("could not bind") || node.log().contains("could not bind") {
                    panic!("port race on {}: {e}", node.name);
                }
                panic!("{e}");
            }
            let mut c = node.connect_db("postgres");
            c.batch_execute(&format!("CREATE DATABASE {}", node.dbname))
                .unwrap_or_else(|e| panic!("create database: {}", db_error_text(&e)));
        }
        cluster
    }

    fn init_node(&self, node: &Node) {
        fs::create_dir_all(&node.dir).unwrap();
        chown_postgres(&node.dir);
        let mut c = pg_command("initdb");
        c.arg("-D").arg(node.datadir()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(c, &format!("initdb {}", node.name)).unwrap_or_else(|e| panic!("{e}"));
        let sockdir = node.dir.join("sock");
        fs::create_dir_all(&sockdir).unwrap();
        chown_postgres(&sockdir);
        let mut conf = vec![
            ("listen_addresses".to_string(), "'127.0.0.1'".to_string()),
            ("port".into(), node.port.to_string()),
            (
                "unix_socket_directories".into(),
                format!("'{}'", sockdir.display()),
            ),
            ("wal_level".into(), "logical".into()),
            ("track_commit_timestamp".into(), "on".into()),
            ("max_replication_slots".into(), "20".into()),
            ("max_wal_senders".into(), "20".into()),
            ("max_worker_processes".into(), "32".into()),
            ("max_logical_replication_workers".into(), "8".into()),
            ("wal_sender_timeout".into(), "'30s'".into()),
            ("max_wal_size".into(), "'1GB'".into()),
            ("shared_buffers".into(), "'64MB'".into()),
            ("logging_collector".into(), "off".into()),
            ("log_line_prefix".into(), "'%m [%p] %b '".into()),
            ("fsync".into(), "on".into()),
        ];
        if self.preload_bdr {
            conf.push(("shared_preload_libraries".into(), "'bdr'".into()));
        }
        if has_output_plugin_libraries() {
            conf.push((
                "output_plugin_libraries".into(),
                "'pgoutput, test_decoding, bdr'".into(),
            ));
        }
        conf.extend(self.conf.iter().cloned());
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(node.datadir().join("postgresql.conf"))
            .unwrap();
        writeln!(f, "\n# --- pg_test harness ---").unwrap();
        for (k, v) in conf {
            writeln!(f, "{k} = {v}").unwrap();
        }
        chown_postgres(&node.dir);
    }
}

/// Whether this PostgreSQL build has the `output_plugin_libraries` setting (15.19+).
pub fn has_output_plugin_libraries() -> bool {
    static CACHE: Mutex<Option<bool>> = Mutex::new(None);
    let mut g = CACHE.lock().unwrap();
    *g.get_or_insert_with(|| {
        pg_command("postgres")
            .arg("--describe-config")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("output_plugin_libraries"))
            .unwrap_or(false)
    })
}

/// A set of nodes; stops them (and removes their files, unless the test failed) on drop.
pub struct Cluster {
    nodes: Vec<Node>,
    base: PathBuf,
    persistent: bool,
}

impl Cluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 3,
            name: "cluster".into(),
            preload_bdr: true,
            conf: Vec::new(),
            dbname: DEFAULT_DB.into(),
            base_dir: None,
            base_port: None,
            node_names: Vec::new(),
        }
    }

    /// `n` nodes with the default configuration.
    pub fn start(n: usize) -> Cluster {
        Cluster::builder().nodes(n).start()
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn dir(&self) -> &Path {
        &self.base
    }

    /// Keep the servers running and the files in place after this value is dropped.
    pub fn into_persistent(mut self) -> Vec<Node> {
        self.persistent = true;
        std::mem::take(&mut self.nodes)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        let failed = std::thread::panicking();
        for n in &self.nodes {
            if failed {
                eprintln!(
                    "\n===== {} (port {}, {}) — last lines of {} =====\n{}",
                    n.name,
                    n.port,
                    n.datadir().display(),
                    n.log_path().display(),
                    n.log_tail(60)
                );
            }
            n.stop_immediate();
        }
        if failed || std::env::var("BDR_TEST_KEEP").is_ok_and(|v| v == "1") {
            eprintln!("kept cluster files in {}", self.base.display());
        } else {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

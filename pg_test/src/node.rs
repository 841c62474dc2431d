//! One PostgreSQL server of a test cluster: its directory, port and log, starting and
//! stopping it (cleanly, immediately, or by `SIGKILL` as a crash would), and SQL helpers
//! that fail with the server's full error text.
//!
//! Why: scenarios crash and restart nodes and then assert on what the server said, so the
//! node must expose its real process, its configuration file and its log.
//!
//! Invariants:
//! - Directory layout: `<node dir>/data` (the data directory), `<node dir>/server.log`
//!   (written by `pg_ctl -l`). Nothing in the data directory is ever removed by the
//!   harness: after [`Node::kill9`], the next [`Node::start`] runs crash recovery.
//! - Every lifecycle method returns only once the state it names holds: `start` when the
//!   server accepts connections, `stop`/`stop_immediate`/`kill9` when every process of
//!   the server is gone.
//! - Panicking helpers (`execute`, `query_scalar`, `start`, ...) put the SQL or command and
//!   the server's message (with DETAIL and HINT) in the panic message.

use crate::sys::{child_pids, pg_command, pid_alive, reap, run};
use crate::wait::{try_wait_until, wait_until};
use postgres::{Client, NoTls};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// How long `connect` keeps retrying while a server comes up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `pg_ctl -w` may wait for a start or stop.
const PG_CTL_TIMEOUT_SECS: &str = "120";

/// Render a server error as `SEVERITY: message (SQLSTATE xxxxx)` plus `DETAIL: ...` and
/// `HINT: ...` lines when present; other errors (connection, I/O) as their `Display`.
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

/// One postmaster.
pub struct Node {
    name: String,
    // Atomic only so the harness can move a node to another port when its first start
    // loses a port race; it never changes once the cluster is handed to a test.
    port: AtomicU16,
    dir: PathBuf,
    dbname: String,
    // Environment every start of this node's postmaster gets (e.g. its PGSERVICEFILE).
    env: std::sync::Mutex<Vec<(String, String)>>,
}

impl Node {
    pub(crate) fn new(name: String, port: u16, dir: PathBuf, dbname: String) -> Node {
        Node {
            name,
            port: AtomicU16::new(port),
            dir,
            dbname,
            env: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn set_env(&mut self, env: Vec<(String, String)>) {
        for (k, v) in env {
            self.set_start_env(&k, &v);
        }
    }

    /// A handle on an existing node directory (`<dir>/data`, `<dir>/server.log`), e.g. one
    /// started earlier by `bdr-cluster start`. Nothing is checked or started.
    pub fn attach(name: &str, port: u16, dir: &Path, dbname: &str) -> Node {
        Node::new(name.into(), port, dir.into(), dbname.into())
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn port(&self) -> u16 {
        self.port.load(Ordering::SeqCst)
    }
    /// The node's own directory (holds `data/` and `server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn datadir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }
    /// The test database (created on every node when the cluster starts).
    pub fn dbname(&self) -> &str {
        &self.dbname
    }
    /// Set an environment variable for every later start of this node's postmaster.
    pub fn set_start_env(&self, key: &str, value: &str) {
        let mut env = self.env.lock().unwrap();
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value.into()));
    }

    /// Where this node's libpq service file is (its postmaster's `PGSERVICEFILE` when the
    /// cluster was built with [`crate::ClusterBuilder::service_files`]).
    pub fn service_file_path(&self) -> PathBuf {
        self.dir.join("pg_service.conf")
    }

    /// DSN naming this node by service (`service=<name>`): each node resolves it with its
    /// own service file, e.g. to a [`crate::Proxy`] port for the link to this node.
    pub fn service_dsn(&self) -> String {
        format!("service={} dbname={} user=postgres", self.name, self.dbname)
    }

    /// libpq DSN of this node's test database.
    pub fn dsn(&self) -> String {
        self.dsn_for(&self.dbname)
    }
    /// libpq DSN of database `db` on this node.
    pub fn dsn_for(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={db} user=postgres",
            self.port()
        )
    }
    /// The psql command line a person would use to connect to the test database.
    pub fn psql_cmd(&self) -> String {
        format!("psql \"{}\"", self.dsn())
    }

    /// Connect to the test database as role `user` (a plain application role, say).
    pub fn connect_as(&self, user: &str) -> Client {
        Client::connect(
            &format!(
                "host=127.0.0.1 port={} dbname={} user={user}",
                self.port(),
                self.dbname
            ),
            NoTls,
        )
        .unwrap_or_else(|e| {
            panic!(
                "connecting to {} as {user}: {}",
                self.name,
                db_error_text(&e)
            )
        })
    }

    /// Connect to the test database; see [`Node::connect_db`].
    pub fn connect(&self) -> Client {
        self.connect_db(&self.dbname)
    }

    /// Connect to database `db`, retrying for up to [`CONNECT_TIMEOUT`] while the server
    /// comes up. Gives up early if the postmaster is not running at all.
    pub fn connect_db(&self, db: &str) -> Client {
        let dsn = self.dsn_for(db);
        let mut last: String;
        let start = Instant::now();
        let mut down_since: Option<Instant> = None;
        loop {
            match Client::connect(&dsn, NoTls) {
                Ok(c) => return c,
                Err(e) => last = db_error_text(&e),
            }
            if self.is_running() {
                down_since = None;
            } else if down_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2)
            {
                last = format!("{last} (the postmaster is not running)");
                break;
            }
            if start.elapsed() >= CONNECT_TIMEOUT {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "cannot connect to {} ({dsn}) after {:.1?}: {last}\n--- last lines of {} ---\n{}",
            self.name,
            start.elapsed(),
            self.log_path().display(),
            self.log_tail(30)
        )
    }

    /// Run SQL (one or more statements); panics with the SQL and the server's error
    /// (including DETAIL and HINT) on failure.
    pub fn execute(&self, sql: &str) {
        self.connect()
            .batch_execute(sql)
            .unwrap_or_else(|e| panic!("on {}: {sql}\n{}", self.name, db_error_text(&e)));
    }

    /// Run SQL (one or more statements), returning the error instead of panicking.
    pub fn try_execute(&self, sql: &str) -> Result<(), postgres::Error> {
        self.connect().batch_execute(sql)
    }

    /// First column of the first row of `sql`; panics if there is no row or on error.
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

    /// Start the server and wait until it accepts connections; `Err` with pg_ctl's output
    /// and the tail of the server log if it does not come up (for tests expecting that).
    pub fn try_start(&self) -> Result<(), String> {
        self.try_start_with_env(&[])
    }

    /// Start the server with extra environment variables for `pg_ctl` and so the
    /// postmaster (e.g. `LD_PRELOAD` of libfaketime with `FAKETIME="-1h"`, to run it with
    /// its clock set back); they last until the server is stopped.
    pub fn start_with_env(&self, env: &[(&str, &str)]) {
        self.try_start_with_env(env)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// [`Node::try_start`] with extra environment variables (see [`Node::start_with_env`]).
    pub fn try_start_with_env(&self, env: &[(&str, &str)]) -> Result<(), String> {
        self.try_start_as(env, None)
    }

    /// Start the server with `postgres` (passed to `pg_ctl -p`) run instead of the
    /// installation's own: a wrapper that runs the real one under a tool (the benchmark's
    /// instruction counts run it under valgrind). Panics if it does not come up.
    pub fn start_with_postgres(&self, postgres: &Path) {
        self.try_start_as(&[], Some(postgres))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_start_as(&self, env: &[(&str, &str)], postgres: Option<&Path>) -> Result<(), String> {
        let mut c = self.pg_ctl(&["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
        if let Some(p) = postgres {
            c.arg("-p").arg(p);
        }
        c.envs(self.env.lock().unwrap().iter().map(|(k, v)| (k, v)));
        c.envs(env.iter().copied());
        c.arg("-l").arg(self.log_path());
        // As a developer's shell often has it: the server must still never show a Rust
        // backtrace to a user (checked when the cluster is dropped).
        c.env("RUST_BACKTRACE", "1");
        run(c, &format!("pg_ctl start {}", self.name))
            .map(|_| ())
            .map_err(|e| {
                format!(
                    "{e}\n--- last lines of {} ---\n{}",
                    self.log_path().display(),
                    self.log_tail(20)
                )
            })
    }

    /// Start the server; panics with the server's complaint if it does not come up.
    pub fn start(&self) {
        self.try_start().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Fast shutdown (clean: a shutdown checkpoint, no recovery on next start). Panics if
    /// the server is not running.
    pub fn stop(&self) {
        let pid = self.postmaster_pid();
        run(
            self.pg_ctl(&["-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", "fast", "stop"]),
            &format!("pg_ctl stop {}", self.name),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if let Some(p) = pid {
            self.wait_gone(&[p]);
        }
    }

    /// Immediate shutdown: no checkpoint, crash recovery on next start. Never panics (a
    /// node that is not running is left as it is).
    pub fn stop_immediate(&self) {
        let pid = self.postmaster_pid();
        let _ = run(
            self.pg_ctl(&["-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", "immediate", "stop"]),
            "pg_ctl stop",
        );
        if let Some(p) = pid {
            reap(p);
        }
    }

    /// Fast stop, then start.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }

    /// Re-read the configuration files (`pg_ctl reload`).
    pub fn reload(&self) {
        run(
            self.pg_ctl(&["reload"]),
            &format!("pg_ctl reload {}", self.name),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// PID of the postmaster, from postmaster.pid, if the file exists.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let s = fs::read_to_string(self.datadir().join("postmaster.pid")).ok()?;
        s.lines().next()?.trim().parse().ok()
    }

    /// Whether the postmaster process exists (a killed one not yet reaped by its parent
    /// is a zombie and counts as gone).
    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some_and(pid_alive)
    }

    /// Crash the server: `SIGKILL` the postmaster and every process it started, then wait
    /// until they are all gone. postmaster.pid and the data directory stay as they are, so
    /// the next [`Node::start`] runs crash recovery.
    ///
    /// The postmaster is first stopped with `SIGSTOP` so it cannot fork a child between
    /// listing its children and killing it; the children are killed too because orphaned
    /// backends would keep the old shared memory attached and block the restart.
    pub fn kill9(&self) {
        let pid = self
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{} has no postmaster.pid: not running?", self.name));
        assert!(
            pid_alive(pid),
            "{}: postmaster {pid} is not running",
            self.name
        );
        // SAFETY: signals to the processes of our own test server.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        let children = child_pids(pid);
        // SAFETY: as above.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            for c in &children {
                libc::kill(*c, libc::SIGKILL);
            }
        }
        let all: Vec<i32> = std::iter::once(pid).chain(children).collect();
        self.wait_gone(&all);
        // A killed postmaster that is not our child stays a zombie until init reaps it,
        // and a new postmaster refuses to start while postmaster.pid names a PID that
        // still exists ("lock file ... already exists"): give init a moment (bounded;
        // a start after that reports its own error as before).
        let _ = try_wait_until(
            "the killed postmaster to be reaped",
            Duration::from_secs(10),
            || {
                // SAFETY: signal 0 only checks for existence.
                (unsafe { libc::kill(pid, 0) }) != 0
            },
        );
    }

    /// Wait (bounded) until none of `pids` is alive, reaping those that are our children.
    fn wait_gone(&self, pids: &[i32]) {
        wait_until(
            &format!("the processes of {} ({pids:?}) to exit", self.name),
            Duration::from_secs(60),
            || pids.iter().all(|p| !pid_alive(*p)),
        );
    }

    /// Append `key = value` to postgresql.conf (later lines override earlier ones);
    /// effective after [`Node::reload`] or a restart, depending on the setting. `value` is
    /// written verbatim: quote strings yourself (`"'64MB'"`).
    pub fn set_conf(&self, key: &str, value: &str) {
        let path = self.datadir().join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(f, "{key} = {value}").unwrap();
    }

    /// Move the node to `port` (before it is handed out; it must be stopped).
    pub(crate) fn set_port(&self, port: u16) {
        self.set_conf("port", &port.to_string());
        self.port.store(port, Ordering::SeqCst);
    }

    /// The last `lines` lines of the server log.
    /// Lines of the server log that must never appear: a Rust backtrace in an error
    /// report, a backend that crashed (segfault, abort), or a reference or buffer pin a
    /// transaction's resource owner found left over at its end.
    pub fn forbidden_log_lines(&self) -> Vec<String> {
        const MARKS: [&str; 7] = [
            "pgrx_pg_sys::submodules::panic",
            "std::backtrace",
            "stack backtrace:",
            "terminated by signal 11",
            "terminated by signal 6",
            // A relcache, TupleDesc, snapshot, ... reference or a buffer pin left at a
            // transaction's end (resowner.c): state kept past its transaction.
            "reference leak",
            "refcount leak",
        ];
        self.log()
            .lines()
            .filter(|l| MARKS.iter().any(|m| l.contains(m)))
            .map(str::to_owned)
            .collect()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let s = self.log();
        let all: Vec<&str> = s.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The whole server log ("" if there is none yet).
    pub fn log(&self) -> String {
        fs::read(self.log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Wait (bounded) until the server log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        try_wait_until(
            &format!("{:?} in the log of {}", needle, self.name),
            timeout,
            || self.log().contains(needle),
        )
        .unwrap_or_else(|e| panic!("{e}\n--- log tail ---\n{}", self.log_tail(30)));
    }
}

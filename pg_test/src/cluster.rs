//! A set of nodes created together: scratch directory, `initdb`, the harness's default
//! postgresql.conf, first start and the test database, and clean-up (or evidence) when
//! the test ends.
//!
//! Why: every multi-node scenario needs the same settings (logical WAL, commit
//! timestamps, enough slots and workers, bdr preloaded) and the same failure evidence
//! (each node's log tail), and parallel tests must not trip over each other's ports and
//! directories.
//!
//! Invariants:
//! - Each cluster gets its own directory `$BDR_TEST_DIR/<name>-<pid>-<seq>` (default base
//!   `/tmp/bdr_pgtest`), one subdirectory per node; an explicit [`ClusterBuilder::dir`] is
//!   used as is and never removed.
//! - When [`ClusterBuilder::start`] returns, every node is running, accepts connections and
//!   has the test database.
//! - Dropping a [`Cluster`] stops every node it still owns with `pg_ctl stop -m immediate`.
//!   Its directory is removed only if the thread is not panicking and `BDR_TEST_KEEP` is
//!   not `1`; on a panic each node's name, port, data directory and log tail are printed.
//! - `fsync` stays on: scenarios test crash safety.

use crate::node::{db_error_text, Node};
use crate::sys::{
    become_subreaper, check_server_user_can_write, chown_postgres, claim_port, free_port,
    has_output_plugin_libraries, is_root, make_world_accessible, pg_command, pid_alive, run,
};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The test database created on every node.
pub const DEFAULT_DB: &str = "bdrtest";

/// Default base of scratch directories (overridden by `$BDR_TEST_DIR`).
pub const DEFAULT_TEST_DIR: &str = "/tmp/bdr_pgtest";

/// Longest socket directory we put under the scratch directory: a Unix socket path
/// (`<dir>/.s.PGSQL.<port>` plus `.lock`) must fit in 107 bytes.
const MAX_SOCKET_DIR_LEN: usize = 85;

static CLUSTER_SEQ: AtomicUsize = AtomicUsize::new(0);

/// libfaketime, as the Debian package `faketime` installs it.
pub const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

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
    node_env: Vec<(usize, String, String)>,
    service_files: bool,
}

impl ClusterBuilder {
    /// Start each postmaster with `PGSERVICEFILE` set to its own
    /// [`Node::service_file_path`] (written later, e.g. by [`crate::bdr::proxied`]), so
    /// `service=<node name>` DSNs resolve per node: the way every node reaches every other
    /// through a [`crate::Proxy`].
    pub fn service_files(mut self) -> Self {
        self.service_files = true;
        self
    }
    /// Number of nodes (default 3).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }
    /// Prefix of the scratch directory's name (default "cluster").
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }
    /// `shared_preload_libraries = 'bdr'` (default true).
    pub fn preload_bdr(mut self, yes: bool) -> Self {
        self.preload_bdr = yes;
        self
    }
    /// Parallel apply with `k` writers per peer (`bdr.writers_per_peer`).
    pub fn writers_per_peer(self, k: usize) -> Self {
        self.conf("bdr.writers_per_peer", &k.to_string())
    }

    /// An extra postgresql.conf line, written after the defaults (so it overrides them).
    /// `value` is written verbatim: quote strings yourself.
    pub fn conf(mut self, key: &str, value: &str) -> Self {
        self.conf.push((key.into(), value.into()));
        self
    }
    /// Name of the database created on every node (default [`DEFAULT_DB`]).
    pub fn dbname(mut self, db: &str) -> Self {
        self.dbname = db.into();
        self
    }
    /// Put the nodes in exactly this directory, which is kept when the cluster is dropped
    /// (persistent clusters: the demo). Node subdirectories left there by an earlier
    /// cluster are replaced, anything else there is refused.
    pub fn dir(mut self, dir: &Path) -> Self {
        self.base_dir = Some(dir.into());
        self
    }
    /// Use consecutive ports from here where free (others get free ports).
    pub fn base_port(mut self, port: u16) -> Self {
        self.base_port = Some(port);
        self
    }
    /// Run node `index`'s postmaster (every start of it) with its clock moved by
    /// `offset`, in libfaketime's `FAKETIME` syntax (`"+1m"`: one minute ahead, `"-1h"`),
    /// through `LD_PRELOAD` of libfaketime (Debian package `faketime`; panics if missing).
    pub fn clock_offset(mut self, index: usize, offset: &str) -> Self {
        assert!(
            Path::new(FAKETIME_LIB).exists(),
            "{FAKETIME_LIB} is missing (apt-get install faketime)"
        );
        self.node_env
            .push((index, "LD_PRELOAD".into(), FAKETIME_LIB.into()));
        self.node_env
            .push((index, "FAKETIME".into(), offset.into()));
        self
    }
    /// Node names (default node1..nodeN).
    pub fn node_names(mut self, names: &[&str]) -> Self {
        self.node_names = names.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Create, configure and start the nodes, and create the test database on each.
    /// Panics with the failing command's output and the server log if anything fails.
    pub fn start(self) -> Cluster {
        become_subreaper();
        let explicit = self.base_dir.is_some();
        let base = match &self.base_dir {
            Some(d) => d.clone(),
            None => {
                let root = PathBuf::from(
                    std::env::var("BDR_TEST_DIR").unwrap_or_else(|_| DEFAULT_TEST_DIR.into()),
                );
                fs::create_dir_all(&root)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
                if is_root() {
                    make_world_accessible(&root);
                }
                root.join(format!(
                    "{}-{}-{}",
                    self.name,
                    std::process::id(),
                    CLUSTER_SEQ.fetch_add(1, Ordering::SeqCst)
                ))
            }
        };
        let names: Vec<String> = (0..self.nodes)
            .map(|i| {
                self.node_names
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("node{}", i + 1))
            })
            .collect();
        if explicit {
            fs::create_dir_all(&base)
                .unwrap_or_else(|e| panic!("creating {}: {e}", base.display()));
            for name in &names {
                clear_old_node_dir(&base.join(name));
            }
        } else if base.exists() {
            // Same pid and sequence number as a cluster of an earlier boot: stale.
            fs::remove_dir_all(&base).unwrap_or_else(|e| panic!("clearing {base:?}: {e}"));
        }
        fs::create_dir_all(&base).unwrap_or_else(|e| panic!("creating {base:?}: {e}"));
        if is_root() {
            make_world_accessible(&base);
            chown_postgres(&base);
        }
        check_server_user_can_write(&base).unwrap_or_else(|e| panic!("{e}"));

        let mut cluster = Cluster {
            nodes: Vec::new(),
            base,
            keep_dir: explicit,
            extra_dirs: Vec::new(),
        };
        for (i, name) in names.into_iter().enumerate() {
            let port = match self.base_port {
                Some(bp) if claim_port(bp.saturating_add(i as u16)) => bp + i as u16,
                _ => free_port(),
            };
            let mut node = Node::new(
                name.clone(),
                port,
                cluster.base.join(&name),
                self.dbname.clone(),
            );
            node.set_env(
                self.node_env
                    .iter()
                    .filter(|(n, _, _)| *n == i)
                    .map(|(_, k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            fs::create_dir_all(node.dir()).unwrap();
            chown_postgres(node.dir());
            if self.service_files {
                let path = node.service_file_path();
                node.set_start_env("PGSERVICEFILE", &path.to_string_lossy());
            }
            cluster.nodes.push(node);
        }
        // initdb is the slow part (about a second each): run them in parallel. A panic in
        // one is re-raised here, after which `cluster` is dropped and cleans up.
        let this = &self;
        let socket_dirs: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = cluster
                .nodes
                .iter()
                .enumerate()
                .map(|(i, node)| s.spawn(move || this.init_node(node, i)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        cluster.extra_dirs = socket_dirs
            .into_iter()
            .filter(|d| !d.starts_with(&cluster.base))
            .collect();
        for node in &cluster.nodes {
            if let Err(e) = node.try_start() {
                // Another process may have taken the port since we picked it: once more,
                // on another port.
                if !e.contains("could not bind") {
                    panic!("{e}");
                }
                let port = free_port();
                eprintln!(
                    "{}: port {} was taken, retrying on {port}",
                    node.name(),
                    node.port()
                );
                node.set_port(port);
                node.start();
            }
            if self.dbname != "postgres" {
                let mut c = node.connect_db("postgres");
                c.batch_execute(&format!(
                    "CREATE DATABASE \"{}\"",
                    self.dbname.replace('"', "\"\"")
                ))
                .unwrap_or_else(|e| {
                    panic!(
                        "on {}: CREATE DATABASE {}: {}",
                        node.name(),
                        self.dbname,
                        db_error_text(&e)
                    )
                });
            }
        }
        cluster
    }

    /// initdb and the harness's postgresql.conf; returns the socket directory.
    fn init_node(&self, node: &Node, index: usize) -> PathBuf {
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
        run(c, &format!("initdb {}", node.name())).unwrap_or_else(|e| panic!("{e}"));

        let mut sockdir = node.dir().join("sock");
        if sockdir.as_os_str().len() > MAX_SOCKET_DIR_LEN {
            sockdir = std::env::temp_dir().join(format!(
                "bdrsock-{}-{}-{index}",
                std::process::id(),
                CLUSTER_SEQ.fetch_add(1, Ordering::SeqCst)
            ));
        }
        fs::create_dir_all(&sockdir).unwrap();
        chown_postgres(&sockdir);

        let mut conf: Vec<(String, String)> = vec![
            ("listen_addresses".into(), "'127.0.0.1'".into()),
            ("port".into(), node.port().to_string()),
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
            ("fsync".into(), "on".into()),
            ("synchronous_commit".into(), "on".into()),
            ("logging_collector".into(), "off".into()),
            ("log_line_prefix".into(), "'%m [%p] %b %a '".into()),
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
        // BDR_TEST_CONF="key=value;key=value": extra settings for every node of every
        // test (e.g. `bdr.writers_per_peer=4` runs a suite with parallel apply).
        if let Ok(extra) = std::env::var("BDR_TEST_CONF") {
            for kv in extra.split(';').filter(|s| !s.trim().is_empty()) {
                if let Some((k, v)) = kv.split_once('=') {
                    conf.push((k.trim().into(), v.trim().into()));
                }
            }
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
        chown_postgres(node.dir());
        sockdir
    }
}

/// Make room for a node directory in an explicit cluster directory: an old node there is
/// removed (refused while it runs); anything else non-empty is refused.
fn clear_old_node_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let data = dir.join("data");
    if data.join("PG_VERSION").exists() {
        let pid = fs::read_to_string(data.join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
        if let Some(pid) = pid.filter(|p| pid_alive(*p)) {
            panic!(
                "{} is still running (postmaster pid {pid}); stop it first",
                dir.display()
            );
        }
        fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("removing {}: {e}", dir.display()));
    } else if fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(true)
    {
        panic!(
            "refusing to overwrite {}: it exists and is not a node directory",
            dir.display()
        );
    }
}

/// A set of running nodes. Dropping it stops them and removes their files (unless the
/// test failed or `BDR_TEST_KEEP=1`).
pub struct Cluster {
    nodes: Vec<Node>,
    base: PathBuf,
    keep_dir: bool,
    // Socket directories outside `base` (when `base` is too long for a socket path).
    extra_dirs: Vec<PathBuf>,
}

impl Cluster {
    /// Defaults: 3 nodes, bdr preloaded, database [`DEFAULT_DB`], scratch directory.
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
            node_env: Vec::new(),
            service_files: false,
        }
    }

    /// `n` nodes with the default configuration.
    pub fn start(n: usize) -> Cluster {
        Cluster::builder().nodes(n).start()
    }

    /// Node `i` (0-based: `node(0)` is "node1").
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node_named(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name() == name)
            .unwrap_or_else(|| panic!("no node called {name}"))
    }

    /// The cluster's directory (one subdirectory per node).
    pub fn dir(&self) -> &Path {
        &self.base
    }

    /// Disown the nodes: they keep running and their files stay after this value is
    /// gone. Returns the nodes, to print or use them.
    pub fn into_persistent(mut self) -> Vec<Node> {
        self.keep_dir = true;
        self.extra_dirs.clear();
        std::mem::take(&mut self.nodes)
    }

    /// Like [`Cluster::into_persistent`], returning only the directory the nodes live in.
    pub fn leak(self) -> PathBuf {
        let dir = self.base.clone();
        let _ = self.into_persistent();
        dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let mut failed = std::thread::panicking();
        let mut forbidden = Vec::new();
        if !failed {
            for n in &self.nodes {
                forbidden.extend(
                    n.forbidden_log_lines()
                        .into_iter()
                        .map(|l| format!("{}: {l}", n.name())),
                );
            }
            failed = !forbidden.is_empty();
        }
        for n in &self.nodes {
            if failed {
                eprintln!(
                    "\n===== {} (port {}, data {}) — last lines of {} =====\n{}",
                    n.name(),
                    n.port(),
                    n.datadir().display(),
                    n.log_path().display(),
                    n.log_tail(60)
                );
            }
            n.stop_immediate();
        }
        let keep = failed || std::env::var("BDR_TEST_KEEP").is_ok_and(|v| v == "1");
        if self.keep_dir {
            return;
        }
        if keep {
            eprintln!("kept cluster files in {}", self.base.display());
        } else {
            let _ = fs::remove_dir_all(&self.base);
            for d in &self.extra_dirs {
                let _ = fs::remove_dir_all(d);
            }
        }
        if !forbidden.is_empty() {
            panic!(
                "the server logs show a Rust backtrace or a crashed backend:\n{}",
                forbidden.join("\n")
            );
        }
    }
}

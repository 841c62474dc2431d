//! `bdr-cluster`: a persistent local cluster built with the test harness (used by
//! `make demo`, and by people who want a few nodes to play with).
//!
//! ```text
//! bdr-cluster start  --dir DIR [--nodes 3] [--base-port 5501] [--dbname bdrdemo] [--no-preload]
//! bdr-cluster stop   --dir DIR
//! bdr-cluster status --dir DIR
//! bdr-cluster sql    --dir DIR --node node2 "SELECT ..."
//! ```
//!
//! Invariants: `start` writes `DIR/nodes.txt`, one node a line with tab-separated name,
//! port, data directory and database (scripts read the first two columns with awk);
//! `stop`, `status` and `sql` only read it. Nothing here removes a running node's files.
//! Exit status: 0 on success, 1 when a command failed (SQL error, node not running), 2 on
//! a usage error.

use pg_test::{db_error_text, Cluster, Node};
use std::path::{Path, PathBuf};
use std::process::exit;

const STATE_FILE: &str = "nodes.txt";
const DEFAULT_DBNAME: &str = "bdrdemo";

const USAGE: &str = "\
usage: bdr-cluster start  --dir DIR [--nodes N] [--base-port P] [--dbname DB] [--no-preload]
       bdr-cluster stop   --dir DIR
       bdr-cluster status --dir DIR
       bdr-cluster sql    --dir DIR --node NAME \"SQL\"";

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("bdr-cluster: {msg}");
    }
    eprintln!("{USAGE}");
    exit(2)
}

/// Parsed command line: the subcommand, `--key value` options, flags and positionals.
struct Args {
    cmd: String,
    opts: Vec<(String, String)>,
    flags: Vec<String>,
    positional: Vec<String>,
}

const FLAGS: &[&str] = &["--no-preload"];

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Args {
        let cmd = it.next().unwrap_or_else(|| usage(""));
        if cmd == "-h" || cmd == "--help" {
            println!("{USAGE}");
            exit(0);
        }
        let mut a = Args {
            cmd,
            opts: Vec::new(),
            flags: Vec::new(),
            positional: Vec::new(),
        };
        while let Some(arg) = it.next() {
            if FLAGS.contains(&arg.as_str()) {
                a.flags.push(arg);
            } else if let Some(key) = arg.strip_prefix("--") {
                let (key, value) = match key.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (
                        key.to_string(),
                        it.next()
                            .unwrap_or_else(|| usage(&format!("--{key} needs a value"))),
                    ),
                };
                a.opts.push((key, value));
            } else {
                a.positional.push(arg);
            }
        }
        a
    }

    fn opt(&self, key: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn parsed<T: std::str::FromStr>(&self, key: &str) -> Option<T> {
        self.opt(key).map(|v| {
            v.parse()
                .unwrap_or_else(|_| usage(&format!("bad value for --{key}: {v}")))
        })
    }

    fn dir(&self) -> PathBuf {
        let d = PathBuf::from(
            self.opt("dir")
                .unwrap_or_else(|| usage("--dir is required")),
        );
        // Absolute, so the paths written to the state file work from anywhere.
        std::path::absolute(&d).unwrap_or(d)
    }

    fn check_known(&self, allowed: &[&str]) {
        for (k, _) in &self.opts {
            if !allowed.contains(&k.as_str()) {
                usage(&format!("unknown option --{k} for {}", self.cmd));
            }
        }
    }
}

fn main() {
    // A failure is reported as one line (the harness library panics with a message that
    // says what to do), never as a Rust panic report or backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("unexpected failure");
        eprintln!("bdr-cluster: error: {msg}");
    }));
    let args = Args::parse(std::env::args().skip(1));
    match args.cmd.as_str() {
        "start" => {
            args.check_known(&["dir", "nodes", "base-port", "dbname"]);
            start(&args)
        }
        "stop" => {
            args.check_known(&["dir"]);
            stop(&args.dir())
        }
        "status" => {
            args.check_known(&["dir"]);
            status(&args.dir())
        }
        "sql" => {
            args.check_known(&["dir", "node"]);
            let node = args
                .opt("node")
                .unwrap_or_else(|| usage("--node is required"));
            let [sql] = args.positional.as_slice() else {
                usage("sql needs exactly one SQL argument")
            };
            sql_cmd(&args.dir(), node, sql)
        }
        other => usage(&format!("unknown command {other}")),
    }
}

fn start(args: &Args) {
    let dir = args.dir();
    if let Some(running) = read_state(&dir)
        .map(|nodes| {
            nodes
                .into_iter()
                .filter(Node::is_running)
                .collect::<Vec<_>>()
        })
        .filter(|r| !r.is_empty())
    {
        let names: Vec<&str> = running.iter().map(|n| n.name()).collect();
        eprintln!(
            "bdr-cluster: {} still running in {}; run `bdr-cluster stop --dir {}` first",
            names.join(", "),
            dir.display(),
            dir.display()
        );
        exit(1);
    }
    let n: usize = args.parsed("nodes").unwrap_or(3);
    if n == 0 {
        usage("--nodes must be at least 1");
    }
    let dbname = args.opt("dbname").unwrap_or(DEFAULT_DBNAME);
    let mut b = Cluster::builder()
        .nodes(n)
        .dir(&dir)
        .dbname(dbname)
        .preload_bdr(!args.flags.iter().any(|f| f == "--no-preload"));
    if let Some(p) = args.parsed::<u16>("base-port") {
        b = b.base_port(p);
    }
    let nodes: Vec<Node> = b.start().into_persistent();
    let listing: String = nodes
        .iter()
        .map(|n| {
            format!(
                "{}\t{}\t{}\t{}\n",
                n.name(),
                n.port(),
                n.datadir().display(),
                n.dbname()
            )
        })
        .collect();
    let state = dir.join(STATE_FILE);
    std::fs::write(&state, listing).unwrap_or_else(|e| panic!("writing {}: {e}", state.display()));
    println!("started {} node(s) in {}:", nodes.len(), dir.display());
    for n in &nodes {
        println!(
            "  {}  port {}\n      data {}\n      log  {}\n      {}",
            n.name(),
            n.port(),
            n.datadir().display(),
            n.log_path().display(),
            n.psql_cmd()
        );
    }
    println!(
        "state in {}; stop with: bdr-cluster stop --dir {}",
        state.display(),
        dir.display()
    );
}

/// The nodes listed in `dir`'s state file (None if there is none).
fn read_state(dir: &Path) -> Option<Vec<Node>> {
    let text = std::fs::read_to_string(dir.join(STATE_FILE)).ok()?;
    let nodes = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            // Tab-separated; older files were space-separated with three columns.
            let cols: Vec<&str> = if line.contains('\t') {
                line.split('\t').collect()
            } else {
                line.split_whitespace().collect()
            };
            let [name, port, datadir, rest @ ..] = cols.as_slice() else {
                eprintln!("bdr-cluster: ignoring malformed line in {STATE_FILE}: {line}");
                return None;
            };
            let port: u16 = port.parse().ok()?;
            let node_dir = Path::new(datadir).parent()?.to_path_buf();
            let db = rest.first().copied().unwrap_or(DEFAULT_DBNAME);
            Some(Node::attach(name, port, &node_dir, db))
        })
        .collect();
    Some(nodes)
}

fn state_or_exit(dir: &Path) -> Vec<Node> {
    read_state(dir).unwrap_or_else(|| {
        eprintln!(
            "bdr-cluster: no {STATE_FILE} in {} (was a cluster started there?)",
            dir.display()
        );
        exit(1)
    })
}

fn stop(dir: &Path) {
    for n in state_or_exit(dir) {
        if n.is_running() {
            n.stop();
            println!("  {} (port {}): stopped", n.name(), n.port());
        } else {
            println!("  {} (port {}): was not running", n.name(), n.port());
        }
    }
}

fn status(dir: &Path) {
    let nodes = state_or_exit(dir);
    let width = nodes.iter().map(|n| n.name().len()).max().unwrap_or(0);
    for n in &nodes {
        let state = match n.postmaster_pid().filter(|_| n.is_running()) {
            Some(pid) => format!("running (pid {pid})"),
            None => "stopped".to_string(),
        };
        println!(
            "  {:width$}  port {}  {state}  {}",
            n.name(),
            n.port(),
            n.datadir().display()
        );
    }
}

fn sql_cmd(dir: &Path, node: &str, sql: &str) {
    let nodes = state_or_exit(dir);
    let Some(n) = nodes.iter().find(|n| n.name() == node) else {
        let names: Vec<&str> = nodes.iter().map(|n| n.name()).collect();
        eprintln!(
            "bdr-cluster: no node {node} in {} (nodes: {})",
            dir.display(),
            names.join(", ")
        );
        exit(1)
    };
    if !n.is_running() {
        eprintln!("bdr-cluster: {node} is not running");
        exit(1);
    }
    let mut client = match postgres::Client::connect(&n.dsn(), postgres::NoTls) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "bdr-cluster: cannot connect to {node}: {}",
                db_error_text(&e)
            );
            exit(1)
        }
    };
    match client.simple_query(sql) {
        Ok(messages) => print_results(&messages),
        Err(e) => {
            eprintln!("{}", db_error_text(&e));
            exit(1)
        }
    }
}

/// Print each statement's rows as an aligned table (NULL as empty), or its command tag
/// row count when it returned no rows.
fn print_results(messages: &[postgres::SimpleQueryMessage]) {
    use postgres::SimpleQueryMessage as M;
    let mut header: Option<Vec<String>> = None;
    let mut rows: Vec<Vec<String>> = Vec::new();
    for m in messages {
        match m {
            M::RowDescription(cols) => {
                header = Some(cols.iter().map(|c| c.name().to_string()).collect());
                rows.clear();
            }
            M::Row(r) => {
                if header.is_none() {
                    header = Some(r.columns().iter().map(|c| c.name().to_string()).collect());
                }
                rows.push(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("").to_string())
                        .collect(),
                );
            }
            M::CommandComplete(n) => {
                match header.take() {
                    Some(h) => print_table(&h, &rows),
                    None => println!("OK ({n} rows affected)"),
                }
                rows.clear();
            }
            _ => {}
        }
    }
}

fn print_table(header: &[String], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, v) in widths.iter_mut().zip(r) {
            *w = (*w).max(v.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header));
    println!(
        "{}",
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("-+-")
    );
    for r in rows {
        println!("{}", line(r));
    }
    println!(
        "({} row{})",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    );
}

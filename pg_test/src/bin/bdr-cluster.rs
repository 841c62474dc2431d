//! `bdr-cluster`: start or stop a persistent local cluster with the test harness (used by
//! `make demo`).
//!
//! ```text
//! bdr-cluster start --dir DIR [--nodes 3] [--base-port 5501] [--dbname bdrdemo]
//! bdr-cluster stop  --dir DIR
//! ```
//! `start` writes `DIR/nodes.txt` (name, port, data directory per line) for `stop` and for
//! scripts.

use pg_test::{Cluster, Node};
use std::path::PathBuf;
use std::process::Command;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn usage() -> ! {
    eprintln!("usage: bdr-cluster start --dir DIR [--nodes N] [--base-port P] [--dbname DB]\n       bdr-cluster stop --dir DIR");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { usage() };
    let Some(dir) = arg(&args, "--dir").map(PathBuf::from) else {
        usage()
    };
    match cmd.as_str() {
        "start" => {
            let n: usize = arg(&args, "--nodes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(3);
            let mut b = Cluster::builder()
                .nodes(n)
                .dir(&dir)
                .dbname(&arg(&args, "--dbname").unwrap_or_else(|| "bdrdemo".into()));
            if let Some(p) = arg(&args, "--base-port").and_then(|v| v.parse().ok()) {
                b = b.base_port(p);
            }
            let nodes: Vec<Node> = b.start().into_persistent();
            let mut listing = String::new();
            for node in &nodes {
                listing.push_str(&format!(
                    "{} {} {}\n",
                    node.name(),
                    node.port(),
                    node.datadir().display()
                ));
            }
            std::fs::write(dir.join("nodes.txt"), listing).expect("write nodes.txt");
            for node in &nodes {
                println!(
                    "  {}  port {}  data {}  log {}",
                    node.name(),
                    node.port(),
                    node.datadir().display(),
                    node.log_path().display()
                );
            }
        }
        "stop" => {
            let listing = std::fs::read_to_string(dir.join("nodes.txt")).unwrap_or_default();
            let bindir = pg_test::pg_bindir();
            for line in listing.lines() {
                let parts: Vec<&str> = line.split_whitespace().collect();
                if parts.len() < 3 {
                    continue;
                }
                let mut c = if unsafe_is_root() {
                    let mut c = Command::new("runuser");
                    c.args(["-u", "postgres", "--"]).arg(bindir.join("pg_ctl"));
                    c
                } else {
                    Command::new(bindir.join("pg_ctl"))
                };
                let ok = c
                    .args(["-D", parts[2], "-m", "fast", "-w", "stop"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false);
                println!(
                    "  {} (port {}): {}",
                    parts[0],
                    parts[1],
                    if ok { "stopped" } else { "was not running" }
                );
            }
        }
        _ => usage(),
    }
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

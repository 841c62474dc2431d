//! A peer that sends what no walsender of ours would: truncated, corrupted and unknown
//! frames, messages out of order, rows that do not fit the local table, a write into
//! bdr's own catalog. Each must stop the apply worker with an ERROR naming the peer (the
//! worker retries with backoff), apply nothing, confirm nothing, and never crash the
//! server; after all of them a well-formed transaction from the same peer still applies.
//! Run with one writer and with parallel apply (frames then travel on to writer
//! processes).
//!
//! The peer is `pg_test::fake_peer` (a scripted replication server); the node under test
//! is a real postmaster with the extension.

use bdr_core::wire::{
    self, Begin, Column, Commit, Insert, Message, Relation, ReplicaIdentity, StreamAbort,
    StreamChange, StreamCommit, StreamStart,
};
use pg_test::fake_peer::{FakePeer, Script};
use pg_test::{wait_until, Cluster, Node};
use std::time::Duration;

const V: u8 = 2;
const REL: u32 = 70_000;

fn frame(m: &Message) -> Vec<u8> {
    wire::encode_frame(m, V)
}

/// A frame with any version, kind and body, with a correct length and CRC.
fn raw_frame(version: u8, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut payload = vec![version, kind];
    payload.extend_from_slice(body);
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend(payload);
    out
}

fn begin(xid: u32, lsn: u64) -> Vec<u8> {
    frame(&Message::Begin(Begin {
        xid,
        final_lsn: lsn,
        commit_time: 0,
        origin: None,
    }))
}

fn commit(lsn: u64) -> Vec<u8> {
    frame(&Message::Commit(Commit {
        commit_lsn: lsn,
        end_lsn: lsn + 0x30,
        commit_time: 0,
    }))
}

fn relation(id: u32, schema: &str, name: &str, cols: &[(&str, &str, bool)]) -> Vec<u8> {
    frame(&Message::Relation(Relation {
        id,
        schema: schema.into(),
        name: name.into(),
        replica_identity: ReplicaIdentity::Default,
        columns: cols
            .iter()
            .map(|(n, t, k)| Column {
                name: (*n).into(),
                type_name: (*t).into(),
                key: *k,
            })
            .collect(),
    }))
}

fn rel_t() -> Vec<u8> {
    relation(
        REL,
        "public",
        "t",
        &[("id", "integer", true), ("v", "text", false)],
    )
}

fn insert(rel: u32, vals: &[&str]) -> Vec<u8> {
    frame(&Message::Insert(Insert {
        relation: rel,
        new: vals
            .iter()
            .map(|v| wire::Value::Text((*v).into()))
            .collect(),
    }))
}

/// Stream frames (protocol version 4: the fake peer says it speaks it, so the apply
/// worker asks it to stream).
fn v4(m: Message) -> Vec<u8> {
    wire::encode_frame(&m, 4)
}

fn start(xid: u32, first: bool) -> Vec<u8> {
    v4(Message::StreamStart(StreamStart {
        xid,
        first_segment: first,
    }))
}

fn tagged(xid: u32, m: &[u8]) -> Vec<u8> {
    let change = wire::decode_frame(m).expect("a frame of ours");
    v4(Message::StreamChange(StreamChange {
        xid,
        subxid: xid,
        change: Box::new(change),
    }))
}

fn stream_commit(xid: u32, lsn: u64) -> Vec<u8> {
    v4(Message::StreamCommit(StreamCommit {
        xid,
        commit_lsn: lsn,
        end_lsn: lsn + 0x30,
        commit_time: 0,
        origin: None,
    }))
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// The odd streams, each with a piece of the ERROR it must cause.
fn odd_scripts() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let mut bad_crc = begin(700, 0x0100_0000);
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x55;
    vec![
        ("two bytes", vec![0, 0], "truncated frame"),
        (
            "a length of 4 GiB",
            vec![0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 2, b'B'],
            "truncated frame",
        ),
        ("a corrupted frame", bad_crc, "checksum mismatch"),
        (
            "an unknown protocol version",
            raw_frame(99, b'B', b"{}"),
            "unsupported protocol version 99",
        ),
        (
            "an unknown kind",
            raw_frame(V, b'Z', b""),
            "unknown message kind",
        ),
        (
            "a body that is not JSON",
            raw_frame(V, b'R', b"{not json"),
            "malformed relation message",
        ),
        (
            "bytes after the last frame of a write",
            cat(&[begin(701, 0x0100_0000), vec![1, 2, 3]]),
            "truncated frame",
        ),
        (
            "COMMIT outside a transaction",
            commit(0x0100_0000),
            "outside a transaction",
        ),
        (
            "BEGIN inside a transaction",
            cat(&[begin(702, 0x0100_0000), begin(703, 0x0100_0100)]),
            "BEGIN inside a transaction",
        ),
        (
            "a change for a relation never described",
            cat(&[
                begin(704, 0x0100_0000),
                insert(REL + 1, &["1", "x"]),
                commit(0x0100_0000),
            ]),
            "arrived before its metadata",
        ),
        (
            "a table that does not exist here",
            cat(&[
                begin(705, 0x0100_0000),
                relation(
                    REL + 2,
                    "public",
                    "no_such_table",
                    &[("id", "integer", true)],
                ),
                insert(REL + 2, &["1"]),
                commit(0x0100_0000),
            ]),
            "no_such_table",
        ),
        (
            "a value that is not of the column's type",
            cat(&[
                begin(706, 0x0100_0000),
                rel_t(),
                insert(REL, &["abc", "x"]),
                commit(0x0100_0000),
            ]),
            "invalid input syntax for type integer",
        ),
        (
            "more values than the relation has columns",
            cat(&[
                begin(707, 0x0100_0000),
                rel_t(),
                insert(REL, &["1", "x", "extra"]),
                commit(0x0100_0000),
            ]),
            "has 3 values",
        ),
        (
            "a write into bdr's catalog",
            cat(&[
                begin(708, 0x0100_0000),
                relation(
                    REL + 3,
                    "bdr",
                    "nodes",
                    &[
                        ("node_name", "text", true),
                        ("node_id", "bigint", false),
                        ("node_dsn", "text", false),
                    ],
                ),
                insert(REL + 3, &["mallory", "12345", "host=nowhere"]),
                commit(0x0100_0000),
            ]),
            "cannot receive replicated changes",
        ),
        (
            "STREAM STOP without START",
            v4(Message::StreamStop),
            "STREAM STOP without STREAM START",
        ),
        (
            "a piece continuing a transaction never started",
            start(900, false),
            "which was never started",
        ),
        (
            "a change of another transaction inside a piece",
            cat(&[start(901, true), tagged(902, &insert(REL, &["1", "x"]))]),
            "inside a piece of transaction 901",
        ),
        (
            "an untagged change inside a piece",
            cat(&[start(903, true), rel_t(), insert(REL, &["1", "x"])]),
            "without its transaction id",
        ),
        (
            "STREAM COMMIT of a transaction never streamed",
            stream_commit(904, 0x0100_0000),
            "STREAM COMMIT of transaction 904, which was never streamed",
        ),
        (
            "STREAM ABORT of a transaction never streamed",
            v4(Message::StreamAbort(StreamAbort {
                xid: 905,
                subxid: 905,
            })),
            "STREAM ABORT of transaction 905, which was never streamed",
        ),
        (
            "a stream frame in a version 2 frame",
            raw_frame(V, b'S', &[0, 0, 3, 138, 1]),
            "unknown message kind",
        ),
    ]
}

/// One node in a one-node group with table `t`, `k` writers per peer, streaming on and
/// quick retries.
fn node_under_test(k: usize) -> Cluster {
    let c: Cluster = Cluster::builder()
        .nodes(1)
        .writers_per_peer(k)
        .conf("bdr.stream_large_transactions", "on")
        .conf("bdr.apply_retry_max_delay", "200ms")
        .start();
    let n: &Node = c.node(0);
    n.execute("CREATE EXTENSION bdr");
    n.execute(&format!(
        "SELECT bdr.group_create(local_node_name := '{}', node_external_dsn := '{}')",
        n.name(),
        n.dsn()
    ));
    n.execute("CREATE TABLE t (id int PRIMARY KEY, v text)");
    c
}

/// Make `peer` node "evil" of `n`'s group: its apply worker starts and connects to it.
fn add_evil_peer(n: &Node, peer: &FakePeer) {
    n.execute(&format!(
        "INSERT INTO bdr.nodes (node_name, node_id, node_kind, node_state, node_dsn, node_number) \
         VALUES ('evil', 4242, 'active', 'active', '{}', 77)",
        peer.dsn()
    ));
}

fn run(k: usize) {
    let c = node_under_test(k);
    let n: &Node = c.node(0);

    let odd = odd_scripts();
    let valid_commit = 0x0200_0000u64;
    let mut scripts: Vec<Script> = odd
        .iter()
        .map(|(_, bytes, _)| Script {
            writes: vec![(0x0100_0000, bytes.clone())],
        })
        .collect();
    scripts.push(Script {
        writes: vec![(
            valid_commit,
            cat(&[
                begin(800, valid_commit),
                rel_t(),
                insert(REL, &["1", "ok"]),
                commit(valid_commit),
            ]),
        )],
    });
    let peer = FakePeer::start(scripts);
    let postmaster = n.postmaster_pid();
    let log_start = n.log().len();
    add_evil_peer(n, &peer);

    wait_until(
        "the valid transaction after every odd one",
        Duration::from_secs(180),
        || n.query_scalar::<i64>("SELECT count(*) FROM t") == 1,
    );
    let seen = peer.seen();
    assert_eq!(
        seen.streams,
        odd.len() + 1,
        "each odd stream should have stopped the worker once: {seen:?}"
    );
    assert_eq!(
        n.query_scalar::<String>("SELECT id || ':' || v FROM t"),
        "1:ok",
        "only the valid transaction's row"
    );
    assert_eq!(
        n.query_scalar::<i64>("SELECT count(*) FROM bdr.nodes WHERE node_name = 'mallory'"),
        0,
        "a peer's change must never write bdr's catalog"
    );
    assert_eq!(
        n.postmaster_pid(),
        postmaster,
        "the server must not have restarted"
    );

    // Nothing was confirmed before the valid transaction; it is confirmed once applied.
    let end = valid_commit + 0x30;
    wait_until(
        "the valid commit's flush confirmed",
        Duration::from_secs(30),
        || peer.seen().flushed.contains(&end),
    );
    let flushed = peer.seen().flushed;
    assert!(
        flushed.iter().all(|&f| f == 0 || f == end),
        "confirmed something other than the valid commit: {flushed:x?}"
    );

    // Each odd stream was refused with its own ERROR, naming the peer.
    let log = n.log()[log_start..].to_string();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR:") && l.contains("evil"))
        .collect();
    // Parallel apply asks for streaming too (a stream writer beside the writers): the
    // same checks refuse the same frames.
    for (what, _, needle) in &odd {
        let needle = needle.to_ascii_lowercase();
        assert!(
            errors
                .iter()
                .any(|l| l.to_ascii_lowercase().contains(&needle)),
            "no ERROR naming the peer and containing {needle:?} for {what}; errors:\n{}",
            errors.join("\n")
        );
    }
    assert!(
        n.forbidden_log_lines().is_empty(),
        "{:?}",
        n.forbidden_log_lines()
    );
}

#[test]
fn odd_frames_from_a_peer_are_refused_with_one_writer() {
    run(1);
}

#[test]
fn odd_frames_from_a_peer_are_refused_with_parallel_apply() {
    run(3);
}

fn tagged_sub(xid: u32, subxid: u32, m: &[u8]) -> Vec<u8> {
    let change = wire::decode_frame(m).expect("a frame of ours");
    v4(Message::StreamChange(StreamChange {
        xid,
        subxid,
        change: Box::new(change),
    }))
}

fn stream_abort(xid: u32, subxid: u32) -> Vec<u8> {
    v4(Message::StreamAbort(StreamAbort { xid, subxid }))
}

/// Streamed transactions a peer may send that need care rather than an ERROR, and one
/// that must be an ERROR: a STREAM ABORT of a subtransaction this node never saw a
/// change of is a no-op (the transaction goes on and commits); a transaction that fell
/// back and was applied whole, then streamed once more, must never be applied a second
/// time: its STREAM COMMIT is refused (PostgreSQL 15's walsender streams such a
/// transaction again but ends it with a STREAM ABORT; a STREAM COMMIT of it is a peer
/// gone wrong). One writer, so the stream writer takes the pieces.
#[test]
fn a_peer_committing_again_what_was_applied_whole_is_refused() {
    let c = node_under_test(1);
    let n: &Node = c.node(0);

    let (l0, l1, l2, l3) = (
        0x0100_0000u64,
        0x0200_0000u64,
        0x0300_0000u64,
        0x0400_0000u64,
    );
    let scripts = vec![
        // Connection 0 (streaming): transaction 920 with an abort of a subtransaction it
        // never streamed a change of, committed; then 930, whose TRUNCATE makes it fall
        // back (the receiver reconnects without streaming).
        Script {
            writes: vec![
                (
                    l0,
                    cat(&[
                        start(920, true),
                        rel_t(),
                        tagged(920, &insert(REL, &["5", "five"])),
                        v4(Message::StreamStop),
                        stream_abort(920, 9_999),
                        start(920, false),
                        tagged_sub(920, 921, &insert(REL, &["6", "six"])),
                        v4(Message::StreamStop),
                        stream_commit(920, l0 + 0x100),
                    ]),
                ),
                (
                    l0 + 0x200,
                    cat(&[
                        start(930, true),
                        tagged(930, &insert(REL, &["1", "streamed"])),
                        v4(Message::StreamStop),
                        start(930, false),
                        tagged(
                            930,
                            &frame(&Message::Truncate(wire::Truncate {
                                relations: vec![REL],
                                cascade: false,
                                restart_identity: false,
                            })),
                        ),
                        v4(Message::StreamStop),
                    ]),
                ),
            ],
        },
        // Connection 1 (no streaming): 930 whole at its commit.
        Script {
            writes: vec![(
                l1,
                cat(&[
                    begin(930, l1),
                    rel_t(),
                    insert(REL, &["1", "whole"]),
                    commit(l1),
                ]),
            )],
        },
        // Connection 2 (streaming asked for again): 930 streamed once more, and committed.
        Script {
            writes: vec![(
                l2,
                cat(&[
                    start(930, true),
                    rel_t(),
                    tagged(930, &insert(REL, &["2", "again"])),
                    v4(Message::StreamStop),
                    stream_commit(930, l2),
                ]),
            )],
        },
        // Every later connection: an ordinary transaction.
        Script {
            writes: vec![(
                l3,
                cat(&[
                    begin(940, l3),
                    rel_t(),
                    insert(REL, &["3", "ok"]),
                    commit(l3),
                ]),
            )],
        },
    ];
    let peer = FakePeer::start(scripts);
    let postmaster = n.postmaster_pid();
    let log_start = n.log().len();
    add_evil_peer(n, &peer);

    wait_until(
        "the ordinary transaction after the refused STREAM COMMIT",
        Duration::from_secs(120),
        || n.query_scalar::<i64>("SELECT count(*) FROM t WHERE id = 3") == 1,
    );
    assert_eq!(
        n.query_scalar::<String>("SELECT string_agg(id || ':' || v, ',' ORDER BY id) FROM t"),
        "1:whole,3:ok,5:five,6:six",
        "920 committed with both rows despite the abort of a subtransaction it never \
         streamed a change of; 930 applied once, whole; its second STREAM COMMIT refused"
    );
    let starts = peer.seen().starts;
    assert!(
        starts.len() >= 4,
        "expected a fallback reconnect, a reconnect with streaming and a retry: {starts:?}"
    );
    assert!(
        starts[0].contains("streaming") && !starts[1].contains("streaming"),
        "the fallback should reconnect without streaming: {starts:?}"
    );
    let log = n.log()[log_start..].to_string();
    assert!(
        log.lines().any(|l| l.contains("ERROR:")
            && l.contains(
                "STREAM COMMIT from node \"evil\" of transaction 930, which was \
                           applied whole here already"
            )),
        "no ERROR refusing the second STREAM COMMIT:\n{log}"
    );
    assert_eq!(
        n.postmaster_pid(),
        postmaster,
        "the server must not have restarted"
    );
    assert!(
        n.forbidden_log_lines().is_empty(),
        "{:?}",
        n.forbidden_log_lines()
    );
}

/// A peer whose link hangs right after the connection is made (it completes the startup,
/// then answers nothing, as a stalled proxy or firewall would): the apply worker gives up
/// after `wal_receiver_timeout` with an error naming the peer and tries again, and a
/// backend's `bdr.group_join` through it ends at its `statement_timeout`. Until session 21
/// both waited inside libpq for ever (neither SIGTERM nor a cancel could end the wait).
#[test]
fn a_peer_that_answers_nothing_after_connecting_is_given_up() {
    let c: Cluster = Cluster::builder()
        .name("silent")
        .nodes(2)
        .conf("wal_receiver_timeout", "2s")
        .conf("bdr.apply_retry_max_delay", "200ms")
        .start();
    let (n, fresh) = (c.node(0), c.node(1));
    for x in [n, fresh] {
        x.execute("CREATE EXTENSION bdr");
    }
    n.execute(&format!(
        "SELECT bdr.group_create(local_node_name := '{}', node_external_dsn := '{}')",
        n.name(),
        n.dsn()
    ));
    let peer = FakePeer::silent();
    let postmaster = n.postmaster_pid();
    add_evil_peer(n, &peer);
    wait_until(
        "the apply worker to give up on the silent peer and connect again, twice",
        Duration::from_secs(60),
        || peer.seen().connections >= 3,
    );
    wait_until(
        "the worker's last error to say why",
        Duration::from_secs(30),
        || {
            n.query_scalar::<bool>(
                "SELECT coalesce(bool_or(last_error LIKE '%no answer from%within 2000 ms%'), false) \
                   FROM bdr.apply_workers() WHERE peer = 'evil'",
            )
        },
    );
    assert_eq!(
        n.postmaster_pid(),
        postmaster,
        "the server must not have restarted"
    );

    // A backend: the join's first statement to its source gets no answer; the
    // backend's statement_timeout ends the wait with its usual error.
    let (dsn, join_from) = (fresh.dsn(), peer.dsn());
    let (tx, rx) = std::sync::mpsc::channel();
    let mut client = fresh.connect();
    std::thread::spawn(move || {
        let r = client.batch_execute(&format!(
            "SET statement_timeout = '3s';
             SELECT bdr.group_join(local_node_name := 'fresh', node_external_dsn := '{dsn}', \
                                   join_using_dsn := '{join_from}')"
        ));
        let _ = tx.send(r.map_err(|e| {
            e.as_db_error().map_or(e.to_string(), |d| {
                format!("{} {}", d.code().code(), d.message())
            })
        }));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("group_join through a silent source should end at its statement_timeout");
    let err = r.expect_err("group_join through a silent source cannot succeed");
    assert!(
        err.starts_with("57014") && err.contains("statement timeout"),
        "{err}"
    );
    assert!(
        n.forbidden_log_lines().is_empty() && fresh.forbidden_log_lines().is_empty(),
        "{:?} {:?}",
        n.forbidden_log_lines(),
        fresh.forbidden_log_lines()
    );
}

/// A member that answers a schema change's questions by starting a COPY (no server of
/// ours would): the statement fails at once naming it, its rollback's unfence (which runs
/// where no cancel reaches) ends too, and the session and the server go on. libpq hands
/// such a COPY result out on every call; until session 25 the drain's reading of answers
/// would have looped on it for ever, in the rollback deaf to cancel and termination.
#[test]
fn a_member_answering_a_schema_change_with_a_copy_fails_it_and_holds_nothing() {
    let c: Cluster = Cluster::builder()
        .name("copymember")
        .nodes(1)
        .conf("bdr.apply_retry_max_delay", "200ms")
        .start();
    let n = c.node(0);
    n.execute(&format!(
        "CREATE EXTENSION bdr; CREATE ROLE app LOGIN; GRANT CREATE ON SCHEMA public TO app;
         SELECT bdr.group_create(local_node_name := '{}', node_external_dsn := '{}')",
        n.name(),
        n.dsn()
    ));
    n.connect_as("app")
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    let peer = FakePeer::copy_on_extended();
    let postmaster = n.postmaster_pid();
    add_evil_peer(n, &peer);

    let mut ddl = n.connect_as("app");
    let (tx, rx) = std::sync::mpsc::channel();
    let started = std::time::Instant::now();
    let alter = std::thread::spawn(move || {
        let r = ddl
            .batch_execute(
                "SET bdr.ddl_lock_timeout = '5s'; ALTER TABLE t ADD COLUMN c int DEFAULT 7",
            )
            .map_err(|e| pg_test::db_error_text(&e));
        // The rollback, unfence included, is over once the session answers again.
        let after = ddl.query_one("SELECT 1", &[]).map(|r| r.get::<_, i32>(0));
        let _ = tx.send((r, after));
    });
    let (r, after) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the schema change and its rollback must end");
    let took = started.elapsed();
    alter.join().unwrap();
    let err = r.expect_err("a member that answers with a COPY cannot hold writes");
    assert!(
        err.contains("not every node could hold writes for this schema change: evil (")
            && err.contains("the server started a COPY where rows were expected"),
        "{err}"
    );
    assert_eq!(after.expect("the session answers after the rollback"), 1);
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(
        peer.seen().copies >= 2,
        "the fence and the rollback's unfence were both asked: {:?}",
        peer.seen()
    );
    assert_eq!(
        n.query_scalar::<i64>(
            "SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'c'"
        ),
        0,
        "the column was not added"
    );
    n.connect_as("app")
        .batch_execute("INSERT INTO t VALUES (1, 'writable')")
        .expect("t is not held here after the failed change");
    assert_eq!(n.postmaster_pid(), postmaster, "the server did not restart");
    assert!(
        n.forbidden_log_lines().is_empty(),
        "{:?}",
        n.forbidden_log_lines()
    );
}

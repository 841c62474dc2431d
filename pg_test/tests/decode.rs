//! Output plugin scenarios on one real node (issue: output plugin and wire protocol).
//!
//! Each test creates a `bdr` slot, commits transactions, reads the slot with
//! `pg_logical_slot_get_binary_changes`, decodes every frame with the project's own
//! decoder (`bdr_core::wire`) and compares the stream with what was committed.

use bdr_core::wire::{self, Message, OldRow, ReplicaIdentity, Value};
use pg_test::{db_error_text, Cluster, Node};
use postgres::Client;

/// Every frame the slot holds, decoded (from protocol version 3 a row may hold several);
/// `options` are extra plugin options.
fn read_slot(c: &mut Client, slot: &str, peek: bool, options: &[&str]) -> Vec<Message> {
    read_rows(c, slot, peek, options)
        .into_iter()
        .flatten()
        .collect()
}

/// The slot's rows, each decoded into its frames.
fn read_rows(c: &mut Client, slot: &str, peek: bool, options: &[&str]) -> Vec<Vec<Message>> {
    let func = if peek {
        "pg_logical_slot_peek_binary_changes"
    } else {
        "pg_logical_slot_get_binary_changes"
    };
    let opts: String = options
        .iter()
        .map(|o| format!(", '{}'", o.replace('\'', "''")))
        .collect();
    let sql = format!("SELECT data FROM {func}('{slot}', NULL, NULL{opts})");
    c.query(&sql, &[])
        .unwrap_or_else(|e| panic!("{sql}: {}", db_error_text(&e)))
        .iter()
        .map(|r| {
            let frames: Vec<u8> = r.get(0);
            wire::decode_frames(&frames).unwrap_or_else(|e| panic!("bad frames {frames:x?}: {e}"))
        })
        .collect()
}

/// The text form of every sent column (not dropped, not generated) of `table`'s row `id`,
/// in attribute order: what the type output functions produce; NULL stays NULL.
fn row_text(c: &mut Client, table: &str, id: i64) -> Vec<Value> {
    let cols: Vec<String> = c
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::text::regclass \
             AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
            &[&table],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // format('%s') runs the type's output function, as the plugin does (a ::text cast
    // would not for every type: bool::text is 'true', its output function says 't').
    let select: Vec<String> = cols
        .iter()
        .map(|c| format!("CASE WHEN {c} IS NULL THEN NULL ELSE format('%s', {c}) END"))
        .collect();
    let row = c
        .query_one(
            &format!("SELECT {} FROM {table} WHERE id = {id}", select.join(", ")),
            &[],
        )
        .unwrap();
    (0..cols.len())
        .map(|i| match row.get::<_, Option<String>>(i) {
            Some(s) => Value::Text(s),
            None => Value::Null,
        })
        .collect()
}

/// Commit `sql` in one transaction; returns its xid and its commit timestamp in
/// microseconds since 2000-01-01 (from `pg_xact_commit_timestamp`).
fn commit(c: &mut Client, sql: &str) -> (u32, i64) {
    let mut tx = c.transaction().unwrap();
    tx.batch_execute(sql)
        .unwrap_or_else(|e| panic!("{sql}: {}", db_error_text(&e)));
    let xid: i64 = tx.query_one("SELECT txid_current()", &[]).unwrap().get(0);
    tx.commit().unwrap();
    let ts: i64 = c
        .query_one(
            "SELECT ((extract(epoch FROM pg_xact_commit_timestamp($1::text::xid)) - 946684800) * 1000000)::bigint",
            &[&xid.to_string()],
        )
        .unwrap()
        .get(0);
    (xid as u32, ts)
}

/// A `bdr` slot named `s` (in its own transaction: slot creation refuses to run after
/// writes in the same transaction).
fn create_slot(c: &mut Client) {
    c.batch_execute("SELECT pg_create_logical_replication_slot('s', 'bdr')")
        .unwrap_or_else(|e| panic!("create slot: {}", db_error_text(&e)));
}

fn node_with_slot(c: &Cluster) -> (&Node, Client) {
    let n = c.node(0);
    let mut cl = n.connect();
    cl.batch_execute("CREATE EXTENSION bdr").unwrap();
    (n, cl)
}

/// Split a decoded stream into transactions (BEGIN .. COMMIT), checking the framing.
fn transactions(stream: &[Message]) -> Vec<Vec<Message>> {
    let mut out = Vec::new();
    let mut cur: Option<Vec<Message>> = None;
    for m in stream {
        match m {
            Message::Begin(_) => {
                assert!(cur.is_none(), "BEGIN inside a transaction: {stream:#?}");
                cur = Some(vec![m.clone()]);
            }
            Message::Commit(_) => {
                let mut t = cur.take().expect("COMMIT without BEGIN");
                t.push(m.clone());
                out.push(t);
            }
            _ => cur
                .as_mut()
                .expect("change outside a transaction")
                .push(m.clone()),
        }
    }
    assert!(cur.is_none(), "unterminated transaction");
    out
}

/// Compare rows column by column, printing at most 80 characters of a differing value.
#[track_caller]
fn assert_row(actual: &[Value], expected: &[Value], what: &str) {
    let short = |v: &Value| {
        let s = format!("{v:?}");
        if s.len() > 80 {
            format!("{}... ({} chars)", &s[..80], s.len())
        } else {
            s
        }
    };
    assert_eq!(actual.len(), expected.len(), "{what}: column count");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            a == e,
            "{what}: column {i}: got {} expected {}",
            short(a),
            short(e)
        );
    }
}

fn kinds(t: &[Message]) -> String {
    t.iter().map(|m| m.kind_byte() as char).collect::<String>()
}

#[test]
fn decoded_stream_equals_what_was_committed() {
    let cluster = Cluster::builder().name("decode").nodes(1).start();
    let (_n, mut c) = node_with_slot(&cluster);
    c.batch_execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
         CREATE TABLE alltypes (
             id      int8 PRIMARY KEY,
             c_i2    int2, c_i4 int4, c_num numeric, c_f8 float8,
             c_text  text, c_vc varchar(20), c_bool bool, c_ts timestamptz,
             c_date  date, c_iv interval, c_uuid uuid, c_jsonb jsonb, c_bytea bytea,
             c_ia    int[], c_ta text[], c_mood mood,
             c_big   text,
             c_gen   int8 GENERATED ALWAYS AS (id * 2) STORED);
         ALTER TABLE alltypes DROP COLUMN c_i4;
         ALTER TABLE alltypes ADD COLUMN c_i4 int4;
         CREATE TABLE trunc_me (id int PRIMARY KEY, v text);
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);",
    )
    .unwrap();
    create_slot(&mut c);

    // T1: every type, and a row of NULLs and empty strings.
    let t1 = commit(
        &mut c,
        "INSERT INTO alltypes (id, c_i2, c_i4, c_num, c_f8, c_text, c_vc, c_bool, c_ts, c_date,
                               c_iv, c_uuid, c_jsonb, c_bytea, c_ia, c_ta, c_mood, c_big)
         VALUES (1, -32768, 2147483647, 12345678901234567890.000000001, 3.5e-300,
                 'it''s \"quoted\" \\ ünïcødé', 'short', true, '2026-11-22 10:11:12.123456+00',
                 '1999-12-31', '1 year 2 mons 3 days 04:05:06.7', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
                 '{\"a\": [1, 2, {\"b\": null}]}', '\\x00ff10', '{1,NULL,3}', '{\"x y\",NULL,\"\"}', 'happy',
                 (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 32768) i));
         INSERT INTO alltypes (id, c_text, c_vc) VALUES (2, '', NULL);",
    );
    let row1 = row_text(&mut c, "alltypes", 1);
    let row2 = row_text(&mut c, "alltypes", 2);
    // T2: an UPDATE that does not touch the TOASTed column.
    let t2 = commit(
        &mut c,
        "UPDATE alltypes SET c_text = 'changed' WHERE id = 1",
    );
    let row1b = row_text(&mut c, "alltypes", 1);
    // T3: a key change.
    let t3 = commit(&mut c, "UPDATE alltypes SET id = 3 WHERE id = 2");
    let row3 = row_text(&mut c, "alltypes", 3);
    // T4: delete.
    let t4 = commit(&mut c, "DELETE FROM alltypes WHERE id = 3");
    // A rolled-back transaction and one touching only unlogged/temp tables: nothing.
    c.batch_execute("BEGIN; INSERT INTO alltypes (id) VALUES (99); ROLLBACK;")
        .unwrap();
    c.batch_execute(
        "BEGIN; INSERT INTO scratch VALUES (1);
         CREATE TEMP TABLE tmp_t (id int); INSERT INTO tmp_t VALUES (1); COMMIT;",
    )
    .unwrap();
    // T5: rows to truncate, T6: the truncate.
    let t5 = commit(&mut c, "INSERT INTO trunc_me VALUES (1, 'a'), (2, 'b')");
    let t6 = commit(&mut c, "TRUNCATE trunc_me RESTART IDENTITY CASCADE");
    // T7: our logical message; a foreign or merely similar prefix is not sent.
    let t7 = commit(
        &mut c,
        "SELECT pg_logical_emit_message(true, 'bdr.sync', 'hello');
         SELECT pg_logical_emit_message(true, 'bdr.test', 'ignored');
         SELECT pg_logical_emit_message(true, 'other', 'ignored');",
    );
    // T8: the definition changes: metadata is sent again with the new column.
    let t8 = commit(
        &mut c,
        "ALTER TABLE trunc_me ADD COLUMN extra int DEFAULT 7; INSERT INTO trunc_me VALUES (3, 'c');",
    );

    let stream = read_slot(&mut c, "s", false, &[]);
    let txs = transactions(&stream);
    let shapes: Vec<String> = txs.iter().map(|t| kinds(t)).collect();
    assert_eq!(
        shapes,
        // TRUNCATE gives the table a new relfilenode, which invalidates the relcache entry:
        // its metadata is sent again before the TRUNCATE (harmless, and what keeps
        // metadata right after real definition changes).
        ["BRIIC", "BUC", "BUC", "BDC", "BRIIC", "BRTC", "BMC", "BRIC"],
        "transactions in commit order: {stream:#?}"
    );

    // BEGIN/COMMIT carry the xid, LSNs and the commit timestamp PostgreSQL recorded.
    for (t, (xid, ts)) in txs.iter().zip([t1, t2, t3, t4, t5, t6, t7, t8]) {
        let (Message::Begin(b), Message::Commit(cm)) = (&t[0], t.last().unwrap()) else {
            unreachable!()
        };
        assert_eq!(b.xid, xid);
        assert_eq!(b.commit_time, ts, "begin commit_time of xid {xid}");
        assert_eq!(cm.commit_time, ts, "commit commit_time of xid {xid}");
        assert_eq!(b.final_lsn, cm.commit_lsn);
        assert!(cm.end_lsn > cm.commit_lsn);
        assert!(b.origin.is_none());
    }
    for w in txs.windows(2) {
        let (Message::Commit(a), Message::Commit(b)) = (w[0].last().unwrap(), w[1].last().unwrap())
        else {
            unreachable!()
        };
        assert!(a.end_lsn <= b.commit_lsn, "commit order");
    }

    // Relation metadata: dropped and generated columns are not sent; the key is marked.
    let Message::Relation(rel) = &txs[0][1] else {
        unreachable!()
    };
    assert_eq!(
        (rel.schema.as_str(), rel.name.as_str()),
        ("public", "alltypes")
    );
    assert_eq!(rel.replica_identity, ReplicaIdentity::Default);
    let names: Vec<&str> = rel.columns.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "id", "c_i2", "c_num", "c_f8", "c_text", "c_vc", "c_bool", "c_ts", "c_date", "c_iv",
            "c_uuid", "c_jsonb", "c_bytea", "c_ia", "c_ta", "c_mood", "c_big", "c_i4"
        ]
    );
    let types: Vec<&str> = rel.columns.iter().map(|c| c.type_name.as_str()).collect();
    assert_eq!(types[0], "bigint");
    assert_eq!(types[5], "character varying(20)");
    assert_eq!(types[13], "integer[]");
    assert_eq!(types[15], "mood");
    assert_eq!(rel.key_columns(), vec![0]);

    // Rows: exactly the committed values in text form.
    let Message::Insert(i1) = &txs[0][2] else {
        unreachable!()
    };
    let Message::Insert(i2) = &txs[0][3] else {
        unreachable!()
    };
    assert_eq!(i1.relation, rel.id);
    assert_row(&i1.new, &row1, "T1 insert 1");
    assert_row(&i2.new, &row2, "T1 insert 2");
    // Spot checks independent of the server's own rendering.
    assert_eq!(i1.new[6], Value::text("t"));
    assert_eq!(i1.new[12], Value::text("\\x00ff10"));
    assert_eq!(i1.new[16].as_text().unwrap().len(), 32768 * 32);
    assert_eq!(
        i2.new[4],
        Value::text(""),
        "empty string stays an empty string"
    );
    assert_eq!(i2.new[5], Value::Null, "NULL stays NULL");

    // T2: the TOASTed column is marked unchanged, never sent or invented.
    let Message::Update(u) = &txs[1][1] else {
        unreachable!()
    };
    assert_eq!(u.old, None, "key unchanged: no old row");
    let mut expect = row1b.clone();
    expect[16] = Value::UnchangedToast;
    assert_row(&u.new, &expect, "T2 update");
    assert_eq!(u.new[4], Value::text("changed"));

    // T3: the old key travels with a key change.
    let Message::Update(u) = &txs[2][1] else {
        unreachable!()
    };
    assert_eq!(u.old, Some(OldRow::Key(vec![Value::text("2")])));
    assert_row(&u.new, &row3, "T3 update");

    // T4: delete by key.
    let Message::Delete(d) = &txs[3][1] else {
        unreachable!()
    };
    assert_eq!(d.old, OldRow::Key(vec![Value::text("3")]));

    // T6: truncate with its flags, metadata already sent in T5.
    let Message::Relation(tr) = &txs[4][1] else {
        unreachable!()
    };
    assert_eq!(tr.name, "trunc_me");
    assert_eq!(
        txs[5][1],
        Message::Relation(tr.clone()),
        "same definition re-sent"
    );
    let Message::Truncate(t) = &txs[5][2] else {
        unreachable!()
    };
    assert_eq!(t.relations, vec![tr.id]);
    assert!(t.cascade && t.restart_identity);

    // T7: only our prefix.
    let Message::Message(m) = &txs[6][1] else {
        unreachable!()
    };
    assert_eq!(
        (m.prefix.as_str(), m.content.as_slice()),
        ("bdr.sync", &b"hello"[..])
    );
    assert!(m.transactional);

    // T8: new metadata with the added column, then the row with it.
    let Message::Relation(tr2) = &txs[7][1] else {
        unreachable!()
    };
    assert_eq!(tr2.columns.len(), 3);
    assert_eq!(tr2.columns[2].name, "extra");
    let Message::Insert(i) = &txs[7][2] else {
        unreachable!()
    };
    assert_eq!(
        i.new,
        vec![Value::text("3"), Value::text("c"), Value::text("7")]
    );

    // The slot was consumed: nothing more to read.
    assert!(read_slot(&mut c, "s", false, &[]).is_empty());
}

#[test]
fn origin_filter_and_forwarding() {
    let cluster = Cluster::builder().name("origin").nodes(1).start();
    let (_n, mut c) = node_with_slot(&cluster);
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         SELECT pg_replication_origin_create('bdr_elsewhere');",
    )
    .unwrap();
    create_slot(&mut c);
    // A transaction replayed under a replication origin, as an apply worker would.
    c.batch_execute(
        "SELECT pg_replication_origin_session_setup('bdr_elsewhere');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/ABCDEF', '2026-01-01 00:00:00+00');
         INSERT INTO t VALUES (1, 'replayed');
         COMMIT;
         SELECT pg_replication_origin_session_reset();",
    )
    .unwrap();
    c.batch_execute("INSERT INTO t VALUES (2, 'local')")
        .unwrap();

    let default = transactions(&read_slot(&mut c, "s", true, &[]));
    assert_eq!(default.len(), 1, "only the local transaction: {default:#?}");
    let Message::Insert(i) = &default[0][2] else {
        panic!("{default:#?}")
    };
    assert_eq!(i.new[1], Value::text("local"));

    let all = transactions(&read_slot(&mut c, "s", true, &["forward_origins", "all"]));
    assert_eq!(all.len(), 2, "{all:#?}");
    let Message::Begin(b) = &all[0][0] else {
        unreachable!()
    };
    let origin = b.origin.as_ref().expect("forwarded BEGIN names its origin");
    assert_eq!(origin.name, "bdr_elsewhere");
    assert_eq!(origin.lsn, wire::parse_lsn("0/ABCDEF").unwrap());
    let Message::Insert(i) = &all[0][2] else {
        unreachable!()
    };
    assert_eq!(i.new[1], Value::text("replayed"));
    let Message::Begin(b) = &all[1][0] else {
        unreachable!()
    };
    assert!(b.origin.is_none(), "a local transaction has no origin");
}

#[test]
fn unsupported_protocol_and_bad_options_fail_clearly() {
    let cluster = Cluster::builder().name("proto").nodes(1).start();
    let (_n, mut c) = node_with_slot(&cluster);
    create_slot(&mut c);
    let err = c
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, \
             'min_proto_version', '5', 'max_proto_version', '6')",
            &[],
        )
        .unwrap_err();
    let text = db_error_text(&err);
    assert!(
        text.contains("bdr output plugin cannot speak protocol versions 5 to 6"),
        "{text}"
    );
    assert!(
        text.contains("This node speaks protocol versions 1 to 4"),
        "{text}"
    );
    assert!(text.contains("HINT"), "{text}");
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "0A000");

    let err = c
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, 'colour', 'red')",
            &[],
        )
        .unwrap_err();
    let text = db_error_text(&err);
    assert!(
        text.contains("unrecognized bdr output plugin option \"colour\""),
        "{text}"
    );
    // The slot is still usable with valid options.
    read_slot(&mut c, "s", true, &["min_proto_version", "1"]);

    // Versions 1 (JSON bodies), 2 (binary bodies for the hot messages) and 3 (version 2's
    // frames, batched) carry the same messages, TOAST marker and NULLs included.
    c.batch_execute(
        "CREATE TABLE v (id int PRIMARY KEY, a text, b bytea);
         ALTER TABLE v ALTER COLUMN b SET STORAGE EXTERNAL;
         INSERT INTO v VALUES (1, 'x', decode(repeat('ab', 5000), 'hex')), (2, NULL, NULL);
         UPDATE v SET a = 'y' WHERE id = 1;
         UPDATE v SET id = 3 WHERE id = 2;
         DELETE FROM v WHERE id = 3;
         CREATE TABLE full_id (id int PRIMARY KEY, a text);
         ALTER TABLE full_id REPLICA IDENTITY FULL;
         INSERT INTO full_id VALUES (1, 'x');
         UPDATE full_id SET a = NULL;
         DELETE FROM full_id;
         CREATE TABLE no_id (id int, a text);
         ALTER TABLE no_id REPLICA IDENTITY NOTHING;
         INSERT INTO no_id VALUES (1, 'x');
         DELETE FROM no_id;",
    )
    .unwrap();
    let v1 = read_slot(&mut c, "s", true, &["max_proto_version", "1"]);
    let v2 = read_slot(&mut c, "s", true, &["max_proto_version", "2"]);
    assert!(v1.len() >= 8, "{v1:?}");
    assert_eq!(v1, v2);
    let v3 = read_slot(&mut c, "s", true, &["max_proto_version", "3"]);
    assert_eq!(v2, v3);
    // Up to version 2 a row is one frame; from 3 a row is a batch: a whole transaction
    // here (BEGIN .. COMMIT, never two transactions' frames), also with no option (4).
    let one_per_row = read_rows(&mut c, "s", true, &["max_proto_version", "2"]);
    assert!(one_per_row.iter().all(|r| r.len() == 1), "{one_per_row:?}");
    for opts in [&["max_proto_version", "3"][..], &[]] {
        let batched = read_rows(&mut c, "s", true, opts);
        assert!(batched.len() < one_per_row.len(), "{batched:?}");
        for row in &batched {
            let (first, last) = (row.first().unwrap(), row.last().unwrap());
            assert!(matches!(first, Message::Begin(_)), "{row:?}");
            assert!(matches!(last, Message::Commit(_)), "{row:?}");
            let commits = row.iter().filter(|m| matches!(m, Message::Commit(_)));
            assert_eq!(commits.count(), 1, "{row:?}");
        }
        assert_eq!(batched.concat(), v2);
    }
    assert!(v2.iter().any(|m| matches!(m, Message::Update(u)
        if u.new.contains(&Value::UnchangedToast))));
    // REPLICA IDENTITY FULL sends the whole old row; a DELETE without a replica identity
    // an empty key (the receiver reports it rather than guessing).
    let full_old = vec![Value::text("1"), Value::text("x")];
    assert!(v2.iter().any(|m| matches!(m, Message::Update(u)
        if u.old == Some(OldRow::Full(full_old.clone())))));
    assert!(v2.iter().any(|m| matches!(m, Message::Delete(d)
        if d.old == OldRow::Full(vec![Value::text("1"), Value::Null]))));
    assert!(v2.iter().any(|m| matches!(m, Message::Delete(d)
        if d.old == OldRow::Key(Vec::new()))));
}

/// Protocol version 4 with `streaming 'on'`: a transaction that outgrows
/// `logical_decoding_work_mem` is sent in pieces before its commit, every piece well
/// framed (the receiver's own order check accepts the stream), relations sent again in
/// each piece, a rolled-back subtransaction and a rolled-back transaction announced;
/// what the pieces hold, less what was rolled back, is exactly what committed. Without
/// the option nothing streams.
#[test]
fn large_transactions_stream_in_pieces_only_when_asked() {
    use bdr_core::streaming::StreamCheck;
    use std::collections::{HashMap, HashSet};
    let cluster = Cluster::builder()
        .name("decode_stream")
        .nodes(1)
        .conf("logical_decoding_work_mem", "'64kB'")
        .start();
    let (_n, mut c) = node_with_slot(&cluster);
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    create_slot(&mut c);
    c.batch_execute(
        "BEGIN; \
         INSERT INTO t SELECT g, repeat('a', 40) FROM generate_series(1, 3000) g; \
         SAVEPOINT s; \
         INSERT INTO t SELECT g, 'gone' FROM generate_series(10001, 13000) g; \
         ROLLBACK TO SAVEPOINT s; \
         INSERT INTO t SELECT g, 'b' FROM generate_series(3001, 3010) g; \
         COMMIT; \
         BEGIN; INSERT INTO t SELECT g, 'aborted' FROM generate_series(20001, 24000) g; ROLLBACK; \
         INSERT INTO t VALUES (0, 'small');",
    )
    .unwrap();
    let whole = read_slot(&mut c, "s", true, &[]);
    assert!(
        whole.iter().all(|m| !m.is_stream()),
        "no streaming unless asked"
    );
    let txns = transactions(&whole);
    assert_eq!(txns.len(), 2);
    assert_eq!(
        txns[0]
            .iter()
            .filter(|m| matches!(m, Message::Insert(_)))
            .count(),
        3010
    );

    // Without version 4 the option is refused.
    let err = c
        .query(
            "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL, \
             'max_proto_version', '3', 'streaming', 'on')",
            &[],
        )
        .unwrap_err();
    assert!(
        db_error_text(&err).contains("streaming"),
        "{}",
        db_error_text(&err)
    );

    let stream = read_slot(&mut c, "s", false, &["streaming", "on"]);
    let mut check = StreamCheck::default();
    for m in &stream {
        check
            .check(m)
            .unwrap_or_else(|e| panic!("{e}: {:#?}", &stream[..20.min(stream.len())]));
    }
    assert_eq!(check.open().count(), 0, "every streamed transaction ended");
    let starts: Vec<(u32, bool)> = stream
        .iter()
        .filter_map(|m| match m {
            Message::StreamStart(s) => Some((s.xid, s.first_segment)),
            _ => None,
        })
        .collect();
    let xids: HashSet<u32> = starts.iter().map(|s| s.0).collect();
    assert_eq!(xids.len(), 2, "both big transactions streamed: {starts:?}");
    for x in &xids {
        let firsts = starts.iter().filter(|s| s.0 == *x && s.1).count();
        assert_eq!(firsts, 1, "one first segment for {x}: {starts:?}");
    }
    // A relation frame precedes the first change of every piece.
    let mut seen_rel = false;
    for m in &stream {
        match m {
            Message::StreamStart(_) => seen_rel = false,
            Message::Relation(_) => seen_rel = true,
            Message::StreamChange(_) => assert!(seen_rel, "a piece's change before its relation"),
            _ => {}
        }
    }
    // Apply the pieces as a receiver would: drop what was rolled back.
    let mut changes: HashMap<u32, Vec<(u32, Message)>> = HashMap::new();
    let mut committed = Vec::new();
    for m in &stream {
        match m {
            Message::StreamChange(ch) => changes
                .entry(ch.xid)
                .or_default()
                .push((ch.subxid, (*ch.change).clone())),
            Message::StreamAbort(a) if a.subxid == a.xid => {
                changes.remove(&a.xid);
            }
            Message::StreamAbort(a) => {
                assert_ne!(a.subxid, a.xid);
                if let Some(v) = changes.get_mut(&a.xid) {
                    v.retain(|(sub, _)| *sub != a.subxid);
                }
            }
            Message::StreamCommit(sc) => {
                assert!(sc.end_lsn > sc.commit_lsn && sc.origin.is_none());
                committed.push(changes.remove(&sc.xid).unwrap_or_default());
            }
            _ => {}
        }
    }
    assert_eq!(committed.len(), 1, "one streamed transaction committed");
    let inserted: Vec<i64> = committed[0]
        .iter()
        .filter_map(|(_, m)| match m {
            Message::Insert(i) => i.new[0].as_text().and_then(|t| t.parse().ok()),
            _ => None,
        })
        .collect();
    assert_eq!(inserted.len(), 3010, "exactly the committed rows");
    assert!(inserted.iter().all(|id| (1..=3010).contains(id)));
    assert!(
        stream
            .iter()
            .any(|m| matches!(m, Message::StreamAbort(a) if a.subxid != a.xid)),
        "the rolled-back subtransaction was announced"
    );
    // The small transaction still travels whole.
    let begins = stream
        .iter()
        .filter(|m| matches!(m, Message::Begin(_)))
        .count();
    let commits = stream
        .iter()
        .filter(|m| matches!(m, Message::Commit(_)))
        .count();
    assert_eq!((begins, commits), (1, 1));
}

/// A value whose text is not UTF-8 (a SQL_ASCII database can hold one) stops decoding with
/// one clear error naming the relation and column (SQLSTATE 22021), never a frame with
/// those bytes: in the path that writes frames straight from the tuples (version 2 and
/// later, batched or not) and in version 1's. The server survives it (the harness fails
/// the test on a crash or a backtrace in the log) and the session goes on.
#[test]
fn a_value_that_is_not_utf8_is_refused_clearly() {
    let cluster = Cluster::builder().name("decode_ascii").nodes(1).start();
    let n = cluster.node(0);
    n.execute(
        "CREATE DATABASE ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' \
         TEMPLATE template0",
    );
    let mut c = n.connect_db("ascii");
    c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .unwrap();
    create_slot(&mut c);
    c.batch_execute("INSERT INTO t VALUES (1, 'fine'); INSERT INTO t VALUES (2, E'caf\\xe9')")
        .unwrap();
    for opts in [
        &[][..],
        &["max_proto_version", "2"],
        &["max_proto_version", "1"],
    ] {
        let opts_sql: String = opts.iter().map(|o| format!(", '{o}'")).collect();
        let err = c
            .query(
                &format!(
                    "SELECT data FROM pg_logical_slot_peek_binary_changes('s', NULL, NULL{opts_sql})"
                ),
                &[],
            )
            .unwrap_err();
        let text = db_error_text(&err);
        assert!(
            text.contains(
                "column \"v\" of relation \"public.t\" has a value that is not valid UTF-8"
            ),
            "{opts:?}: {text}"
        );
        assert_eq!(err.as_db_error().unwrap().code().code(), "22021", "{text}");
        let one: i32 = c.query_one("SELECT 1", &[]).unwrap().get(0);
        assert_eq!(one, 1);
    }
}

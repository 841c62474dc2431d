//! The join's data copy, with versions: every copied row (and every tombstone) gets on the
//! joining node J the version (commit timestamp, node) it has on the join source S.
//!
//! Why: last-update-wins compares a remote change with the local row's version, read from
//! the row's xmin (commit timestamp and replication origin). A member M's change that is in
//! flight to S when S's snapshot is taken reaches J later through J's own slot on M. S
//! resolves it against S's versions; J must resolve it against the same versions, or a
//! change S rejected (older than S's update or delete of the row) is applied on J, which
//! then differs for good (issue 18; `pg_test/tests/join_conflicts.rs`). So the versions
//! travel with the copy, and the deleted keys (`bdr.tombstones`) too, in the same snapshot.
//!
//! How, without any side table: S's COPY query appends each row's version
//! (`pg_xact_commit_timestamp_origin(xmin)`) and sorts by it; J writes the rows of each
//! version in a transaction of their own whose commit is stamped, through J's replication
//! origin for the node that wrote them, with that exact commit timestamp
//! (`pg_replication_origin_xact_setup`). The row's xmin on J then reads as the same
//! (timestamp, node) the apply stage reads on S.
//!
//! Speed: one transaction per distinct version would make a table written by 100k
//! transactions 100k commits. Versions older than the *horizon* H are not needed exactly:
//! every change that can still reach J is newer than H (from each member Mi, J receives
//! only what Mi commits after S's applied position, whose commit time S knows; S's own
//! later writes are newer than S's clock at the snapshot; J's own writes are newer than
//! J's clock; H is the least of these minus a second for clock steps). A change newer than H wins over any version older than H, so
//! those rows are copied with the oldest possible timestamp, keeping only their node:
//! one transaction per node. Only rows written in the last moments before the join (or
//! after the oldest member's last applied change) are copied one version per transaction.
//! When S does not know a member's last applied commit time (its worker restarted and
//! applied nothing since), there is no horizon and every version is copied exactly.
//!
//! Versions kept exactly may be in J's future (J's clock behind the node that wrote
//! them): the join then waits until J's clock passes the latest (`CopyStats::latest`), as
//! the apply stage does for every remote transaction, so no local write can be older
//! than a row it overwrites.
//!
//! Invariants: J's origin progress is not touched by the copy (commits carry origin LSN
//! 0/0, which never moves an origin's progress; the join sets the real starting points
//! afterwards); copied rows commit under a replication origin, so J's slots never send
//! them; a row whose origin S cannot name (not a bdr origin, or commit time unknown) is
//! older than anything on S, and gets the oldest possible version on J.

use crate::api::group_error::GroupError;
use crate::pg::libpq::{quote_ident, quote_literal, Conn, LibpqError};
use bdr_core::join_copy::{origin_node, split_versioned_row};
use std::collections::HashMap;

/// Commit time given to copied rows whose exact version does not matter (older than the
/// horizon) or is unknown: older than any real change.
pub const OLDEST_VERSION_TIME: &str = "2000-01-01 00:00:00.000001+00";

/// What the copy did, for the log.
#[derive(Debug, Default)]
pub struct CopyStats {
    pub rows: u64,
    pub tombstones: u64,
    pub transactions: u64,
    /// The latest commit time given to a copied row or tombstone (ISO text, UTC), if any
    /// was kept exactly.
    pub latest: Option<String>,
}

/// Where the copy writes, and how it names versions.
pub struct Target<'a> {
    /// S's node name and J's node name (for error messages).
    pub source: &'a str,
    pub joining: &'a str,
    /// J's replication origin for S.
    pub source_origin: String,
    /// J's replication origin for each node name that has one.
    pub origins: HashMap<String, String>,
    /// Versions older than this (a timestamptz literal, or `-infinity`) are not kept.
    pub horizon: String,
}

type Fail = GroupError;

fn on(node: &str) -> impl Fn(LibpqError) -> Fail + '_ {
    move |e| GroupError::Remote {
        node: node.to_string(),
        message: e.to_string(),
    }
}

/// J's writing session: which origin it runs under and which version its open
/// transaction is stamped with.
struct Stamper<'a> {
    conn: &'a mut Conn,
    node: &'a str,
    origin: Option<String>,
    version: Option<(String, String)>,
    copying: bool,
    transactions: u64,
    latest: Option<String>,
}

impl Stamper<'_> {
    /// SQL that leaves the session in a transaction stamped (`origin`, `ts`), committing
    /// the open one first; empty if the open one already is.
    fn switch_sql(&mut self, origin: &str, ts: &str) -> String {
        if self
            .version
            .as_ref()
            .is_some_and(|(o, t)| o == origin && t == ts)
        {
            return String::new();
        }
        let mut sql = String::new();
        if self.version.is_some() {
            sql.push_str("COMMIT; ");
        }
        if self.origin.as_deref() != Some(origin) {
            if self.origin.is_some() {
                sql.push_str("SELECT pg_replication_origin_session_reset(); ");
            }
            sql.push_str(&format!(
                "SELECT pg_replication_origin_session_setup({}); ",
                quote_literal(origin)
            ));
            self.origin = Some(origin.to_string());
        }
        sql.push_str(&format!(
            "BEGIN; SELECT pg_replication_origin_xact_setup('0/0', {}); ",
            quote_literal(ts)
        ));
        self.version = Some((origin.to_string(), ts.to_string()));
        self.transactions += 1;
        // S's ISO text in UTC, microseconds with trailing zeros dropped: the text order is
        // the time order ('+' and '.' sort before digits).
        if ts != OLDEST_VERSION_TIME && self.latest.as_deref().is_none_or(|l| l < ts) {
            self.latest = Some(ts.to_string());
        }
        sql
    }

    fn end_copy(&mut self) -> Result<(), Fail> {
        if self.copying {
            self.copying = false;
            self.conn.put_copy_end().map_err(on(self.node))?;
        }
        Ok(())
    }

    /// Be inside `COPY copy_sql` in a transaction stamped (`origin`, `ts`).
    fn copy_in(&mut self, origin: &str, ts: &str, copy_sql: &str) -> Result<(), Fail> {
        let same = self
            .version
            .as_ref()
            .is_some_and(|(o, t)| o == origin && t == ts);
        if self.copying && same {
            return Ok(());
        }
        self.end_copy()?;
        let sql = self.switch_sql(origin, ts) + copy_sql;
        self.conn.start_copy(&sql).map_err(on(self.node))?;
        self.copying = true;
        Ok(())
    }

    /// Run `sql` (with `params`) in a transaction stamped (`origin`, `ts`).
    fn exec_in(&mut self, origin: &str, ts: &str, sql: &str, params: &[&str]) -> Result<(), Fail> {
        self.end_copy()?;
        let switch = self.switch_sql(origin, ts);
        if !switch.is_empty() {
            self.conn.exec(&switch).map_err(on(self.node))?;
        }
        self.conn.exec_params(sql, params).map_err(on(self.node))?;
        Ok(())
    }

    fn finish(&mut self) -> Result<(), Fail> {
        self.end_copy()?;
        if self.version.take().is_some() {
            self.conn.exec("COMMIT").map_err(on(self.node))?;
        }
        if self.origin.take().is_some() {
            self.conn
                .exec("SELECT pg_replication_origin_session_reset()")
                .map_err(on(self.node))?;
        }
        Ok(())
    }
}

/// How S's origin ids map to J's: (J's origin, whether the commit time is kept).
struct Origins {
    map: HashMap<u32, (String, bool)>,
    source_origin: String,
}

impl Origins {
    /// Read S's origins and node names (in the reader's snapshot).
    fn read(reader: &mut Conn, t: &Target) -> Result<Origins, Fail> {
        let names: Vec<String> = reader
            .exec("SELECT node_name FROM bdr.nodes")
            .map_err(on(t.source))?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        let mut map = HashMap::new();
        map.insert(0, (t.source_origin.clone(), true));
        for r in reader
            // (The status view lists every origin that ever committed here, which is every
            // origin a row can carry; a join's role may read it, see docs/security.md.)
            .exec("SELECT local_id::text, external_id FROM pg_replication_origin_status")
            .map_err(on(t.source))?
        {
            let (Some(id), Some(name)) = (
                r[0].as_deref().and_then(|v| v.parse::<u32>().ok()),
                r[1].as_deref(),
            ) else {
                continue;
            };
            // As S's apply stage reads it: a bdr origin of a node S knows has a version;
            // anything else is older than everything.
            let entry = match origin_node(name).filter(|n| names.iter().any(|k| k == n)) {
                // A node J has no origin for (a parted one): the commit time is kept and the
                // node becomes S (the outcome differs only for equal commit times).
                Some(node) => (
                    t.origins
                        .get(node)
                        .cloned()
                        .unwrap_or_else(|| t.source_origin.clone()),
                    true,
                ),
                None => (t.source_origin.clone(), false),
            };
            map.insert(id, entry);
        }
        Ok(Origins {
            map,
            source_origin: t.source_origin.clone(),
        })
    }

    /// Origin ids whose commit time is kept, as an SQL array literal.
    fn kept_sql(&self) -> String {
        let ids: Vec<String> = self
            .map
            .iter()
            .filter(|(_, (_, keep))| *keep)
            .map(|(id, _)| id.to_string())
            .collect();
        format!("'{{{}}}'::oid[]", ids.join(","))
    }

    /// J's (origin, commit time) for a row of S's version.
    fn version<'a>(&'a self, origin: u32, ts: Option<&'a str>) -> (&'a str, &'a str) {
        let (o, keep) = self
            .map
            .get(&origin)
            .map(|(o, k)| (o.as_str(), *k))
            .unwrap_or((self.source_origin.as_str(), false));
        let ts = ts.filter(|_| keep).unwrap_or(OLDEST_VERSION_TIME);
        (o, ts)
    }
}

/// The version columns S appends for the row (or tombstone) aliased `alias`.
fn version_sql(alias: &str, origins: &Origins, horizon: &str) -> String {
    format!(
        "(SELECT CASE WHEN bdr_c.roident = ANY ({kept}) AND bdr_c.timestamp >= {h}::timestamptz \
                 THEN bdr_c.timestamp END AS ts, coalesce(bdr_c.roident, 0) AS ro \
            FROM pg_xact_commit_timestamp_origin({alias}.xmin) bdr_c) bdr_v",
        kept = origins.kept_sql(),
        h = quote_literal(horizon)
    )
}

/// Copy every table in `tables` (schema, name) and S's tombstones of them from `reader`
/// (in S's snapshot, DateStyle ISO) into J through `jconn` (replica role, no origin set).
pub fn copy_versioned(
    reader: &mut Conn,
    jconn: &mut Conn,
    tables: &[(String, String)],
    t: &Target,
) -> Result<CopyStats, Fail> {
    let origins = Origins::read(reader, t)?;
    let mut stats = CopyStats::default();
    // Commits flushed by the join's own final commit: none of these needs its own flush.
    jconn
        .exec("SET synchronous_commit = off")
        .map_err(on(t.joining))?;
    let mut st = Stamper {
        conn: jconn,
        node: t.joining,
        origin: None,
        version: None,
        copying: false,
        transactions: 0,
        latest: None,
    };
    for (schema, table) in tables {
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let cols: Vec<String> = reader
            .exec_params(
                "SELECT quote_ident(attname) FROM pg_attribute \
                  WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped \
                    AND attgenerated = '' ORDER BY attnum",
                &[&name],
            )
            .map_err(on(t.source))?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        let select: Vec<String> = cols.iter().map(|c| format!("bdr_t.{c}")).collect();
        let select = if select.is_empty() {
            String::new()
        } else {
            select.join(", ") + ", "
        };
        reader
            .start_copy(&format!(
                "COPY (SELECT {select}bdr_v.ts, bdr_v.ro FROM ONLY {name} bdr_t, LATERAL {} \
                  ORDER BY bdr_v.ts NULLS FIRST, bdr_v.ro) TO STDOUT",
                version_sql("bdr_t", &origins, &t.horizon)
            ))
            .map_err(on(t.source))?;
        let copy_sql = if cols.is_empty() {
            format!("COPY {name} FROM STDIN")
        } else {
            format!("COPY {name} ({}) FROM STDIN", cols.join(", "))
        };
        loop {
            match reader.get_copy_data(false).map_err(on(t.source))? {
                crate::pg::libpq::CopyData::Data(buf) => {
                    let Some(row) = split_versioned_row(&buf) else {
                        return Err(GroupError::Remote {
                            node: t.source.into(),
                            message: format!("a copied row of {name} has no version"),
                        });
                    };
                    let (o, ts) = origins.version(row.origin, row.commit_time);
                    st.copy_in(o, ts, &copy_sql)?;
                    st.conn.put_copy_data(row.fields).map_err(on(t.joining))?;
                    st.conn.put_copy_data(b"\n").map_err(on(t.joining))?;
                    stats.rows += 1;
                }
                crate::pg::libpq::CopyData::Done => break,
                crate::pg::libpq::CopyData::WouldBlock => {}
            }
        }
        st.end_copy()?;
        pgrx::check_for_interrupts!();
    }

    // Tombstones of the copied tables, named by table (OIDs differ between nodes).
    let rows = reader
        .exec(&format!(
            "SELECT format('%I.%I', n.nspname, c.relname), b.key, bdr_v.ts::text, bdr_v.ro::text \
               FROM bdr.tombstones b JOIN pg_class c ON c.oid = b.relid \
               JOIN pg_namespace n ON n.oid = c.relnamespace, LATERAL {} \
              ORDER BY bdr_v.ts NULLS FIRST, bdr_v.ro",
            version_sql("b", &origins, &t.horizon)
        ))
        .map_err(on(t.source))?;
    let mut i = 0;
    while i < rows.len() {
        let key_of = |r: &Vec<Option<String>>| {
            (
                r[3].as_deref()
                    .and_then(|v| v.parse::<u32>().ok())
                    .unwrap_or(0),
                r[2].clone(),
            )
        };
        let k = key_of(&rows[i]);
        let mut group = Vec::new();
        while i < rows.len() && key_of(&rows[i]) == k {
            group.push(serde_json::json!({
                "r": rows[i][0].clone().unwrap_or_default(),
                "k": rows[i][1].clone().unwrap_or_default(),
            }));
            i += 1;
        }
        let (o, ts) = origins.version(k.0, k.1.as_deref());
        stats.tombstones += group.len() as u64;
        st.exec_in(
            o,
            ts,
            "INSERT INTO bdr.tombstones (relid, key) \
             SELECT to_regclass(x.r), x.k FROM json_to_recordset($1::json) AS x(r text, k text) \
              WHERE to_regclass(x.r) IS NOT NULL ON CONFLICT DO NOTHING",
            &[&serde_json::Value::Array(group).to_string()],
        )?;
    }
    st.finish()?;
    stats.transactions = st.transactions;
    stats.latest = st.latest.take();
    jconn
        .exec("RESET synchronous_commit")
        .map_err(on(t.joining))?;
    Ok(stats)
}

//! Write stage, mapping half: turn a peer's relation and rows (text values by column name)
//! into rows of the local table (datums by attribute number).
//!
//! Rules: the local table is found by schema and name, and must be a table that
//! replicates by the same rule the sender uses (`decode::why_not_replicated`: an ordinary
//! permanent table outside the system and bdr schemas, of no extension) — never a view, a
//! partitioned table or a catalog, whatever the peer names; every column the peer sends must
//! exist locally unless its value is NULL (a column dropped here, or added on the peer and
//! not yet here: a non-NULL value for it is an apply error naming the column, retried until
//! a DBA adds it — never a silent loss); local columns the peer does not send get their
//! DEFAULT on INSERT and keep their value on UPDATE; generated columns are computed
//! locally; an unchanged-TOAST value keeps the local value.
//!
//! A mapping is cached per peer relation and dropped whenever the local table's definition
//! changes (relcache invalidation, see `pg::relcache`), so it always describes the table as
//! it is. It also keeps the table's [`Target`] (executor state, kept across changes and
//! transactions, see `pg::exec`), which an invalidation of one of the table's indexes
//! makes stale too ([`RelMap::invalidated_by`]). Text values are converted by the column types' input functions as the table's
//! owner (a domain's CHECK may call the owner's functions), and the owner's privileges on
//! the table are checked before each kind of change.

use crate::error::ApplyError;
/// The write stage's raw half ([`crate::pg::exec`]): a local table opened for writing,
/// the rows it writes and the locked rows it finds. The conflict stage writes through
/// these, never through `pg::exec` directly.
pub use crate::pg::exec::{LocalRow, Row, Target};
use crate::pg::memcxt::MemCxt;
use crate::pg::owner::{self, OwnerRights};
use crate::pg::relcache::Invalidated;
pub use crate::pg::tables::relation_name;
use crate::pg::tables::{self, InputFn, LocalAttr};
use bdr_core::wire::{self, OldRow, ReplicaIdentity, Value};
use pgrx::pg_sys;

/// Local position of each remote column (`None`: no such column here).
pub fn map_columns(remote: &[wire::Column], local: &[LocalAttr]) -> Vec<Option<usize>> {
    remote
        .iter()
        .map(|c| {
            local
                .iter()
                .position(|a| !a.dropped && !a.generated && a.name == c.name)
        })
        .collect()
}

/// A peer relation bound to a local table.
pub struct RelMap {
    pub remote: wire::Relation,
    pub relid: pg_sys::Oid,
    pub natts: usize,
    /// For each remote column, the local attribute index (`None`: not here).
    local_of: Vec<Option<usize>>,
    /// Input function per remote column that exists here.
    inputs: Vec<Option<InputFn>>,
    /// Local attributes the peer does not send (they get their DEFAULT on INSERT).
    local_only: Vec<usize>,
    /// Remote column indexes of the key.
    key: Vec<usize>,
    /// The table's owner and what it may do.
    pub rights: OwnerRights,
    /// The table opened for writing with its executor state, kept from change to change
    /// and across transactions while the mapping lives (see `pg::exec`, "Kept across
    /// transactions"); built by the first change.
    target: Option<Target>,
}

impl RelMap {
    /// Inside a transaction; input functions are kept in `cxt`.
    pub fn build(remote: &wire::Relation, cxt: &MemCxt) -> Result<RelMap, ApplyError> {
        let missing = || ApplyError::MissingTable {
            schema: remote.schema.clone(),
            name: remote.name.clone(),
        };
        let relid = tables::find_table(&remote.schema, &remote.name).ok_or_else(missing)?;
        if let Some(why) = crate::pg::relcache::why_not_target(relid) {
            return Err(ApplyError::NotReplicatedTarget {
                schema: remote.schema.clone(),
                name: remote.name.clone(),
                why,
            });
        }
        let attrs = tables::table_attrs(relid);
        let rights = owner::owner_rights(relid).ok_or_else(missing)?;
        let local_of = map_columns(&remote.columns, &attrs);
        let inputs = local_of
            .iter()
            .map(|i| i.map(|i| InputFn::new(attrs[i].typid, attrs[i].typmod, cxt)))
            .collect();
        let local_only = (0..attrs.len())
            .filter(|i| !attrs[*i].dropped && !attrs[*i].generated)
            .filter(|i| !local_of.contains(&Some(*i)))
            .collect();
        Ok(RelMap {
            key: remote.key_columns(),
            remote: remote.clone(),
            relid,
            natts: attrs.len(),
            local_of,
            inputs,
            local_only,
            rights,
            target: None,
        })
    }

    /// Whether the invalidations `inv` concern this mapping: its table, or an index its
    /// target writes (then the mapping must be dropped and built again).
    pub fn invalidated_by(&self, inv: &Invalidated) -> bool {
        inv.all
            || inv.relids.contains(&self.relid)
            || self
                .target
                .as_ref()
                .is_some_and(|t| t.indexes().iter().any(|i| inv.relids.contains(i)))
    }

    /// Start a change on the table: its target is built on first use (executor state in a
    /// context under `cxt`), re-opened in a new transaction, or built again if the
    /// relcache gave other entries than the ones it was built on.
    ///
    /// Inside a transaction with an active snapshot, the table locked and its
    /// invalidations taken; [`RelMap::end_change`] after the change.
    pub fn begin_change(&mut self, cxt: &MemCxt) {
        loop {
            let relid = self.relid;
            let t = self.target.get_or_insert_with(|| Target::build(relid, cxt));
            if t.begin_change() {
                return;
            }
            // Stale: a fresh one holds this transaction's references and cannot be.
            self.target = None;
        }
    }

    /// The table's target, for the change in progress.
    pub fn target(&self) -> &Target {
        match &self.target {
            Some(t) => t,
            None => crate::error::internal("a change without its table open"),
        }
    }

    /// The change is done: its AFTER triggers fire, its slots are released.
    pub fn end_change(&self) {
        if let Some(t) = &self.target {
            t.end_change();
        }
    }

    /// The transaction ends (before its commit): release its references to the table.
    pub fn end_transaction(&mut self) {
        if let Some(t) = &mut self.target {
            t.end_transaction();
        }
    }

    /// Close the table and free its executor state (before DDL or TRUNCATE in the applying
    /// transaction, which refuse a table this session holds open).
    pub fn release_target(&mut self) {
        self.target = None;
    }

    /// Whether the table's owner may make a change of kind `action` ("insert", "update",
    /// "delete", "truncate") here, as every change is applied as that owner.
    pub fn check_may(&self, action: &'static str) -> Result<(), ApplyError> {
        let r = &self.rights;
        if r.row_security {
            return Err(ApplyError::RowLevelSecurity {
                role: r.name.clone(),
                table: self.name(),
            });
        }
        let ok = match action {
            "insert" => r.insert,
            "update" => r.update,
            "delete" => r.delete,
            _ => r.truncate,
        };
        if ok {
            Ok(())
        } else {
            Err(ApplyError::OwnerCannotWrite {
                role: r.name.clone(),
                table: self.name(),
                action,
            })
        }
    }

    pub fn name(&self) -> String {
        self.remote.qualified_name()
    }

    /// Local attributes the peer does not send.
    pub fn local_only(&self) -> &[usize] {
        &self.local_only
    }

    fn missing_column(&self, ri: usize) -> ApplyError {
        ApplyError::MissingColumn {
            schema: self.remote.schema.clone(),
            name: self.remote.name.clone(),
            column: self.remote.columns[ri].name.clone(),
        }
    }

    /// Convert remote column `ri`'s text here.
    ///
    /// As [`RelMap::row`].
    fn input(&self, ri: usize, text: &str) -> Result<pg_sys::Datum, ApplyError> {
        match &self.inputs[ri] {
            Some(f) => Ok(f.call(text)),
            None => Err(self.missing_column(ri)),
        }
    }

    fn toast_error(&self, ri: usize) -> ApplyError {
        ApplyError::ToastWithoutRow {
            table: self.name(),
            column: self.remote.columns[ri].name.clone(),
        }
    }

    /// A full local row from the remote values; unchanged-TOAST (and unsent) columns come
    /// from `base` (the local row being updated).
    ///
    /// Inside a transaction; datums live in the current memory context.
    pub fn row(&self, values: &[Value], base: Option<&Row>) -> Result<Row, ApplyError> {
        owner::as_user(self.rights.owner, || self.row_as_owner(values, base))
    }

    /// As [`RelMap::row`].
    fn row_as_owner(&self, values: &[Value], base: Option<&Row>) -> Result<Row, ApplyError> {
        if values.len() != self.local_of.len() {
            return Err(ApplyError::Protocol(format!(
                "row for {} has {} values, its metadata {} columns",
                self.name(),
                values.len(),
                self.local_of.len()
            )));
        }
        let mut row: Row = match base {
            Some(b) => b.clone(),
            None => smallvec::smallvec![None; self.natts],
        };
        for (ri, v) in values.iter().enumerate() {
            let Some(li) = self.local_of[ri] else {
                // Not here: fine while the peer has nothing in it.
                match v {
                    Value::Null | Value::UnchangedToast => continue,
                    Value::Text(_) => return Err(self.missing_column(ri)),
                }
            };
            row[li] = match v {
                Value::Null => None,
                Value::Text(t) => Some(self.input(ri, t)?),
                Value::UnchangedToast => match base {
                    Some(b) => b[li],
                    None => return Err(self.toast_error(ri)),
                },
            };
        }
        Ok(row)
    }

    /// The search row for the old key of an UPDATE/DELETE: key (or all, under FULL)
    /// columns set, the rest NULL.
    ///
    /// As [`RelMap::row`].
    pub fn search_row_old(&self, old: &OldRow, action: &'static str) -> Result<Row, ApplyError> {
        match old {
            OldRow::Full(values) => self.row(values, None),
            OldRow::Key(values) => {
                if values.len() != self.key.len() {
                    return Err(ApplyError::NoIdentity {
                        table: self.name(),
                        action,
                    });
                }
                self.key_search_row(values.iter(), action)
            }
        }
    }

    /// The search row from the key columns' values, in key order (`values` yields one per
    /// key column).
    ///
    /// As [`RelMap::row`].
    fn key_search_row<'v>(
        &self,
        values: impl Iterator<Item = &'v Value>,
        action: &'static str,
    ) -> Result<Row, ApplyError> {
        if self.key.is_empty() {
            return Err(ApplyError::NoIdentity {
                table: self.name(),
                action,
            });
        }
        owner::as_user(self.rights.owner, || {
            let mut row: Row = smallvec::smallvec![None; self.natts];
            for (k, &ri) in values.zip(&self.key) {
                let li = self.local_of[ri].ok_or_else(|| self.missing_column(ri))?;
                row[li] = match k {
                    Value::Null => None,
                    Value::Text(t) => Some(self.input(ri, t)?),
                    Value::UnchangedToast => return Err(self.toast_error(ri)),
                };
            }
            Ok(row)
        })
    }

    /// The search row for an UPDATE whose key did not change: the key columns of `new`.
    ///
    /// As [`RelMap::row`].
    pub fn search_row_new(&self, new: &[Value]) -> Result<Row, ApplyError> {
        if self.remote.replica_identity == ReplicaIdentity::Full {
            // Under FULL every update carries its old row; none means a protocol bug.
            return Err(ApplyError::Protocol(format!(
                "UPDATE of {} (REPLICA IDENTITY FULL) without its old row",
                self.name()
            )));
        }
        if new.len() != self.local_of.len() {
            return Err(ApplyError::Protocol(format!(
                "row for {} has {} values, its metadata {} columns",
                self.name(),
                new.len(),
                self.local_of.len()
            )));
        }
        // The key columns' values, read in place (no copy of the text).
        self.key_search_row(self.key.iter().map(|&ri| &new[ri]), "update")
    }
}

/// A row's canonical key text, rendered only if something needs it (a tombstone lookup or
/// write, a history row): most inserts need none.
pub struct LazyKey<'a> {
    t: &'a Target,
    pub row: &'a Row,
    text: Option<Option<String>>,
}

impl<'a> LazyKey<'a> {
    pub fn new(t: &'a Target, row: &'a Row) -> Self {
        LazyKey { t, row, text: None }
    }

    pub fn get(&mut self) -> Option<String> {
        let (t, row) = (self.t, self.row);
        self.text.get_or_insert_with(|| t.key_text(row)).clone()
    }

    /// This key's text when `row` (the row's new version) has another key: the key an
    /// UPDATE moves its row away from.
    pub fn left_by(&mut self, row: &Row) -> Option<String> {
        let t = self.t;
        self.get().filter(|k| t.key_text(row).as_ref() != Some(k))
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;
    use pgrx::prelude::*;

    fn attr(name: &str, dropped: bool, generated: bool) -> LocalAttr {
        LocalAttr {
            name: name.into(),
            dropped,
            generated,
            typid: pg_sys::INT4OID,
            typmod: -1,
        }
    }
    fn col(name: &str) -> wire::Column {
        wire::Column {
            name: name.into(),
            type_name: "integer".into(),
            key: false,
        }
    }

    #[pg_test]
    fn columns_map_by_name_skipping_dropped_and_generated() {
        let local = [
            attr("a", false, false),
            attr("b", true, false),
            attr("c", false, true),
            attr("b", false, false),
        ];
        assert_eq!(
            map_columns(&[col("b"), col("a")], &local),
            vec![Some(3), Some(0)]
        );
        assert_eq!(map_columns(&[col("c")], &local), vec![None]);
        assert_eq!(map_columns(&[col("zz")], &local), vec![None]);
    }
}

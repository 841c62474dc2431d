//! Statement description, the raw half of DDL capture: what a utility statement does to
//! which tables, as `bdr_core::ddl::Shape` (the policy decides from it), and the exact text
//! of the one statement.
//!
//! Invariant: targets are resolved before the statement runs (a DROP cannot be described
//! afterwards), without taking locks (the statement takes its own).

use bdr_core::ddl::{PerNodeValues, Shape, Table};
use pgrx::pg_sys;
use pgrx::PgList;
use std::ffi::{c_char, CStr};

/// The one statement `pstmt` is, out of a possibly multi-statement string.
///
/// # Safety
/// As the hook's arguments.
pub(super) unsafe fn statement_text(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const c_char,
) -> String {
    // SAFETY: query_string is NUL-terminated; location and length index into it.
    unsafe {
        let all = CStr::from_ptr(query).to_string_lossy();
        let bytes = all.as_bytes();
        let start = ((*pstmt).stmt_location.max(0) as usize).min(bytes.len());
        let end = match (*pstmt).stmt_len {
            n if n > 0 => (start + n as usize).min(bytes.len()),
            _ => bytes.len(),
        };
        String::from_utf8_lossy(&bytes[start..end])
            .trim()
            .to_string()
    }
}

/// The relation a RangeVar names, if it exists (no lock taken: the statement takes its
/// own).
///
/// # Safety
/// Inside a transaction; `rv` is valid.
pub(super) unsafe fn resolve(rv: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    // SAFETY: a catalog lookup with missing_ok.
    let relid = unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    (relid != pg_sys::InvalidOid).then_some(relid)
}

/// A relation as the policy sees it: quoted name and whether it replicates.
fn table(relid: pg_sys::Oid) -> Table {
    Table {
        name: crate::pg::relcache::quoted_name(relid),
        replicates: crate::pg::relcache::why_not_target(relid).is_none(),
    }
}

/// Whether a relation (of any kind) is local-only: temporary, unlogged, or in a schema or
/// extension that never replicates (the replication rule, relkind aside).
fn local_only(relid: pg_sys::Oid) -> bool {
    crate::pg::relcache::why_local(relid).is_some()
}

/// Whether a RangeVar names a permanent relation (as written: a missing object is
/// judged by its persistence keyword and schema).
///
/// # Safety
/// `rv` is valid.
unsafe fn permanent(rv: *mut pg_sys::RangeVar) -> bool {
    // SAFETY: plain reads of the parse node.
    unsafe {
        if rv.is_null() {
            return true;
        }
        let schema = if (*rv).schemaname.is_null() {
            String::new()
        } else {
            CStr::from_ptr((*rv).schemaname)
                .to_string_lossy()
                .into_owned()
        };
        (*rv).relpersistence as u8 == pg_sys::RELPERSISTENCE_PERMANENT
            && schema != "bdr"
            && schema != "pg_temp"
    }
}

/// Other-kind objects named by a relation: `Other` unless local-only.
///
/// # Safety
/// Inside a transaction; `rv` valid or NULL.
unsafe fn other_on(rv: *mut pg_sys::RangeVar) -> Shape {
    // SAFETY: forwarded.
    unsafe {
        match (!rv.is_null()).then(|| resolve(rv)).flatten() {
            Some(relid) if local_only(relid) => Shape::NotReplicated,
            _ => Shape::Other,
        }
    }
}

/// Whether every subcommand of an ALTER TABLE adds a plain nullable column without a
/// default (no old-shaped row can be hurt: no drain needed).
///
/// # Safety
/// `cmds` is the statement's command list.
unsafe fn only_plain_add_column(cmds: *mut pg_sys::List) -> bool {
    // SAFETY: the list holds AlterTableCmd nodes; `def` of ADD COLUMN is a ColumnDef.
    unsafe {
        let cmds = PgList::<pg_sys::AlterTableCmd>::from_pg(cmds);
        !cmds.is_empty()
            && cmds.iter_ptr().all(|c| {
                let st = (*c).subtype;
                if st != pg_sys::AlterTableType::AT_AddColumn
                    && st != pg_sys::AlterTableType::AT_AddColumnRecurse
                {
                    return false;
                }
                let d = (*c).def as *mut pg_sys::ColumnDef;
                !d.is_null()
                    && (*d).raw_default.is_null()
                    && (*d).cooked_default.is_null()
                    && (*d).constraints.is_null()
                    && (*d).identity == 0
                    && (*d).generated == 0
                    && !(*d).is_not_null
            })
    }
}

/// The first subcommand of an ALTER TABLE of `relid` that fills existing rows with values
/// each node computes for itself: a column added with a default that is not immutable,
/// of a serial type or as an identity, or a type change USING an expression that is not
/// immutable (see `bdr_core::ddl::PerNodeValues`).
///
/// A USING expression names the table's columns, so telling whether it is immutable
/// needs the table open under the ALTER's own lock. Before the drain that lock would
/// block this node's apply workers, which the drain waits for: then (`after_drain`
/// false) any USING counts, and [`per_node_after_drain`] looks again once drained.
///
/// # Safety
/// Inside a transaction; `cmds` is the statement's command list.
unsafe fn per_node_values(
    relid: pg_sys::Oid,
    cmds: *mut pg_sys::List,
    after_drain: bool,
) -> Option<PerNodeValues> {
    use pg_sys::AlterTableType as At;
    // SAFETY: the list holds AlterTableCmd nodes; `def` of ADD COLUMN and of ALTER COLUMN
    // TYPE is a ColumnDef (for the latter, `raw_default` holds the USING expression).
    unsafe {
        for c in PgList::<pg_sys::AlterTableCmd>::from_pg(cmds).iter_ptr() {
            let d = (*c).def as *mut pg_sys::ColumnDef;
            if d.is_null() || (*d).type_ != pg_sys::NodeTag::T_ColumnDef {
                continue;
            }
            // ADD COLUMN names its column in the definition, ALTER COLUMN in the command.
            let column = match cstr((*d).colname) {
                n if n.is_empty() => cstr((*c).name),
                n => n,
            };
            match (*c).subtype {
                At::AT_AddColumn | At::AT_AddColumnRecurse => {
                    // ADD COLUMN IF NOT EXISTS of a column that is there adds nothing.
                    if (*c).missing_ok && !(*d).colname.is_null() {
                        let attnum = pg_sys::get_attnum(relid, (*d).colname);
                        if attnum != pg_sys::InvalidAttrNumber as pg_sys::AttrNumber {
                            continue;
                        }
                    }
                    if is_serial((*d).typeName) {
                        return Some(PerNodeValues::Serial { column });
                    }
                    let constraints = PgList::<pg_sys::Constraint>::from_pg((*d).constraints);
                    let of = |kind| constraints.iter_ptr().find(|k| (**k).contype == kind);
                    if (*d).identity != 0 || of(pg_sys::ConstrType::CONSTR_IDENTITY).is_some() {
                        return Some(PerNodeValues::Identity { column });
                    }
                    let default = match of(pg_sys::ConstrType::CONSTR_DEFAULT) {
                        Some(k) => (*k).raw_expr,
                        None => (*d).raw_default,
                    };
                    if !default.is_null() && mutable(default, None) {
                        return Some(PerNodeValues::Default { column });
                    }
                    if !default.is_null() && clock_literal(default, (*d).typeName) {
                        return Some(PerNodeValues::ClockLiteral { column });
                    }
                }
                At::AT_AlterColumnType
                    if !(*d).raw_default.is_null()
                        && (!after_drain || mutable((*d).raw_default, Some((relid, cmds)))) =>
                {
                    return Some(PerNodeValues::Using { column });
                }
                _ => {}
            }
        }
        None
    }
}

/// [`per_node_values`] of an ALTER TABLE, asked again once its tables are drained:
/// whether it still fills existing rows with values each node computes for itself.
///
/// # Safety
/// Inside a transaction; `stmt` is a valid parse tree node.
pub(super) unsafe fn per_node_after_drain(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the node tag says which struct it is; forwarded.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return false;
        }
        let a = stmt as *mut pg_sys::AlterTableStmt;
        resolve((*a).relation)
            .is_some_and(|relid| per_node_values(relid, (*a).cmds, true).is_some())
    }
}

/// Whether an ALTER SEQUENCE's options set where it counts from or by how much.
///
/// # Safety
/// `options` is NULL or a list of DefElem nodes.
unsafe fn sets_values(options: *mut pg_sys::List) -> bool {
    // SAFETY: the list holds DefElem nodes with NUL-terminated names.
    unsafe {
        PgList::<pg_sys::DefElem>::from_pg(options)
            .iter_ptr()
            .any(|d| {
                matches!(
                    cstr((*d).defname).as_str(),
                    "restart" | "start" | "increment" | "minvalue" | "maxvalue"
                )
            })
    }
}

/// Whether a type name is one of the serial pseudo-types (as PostgreSQL recognises them
/// when it expands `serial` into a sequence and a `nextval()` default).
///
/// # Safety
/// `t` is NULL or a valid TypeName.
unsafe fn is_serial(t: *mut pg_sys::TypeName) -> bool {
    // SAFETY: plain reads of the parse node; its names are String nodes.
    unsafe {
        if t.is_null() || (*t).pct_type {
            return false;
        }
        let names = PgList::<pg_sys::String>::from_pg((*t).names);
        let parts: Vec<String> = names.iter_ptr().map(|n| cstr((*n).sval)).collect();
        let name = match parts.as_slice() {
            [n] => n,
            [schema, n] if schema == "pg_catalog" => n,
            _ => return false,
        };
        matches!(
            name.as_str(),
            "smallserial" | "serial2" | "serial" | "serial4" | "bigserial" | "serial8"
        )
    }
}

/// Whether a raw column default is a date/time literal read from the clock as the
/// statement runs (`bdr_core::ddl::reads_clock`): `'now'` for a column of a date/time type
/// (or a domain over one), or `'today'::date`. PostgreSQL turns it into a constant while
/// transforming it, so [`mutable`] cannot see it.
///
/// # Safety
/// Inside a transaction; `raw` is a valid raw expression, `column_type` NULL or a valid
/// TypeName.
unsafe fn clock_literal(raw: *mut pg_sys::Node, column_type: *mut pg_sys::TypeName) -> bool {
    use pg_sys::NodeTag::{T_A_Const, T_String, T_TypeCast};
    // SAFETY: each cast follows the node's tag; an A_Const's `val` is a String node when
    // its tag says so.
    unsafe {
        let (literal, ty) = match (*raw).type_ {
            T_A_Const => (raw as *mut pg_sys::A_Const, column_type),
            T_TypeCast => {
                let cast = raw as *mut pg_sys::TypeCast;
                if (*cast).arg.is_null() || (*(*cast).arg).type_ != T_A_Const {
                    return false;
                }
                ((*cast).arg as *mut pg_sys::A_Const, (*cast).typeName)
            }
            _ => return false,
        };
        if (*literal).isnull || (*literal).val.node.type_ != T_String {
            return false;
        }
        bdr_core::ddl::reads_clock(&cstr((*literal).val.sval.sval)) && is_date_time(ty)
    }
}

/// Whether a type name names a date/time type, or a domain over one (a name that names no
/// type: no; the statement then fails as PostgreSQL says).
///
/// # Safety
/// Inside a transaction; `t` is NULL or a valid TypeName.
unsafe fn is_date_time(t: *mut pg_sys::TypeName) -> bool {
    if t.is_null() {
        return false;
    }
    // SAFETY: a cache lookup that returns NULL when missing_ok; the tuple is released.
    let oid = unsafe {
        let mut typmod = 0;
        let tuple = pg_sys::LookupTypeName(std::ptr::null_mut(), t, &mut typmod, true);
        if tuple.is_null() {
            return false;
        }
        let oid = pg_sys::typeTypeId(tuple);
        pg_sys::ReleaseSysCache(tuple);
        pg_sys::getBaseType(oid)
    };
    [
        pg_sys::DATEOID,
        pg_sys::TIMEOID,
        pg_sys::TIMETZOID,
        pg_sys::TIMESTAMPOID,
        pg_sys::TIMESTAMPTZOID,
    ]
    .contains(&oid)
}

/// Whether a raw (untransformed) expression calls anything that is not immutable, once
/// transformed as PostgreSQL will: a column default (no table in scope), or with
/// `using = Some((relid, cmds))` an ALTER COLUMN TYPE's USING expression over the table's
/// columns. For the latter the table is opened with the lock the ALTER TABLE takes
/// anyway (`AlterTableGetLockLevel`), so the statement does not upgrade a weaker one.
/// Errors in the expression are PostgreSQL's own, as the statement would raise them.
///
/// # Safety
/// Inside a transaction; `raw` is a valid raw expression.
unsafe fn mutable(raw: *mut pg_sys::Node, using: Option<(pg_sys::Oid, *mut pg_sys::List)>) -> bool {
    // SAFETY: the expression is copied before transformation (which may scribble on its
    // input); the relation, if any, is opened under a lock kept to the transaction's end.
    unsafe {
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        let kind = match using {
            None => pg_sys::ParseExprKind::EXPR_KIND_COLUMN_DEFAULT,
            Some((relid, cmds)) => {
                let rel = pg_sys::relation_open(relid, pg_sys::AlterTableGetLockLevel(cmds));
                let item = pg_sys::addRangeTableEntryForRelation(
                    pstate,
                    rel,
                    pg_sys::AccessShareLock as i32,
                    std::ptr::null_mut(),
                    false,
                    true,
                );
                pg_sys::addNSItemToQuery(pstate, item, false, true, true);
                pg_sys::relation_close(rel, pg_sys::NoLock as i32);
                pg_sys::ParseExprKind::EXPR_KIND_ALTER_COL_TRANSFORM
            }
        };
        let copy = pg_sys::copyObjectImpl(raw as *const std::ffi::c_void) as *mut pg_sys::Node;
        let expr = pg_sys::transformExpr(pstate, copy, kind);
        let mutable = pg_sys::contain_mutable_functions(expr);
        pg_sys::free_parsestate(pstate);
        mutable
    }
}

/// A C string of a parse node, or empty.
///
/// # Safety
/// `s` is NULL or NUL-terminated.
unsafe fn cstr(s: *const c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: NUL-terminated, as the caller says.
    unsafe { CStr::from_ptr(s).to_string_lossy().into_owned() }
}

/// Describe a utility statement for the policy.
///
/// # Safety
/// Inside a transaction; `stmt` is a valid parse tree node.
pub(super) unsafe fn describe(stmt: *mut pg_sys::Node) -> Shape {
    use pg_sys::NodeTag::*;
    use pg_sys::ObjectType::*;
    if stmt.is_null() {
        return Shape::NotReplicated;
    }
    // SAFETY: each cast follows the node's tag.
    unsafe {
        match (*stmt).type_ {
            T_CreateStmt => Shape::Create {
                permanent: permanent((*(stmt as *mut pg_sys::CreateStmt)).relation),
            },
            T_CreateTableAsStmt => {
                let c = stmt as *mut pg_sys::CreateTableAsStmt;
                let permanent = (*c).into.is_null() || permanent((*(*c).into).rel);
                if (*c).objtype == OBJECT_MATVIEW {
                    Shape::Create { permanent }
                } else {
                    Shape::CreateTableAs { permanent }
                }
            }
            T_CreateSeqStmt => Shape::Create {
                permanent: permanent((*(stmt as *mut pg_sys::CreateSeqStmt)).sequence),
            },
            T_ViewStmt => Shape::Create {
                permanent: permanent((*(stmt as *mut pg_sys::ViewStmt)).view),
            },
            T_IndexStmt => {
                let i = stmt as *mut pg_sys::IndexStmt;
                if (*i).concurrent {
                    return Shape::Concurrently;
                }
                Shape::Create {
                    permanent: resolve((*i).relation).is_some_and(|r| !local_only(r)),
                }
            }
            T_AlterTableStmt => {
                let a = stmt as *mut pg_sys::AlterTableStmt;
                let Some(relid) = resolve((*a).relation) else {
                    return Shape::NotReplicated; // it fails (or IF EXISTS skips) here
                };
                if (*a).objtype == OBJECT_TABLE || (*a).objtype == OBJECT_FOREIGN_TABLE {
                    let t = table(relid);
                    let per_node = if t.replicates {
                        per_node_values(relid, (*a).cmds, false)
                    } else {
                        None
                    };
                    Shape::Change {
                        tables: vec![t],
                        safe: only_plain_add_column((*a).cmds),
                        per_node,
                    }
                } else if local_only(relid) {
                    Shape::NotReplicated
                } else {
                    Shape::Other
                }
            }
            T_DropStmt => describe_drop(stmt as *mut pg_sys::DropStmt),
            T_RenameStmt => describe_rename(stmt as *mut pg_sys::RenameStmt),
            T_CreateTrigStmt => other_on((*(stmt as *mut pg_sys::CreateTrigStmt)).relation),
            T_CreatePolicyStmt => other_on((*(stmt as *mut pg_sys::CreatePolicyStmt)).table),
            T_AlterPolicyStmt => other_on((*(stmt as *mut pg_sys::AlterPolicyStmt)).table),
            T_RuleStmt => other_on((*(stmt as *mut pg_sys::RuleStmt)).relation),
            T_AlterSeqStmt => {
                let a = stmt as *mut pg_sys::AlterSeqStmt;
                match other_on((*a).sequence) {
                    Shape::Other if sets_values((*a).options) => Shape::SequenceValues,
                    shape => shape,
                }
            }
            T_CommentStmt
            | T_GrantStmt
            | T_CreateSchemaStmt
            | T_CreateFunctionStmt
            | T_AlterFunctionStmt
            | T_DefineStmt
            | T_CompositeTypeStmt
            | T_CreateEnumStmt
            | T_AlterEnumStmt
            | T_CreateDomainStmt
            | T_AlterDomainStmt
            | T_AlterObjectSchemaStmt
            | T_AlterOwnerStmt
            | T_AlterDefaultPrivilegesStmt
            | T_RefreshMatViewStmt
            | T_CreateCastStmt
            | T_AlterTypeStmt => Shape::Other,
            _ => Shape::NotReplicated,
        }
    }
}

/// [`describe`] of a DROP.
///
/// # Safety
/// Inside a transaction; `d` is a valid DropStmt.
unsafe fn describe_drop(d: *mut pg_sys::DropStmt) -> Shape {
    use pg_sys::ObjectType::*;
    // SAFETY: the statement's lists hold name lists (relations) or String nodes (schemas).
    unsafe {
        if (*d).concurrent {
            return Shape::Concurrently;
        }
        let rt = (*d).removeType;
        let rels = || -> Vec<pg_sys::Oid> {
            PgList::<pg_sys::List>::from_pg((*d).objects)
                .iter_ptr()
                .filter_map(|names| resolve(pg_sys::makeRangeVarFromNameList(names)))
                .collect()
        };
        match rt {
            OBJECT_TABLE | OBJECT_FOREIGN_TABLE => {
                let tables: Vec<Table> = rels().into_iter().map(table).collect();
                if tables.is_empty() {
                    Shape::NotReplicated
                } else {
                    Shape::Change {
                        tables,
                        safe: false,
                        per_node: None,
                    }
                }
            }
            OBJECT_INDEX | OBJECT_SEQUENCE | OBJECT_VIEW | OBJECT_MATVIEW => {
                let r = rels();
                if !r.is_empty() && r.iter().all(|&x| local_only(x)) {
                    Shape::NotReplicated
                } else {
                    Shape::Other
                }
            }
            OBJECT_EXTENSION => Shape::NotReplicated,
            OBJECT_SCHEMA => {
                let bdr = PgList::<pg_sys::Node>::from_pg((*d).objects)
                    .iter_ptr()
                    .any(|n| {
                        let s = (*(n as *mut pg_sys::String)).sval;
                        !s.is_null() && CStr::from_ptr(s).to_bytes() == b"bdr"
                    });
                if bdr {
                    Shape::NotReplicated
                } else {
                    Shape::Other
                }
            }
            _ => Shape::Other,
        }
    }
}

/// [`describe`] of a RENAME.
///
/// # Safety
/// Inside a transaction; `r` is a valid RenameStmt.
unsafe fn describe_rename(r: *mut pg_sys::RenameStmt) -> Shape {
    use pg_sys::ObjectType::*;
    // SAFETY: plain reads of the parse node; the relation is resolved with missing_ok.
    unsafe {
        let renames_table_shape =
            matches!(
                (*r).renameType,
                OBJECT_TABLE | OBJECT_COLUMN | OBJECT_TABCONSTRAINT
            ) && matches!((*r).relationType, OBJECT_TABLE | OBJECT_FOREIGN_TABLE)
                || (*r).renameType == OBJECT_TABLE;
        match (!(*r).relation.is_null())
            .then(|| resolve((*r).relation))
            .flatten()
        {
            Some(relid) if renames_table_shape => Shape::Change {
                tables: vec![table(relid)],
                safe: false,
                per_node: None,
            },
            Some(relid) if local_only(relid) => Shape::NotReplicated,
            _ => Shape::Other,
        }
    }
}

//! Catalog facts of local tables that the write stage maps peers' rows onto: lookup by
//! name, attributes, type input functions, names for messages.
//!
//! Invariant: every function here reads catalogs, so each checks a transaction is open
//! (an ERROR otherwise, never a crash).

use crate::pg::memcxt::MemCxt;
use pgrx::pg_sys;
use std::ffi::{c_char, CStr, CString};

/// What the mapping code needs to know about a local table's attributes.
#[derive(Debug, Clone)]
pub struct LocalAttr {
    pub name: String,
    pub dropped: bool,
    pub generated: bool,
    pub typid: pg_sys::Oid,
    pub typmod: i32,
}

/// A type's input function, resolved once.
pub struct InputFn {
    flinfo: Box<pg_sys::FmgrInfo>,
    typioparam: pg_sys::Oid,
    typmod: i32,
}

impl InputFn {
    /// # Preconditions
    /// Catalog access must be allowed (inside a transaction).
    pub fn new(typid: pg_sys::Oid, typmod: i32, cxt: &MemCxt) -> InputFn {
        crate::pg::xact::require_transaction();
        // SAFETY: forwarded; the FmgrInfo lives in a Box for as long as this value.
        unsafe {
            let mut func = pg_sys::InvalidOid;
            let mut typioparam = pg_sys::InvalidOid;
            pg_sys::getTypeInputInfo(typid, &mut func, &mut typioparam);
            let mut flinfo: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
            pg_sys::fmgr_info_cxt(func, &mut *flinfo, cxt.raw());
            InputFn {
                flinfo,
                typioparam,
                typmod,
            }
        }
    }

    /// Convert a text form into a datum in the current memory context.
    ///
    /// # Preconditions
    /// Inside a transaction; errors are raised as PostgreSQL errors.
    pub fn call(&self, text: &str) -> pg_sys::Datum {
        if text.as_bytes().contains(&0) {
            crate::error::raise(&crate::error::ApplyError::NulInText);
        }
        // The NUL-terminated copy goes into a buffer kept for the process, not a new
        // allocation per value (two to three per applied row).
        thread_local! {
            static TEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        TEXT.with(|t| {
            let mut t = t.borrow_mut();
            t.clear();
            t.extend_from_slice(text.as_bytes());
            t.push(0);
            let (flinfo, text) = (&*self.flinfo as *const _ as *mut _, t.as_mut_ptr());
            let (typioparam, typmod) = (self.typioparam, self.typmod);
            // SAFETY: flinfo was set up by fmgr_info_cxt; the buffer is NUL-terminated
            // with no NUL before (checked above); input functions copy what they keep.
            // The guarded closure holds pointers and plain values only.
            unsafe {
                crate::pg::unguarded::guarded(|| {
                    crate::pg::unguarded::raw::InputFunctionCall(
                        flinfo,
                        text as *mut c_char,
                        typioparam,
                        typmod,
                    )
                })
            }
        })
    }
}

/// Look up a table by schema and name; `None` if there is none.
///
/// # Preconditions
/// Inside a transaction.
pub fn find_table(schema: &str, name: &str) -> Option<pg_sys::Oid> {
    crate::pg::xact::require_transaction();
    let s = CString::new(schema).ok()?;
    let n = CString::new(name).ok()?;
    // SAFETY: catalog lookups with valid C strings.
    unsafe {
        let nsp = pg_sys::get_namespace_oid(s.as_ptr(), true);
        if nsp == pg_sys::InvalidOid {
            return None;
        }
        let rel = pg_sys::get_relname_relid(n.as_ptr(), nsp);
        (rel != pg_sys::InvalidOid).then_some(rel)
    }
}

/// The attributes of a table, in attribute order (index = attnum - 1).
///
/// # Preconditions
/// Inside a transaction; `relid` exists.
pub fn table_attrs(relid: pg_sys::Oid) -> Vec<LocalAttr> {
    crate::pg::xact::require_transaction();
    // SAFETY: the relation is opened and closed here; the descriptor is read while open.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as i32);
        let desc = (*rel).rd_att;
        let attrs = (0..(*desc).natts as usize)
            .map(|i| {
                let a = &*(*desc).attrs.as_ptr().add(i);
                LocalAttr {
                    name: CStr::from_ptr(a.attname.data.as_ptr())
                        .to_string_lossy()
                        .into_owned(),
                    dropped: a.attisdropped,
                    generated: a.attgenerated != 0,
                    typid: a.atttypid,
                    typmod: a.atttypmod,
                }
            })
            .collect();
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        attrs
    }
}

/// "schema.name" of a relation, for messages.
///
/// # Preconditions
/// Inside a transaction.
pub fn relation_name(relid: pg_sys::Oid) -> String {
    crate::pg::xact::require_transaction();
    // SAFETY: catalog lookups; NULL results (a dropped relation) are handled.
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        let s = |p: *mut c_char| {
            if p.is_null() {
                "?".to_string()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        format!("{}.{}", s(nsp), s(name))
    }
}

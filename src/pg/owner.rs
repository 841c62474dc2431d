//! Acting as a table's owner: the role switch every write of the apply worker runs under,
//! and what the owner may do to its table.
//!
//! Invariant: code a table's owner wrote (triggers, CHECK and index expressions, defaults,
//! domain input functions) runs as that owner inside a security-restricted operation, and
//! the user and security context are restored also when an error unwinds through.

use pgrx::pg_sys;
use std::ffi::CStr;

/// Restores the user and security context saved by [`as_user`], also when an error
/// unwinds through it.
struct RestoreUser(pg_sys::Oid, i32);

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores the values read by GetUserIdAndSecContext (cannot raise).
        unsafe { crate::pg::unguarded::SetUserIdAndSecContext(self.0, self.1) };
    }
}

/// Run `f` as `role`, inside a security-restricted operation (no SET ROLE, no temp
/// objects, no session-level changes; see `SECURITY_RESTRICTED_OPERATION`).
pub fn as_user<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    switch_user(
        role,
        pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION,
        f,
    )
}

/// Run `f` as `role` with `flags` added to the security context; both restored after,
/// also when an error unwinds through.
pub fn switch_user<R>(role: pg_sys::Oid, flags: u32, f: impl FnOnce() -> R) -> R {
    let (mut user, mut sec) = (pg_sys::InvalidOid, 0);
    // SAFETY: plain reads and writes of the backend's current user and context (they
    // cannot raise, so no guard is needed).
    unsafe {
        crate::pg::unguarded::GetUserIdAndSecContext(&mut user, &mut sec);
        crate::pg::unguarded::SetUserIdAndSecContext(role, sec | flags as i32);
    }
    let _restore = RestoreUser(user, sec);
    f()
}

/// The owner of `relid`, and whether that owner may insert, update and delete in it and
/// is exempt from its row-level security; `None` if the table is gone.
///
/// # Preconditions
/// Inside a transaction.
pub fn owner_rights(relid: pg_sys::Oid) -> Option<OwnerRights> {
    crate::pg::xact::require_transaction();
    // SAFETY: syscache lookups inside a transaction.
    unsafe {
        let owner = rel_owner(relid)?;
        let may = |mode: u32| {
            pg_sys::pg_class_aclcheck(relid, owner, mode as pg_sys::AclMode)
                == pg_sys::AclResult::ACLCHECK_OK
        };
        let rls = pg_sys::check_enable_rls(relid, owner, true)
            == pg_sys::CheckEnableRlsResult::RLS_ENABLED as i32;
        let name = pg_sys::GetUserNameFromId(owner, true);
        Some(OwnerRights {
            owner,
            name: if name.is_null() {
                owner.to_u32().to_string()
            } else {
                CStr::from_ptr(name).to_string_lossy().into_owned()
            },
            insert: may(pg_sys::ACL_INSERT),
            update: may(pg_sys::ACL_UPDATE),
            delete: may(pg_sys::ACL_DELETE),
            truncate: may(pg_sys::ACL_TRUNCATE),
            row_security: rls,
        })
    }
}

/// See [`owner_rights`].
#[derive(Debug, Clone)]
pub struct OwnerRights {
    pub owner: pg_sys::Oid,
    pub name: String,
    pub insert: bool,
    pub update: bool,
    pub delete: bool,
    pub truncate: bool,
    /// Row-level security applies to the owner (FORCE ROW LEVEL SECURITY).
    pub row_security: bool,
}

/// # Safety
/// Inside a transaction.
unsafe fn rel_owner(relid: pg_sys::Oid) -> Option<pg_sys::Oid> {
    // SAFETY: a syscache lookup, released before returning.
    unsafe {
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tup.is_null() {
            return None;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup);
        let owner = (*form).relowner;
        pg_sys::ReleaseSysCache(tup);
        Some(owner)
    }
}

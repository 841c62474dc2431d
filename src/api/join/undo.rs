//! What a join did on the members and locally, undone from `Drop` if it fails: the
//! join's slots, catalog rows, the source's pause, J's origins and slots, and the rows its
//! copy committed (the copy commits as it goes).
//!
//! Invariant: a failed join leaves no slot, origin, catalog row or copied row behind (a
//! FATAL skips `Drop`; then the members' janitors and the pause's time limit clean up).

use crate::catalog::nodes::Node;
use crate::catalog::{DROP_ORIGIN_SQL, DROP_SLOT_SQL};
use crate::pg::libpq::Conn;

/// A member reached during a join.
pub(super) struct Member {
    pub node: Node,
    pub conn: Conn,
    pub dboid: u32,
}

/// What a join did remotely, undone if it fails.
pub(super) struct Undo {
    pub joining: String,
    /// (member dsn, slot name)
    pub slots: Vec<(String, String)>,
    /// member dsns where J was registered
    pub registered: Vec<String>,
    /// J's own dsn, for its local slots and origins
    pub local_dsn: String,
    pub local_slots: Vec<String>,
    pub local_origins: Vec<String>,
    /// the join source while its apply is paused
    pub paused: Option<String>,
    /// J's copying session (backend pid) and the tables it may have written: the copy
    /// commits as it goes, so a failed join ends that session and empties them again
    pub copy_pid: Option<i32>,
    pub copied_tables: Vec<String>,
    pub done: bool,
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(d) = &self.paused {
            if let Ok(mut c) = Conn::connect(d, "bdr_join_undo") {
                let _ = c.exec("SELECT bdr.apply_resume()");
            }
        }
        if self.done {
            return;
        }
        for (d, slot) in &self.slots {
            if let Ok(mut c) = Conn::connect(d, "bdr_join_undo") {
                let _ = c.exec_params(DROP_SLOT_SQL, &[slot]);
            }
        }
        for d in &self.registered {
            if let Ok(mut c) = Conn::connect(d, "bdr_join_undo") {
                let _ = c.exec_params(
                    "DELETE FROM bdr.nodes WHERE node_name = $1",
                    &[&self.joining],
                );
            }
        }
        if let Ok(mut c) = Conn::connect(&self.local_dsn, "bdr_join_undo") {
            if let Some(pid) = self.copy_pid {
                // Its open transaction would block the TRUNCATE, and it holds an origin.
                let _ = c.exec(&format!("SELECT pg_terminate_backend({pid}, 10000)"));
                if !self.copied_tables.is_empty() {
                    let _ = c.exec(&format!(
                        "SET session_replication_role = replica; TRUNCATE {}; \
                         DELETE FROM bdr.tombstones",
                        self.copied_tables.join(", ")
                    ));
                }
            }
            for slot in &self.local_slots {
                let _ = c.exec_params(DROP_SLOT_SQL, &[slot]);
            }
            for o in &self.local_origins {
                let _ = c.exec_params(DROP_ORIGIN_SQL, &[o]);
            }
        }
    }
}

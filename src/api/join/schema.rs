//! Step 6's schema half: the join source's schema, as of the join snapshot, copied into
//! the joining node with `pg_dump --schema-only --snapshot` piped into `psql` (no
//! publications; the extension's own objects are left out), owners and privileges
//! included: the joined node's objects belong to the roles they belong to on every other
//! member (an application role can write there, a replicated `ALTER TABLE` of a table's
//! owner runs there as that owner, and apply runs as it). Until session 29 they were
//! copied without (`--no-owner --no-privileges`): the joining role owned everything.
//!
//! Invariant: passwords never reach a command line or an error message (the DSN goes
//! through a private temporary service file; errors are redacted).

use bdr_core::dsn;

/// A client program (`pg_dump`, `psql`) connecting with `dsn`, with no secret on its
/// command line (every local user can read it in `/proc`): see [`dsn::for_client`]. The
/// returned guard removes the 0600 service file, if one was needed, when dropped.
fn client_command(
    program: &str,
    dsn_text: &str,
) -> Result<(std::process::Command, Option<TempFile>), String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "bdr_client_{}_{}.conf",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    let conn = dsn::for_client(dsn_text, &path.to_string_lossy())?;
    let file = match &conn.service_file {
        Some(text) => Some(TempFile::create(path, text)?),
        None => None,
    };
    let mut cmd = std::process::Command::new(crate::pg::bgw::pg_bindir().join(program));
    cmd.envs(conn.env.iter().map(|(k, v)| (k, v)));
    cmd.arg("-d").arg(conn.argv_dsn);
    Ok((cmd, file))
}

/// A file only this OS user can read, removed when dropped.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn create(path: std::path::PathBuf, text: &str) -> Result<TempFile, String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        let file = TempFile(path);
        f.write_all(text.as_bytes())
            .map_err(|e| format!("writing {}: {e}", file.0.display()))?;
        Ok(file)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Copy the schema of `source_dsn` (as of `snapshot`) into `target_dsn`.
pub(super) fn copy_schema(
    source_dsn: &str,
    target_dsn: &str,
    snapshot: &str,
) -> Result<(), String> {
    use std::process::Stdio;
    let (mut dump, _dump_secrets) = client_command("pg_dump", source_dsn)?;
    let (mut restore, _restore_secrets) = client_command("psql", target_dsn)?;
    // The copied schema is already on every member: it must not be replicated again.
    restore.env("PGOPTIONS", "-c bdr.ddl_replication=off");
    let mut dump = dump
        .args([
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            "--exclude-schema=bdr",
        ])
        .arg(format!("--snapshot={snapshot}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("pg_dump: {e}"))?;
    let restore = restore
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(dump.stdout.take().expect("piped"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("psql: {e}"))?;
    let dumped = dump
        .wait_with_output()
        .map_err(|e| format!("pg_dump: {e}"))?;
    if !dumped.status.success() {
        return Err(format!(
            "pg_dump failed: {}",
            String::from_utf8_lossy(&dumped.stderr).trim()
        ));
    }
    if !restore.status.success() {
        return Err(format!(
            "restoring the schema failed (every role that owns or was granted an object \
             there must exist here: roles do not replicate): {}",
            String::from_utf8_lossy(&restore.stderr).trim()
        ));
    }
    Ok(())
}

//! libpq, for the connections the extension makes itself: apply workers streaming from a
//! peer's walsender, and `group_join` talking to the members.
//!
//! Why libpq (through `pq-sys`) and not a Rust client: it is the library PostgreSQL's own
//! walreceiver uses inside a backend, it speaks the replication sub-protocol, and it has no
//! runtime of its own, so waiting happens on our latch and socket (`WaitLatchOrSocket`) and
//! SIGTERM or a config reload interrupt a wait at once.
//!
//! Connections are made (`PQconnectStart`, `PQconnectPoll`; a DSN of several hosts one
//! host after the other) and statements sent and their answers awaited (`PQsendQuery`)
//! the same way, on the socket and the latch, never with libpq's blocking calls:
//! a peer that accepts and never answers, or whose link hangs after the connection was
//! made (a stalled proxy or firewall; TCP alone notices only much later), cannot hold the
//! process. A backend's wait ends with its cancel or `statement_timeout`; a background
//! worker's also after [`Conn::timeout`] without an answer (`wal_receiver_timeout` by
//! default, as PostgreSQL's own walreceiver), and at SIGTERM; a connect's also after
//! `connect_timeout`.
//!
//! Invariants: a [`Conn`] is closed (`PQfinish`) when dropped; every error message that
//! may include the DSN is built from [`bdr_core::dsn::redact`]ed text.

use bdr_core::dsn;
use pgrx::pg_sys;
use pq_sys as pq;
use std::collections::VecDeque;
use std::ffi::{c_char, c_int, CStr, CString};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, thiserror::Error)]
pub enum LibpqError {
    #[error("could not connect to \"{dsn}\": {message}")]
    Connect { dsn: String, message: String },
    #[error("{message}")]
    Query {
        sqlstate: Option<String>,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("connection to \"{dsn}\" lost: {message}")]
    Lost { dsn: String, message: String },
    #[error("no answer from \"{dsn}\" within {ms} ms (the link may hang)")]
    Timeout { dsn: String, ms: u128 },
    #[error("stopped on request while waiting for \"{dsn}\"")]
    Stopping { dsn: String },
}

impl LibpqError {
    /// Whether the server answered with SQLSTATE `code` (the message itself may be in the
    /// server's language).
    pub fn has_sqlstate(&self, code: &str) -> bool {
        matches!(self, LibpqError::Query { sqlstate, .. } if sqlstate.as_deref() == Some(code))
    }
}

/// A row of text values (NULL as None).
pub type Row = Vec<Option<String>>;

/// What a statement came to: its rows, or why not.
pub type Answer = Result<Vec<Row>, LibpqError>;

/// One CopyData message's bytes, in the buffer libpq allocated for it (freed with
/// `PQfreemem` on drop). Not copied: a protocol version 3 write is up to ~64 KiB, and a
/// copy per message was a second buffer that size, and a memcpy, for nothing.
pub struct PqBuf {
    ptr: *mut c_char,
    len: usize,
}

impl std::ops::Deref for PqBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: libpq returned `len` bytes at `ptr`, owned by us until drop.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for PqBuf {
    fn drop(&mut self) {
        // SAFETY: allocated by PQgetCopyData, freed once, here.
        unsafe { pq::PQfreemem(self.ptr as *mut std::ffi::c_void) };
    }
}

/// What `get_copy_data` found.
pub enum CopyData {
    Data(PqBuf),
    WouldBlock,
    Done,
}

pub struct Conn {
    raw: *mut pq::PGconn,
    safe_dsn: String,
    /// Longest wait for an answer (a statement's result, the next COPY data of a blocking
    /// read); `None`: no limit but the backend's own cancel and `statement_timeout`.
    timeout: Option<Duration>,
}

/// The default [`Conn::timeout`]: `wal_receiver_timeout` in a background worker (0: none),
/// none in a backend (its user can cancel, and has `statement_timeout`).
fn default_timeout() -> Option<Duration> {
    // SAFETY: a plain read of a setting's global.
    let ms = unsafe { pg_sys::wal_receiver_timeout };
    (crate::pg::bgw::in_background_worker() && ms > 0).then(|| Duration::from_millis(ms as u64))
}

fn cstr_lossy(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libpq returns NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }
        .to_string_lossy()
        .trim_end()
        .to_owned()
}

/// A connection [`connect_many`] is making.
struct Making {
    /// Its place in the caller's list.
    index: usize,
    conn: Conn,
    /// What `PQconnectPoll` last asked to wait for.
    status: pq::PostgresPollingStatusType,
    /// `connect_timeout` (`None`: no limit), for each host.
    limit: Option<Duration>,
    /// This host's `connect_timeout`'s end.
    deadline: Option<Instant>,
    /// The hosts still to try when this one fails (a DSN naming several), in order.
    next: VecDeque<CString>,
    /// Why each host tried before failed.
    failed: Vec<String>,
}

impl Making {
    /// The error of a connect that failed: why at each host tried, `last` the last one's.
    fn failure(self, last: Option<String>) -> LibpqError {
        LibpqError::Connect {
            dsn: self.conn.safe_dsn.clone(),
            message: self
                .failed
                .into_iter()
                .chain(last)
                .collect::<Vec<_>>()
                .join("; "),
        }
    }

    /// The end of this attempt, if it has ended: made, failed, or out of time.
    fn ended(&self, now: Instant) -> Option<Result<(), String>> {
        use pq::PostgresPollingStatusType::*;
        match self.status {
            PGRES_POLLING_OK => Some(Ok(())),
            PGRES_POLLING_FAILED => Some(Err(self.conn.error_message())),
            _ if self.deadline.is_some_and(|d| now >= d) => Some(Err(self.conn.timed_out())),
            _ if self.conn.socket() < 0 => Some(Err(self.conn.error_message())),
            _ => None,
        }
    }
}

/// Connect to every one of `conninfos` at once (see [`Conn::connect`], which each
/// connection behaves as); the results are in the same order. A group operation that must
/// reach every member, or the supervisor's quorum probe, then waits for the slowest
/// member's `connect_timeout` once, not for each unreachable member's in turn.
pub fn connect_many(conninfos: &[String], application_name: &str) -> Vec<Result<Conn, LibpqError>> {
    use pq::PostgresPollingStatusType::*;
    let mut out: Vec<Option<Result<Conn, LibpqError>>> = conninfos.iter().map(|_| None).collect();
    let mut making = Vec::new();
    for (index, conninfo) in conninfos.iter().enumerate() {
        match Conn::start(conninfo, application_name) {
            Err(e) => out[index] = Some(Err(e)),
            Ok((conn, limit, next)) => making.push(Making {
                index,
                conn,
                // After PQconnectStart, as if PQconnectPoll had asked to wait for writing.
                status: PGRES_POLLING_WRITING,
                limit,
                deadline: limit.map(|t| Instant::now() + t),
                next,
                failed: Vec::new(),
            }),
        }
    }
    while !making.is_empty() {
        let now = Instant::now();
        let mut i = 0;
        while i < making.len() {
            let m = &mut making[i];
            match m.ended(now) {
                None => i += 1,
                Some(Err(why)) if !m.next.is_empty() => {
                    m.failed.push(why);
                    // On to the next host that starts, as libpq's blocking connect would.
                    let mut started = false;
                    while let Some(c) = m.next.pop_front() {
                        match Conn::start_raw(&c, &m.conn.safe_dsn) {
                            Ok(conn) => {
                                m.conn = conn;
                                m.status = PGRES_POLLING_WRITING;
                                m.deadline = m.limit.map(|t| Instant::now() + t);
                                started = true;
                                break;
                            }
                            Err(LibpqError::Connect { message, .. }) => m.failed.push(message),
                            Err(e) => m.failed.push(e.to_string()),
                        }
                    }
                    if !started {
                        // Every host failed; the last one's reason is in `failed`.
                        let m = making.swap_remove(i);
                        let index = m.index;
                        out[index] = Some(Err(m.failure(None)));
                    }
                }
                Some(end) => {
                    let m = making.swap_remove(i);
                    let index = m.index;
                    out[index] = Some(match end {
                        Ok(()) => Ok(m.conn),
                        Err(why) => Err(m.failure(Some(why))),
                    });
                }
            }
        }
        if making.is_empty() {
            break;
        }
        let left = making
            .iter()
            .filter_map(|m| m.deadline)
            .min()
            .map_or(Duration::from_secs(1), |d| d.saturating_duration_since(now));
        let sockets: Vec<(i32, bool)> = making
            .iter()
            .map(|m| (m.conn.socket(), m.status == PGRES_POLLING_WRITING))
            .collect();
        let (ready, stop) = crate::pg::bgw::wait_sockets(&sockets, left);
        if stop {
            for m in making.drain(..) {
                out[m.index] = Some(Err(LibpqError::Stopping {
                    dsn: m.conn.safe_dsn.clone(),
                }));
            }
            break;
        }
        for (m, ready) in making.iter_mut().zip(ready) {
            // Only once the socket is ready: libpq takes a call before it as the
            // connection's progress (a connect still under way reads as made).
            if ready {
                // SAFETY: a started connection, owned by m.
                m.status = unsafe { pq::PQconnectPoll(m.conn.raw) };
            }
        }
    }
    out.into_iter()
        .map(|r| r.expect("every connection has a result"))
        .collect()
}

/// A statement with text parameters `$1`, `$2`, ..., ready to send.
struct Statement {
    sql: CString,
    values: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl Statement {
    fn new(sql: &str, params: &[&str]) -> Result<Statement, LibpqError> {
        let values: Vec<CString> = params
            .iter()
            .map(|p| CString::new(*p))
            .collect::<Result<_, _>>()
            .map_err(|_| LibpqError::Query {
                sqlstate: None,
                message: "a query parameter contains a NUL byte".into(),
                detail: None,
                hint: None,
            })?;
        let ptrs = values.iter().map(|v| v.as_ptr()).collect();
        Ok(Statement {
            sql: CString::new(sql).expect("SQL without NUL bytes"),
            values,
            ptrs,
        })
    }

    /// `PQsendQueryParams` on `raw`: 1 when sent.
    fn send(&self, raw: *mut pq::PGconn) -> c_int {
        debug_assert_eq!(self.ptrs.len(), self.values.len());
        // SAFETY: `raw` is a connection; `ptrs` point into `values`, alive as long as
        // self; NULL types, lengths and formats mean text parameters whose types the
        // server infers.
        unsafe {
            pq::PQsendQueryParams(
                raw,
                self.sql.as_ptr(),
                self.ptrs.len() as c_int,
                std::ptr::null(),
                self.ptrs.as_ptr(),
                std::ptr::null(),
                std::ptr::null(),
                0,
            )
        }
    }
}

/// Run one statement with text parameters on every one of `conns` at once, and wait for
/// every answer at most `limit` in all (`None`: no limit but a backend's cancel and
/// `statement_timeout`, or a worker's SIGTERM, which end the wait either way). Results in
/// the connections' order. A connection that did not answer in time gets
/// [`LibpqError::Timeout`] and still runs its statement: drop it. So one member whose
/// link hangs after the connection was made costs the caller `limit`, not its own
/// `statement_timeout`, and members answer in the time of the slowest, not of all.
pub fn exec_params_many(
    conns: &mut [&mut Conn],
    sql: &str,
    params: &[&str],
    limit: Option<Duration>,
) -> Vec<Answer> {
    let q = match Statement::new(sql, params) {
        Ok(q) => q,
        Err(e) => return conns.iter().map(|_| Err(e.clone())).collect(),
    };
    let deadline = limit.map(|t| Instant::now() + t);
    let mut out: Vec<Option<Answer>> = conns.iter().map(|_| None).collect();
    // (index, first error or last rows so far) of each connection still answering.
    let mut waiting: Vec<(usize, Option<Answer>)> = Vec::new();
    for (i, c) in conns.iter_mut().enumerate() {
        if q.send(c.raw) == 0 {
            out[i] = Some(Err(c.lost()));
        } else {
            waiting.push((i, None));
        }
    }
    loop {
        waiting.retain_mut(|(i, kept)| {
            let c = &mut conns[*i];
            if !c.take_results(kept) {
                return true;
            }
            out[*i] = Some(kept.take().unwrap_or_else(|| Err(c.lost())));
            false
        });
        if waiting.is_empty() {
            break;
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            let ms = limit.unwrap_or_default().as_millis();
            for (i, _) in waiting.drain(..) {
                out[i] = Some(Err(LibpqError::Timeout {
                    dsn: conns[i].safe_dsn.clone(),
                    ms,
                }));
            }
            break;
        }
        // Woken by a socket or the latch anyway; interrupts are served on each turn.
        let left = deadline.map_or(Duration::from_secs(1), |d| d - now);
        let sockets: Vec<(i32, bool)> = waiting
            .iter()
            .map(|(i, _)| (conns[*i].socket(), false))
            .collect();
        let (ready, stop) = crate::pg::bgw::wait_sockets(&sockets, left);
        if stop {
            for (i, _) in waiting.drain(..) {
                out[i] = Some(Err(LibpqError::Stopping {
                    dsn: conns[i].safe_dsn.clone(),
                }));
            }
            break;
        }
        waiting = waiting
            .into_iter()
            .zip(ready)
            .filter_map(|((i, kept), ready)| {
                if !ready {
                    return Some((i, kept));
                }
                match conns[i].consume_input() {
                    Ok(()) => Some((i, kept)),
                    Err(e) => {
                        out[i] = Some(Err(e));
                        None
                    }
                }
            })
            .collect();
    }
    out.into_iter()
        .map(|r| r.expect("every connection has a result"))
        .collect()
}

impl Conn {
    /// Connect, bounded by `connect_timeout` (10 s unless the DSN says otherwise).
    ///
    /// The connection is made without blocking (`PQconnectStart`, then `PQconnectPoll`
    /// whenever the socket is ready) and waited for on the latch and the socket, as
    /// PostgreSQL's walreceiver does: a host that accepts and never answers (a
    /// black-holing firewall, a frozen server) cannot hold the process. A backend's
    /// cancel and `statement_timeout` end the wait with their ERROR; a background
    /// worker's SIGTERM with [`LibpqError::Stopping`]. libpq leaves `connect_timeout` to
    /// the caller in this mode: it is read from the connection's options and bounds each
    /// host's attempt. A DSN naming several hosts (`host=a,b`) is tried one host after
    /// the other, each with every other option of the DSN, as libpq's blocking connect
    /// would. [`connect_many`] makes several connections at once.
    pub fn connect(conninfo: &str, application_name: &str) -> Result<Conn, LibpqError> {
        connect_many(&[conninfo.to_string()], application_name)
            .pop()
            .expect("one result")
    }

    /// `PQconnectStart` on `conninfo` (with defaults for `connect_timeout` and
    /// `application_name`); its `connect_timeout`, and for a DSN naming several hosts the
    /// connection strings of the hosts after the first (the connection started is then
    /// the first host's).
    fn start(
        conninfo: &str,
        application_name: &str,
    ) -> Result<(Conn, Option<Duration>, VecDeque<CString>), LibpqError> {
        let safe_dsn = dsn::redact(conninfo);
        let full = dsn::with_default(conninfo, "connect_timeout", "10");
        let full = dsn::with_default(&full, "application_name", application_name);
        // Every value the other node sends as text in one form, whatever its own
        // configuration (dates in ISO order, all of a float's digits...).
        let full = dsn::with_options(&full, &dsn::peer_session_options());
        let c = CString::new(full).map_err(|_| LibpqError::Connect {
            dsn: safe_dsn.clone(),
            message: "connection string contains a NUL byte".into(),
        })?;
        let conn = Conn::start_raw(&c, &safe_dsn)?;
        let (limit, options) = conn.connect_options();
        // libpq has checked the lists' lengths already (else the start failed).
        let Ok(Some(hosts)) = dsn::split_hosts(&options) else {
            return Ok((conn, limit, VecDeque::new()));
        };
        drop(conn);
        let mut hosts = hosts
            .iter()
            .map(|pairs| {
                CString::new(dsn::render(pairs)).map_err(|_| LibpqError::Connect {
                    dsn: safe_dsn.clone(),
                    message: "connection string contains a NUL byte".into(),
                })
            })
            .collect::<Result<VecDeque<_>, _>>()?;
        let first = hosts.pop_front().expect("several hosts");
        Ok((Conn::start_raw(&first, &safe_dsn)?, limit, hosts))
    }

    /// `PQconnectStart` on the connection string `c`; `safe_dsn` names it in messages.
    fn start_raw(c: &CString, safe_dsn: &str) -> Result<Conn, LibpqError> {
        // A new socket may take the number of one a kept wait set watched.
        crate::pg::bgw::forget_socket_waits();
        // SAFETY: c is a valid C string; the result is owned by Conn (freed on drop).
        let raw = unsafe { pq::PQconnectStart(c.as_ptr()) };
        let conn = Conn {
            raw,
            safe_dsn: safe_dsn.to_owned(),
            timeout: default_timeout(),
        };
        // SAFETY: raw is a connection object (possibly failed), valid until PQfinish.
        if raw.is_null() || unsafe { pq::PQstatus(raw) } == pq::ConnStatusType::CONNECTION_BAD {
            return Err(conn.connect_error());
        }
        Ok(conn)
    }

    /// Why a connect that ran out of `connect_timeout` failed, in libpq's words.
    fn timed_out(&self) -> String {
        // SAFETY: a started connection; PQhost and PQport return NUL-terminated strings
        // (or NULL) owned by it.
        let (host, port) = unsafe {
            (
                cstr_lossy(pq::PQhost(self.raw)),
                cstr_lossy(pq::PQport(self.raw)),
            )
        };
        format!("connection to server at \"{host}\", port {port} failed: timeout expired")
    }

    fn connect_error(&self) -> LibpqError {
        LibpqError::Connect {
            dsn: self.safe_dsn.clone(),
            message: self.error_message(),
        }
    }

    /// The started connection's `connect_timeout` (`None`: wait without limit; libpq
    /// takes less than 2 s as 2 s), and every option it was given or defaulted to.
    fn connect_options(&self) -> (Option<Duration>, Vec<dsn::Pair>) {
        let mut limit = Some(Duration::from_secs(10));
        let mut options = Vec::new();
        // SAFETY: PQconninfo returns an array ending with a NULL keyword (or NULL when
        // out of memory), freed once below; its strings are NUL-terminated.
        unsafe {
            let opts = pq::PQconninfo(self.raw);
            if opts.is_null() {
                return (limit, options);
            }
            let mut o = opts;
            while !(*o).keyword.is_null() {
                let key = CStr::from_ptr((*o).keyword).to_string_lossy().into_owned();
                if !(*o).val.is_null() {
                    // Not `cstr_lossy`: a value's trailing blanks are its own.
                    let value = CStr::from_ptr((*o).val).to_string_lossy().into_owned();
                    if key == "connect_timeout" {
                        limit = match value.trim().parse::<i64>() {
                            Ok(s) if s > 0 => Some(Duration::from_secs(s.max(2) as u64)),
                            _ => None,
                        }
                    }
                    options.push(dsn::Pair { key, value });
                }
                o = o.add(1);
            }
            pq::PQconninfoFree(opts);
        }
        (limit, options)
    }

    pub fn safe_dsn(&self) -> &str {
        &self.safe_dsn
    }

    /// Wait at most `t` for each answer from now on (`None`: no limit; see the module note).
    pub fn set_timeout(&mut self, t: Option<Duration>) {
        self.timeout = t;
    }

    fn lost(&self) -> LibpqError {
        LibpqError::Lost {
            dsn: self.safe_dsn.clone(),
            message: self.error_message(),
        }
    }

    /// Wait until libpq holds the whole of what it is waiting for (`PQisBusy` false),
    /// serving the latch and interrupts meanwhile (see the module note).
    fn await_input(&mut self) -> Result<(), LibpqError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        // SAFETY: connected.
        while unsafe { pq::PQisBusy(self.raw) } != 0 {
            self.wait_readable(deadline)?;
        }
        Ok(())
    }

    /// One wait for the socket to have input (or the deadline), then read what it has.
    fn wait_readable(&mut self, deadline: Option<Instant>) -> Result<(), LibpqError> {
        let left = match deadline {
            Some(d) => {
                let now = Instant::now();
                if now >= d {
                    return Err(LibpqError::Timeout {
                        dsn: self.safe_dsn.clone(),
                        ms: self.timeout.unwrap_or_default().as_millis(),
                    });
                }
                d - now
            }
            // Woken by the socket or the latch anyway; interrupts are served on each turn.
            None => Duration::from_secs(1),
        };
        if crate::pg::bgw::wait(Some(self.socket()), left) {
            return Err(LibpqError::Stopping {
                dsn: self.safe_dsn.clone(),
            });
        }
        self.consume_input()
    }

    /// Send a statement with `send` (a `PQsend*` call) and wait for its results: the
    /// first error, else the last result (as `PQexec` returns), or the COPY result that
    /// starts a COPY. Never NULL.
    fn run(
        &mut self,
        send: impl FnOnce(*mut pq::PGconn) -> c_int,
    ) -> Result<*mut pq::PGresult, LibpqError> {
        if send(self.raw) == 0 {
            return Err(self.lost());
        }
        let mut kept: *mut pq::PGresult = std::ptr::null_mut();
        // SAFETY: connected; every result is cleared once: `kept` is handed to the caller
        // or cleared, any other at once.
        unsafe {
            loop {
                if let Err(e) = self.await_input() {
                    pq::PQclear(kept);
                    return Err(e);
                }
                let r = pq::PQgetResult(self.raw);
                if r.is_null() {
                    break;
                }
                let status = pq::PQresultStatus(r);
                let error = !kept.is_null()
                    && pq::PQresultStatus(kept) == pq::ExecStatusType::PGRES_FATAL_ERROR;
                if error {
                    pq::PQclear(r);
                    continue;
                }
                pq::PQclear(kept);
                kept = r;
                if matches!(
                    status,
                    pq::ExecStatusType::PGRES_COPY_BOTH
                        | pq::ExecStatusType::PGRES_COPY_OUT
                        | pq::ExecStatusType::PGRES_COPY_IN
                ) {
                    break;
                }
            }
        }
        if kept.is_null() {
            return Err(self.lost());
        }
        Ok(kept)
    }

    fn error_message(&self) -> String {
        if self.raw.is_null() {
            return "out of memory".into();
        }
        // SAFETY: raw is valid until drop.
        let m = cstr_lossy(unsafe { pq::PQerrorMessage(self.raw) });
        // libpq continues a message on indented lines; an error shown to a user is one line.
        m.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn result_error(&self, res: *mut pq::PGresult) -> LibpqError {
        // SAFETY: res is a live result; fields are NUL-terminated or NULL.
        unsafe {
            let field = |code: u8| {
                let p = pq::PQresultErrorField(res, code as c_int);
                (!p.is_null()).then(|| cstr_lossy(p))
            };
            let message = field(b'M').unwrap_or_else(|| {
                let m = cstr_lossy(pq::PQresultErrorMessage(res));
                if m.is_empty() {
                    self.error_message()
                } else {
                    m
                }
            });
            LibpqError::Query {
                sqlstate: field(b'C'),
                message,
                detail: field(b'D'),
                hint: field(b'H'),
            }
        }
    }

    /// Run one statement and return its rows (none for a command).
    pub fn exec(&mut self, sql: &str) -> Result<Vec<Row>, LibpqError> {
        let q = CString::new(sql).expect("SQL without NUL bytes");
        // SAFETY: `q` outlives the call; the result is consumed (and cleared) by `rows`.
        let res = self.run(|raw| unsafe { pq::PQsendQuery(raw, q.as_ptr()) })?;
        // SAFETY: a result of this connection, not used afterwards.
        unsafe { self.rows(res) }
    }

    /// Run one statement with text parameters `$1`, `$2`, ... and return its rows. Values
    /// never go through the SQL text, so nothing depends on the peer's quoting settings
    /// (`standard_conforming_strings`) and no value can change the statement.
    pub fn exec_params(&mut self, sql: &str, params: &[&str]) -> Result<Vec<Row>, LibpqError> {
        let q = Statement::new(sql, params)?;
        let res = self.run(|raw| q.send(raw))?;
        // SAFETY: a result of this connection, not used afterwards.
        unsafe { self.rows(res) }
    }

    /// Take the results libpq already holds for the statement sent, without waiting: into
    /// `kept` the first error, else the last result's rows (as `PQexec` would return).
    /// True once they are all in (`PQgetResult` said NULL); `kept` is then the outcome.
    fn take_results(&mut self, kept: &mut Option<Answer>) -> bool {
        // SAFETY: connected; every result is consumed (and cleared) by `rows` or cleared
        // at once.
        unsafe {
            while pq::PQisBusy(self.raw) == 0 {
                let r = pq::PQgetResult(self.raw);
                if r.is_null() {
                    return true;
                }
                if matches!(
                    pq::PQresultStatus(r),
                    pq::ExecStatusType::PGRES_COPY_BOTH
                        | pq::ExecStatusType::PGRES_COPY_OUT
                        | pq::ExecStatusType::PGRES_COPY_IN
                ) {
                    // libpq would hand out this result for ever: the statement is over
                    // for us, and the connection unfit for another.
                    pq::PQclear(r);
                    *kept = Some(Err(LibpqError::Lost {
                        dsn: self.safe_dsn.clone(),
                        message: "the server started a COPY where rows were expected".into(),
                    }));
                    return true;
                }
                if matches!(kept, Some(Err(_))) {
                    pq::PQclear(r);
                } else {
                    *kept = Some(self.rows(r));
                }
            }
        }
        false
    }

    /// Like [`Conn::query_value`], with parameters.
    pub fn query_value_params(
        &mut self,
        sql: &str,
        params: &[&str],
    ) -> Result<Option<String>, LibpqError> {
        Ok(self
            .exec_params(sql, params)?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// The rows of `res` (or its error); clears it.
    ///
    /// # Safety
    /// `res` is a result of this connection (or NULL), not used afterwards.
    unsafe fn rows(&self, res: *mut pq::PGresult) -> Result<Vec<Row>, LibpqError> {
        // SAFETY: forwarded from the caller.
        unsafe {
            let status = pq::PQresultStatus(res);
            let out = match status {
                pq::ExecStatusType::PGRES_TUPLES_OK | pq::ExecStatusType::PGRES_COMMAND_OK => {
                    let (n, m) = (pq::PQntuples(res), pq::PQnfields(res));
                    Ok((0..n)
                        .map(|r| {
                            (0..m)
                                .map(|f| {
                                    (pq::PQgetisnull(res, r, f) == 0)
                                        .then(|| cstr_lossy(pq::PQgetvalue(res, r, f)))
                                })
                                .collect()
                        })
                        .collect())
                }
                _ => Err(self.result_error(res)),
            };
            pq::PQclear(res);
            out
        }
    }

    /// Run a statement returning exactly one value.
    pub fn query_value(&mut self, sql: &str) -> Result<Option<String>, LibpqError> {
        let rows = self.exec(sql)?;
        Ok(rows
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// Send a statement that enters COPY BOTH (START_REPLICATION) or COPY OUT/IN mode.
    pub fn start_copy(&mut self, sql: &str) -> Result<(), LibpqError> {
        let q = CString::new(sql).expect("SQL without NUL bytes");
        // SAFETY: as in exec.
        let res = self.run(|raw| unsafe { pq::PQsendQuery(raw, q.as_ptr()) })?;
        // SAFETY: a result of this connection, cleared here.
        unsafe {
            let ok = matches!(
                pq::PQresultStatus(res),
                pq::ExecStatusType::PGRES_COPY_BOTH
                    | pq::ExecStatusType::PGRES_COPY_OUT
                    | pq::ExecStatusType::PGRES_COPY_IN
            );
            let err = (!ok).then(|| self.result_error(res));
            pq::PQclear(res);
            err.map_or(Ok(()), Err)
        }
    }

    /// One CopyData message, or WouldBlock (`nonblocking`, nothing there yet) / Done (COPY
    /// finished). A blocking read waits as statements do (see the module note).
    pub fn get_copy_data(&mut self, nonblocking: bool) -> Result<CopyData, LibpqError> {
        let deadline = self.timeout.map(|t| Instant::now() + t);
        loop {
            match self.copy_data()? {
                CopyData::WouldBlock if !nonblocking => self.wait_readable(deadline)?,
                other => return Ok(other),
            }
        }
    }

    /// `PQgetCopyData` without blocking.
    fn copy_data(&mut self) -> Result<CopyData, LibpqError> {
        let mut buf: *mut c_char = std::ptr::null_mut();
        // SAFETY: libpq allocates buf, which PqBuf owns and frees with PQfreemem.
        unsafe {
            let n = pq::PQgetCopyData(self.raw, &mut buf, 1);
            if n > 0 {
                Ok(CopyData::Data(PqBuf {
                    ptr: buf,
                    len: n as usize,
                }))
            } else if n == 0 {
                Ok(CopyData::WouldBlock)
            } else if n == -1 {
                // COPY done: collect the final result.
                self.await_input()?;
                let res = pq::PQgetResult(self.raw);
                let status = pq::PQresultStatus(res);
                let err = (!matches!(status, pq::ExecStatusType::PGRES_COMMAND_OK))
                    .then(|| self.result_error(res));
                pq::PQclear(res);
                while {
                    self.await_input()?;
                    let r = pq::PQgetResult(self.raw);
                    let more = !r.is_null();
                    pq::PQclear(r);
                    more
                } {}
                err.map_or(Ok(CopyData::Done), Err)
            } else {
                Err(LibpqError::Lost {
                    dsn: self.safe_dsn.clone(),
                    message: self.error_message(),
                })
            }
        }
    }

    pub fn put_copy_data(&mut self, data: &[u8]) -> Result<(), LibpqError> {
        // SAFETY: data is valid for its length.
        let r = unsafe {
            pq::PQputCopyData(
                self.raw,
                data.as_ptr() as *const c_char,
                data.len() as c_int,
            )
        };
        if r == 1 {
            Ok(())
        } else {
            Err(LibpqError::Lost {
                dsn: self.safe_dsn.clone(),
                message: self.error_message(),
            })
        }
    }

    /// Finish a COPY IN and check its result.
    pub fn put_copy_end(&mut self) -> Result<(), LibpqError> {
        // SAFETY: connected, in COPY IN mode.
        unsafe {
            if pq::PQputCopyEnd(self.raw, std::ptr::null()) != 1 {
                return Err(LibpqError::Lost {
                    dsn: self.safe_dsn.clone(),
                    message: self.error_message(),
                });
            }
            let mut err = None;
            loop {
                self.await_input()?;
                let res = pq::PQgetResult(self.raw);
                if res.is_null() {
                    break;
                }
                if pq::PQresultStatus(res) != pq::ExecStatusType::PGRES_COMMAND_OK {
                    err = Some(self.result_error(res));
                }
                pq::PQclear(res);
            }
            err.map_or(Ok(()), Err)
        }
    }

    pub fn flush(&mut self) -> Result<(), LibpqError> {
        // SAFETY: connected.
        if unsafe { pq::PQflush(self.raw) } < 0 {
            return Err(LibpqError::Lost {
                dsn: self.safe_dsn.clone(),
                message: self.error_message(),
            });
        }
        Ok(())
    }

    /// Read what the socket has, without blocking.
    pub fn consume_input(&mut self) -> Result<(), LibpqError> {
        // SAFETY: connected.
        if unsafe { pq::PQconsumeInput(self.raw) } == 0 {
            return Err(LibpqError::Lost {
                dsn: self.safe_dsn.clone(),
                message: self.error_message(),
            });
        }
        Ok(())
    }

    pub fn socket(&self) -> c_int {
        // SAFETY: connected.
        unsafe { pq::PQsocket(self.raw) }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            crate::pg::bgw::forget_socket_waits();
            // SAFETY: we own the connection; it is not used after this.
            unsafe { pq::PQfinish(self.raw) };
        }
    }
}

/// Quote a SQL literal (standard_conforming_strings on).
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Quote an identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

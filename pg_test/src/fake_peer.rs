//! A fake bdr peer: a TCP server on 127.0.0.1 that speaks just enough of PostgreSQL's
//! frontend/backend and streaming replication protocols for a node's apply worker to
//! connect to it, and then sends whatever bytes a test scripted as the stream's WAL data.
//!
//! Why: "nothing a peer sends may crash a server" can only be tested with a peer that
//! sends what a real walsender never would (truncated or corrupted frames, messages out of
//! order, rows that do not fit the local table). A real postmaster cannot be made to do
//! that; this server can, and the node under test is still a real postmaster running the
//! real extension.
//!
//! What it answers: SSL/GSS requests are refused (`N`), any user is trusted, the simple
//! queries the apply worker sends (`IDENTIFY_SYSTEM`, one-value `SELECT`s) get plausible
//! rows, and `START_REPLICATION` enters COPY BOTH. The n-th `START_REPLICATION` (counting
//! from 0) plays script n (the last script again once they are used up): each write is
//! sent as one XLogData message; afterwards the server sends a keepalive every 100 ms and
//! records the flush positions the worker confirms, until the worker hangs up.
//!
//! [`FakePeer::silent`] instead answers nothing after the startup (a link that hangs
//! once the connection is made), counting the connections that got that far.
//! [`FakePeer::copy_on_extended`] answers every extended-protocol statement (what a
//! schema change's drain sends its members) by starting a COPY that never ends; simple
//! queries and streams are as in [`FakePeer::start`].
//!
//! Invariants: it listens on 127.0.0.1 only; dropping it stops the listener and every
//! connection thread within about 100 ms.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One connection's stream: each entry is (WAL start LSN, bytes) of one XLogData message.
#[derive(Clone, Debug, Default)]
pub struct Script {
    pub writes: Vec<(u64, Vec<u8>)>,
}

/// What the fake peer saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Connections that reached `START_REPLICATION`.
    pub streams: usize,
    /// Every flush position the worker confirmed, in order.
    pub flushed: Vec<u64>,
    /// The `START_REPLICATION` commands, as sent.
    pub starts: Vec<String>,
    /// Connections that completed the startup.
    pub connections: usize,
    /// Statements answered with a COPY ([`FakePeer::copy_on_extended`]).
    pub copies: usize,
}

pub struct FakePeer {
    port: u16,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

/// How a fake peer answers after the startup.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Silent,
    CopyOnExtended,
}

impl FakePeer {
    pub fn start(scripts: Vec<Script>) -> FakePeer {
        Self::start_with(scripts, Mode::Normal)
    }

    /// A peer that completes every connection's startup and then answers nothing.
    pub fn silent() -> FakePeer {
        Self::start_with(vec![Script::default()], Mode::Silent)
    }

    /// A peer that answers each extended-protocol statement with a COPY that never ends.
    pub fn copy_on_extended() -> FakePeer {
        Self::start_with(vec![Script::default()], Mode::CopyOnExtended)
    }

    fn start_with(scripts: Vec<Script>, mode: Mode) -> FakePeer {
        assert!(!scripts.is_empty(), "a fake peer needs at least one script");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let scripts = Arc::new(scripts);
        let (s, st) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            let mut conns = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((sock, _)) => {
                        let (s, st, sc) = (s.clone(), st.clone(), scripts.clone());
                        conns.push(std::thread::spawn(move || {
                            let _ = serve(sock, &s, &st, &sc, mode);
                        }));
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
            for c in conns {
                let _ = c.join();
            }
        });
        FakePeer {
            port,
            stop,
            seen,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A DSN for this peer.
    pub fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} dbname=fake user=fake sslmode=disable gssencmode=disable",
            self.port
        )
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakePeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A backend message: type byte, length, body.
fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(kind);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// RowDescription + DataRow + CommandComplete + ReadyForQuery for text columns.
fn result(cols: &[&str], row: Option<&[&str]>, tag: &str) -> Vec<u8> {
    let mut desc = (cols.len() as u16).to_be_bytes().to_vec();
    for c in cols {
        cstr(&mut desc, c);
        desc.extend_from_slice(&0u32.to_be_bytes()); // table oid
        desc.extend_from_slice(&0u16.to_be_bytes()); // column number
        desc.extend_from_slice(&25u32.to_be_bytes()); // text
        desc.extend_from_slice(&(-1i16).to_be_bytes());
        desc.extend_from_slice(&(-1i32).to_be_bytes());
        desc.extend_from_slice(&0u16.to_be_bytes()); // text format
    }
    let mut out = msg(b'T', &desc);
    if let Some(row) = row {
        let mut data = (row.len() as u16).to_be_bytes().to_vec();
        for v in row {
            data.extend_from_slice(&(v.len() as u32).to_be_bytes());
            data.extend_from_slice(v.as_bytes());
        }
        out.extend(msg(b'D', &data));
    }
    let mut t = Vec::new();
    cstr(&mut t, tag);
    out.extend(msg(b'C', &t));
    out.extend(msg(b'Z', b"I"));
    out
}

fn now_micros() -> i64 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    unix - 946_684_800_000_000
}

/// Reads whole frontend messages off a socket with a short timeout.
struct Reader {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Reader {
    /// The next message (type byte, body), None on timeout; Err when the peer hung up.
    fn next(&mut self, typed: bool) -> std::io::Result<Option<(u8, Vec<u8>)>> {
        loop {
            let head = if typed { 5 } else { 4 };
            if self.buf.len() >= head {
                let at = head - 4;
                let len = u32::from_be_bytes(self.buf[at..at + 4].try_into().unwrap()) as usize;
                if self.buf.len() >= at + len {
                    let kind = if typed { self.buf[0] } else { 0 };
                    let body = self.buf[head..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Ok(Some((kind, body)));
                }
            }
            let mut chunk = [0u8; 8192];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

fn serve(
    sock: TcpStream,
    stop: &AtomicBool,
    seen: &Mutex<Seen>,
    scripts: &[Script],
    mode: Mode,
) -> std::io::Result<()> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut out = sock.try_clone()?;
    let mut r = Reader {
        sock,
        buf: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    // Startup: refuse SSL and GSS encryption, trust everyone.
    loop {
        let Some((_, body)) = r.next(false)? else {
            if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                return Ok(());
            }
            continue;
        };
        let code = u32::from_be_bytes(body[0..4].try_into().unwrap());
        if code == 80_877_103 || code == 80_877_104 {
            out.write_all(b"N")?;
            continue;
        }
        break;
    }
    let mut hello = msg(b'R', &0u32.to_be_bytes());
    for (k, v) in [
        ("server_version", "15.20"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
    ] {
        let mut b = Vec::new();
        cstr(&mut b, k);
        cstr(&mut b, v);
        hello.extend(msg(b'S', &b));
    }
    hello.extend(msg(b'K', &[0, 0, 0, 42, 0, 0, 0, 7]));
    hello.extend(msg(b'Z', b"I"));
    out.write_all(&hello)?;
    seen.lock().unwrap().connections += 1;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some((kind, body)) = r.next(true)? else {
            continue;
        };
        match kind {
            b'X' => return Ok(()),
            _ if mode == Mode::Silent => {}
            // Parse, Bind, Describe, Execute: answered at the Sync.
            b'P' | b'B' | b'D' | b'E' if mode == Mode::CopyOnExtended => {}
            b'S' if mode == Mode::CopyOnExtended => {
                seen.lock().unwrap().copies += 1;
                let mut m = msg(b'1', &[]);
                m.extend(msg(b'2', &[]));
                m.extend(msg(b'H', &[0, 0, 0]));
                out.write_all(&m)?;
            }
            b'Q' => {
                let q = String::from_utf8_lossy(&body)
                    .trim_end_matches('\0')
                    .to_string();
                let upper = q.trim_start().to_ascii_uppercase();
                if upper.starts_with("IDENTIFY_SYSTEM") {
                    out.write_all(&result(
                        &["systemid", "timeline", "xlogpos", "dbname"],
                        Some(&["7000000000000000001", "1", "0/5000000", "fake"]),
                        "IDENTIFY_SYSTEM",
                    ))?;
                } else if upper.starts_with("START_REPLICATION") {
                    let n = {
                        let mut s = seen.lock().unwrap();
                        s.streams += 1;
                        s.starts.push(q.clone());
                        s.streams - 1
                    };
                    let script = &scripts[n.min(scripts.len() - 1)];
                    return stream(&mut r, &mut out, stop, seen, script);
                } else if upper.starts_with("SELECT") {
                    let v = if q.contains("pg_database") {
                        "16384"
                    } else if q.contains("bdr.version") {
                        // A peer of this build: it may be asked to stream (protocol 4).
                        "bdr 0.1.0 (protocol 1..4)"
                    } else {
                        "0/5000000"
                    };
                    out.write_all(&result(&["v"], Some(&[v]), "SELECT 1"))?;
                } else {
                    out.write_all(&result(&[], None, "SET"))?;
                }
            }
            _ => {
                // Anything else (extended protocol): an error the client can report.
                let mut e = Vec::new();
                for (f, v) in [(b'S', "ERROR"), (b'C', "0A000"), (b'M', "not supported")] {
                    e.push(f);
                    cstr(&mut e, v);
                }
                e.push(0);
                let mut m = msg(b'E', &e);
                m.extend(msg(b'Z', b"I"));
                out.write_all(&m)?;
            }
        }
    }
}

fn stream(
    r: &mut Reader,
    out: &mut TcpStream,
    stop: &AtomicBool,
    seen: &Mutex<Seen>,
    script: &Script,
) -> std::io::Result<()> {
    // CopyBothResponse: text format, no columns.
    out.write_all(&msg(b'W', &[0, 0, 0]))?;
    let mut end = 0u64;
    for (start, bytes) in &script.writes {
        let mut w = vec![b'w'];
        w.extend_from_slice(&start.to_be_bytes());
        w.extend_from_slice(&start.to_be_bytes());
        w.extend_from_slice(&now_micros().to_be_bytes());
        w.extend_from_slice(bytes);
        out.write_all(&msg(b'd', &w))?;
        end = end.max(*start);
    }
    let mut last_keepalive = Instant::now() - Duration::from_secs(1);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        if last_keepalive.elapsed() >= Duration::from_millis(100) {
            let mut k = vec![b'k'];
            k.extend_from_slice(&end.to_be_bytes());
            k.extend_from_slice(&now_micros().to_be_bytes());
            k.push(0);
            out.write_all(&msg(b'd', &k))?;
            last_keepalive = Instant::now();
        }
        match r.next(true)? {
            Some((b'd', body)) if body.first() == Some(&b'r') && body.len() >= 17 => {
                let flush = u64::from_be_bytes(body[9..17].try_into().unwrap());
                seen.lock().unwrap().flushed.push(flush);
            }
            Some((b'c' | b'X', _)) => return Ok(()),
            _ => {}
        }
    }
}

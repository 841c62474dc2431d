//! A fault-injecting TCP proxy between the nodes of a test cluster: every directed link
//! (node `i` dialing node `j`) has its own loopback listener, and a test can cut, hang,
//! delay or throttle each link and heal it.
//!
//! Why this way: bdr stores one DSN per node (`bdr.nodes.node_dsn`) and every node dials a
//! peer with that DSN, so a per-link port cannot be written into the DSN itself. The DSN
//! is `service=<peer name> ...` instead, and each node's postmaster runs with its own
//! `PGSERVICEFILE` (see [`crate::ClusterBuilder::service_files`]), where the service
//! `nodej` is `127.0.0.1:P(i,j)`, the proxy's listener for the link i→j. libpq resolves
//! services in the process that connects, so the apply worker on node i pulling from node
//! j, a DDL drain or a quorum probe from node i, and `pg_dump` during a join all go
//! through link i→j; node i reaching itself uses its own port. The source address is no
//! help (every loopback connection comes from 127.0.0.1), the listener port is.
//!
//! A link is the connections node `i` opens to node `j`, in both byte directions. bdr
//! pulls: node `i`'s apply worker for `j` dials `j`, so cutting i→j stops `j`'s changes
//! from reaching `i` while `i`'s changes still reach `j` (over j→i).
//!
//! Fault modes ([`Fault`]): `Cut` closes the link's open connections and closes every new
//! one at once (the dialer sees the connection end before the startup reply); `Hang`
//! keeps connections open and accepts new ones but forwards no byte in either direction
//! until healed (what a silent peer or a black-holing firewall looks like: only timeouts
//! can detect it); `HangAfterConnect` lets each connection be made (up to the server's
//! first ReadyForQuery message) and then hangs it (a link that stalls while a statement
//! is on its way); delay adds latency to every chunk; throttle caps bytes per second per
//! direction. `heal` restores a plain link; bytes held by a hang are then delivered in
//! order.
//!
//! Invariants:
//! - Listeners bind 127.0.0.1 only; targets are 127.0.0.1 ports.
//! - Bytes are forwarded in order, never duplicated or altered; a fault only withholds,
//!   delays or ends a connection.
//! - Dropping the [`Proxy`] stops its listeners and closes every connection it holds;
//!   each thread notices within [`TICK`].

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often idle proxy threads look at their link's state and the shutdown flag.
pub const TICK: Duration = Duration::from_millis(20);

/// Largest chunk read or written at once.
const CHUNK: usize = 16 * 1024;

/// Chunks buffered per direction before the reader stops reading (back-pressure to the
/// sender's socket during a hang or throttle).
const QUEUE: usize = 64;

/// A link's fault mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward bytes (subject to delay and throttle).
    None,
    /// Close open connections, close new ones at once.
    Cut,
    /// Keep and accept connections, forward nothing.
    Hang,
    /// Forward each connection's bytes until the server has sent its first ReadyForQuery
    /// (the connection is made), then nothing more.
    HangAfterConnect,
}

#[derive(Debug, Clone, Copy)]
struct LinkState {
    fault: Fault,
    delay: Duration,
    /// Bytes per second per direction; 0: unlimited.
    rate: u64,
}

impl LinkState {
    const HEALTHY: LinkState = LinkState {
        fault: Fault::None,
        delay: Duration::ZERO,
        rate: 0,
    };
}

/// One directed link: a listener forwarding to one target port.
struct Link {
    state: Mutex<LinkState>,
    /// Both sockets of every open connection by id (closed on cut).
    conns: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    accepted: AtomicU64,
    bytes: AtomicU64,
}

impl Link {
    fn state(&self) -> LinkState {
        *self.state.lock().unwrap()
    }
    fn close_all(&self) {
        for (_, (a, b)) in self.conns.lock().unwrap().drain() {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }
}

/// The proxy: one listener per directed link between `n` targets (see the module note).
pub struct Proxy {
    targets: Vec<u16>,
    links: HashMap<(usize, usize), (u16, Arc<Link>)>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Proxy {
    /// Listeners for every directed link between the given target ports (`targets[i]` is
    /// node `i`'s server port); each gets a free 127.0.0.1 port from the OS.
    pub fn new(targets: &[u16]) -> Proxy {
        let stop = Arc::new(AtomicBool::new(false));
        let mut links = HashMap::new();
        let mut threads = Vec::new();
        for from in 0..targets.len() {
            for (to, &target_port) in targets.iter().enumerate() {
                if from == to {
                    continue;
                }
                let listener = TcpListener::bind("127.0.0.1:0").expect("binding a proxy port");
                listener.set_nonblocking(true).unwrap();
                let port = listener.local_addr().unwrap().port();
                let link = Arc::new(Link {
                    state: Mutex::new(LinkState::HEALTHY),
                    conns: Mutex::new(HashMap::new()),
                    accepted: AtomicU64::new(0),
                    bytes: AtomicU64::new(0),
                });
                let target: SocketAddr = ([127, 0, 0, 1], target_port).into();
                let (l2, s2) = (link.clone(), stop.clone());
                threads.push(
                    std::thread::Builder::new()
                        .name(format!("proxy {from}->{to}"))
                        .spawn(move || accept_loop(listener, target, l2, s2))
                        .unwrap(),
                );
                links.insert((from, to), (port, link));
            }
        }
        Proxy {
            targets: targets.to_vec(),
            links,
            stop,
            threads: Mutex::new(threads),
        }
    }

    /// Number of targets (nodes).
    pub fn len(&self) -> usize {
        self.targets.len()
    }
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }

    fn link(&self, from: usize, to: usize) -> &Arc<Link> {
        &self
            .links
            .get(&(from, to))
            .unwrap_or_else(|| panic!("no proxy link {from}->{to}"))
            .1
    }

    /// The port node `from` dials to reach node `to` (`to`'s own port when they are the
    /// same node).
    pub fn port(&self, from: usize, to: usize) -> u16 {
        if from == to {
            return self.targets[to];
        }
        self.links[&(from, to)].0
    }

    /// The libpq service file for node `from`: one section per node name, reaching it
    /// through the proxy (itself directly).
    pub fn service_file(&self, from: usize, names: &[&str]) -> String {
        names
            .iter()
            .enumerate()
            .map(|(to, name)| format!("[{name}]\nhost=127.0.0.1\nport={}\n\n", self.port(from, to)))
            .collect()
    }

    fn set(&self, from: usize, to: usize, f: impl FnOnce(&mut LinkState)) {
        let link = self.link(from, to);
        let cut = {
            let mut s = link.state.lock().unwrap();
            f(&mut s);
            s.fault == Fault::Cut
        };
        if cut {
            link.close_all();
        }
    }

    /// Cut link from→to: close its connections and every new one.
    pub fn cut(&self, from: usize, to: usize) {
        self.set(from, to, |s| s.fault = Fault::Cut);
    }
    /// Hang link from→to: connections stay open, nothing is forwarded.
    pub fn hang(&self, from: usize, to: usize) {
        self.set(from, to, |s| s.fault = Fault::Hang);
    }
    /// Hang link from→to once each connection is made: connecting works, then nothing is
    /// forwarded (connections already made hang at once).
    pub fn hang_after_connect(&self, from: usize, to: usize) {
        self.set(from, to, |s| s.fault = Fault::HangAfterConnect);
    }
    /// Add `d` of latency to every chunk on link from→to (both byte directions).
    pub fn delay(&self, from: usize, to: usize, d: Duration) {
        self.set(from, to, |s| s.delay = d);
    }
    /// Cap link from→to at `bytes_per_sec` in each byte direction (0: no cap).
    pub fn throttle(&self, from: usize, to: usize, bytes_per_sec: u64) {
        self.set(from, to, |s| s.rate = bytes_per_sec);
    }
    /// Make link from→to plain again (held bytes are delivered).
    pub fn heal(&self, from: usize, to: usize) {
        self.set(from, to, |s| *s = LinkState::HEALTHY);
    }
    /// Cut both directions between `a` and `b`.
    pub fn cut_both(&self, a: usize, b: usize) {
        self.cut(a, b);
        self.cut(b, a);
    }
    /// Heal both directions between `a` and `b`.
    pub fn heal_both(&self, a: usize, b: usize) {
        self.heal(a, b);
        self.heal(b, a);
    }
    /// Cut every link between different sides: `side[i]` is node i's side.
    pub fn partition(&self, side: &[usize]) {
        for (&(from, to), _) in self.links.iter() {
            if side[from] != side[to] {
                self.cut(from, to);
            }
        }
    }
    /// Heal every link.
    pub fn heal_all(&self) {
        for &(from, to) in self.links.keys() {
            self.heal(from, to);
        }
    }
    /// The fault mode of link from→to.
    pub fn fault(&self, from: usize, to: usize) -> Fault {
        self.link(from, to).state().fault
    }
    /// Connections accepted so far on link from→to.
    pub fn accepted(&self, from: usize, to: usize) -> u64 {
        self.link(from, to).accepted.load(Ordering::SeqCst)
    }
    /// Bytes forwarded so far on link from→to (both directions).
    pub fn bytes(&self, from: usize, to: usize) -> u64 {
        self.link(from, to).bytes.load(Ordering::SeqCst)
    }
    /// Connections open now on link from→to.
    pub fn open_connections(&self, from: usize, to: usize) -> usize {
        self.link(from, to).conns.lock().unwrap().len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (_, link) in self.links.values() {
            link.close_all();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, link: Arc<Link>, stop: Arc<AtomicBool>) {
    let mut pumps: Vec<std::thread::JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        pumps.retain(|h| !h.is_finished());
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(TICK);
                continue;
            }
            Err(_) => {
                std::thread::sleep(TICK);
                continue;
            }
        };
        link.accepted.fetch_add(1, Ordering::SeqCst);
        if link.state().fault == Fault::Cut {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let server = match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => {
                // Target down: the dialer sees the connection close, as with no listener.
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
            continue;
        };
        let id = link.accepted.load(Ordering::SeqCst);
        link.conns.lock().unwrap().insert(id, (c2, s2));
        // The last of the connection's four threads to finish forgets it.
        let live = Arc::new(AtomicU64::new(4));
        // Set once the server has sent ReadyForQuery (the connection is made).
        let made = Arc::new(AtomicBool::new(false));
        for (src, dst, from_server) in [(&client, &server, false), (&server, &client, true)] {
            let (src, dst) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
            let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE);
            let g1 = ConnGuard(id, live.clone(), link.clone());
            let g2 = ConnGuard(id, live.clone(), link.clone());
            let (st, st2) = (stop.clone(), stop.clone());
            let l2 = link.clone();
            pumps.push(std::thread::spawn(move || {
                let _g = g1;
                reader(src, tx, st)
            }));
            let made = Made {
                flag: made.clone(),
                watch: from_server,
            };
            pumps.push(std::thread::spawn(move || {
                let _g = g2;
                writer(dst, rx, l2, st2, made)
            }));
        }
    }
    for h in pumps {
        let _ = h.join();
    }
}

/// Counts a connection's threads down; the last one removes it from its link.
struct ConnGuard(u64, Arc<AtomicU64>, Arc<Link>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.1.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.2.conns.lock().unwrap().remove(&self.0);
        }
    }
}

/// Read chunks from `src` into the queue until EOF, an error (then `src` is shut down, so
/// the other direction ends too), or shutdown.
fn reader(mut src: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, stop: Arc<AtomicBool>) {
    let _ = src.set_read_timeout(Some(TICK * 5));
    let mut buf = vec![0u8; CHUNK];
    loop {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match src.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut item = (Instant::now(), buf[..n].to_vec());
                // Blocks while the writer is held (hang, throttle): back-pressure.
                loop {
                    match tx.try_send(item) {
                        Ok(()) => break,
                        Err(std::sync::mpsc::TrySendError::Full(it)) => {
                            if stop.load(Ordering::SeqCst) {
                                return;
                            }
                            item = it;
                            std::thread::sleep(TICK);
                        }
                        Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return,
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = src.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// Whether a connection is made, for [`Fault::HangAfterConnect`]: the writer of the
/// server's bytes (`watch`) sets `flag` after forwarding a chunk that ends with
/// ReadyForQuery ('Z', length 5, a status byte).
struct Made {
    flag: Arc<AtomicBool>,
    watch: bool,
}

impl Made {
    fn is_made(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
    /// Note the last bytes forwarded (`tail`: what came before, kept to 6 bytes).
    fn forwarded(&self, tail: &mut Vec<u8>, chunk: &[u8]) {
        if !self.watch || self.is_made() {
            return;
        }
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(6)..]);
        let cut = tail.len().saturating_sub(6);
        tail.drain(..cut);
        if tail.len() == 6 && tail[..5] == [b'Z', 0, 0, 0, 5] && b"ITE".contains(&tail[5]) {
            self.flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Whether the link's state holds this connection's bytes back now.
fn held(fault: Fault, made: &Made) -> bool {
    match fault {
        Fault::Hang => true,
        Fault::HangAfterConnect => made.is_made(),
        Fault::None | Fault::Cut => false,
    }
}

/// Forward queued chunks to `dst`, honouring the link's fault, delay and rate. When the
/// reader is done (EOF), the write side of `dst` is shut down after the last chunk.
fn writer(
    mut dst: TcpStream,
    rx: Receiver<(Instant, Vec<u8>)>,
    link: Arc<Link>,
    stop: Arc<AtomicBool>,
    made: Made,
) {
    let mut next_allowed = Instant::now();
    let mut tail = Vec::new();
    loop {
        let (at, data) = match rx.recv_timeout(TICK * 5) {
            Ok(x) => x,
            Err(RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                // A hung link withholds the end of the stream too.
                while held(link.state().fault, &made) && !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(TICK);
                }
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
        };
        let mut off = 0;
        while off < data.len() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let s = link.state();
            if s.fault == Fault::Cut {
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
            if held(s.fault, &made) {
                std::thread::sleep(TICK);
                continue;
            }
            let due = at + s.delay;
            let now = Instant::now();
            if now < due {
                std::thread::sleep((due - now).min(TICK));
                continue;
            }
            let mut n = data.len() - off;
            if s.rate > 0 {
                if now < next_allowed {
                    std::thread::sleep((next_allowed - now).min(TICK));
                    continue;
                }
                // At most a tenth of a second's worth at once.
                n = n.min((s.rate / 10).max(1) as usize);
                next_allowed =
                    now.max(next_allowed) + Duration::from_secs_f64(n as f64 / s.rate as f64);
            }
            if dst.write_all(&data[off..off + n]).is_err() {
                let _ = dst.shutdown(Shutdown::Both);
                return;
            }
            link.bytes.fetch_add(n as u64, Ordering::SeqCst);
            off += n;
        }
        made.forwarded(&mut tail, &data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on a free loopback port; returns its port.
    fn echo_server() -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn dial(p: &Proxy) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", p.port(0, 1))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(msg)?;
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got)?;
        Ok(got)
    }

    /// Whether the peer closed `s` (EOF or reset) within the read timeout.
    fn closed(s: &mut TcpStream) -> bool {
        let _ = s.write_all(b"x");
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        }
    }

    #[test]
    fn forwards_cuts_and_heals() {
        let p = Proxy::new(&[1, echo_server()]);
        assert_ne!(p.port(0, 1), p.port(1, 0));
        let mut s = dial(&p);
        assert_eq!(roundtrip(&mut s, b"hello").unwrap(), b"hello");
        p.cut(0, 1);
        assert!(closed(&mut s), "an open connection ends on cut");
        let mut s2 = dial(&p);
        assert!(closed(&mut s2), "a new connection is closed while cut");
        p.heal(0, 1);
        let mut s3 = dial(&p);
        assert_eq!(roundtrip(&mut s3, b"again").unwrap(), b"again");
        assert!(p.accepted(0, 1) >= 3);
        assert!(p.bytes(0, 1) >= 10);
        drop(s3);
        crate::wait_until(
            "the closed connection to be forgotten",
            Duration::from_secs(5),
            || p.open_connections(0, 1) == 0,
        );
    }

    #[test]
    fn hang_holds_bytes_until_healed() {
        let p = Proxy::new(&[1, echo_server()]);
        let mut s = dial(&p);
        assert_eq!(roundtrip(&mut s, b"one").unwrap(), b"one");
        p.hang(0, 1);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.write_all(b"two").unwrap();
        let mut b = [0u8; 3];
        let e = s.read(&mut b).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
        // New connections are accepted but silent too.
        let mut s2 = dial(&p);
        s2.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s2.write_all(b"z").unwrap();
        assert!(s2.read(&mut b).is_err());
        p.heal(0, 1);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"two", "held bytes arrive, once, in order");
        assert_eq!(roundtrip(&mut s, b"three").unwrap(), b"three");
    }

    #[test]
    fn hang_after_connect_lets_connections_be_made_then_holds_bytes() {
        let p = Proxy::new(&[1, echo_server()]);
        p.hang_after_connect(0, 1);
        // Echoed back, a ReadyForQuery is what the "server" sends: until it, bytes pass.
        let mut s = dial(&p);
        assert_eq!(roundtrip(&mut s, b"startup").unwrap(), b"startup");
        let rfq = [b'Z', 0, 0, 0, 5, b'I'];
        assert_eq!(roundtrip(&mut s, &rfq).unwrap(), rfq);
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s.write_all(b"query").unwrap();
        let mut b = [0u8; 5];
        let e = s.read(&mut b).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
        // Another connection is made the same way, independently.
        let mut s2 = dial(&p);
        assert_eq!(roundtrip(&mut s2, b"hello").unwrap(), b"hello");
        p.heal(0, 1);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"query", "held bytes arrive once healed");
    }

    #[test]
    fn delays_and_throttles() {
        let p = Proxy::new(&[1, echo_server()]);
        let mut s = dial(&p);
        p.delay(0, 1, Duration::from_millis(200));
        let t = Instant::now();
        roundtrip(&mut s, b"slow").unwrap();
        // Delayed on the way there and on the way back.
        assert!(
            t.elapsed() >= Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        p.heal(0, 1);
        p.throttle(0, 1, 20_000);
        let msg = vec![7u8; 20_000];
        let t = Instant::now();
        assert_eq!(roundtrip(&mut s, &msg).unwrap(), msg);
        // 20 kB each way at 20 kB/s, the first tenth of a second free.
        assert!(
            t.elapsed() >= Duration::from_millis(800),
            "{:?}",
            t.elapsed()
        );
        p.heal(0, 1);
        let t = Instant::now();
        roundtrip(&mut s, &msg).unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
}

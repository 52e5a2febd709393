//! Deadlines on calls into PostgreSQL ([`Link::call`]).
//!
//! libpq waits for an answer for ever: it has no client-side timeout. A server that is frozen (a
//! hung host, SIGSTOP) keeps its TCP peer alive, as its kernel still acknowledges, so neither
//! keepalives nor `tcp_user_timeout` end the wait (issue 18: a writer thread in `poll` for good,
//! health `SERVING`, no write answered). A watchdog thread shuts the call's socket down at its
//! deadline: libpq then fails the call as a lost connection, the connection is dropped, and every
//! connection opened before it is taken for stale ([`Epoch`]), since they went to the same server.
//!
//! The socket is found once, when the connection is made ([`Socket::find`]): diesel does not
//! give libpq's handle out. SQLite connections, and PostgreSQL ones over a Unix socket, have none:
//! their calls run without a deadline.

use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use super::AnyConnection;
use crate::StorageError;

/// The TCP socket of a PostgreSQL connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Socket(RawFd);

impl Socket {
    /// The one socket of this process connected from local port `local` to remote port
    /// `remote` (as the server sees the connection: `inet_client_port()`,
    /// `inet_server_port()`); `None` when none or several match. Two open TCP sockets never
    /// share both ports and both addresses, and the connection asking holds its own open.
    pub(super) fn find(local: u16, remote: u16) -> Option<Socket> {
        let mut found = None;
        for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<RawFd>().ok())
            else {
                continue;
            };
            let is_socket = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
            let port = |side| address_of(fd, side).map(|a| a.port());
            if is_socket && port(Side::Local) == Some(local) && port(Side::Remote) == Some(remote) {
                if found.is_some() {
                    return None;
                }
                found = Some(Socket(fd));
            }
        }
        found
    }

    /// The address it is connected to.
    pub(super) fn peer(self) -> Option<SocketAddr> {
        address_of(self.0, Side::Remote)
    }
}

/// Which end of a socket.
enum Side {
    Local,
    Remote,
}

/// The address of one end of socket `fd` (IPv4 or IPv6), if it is one.
fn address_of(fd: RawFd, side: Side) -> Option<SocketAddr> {
    // SAFETY: getsockname/getpeername write at most `len` bytes into a zeroed sockaddr_storage,
    // which is large enough for every address family; an fd closed meanwhile only fails (EBADF).
    let storage = unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        let address = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
        let done = match side {
            Side::Local => libc::getsockname(fd, address, &mut len),
            Side::Remote => libc::getpeername(fd, address, &mut len),
        };
        if done != 0 {
            return None;
        }
        storage
    };
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4 = unsafe {
                &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6 = unsafe {
                &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(v6.sin6_port))))
        }
        _ => None,
    }
}

/// When a storage's connections stop being trusted: a connection whose opening began before it
/// is stale. A call cut off at its deadline, or a failed health check, moves it to the moment that
/// call or check began: connections opened since (after a failover, to the new primary) stay.
#[derive(Debug, Clone, Default)]
pub(super) struct Epoch(Arc<AtomicU64>);

/// Now, as the nanoseconds since the first call (an [`Epoch`]'s unit).
pub(super) fn moment() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    // Never 0: 0 is "nothing is stale".
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

impl Epoch {
    fn stale_before(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Connections whose opening began before `since` (a [`moment`]) are stale: the server
    /// they went to did not answer a call or check made since.
    pub(super) fn invalidate(&self, since: u64) {
        self.0.fetch_max(since, Ordering::Relaxed);
    }

    /// [`Epoch::invalidate`], and the calls still waiting on those connections are cut off at
    /// once rather than at their own deadlines: the health check found that the database does
    /// not answer (or takes no writes), so they would wait for nothing.
    pub(super) fn cut_off(&self, since: u64) {
        self.invalidate(since);
        watchdog().cut(self, since);
    }
}

/// A connection of the ledger's storage, with what its calls' deadlines need.
pub(super) struct Link {
    conn: AnyConnection,
    socket: Option<Socket>,
    /// The [`moment`] its opening began.
    opened: u64,
    epoch: Epoch,
    /// A call on it was cut off: its socket is shut down.
    cut: bool,
}

impl Link {
    /// `conn`, whose opening began at `opened` (a [`moment`]), with its socket if it has one.
    pub(super) fn new(
        conn: AnyConnection,
        socket: Option<Socket>,
        opened: u64,
        epoch: &Epoch,
    ) -> Link {
        Link {
            conn,
            socket,
            opened,
            epoch: epoch.clone(),
            cut: false,
        }
    }

    /// Whether it must not be used again: a call on it was cut off, or it was opened before a
    /// call or check that the database did not answer.
    pub(super) fn is_stale(&self) -> bool {
        self.cut || self.opened < self.epoch.stale_before()
    }

    /// Runs `call` on the connection; if the database has not answered within `within`, the
    /// socket is shut down, `call` fails, and the error is `cut_off(the reason)`. Without a
    /// socket, `call` runs without a deadline.
    pub(super) fn call<T>(
        &mut self,
        within: Duration,
        cut_off: impl FnOnce(String) -> StorageError,
        call: impl FnOnce(&mut AnyConnection) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        self.call_pausing(within, cut_off, |conn, _| call(conn))
    }

    /// [`Link::call`], for a call that waits for something else than the database between its
    /// statements (a snapshot handing pages to a slow reader): it runs that wait in
    /// [`Armed::paused`], and each statement gets `within`.
    pub(super) fn call_pausing<T>(
        &mut self,
        within: Duration,
        cut_off: impl FnOnce(String) -> StorageError,
        call: impl FnOnce(&mut AnyConnection, &mut Armed) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let socket = self.socket.map(|socket| Watched {
            socket,
            epoch: self.epoch.clone(),
            opened: self.opened,
        });
        let began = moment();
        let mut armed = Armed::arm(socket, within);
        let result = call(&mut self.conn, &mut armed);
        let tripped = armed.disarm();
        if !tripped {
            return result;
        }
        self.cut = true;
        self.epoch.invalidate(began);
        let reason = format!(
            "the database gave no answer within {within:?} (or the health check found it gone): the connection was cut off and every connection opened before it is replaced"
        );
        tracing::warn!(%reason, "a database call was cut off at its deadline");
        Err(cut_off(reason))
    }

    /// Its socket, if its calls have deadlines.
    pub(super) fn socket(&self) -> Option<Socket> {
        self.socket
    }

    /// The connection, for what runs without a deadline (set-up, migrations).
    pub(super) fn conn(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

/// A deadline armed on a socket: the watchdog shuts the socket down when it passes, unless
/// disarmed first.
pub(super) struct Armed {
    /// The entry in the watchdog's table while armed.
    id: Option<u64>,
    socket: Option<Watched>,
    within: Duration,
    tripped: Arc<AtomicBool>,
}

/// A socket to watch, and the epoch of its connection.
#[derive(Clone)]
struct Watched {
    socket: Socket,
    epoch: Epoch,
    opened: u64,
}

impl Armed {
    fn arm(socket: Option<Watched>, within: Duration) -> Armed {
        let mut armed = Armed {
            id: None,
            socket,
            within,
            tripped: Arc::new(AtomicBool::new(false)),
        };
        armed.rearm();
        armed
    }

    fn rearm(&mut self) {
        if let Some(socket) = &self.socket
            && !self.tripped.load(Ordering::Relaxed)
        {
            self.id =
                Some(watchdog().watch(socket.clone(), Instant::now() + self.within, &self.tripped));
        }
    }

    /// Disarms; whether the deadline had passed (and the socket was shut down).
    fn disarm(&mut self) -> bool {
        if let Some(id) = self.id.take() {
            watchdog().forget(id);
        }
        self.tripped.load(Ordering::Relaxed)
    }

    /// Runs `wait` (not a call into the database) without the deadline, which starts again
    /// after it.
    pub(super) fn paused<T>(&mut self, wait: impl FnOnce() -> T) -> T {
        self.disarm();
        let result = wait();
        self.rearm();
        result
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        self.disarm();
    }
}

/// One armed deadline.
struct Watch {
    socket: Watched,
    deadline: Instant,
    tripped: Arc<AtomicBool>,
}

impl Watch {
    /// Shuts the socket down: the call fails.
    fn trip(&self) {
        self.tripped.store(true, Ordering::Relaxed);
        // SAFETY: shutdown(2) of a socket still open: its call is still armed (disarming takes
        // the watchdog's lock, held here, and comes before the connection can be closed). A
        // shut-down socket ends the call's wait with an end of file, which libpq reports.
        unsafe { libc::shutdown(self.socket.socket.0, libc::SHUT_RDWR) };
    }
}

/// The deadlines armed, and the thread that enforces them.
struct Watchdog {
    armed: Mutex<Deadlines>,
    changed: Condvar,
}

/// The watchdog's table.
#[derive(Default)]
struct Deadlines {
    next_id: u64,
    watches: HashMap<u64, Watch>,
    /// When the watchdog wakes next by itself; `None` while it waits for a deadline to be armed.
    /// Arming a later deadline does not wake it: it wakes at this one and then waits for the
    /// next. Waking it for every call cost two context switches per PostgreSQL call (perf at
    /// one client, issue 16: the watchdog's thread was 7% of the master's samples).
    wakes_at: Option<Instant>,
}

/// The process's one watchdog, its thread started at the first use.
fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            armed: Mutex::new(Deadlines::default()),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("ledger-db-deadlines".into())
            .spawn(move || dog.run())
            .expect("spawning the database deadline thread");
        dog
    })
}

impl Watchdog {
    fn watch(&self, socket: Watched, deadline: Instant, tripped: &Arc<AtomicBool>) -> u64 {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        let id = armed.next_id;
        armed.next_id += 1;
        armed.watches.insert(
            id,
            Watch {
                socket,
                deadline,
                tripped: tripped.clone(),
            },
        );
        if armed.wakes_at.is_none_or(|wakes| deadline < wakes) {
            self.changed.notify_one();
        }
        id
    }

    fn forget(&self, id: u64) {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        armed.watches.remove(&id);
    }

    /// Cuts off every call armed on a connection of `epoch` whose opening began before `before`.
    fn cut(&self, epoch: &Epoch, before: u64) {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        armed.watches.retain(|_, watch| {
            let older =
                Arc::ptr_eq(&watch.socket.epoch.0, &epoch.0) && watch.socket.opened < before;
            if older {
                watch.trip();
            }
            !older
        });
    }

    fn run(&self) {
        let mut armed = self.armed.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let now = Instant::now();
            armed.watches.retain(|_, watch| {
                if watch.deadline > now {
                    return true;
                }
                watch.trip();
                false
            });
            let next = armed.watches.values().map(|watch| watch.deadline).min();
            armed.wakes_at = next;
            armed = match next {
                None => self
                    .changed
                    .wait(armed)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    self.changed
                        .wait_timeout(armed, deadline.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    /// A client connection to a server that accepts it and never answers, and its socket.
    fn frozen(listener: &TcpListener) -> (TcpStream, TcpStream, Socket) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        // A deadline that never trips fails the test instead of hanging it.
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let socket = Socket::find(
            client.local_addr().unwrap().port(),
            listener.local_addr().unwrap().port(),
        )
        .unwrap();
        (client, server, socket)
    }

    /// Deadlines armed in any order each trip at their own time: an earlier one than the
    /// watchdog waits for wakes it, a later one is found when it wakes.
    #[test]
    fn deadlines_trip_whatever_the_order_they_are_armed_in() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let epoch = Epoch::default();
        let watched = |socket| {
            Some(Watched {
                socket,
                epoch: epoch.clone(),
                opened: moment(),
            })
        };
        let mut answer = [0u8; 16];
        let (_long_client, _long_server, long) = frozen(&listener);
        let mut long = Armed::arm(watched(long), Duration::from_secs(60));
        let (mut early_client, _early_server, early) = frozen(&listener);
        let mut early = Armed::arm(watched(early), Duration::from_millis(200));
        assert_eq!(early_client.read(&mut answer).unwrap(), 0, "cut off");
        assert!(early.disarm(), "the earlier deadline tripped");

        let (mut first_client, _first_server, first) = frozen(&listener);
        let mut first = Armed::arm(watched(first), Duration::from_millis(200));
        let (mut later_client, _later_server, later) = frozen(&listener);
        let mut later = Armed::arm(watched(later), Duration::from_millis(400));
        assert_eq!(first_client.read(&mut answer).unwrap(), 0, "cut off");
        assert_eq!(later_client.read(&mut answer).unwrap(), 0, "cut off");
        assert!(first.disarm() && later.disarm(), "both deadlines tripped");
        assert!(!long.disarm(), "a deadline still ahead did not trip");
    }

    /// A socket is found by its ports, and a call past its deadline ends when the watchdog shuts
    /// the socket down, as a peer that never answers cannot end it.
    #[test]
    fn a_call_past_its_deadline_is_cut_off() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // Accepted, and never answered: a frozen server.
        let (_server, _) = listener.accept().unwrap();
        let local = client.local_addr().unwrap().port();
        let remote = listener.local_addr().unwrap().port();
        let socket = Socket::find(local, remote).expect("the client's socket");
        assert_eq!(socket, Socket(client.as_raw_fd()));
        assert_eq!(socket.peer(), Some(listener.local_addr().unwrap()));
        assert_eq!(Socket::find(local, remote.wrapping_add(1)), None);

        let started = Instant::now();
        let epoch = Epoch::default();
        let opened = moment();
        let watched = |socket| {
            Some(Watched {
                socket,
                epoch: epoch.clone(),
                opened,
            })
        };
        let mut armed = Armed::arm(watched(socket), Duration::from_millis(200));
        client.write_all(b"a query").unwrap();
        let mut answer = [0u8; 16];
        // Blocks until the watchdog shuts the socket down: then an end of file.
        let read = client.read(&mut answer).unwrap();
        assert_eq!(read, 0);
        assert!(armed.disarm(), "the deadline tripped");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");

        // A call that answers in time is not cut off.
        let mut other = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let socket = Socket::find(
            other.local_addr().unwrap().port(),
            listener.local_addr().unwrap().port(),
        )
        .unwrap();
        let mut armed = Armed::arm(watched(socket), Duration::from_secs(5));
        peer.write_all(b"x").unwrap();
        assert_eq!(other.read(&mut answer).unwrap(), 1);
        assert!(!armed.disarm());
        // Disarmed: nothing shuts it down later.
        std::thread::sleep(Duration::from_millis(50));
        peer.write_all(b"y").unwrap();
        assert_eq!(other.read(&mut answer).unwrap(), 1);

        // Armed for long, and cut off at once when the epoch it was opened in is.
        let mut armed = Armed::arm(watched(socket), Duration::from_secs(60));
        let started = Instant::now();
        let cutter = {
            let epoch = epoch.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                epoch.cut_off(moment());
            })
        };
        assert_eq!(other.read(&mut answer).unwrap(), 0, "cut off: end of file");
        cutter.join().unwrap();
        assert!(armed.disarm());
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}

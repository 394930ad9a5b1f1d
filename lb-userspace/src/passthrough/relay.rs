//! Moving a routed connection's bytes between the client and its backend without copying
//! them through the daemon: in the kernel by socket map (see `lb_common::passthrough`), or by
//! `splice(2)` through a pipe.
//!
//! Either way the daemon keeps the two sockets and ends the relay: a FIN from one side is
//! passed on as a shutdown of the other's sending half, but only once every byte the kernel
//! relayed before it has reached that socket, so nothing is cut short.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lb_common::passthrough::RelayKey;
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::TcpStream,
};
use tracing::debug;

use super::stats::{RouteId, Stats};
use crate::maps::RelayMaps;

/// How long a direction's relayed bytes may take to reach the other socket after its FIN.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a socket-map relay reports its byte counts.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Bytes moved per `splice` call.
const SPLICE_CHUNK: usize = 1 << 16;

/// The socket maps, shared by every connection task.
pub type SharedMaps = Arc<Mutex<RelayMaps>>;

fn lock(maps: &SharedMaps) -> std::sync::MutexGuard<'_, RelayMaps> {
    maps.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends `first` (the PROXY header and the hello the daemon read) to `upstream`, then relays
/// until both sides have finished. Returns which relay ran.
pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    first: Vec<u8>,
    maps: Option<&SharedMaps>,
    stats: &Stats,
    route: &RouteId,
) -> io::Result<&'static str> {
    if let Some(maps) = maps {
        let keys = (
            RelayKey::new(client.peer_addr()?, client.local_addr()?),
            RelayKey::new(upstream.peer_addr()?, upstream.local_addr()?),
        );
        for socket in [client.as_raw_fd(), upstream.as_raw_fd()] {
            fix_receive_buffer(socket);
        }
        // Linked before the hello goes out, so the backend's answer is already redirected.
        let linked = lock(maps).link(keys.0, &client, keys.1, &upstream);
        match linked {
            Ok(()) => {
                let result = sockmap(&client, &upstream, &first, maps, keys, stats, route).await;
                lock(maps).unlink(keys.0, keys.1);
                return result.map(|()| "sockmap");
            }
            Err(error) => debug!(%error, "socket map refused the relay; splicing"),
        }
    }
    splice(client, upstream, &first, stats, route).await.map(|()| "splice")
}

/// Receive buffer of relayed sockets. The kernel grows a TCP receive buffer as a reader
/// copies data out; the socket map takes it without copying, so the buffer would stay at
/// its initial size, and the window with it (bytes waiting to be relayed count against it).
const RELAY_RCVBUF: libc::c_int = 4 << 20;

/// Sets a relayed socket's receive buffer (forced past `net.core.rmem_max`: lbd runs with
/// CAP_NET_ADMIN); failure only costs throughput.
fn fix_receive_buffer(fd: RawFd) {
    let size = RELAY_RCVBUF;
    // SAFETY: setsockopt with an int option value on a socket this process holds.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if ret != 0 {
        debug!(error = %io::Error::last_os_error(), "could not size a relayed socket's receive buffer");
    }
}

/// One direction's progress.
#[derive(Default)]
struct Direction {
    /// The source sent its FIN (and the sink was shut down for writing).
    done: bool,
    /// Bytes the daemon itself wrote to the sink (the hello, and any bytes that were in the
    /// source's queue before the relay started).
    written: u64,
    /// Bytes the kernel relayed, as last reported.
    reported: u64,
}

async fn sockmap(
    client: &TcpStream,
    upstream: &TcpStream,
    first: &[u8],
    maps: &SharedMaps,
    (client_key, upstream_key): (RelayKey, RelayKey),
    stats: &Stats,
    route: &RouteId,
) -> io::Result<()> {
    let mut up = Direction::default();
    let mut down = Direction::default();
    let mut buf = vec![0u8; 16 * 1024];
    // Bytes the client sent after its hello, before the link: still in its queue, where the
    // kernel would only take them with the next segment. The backend cannot have answered
    // yet (it has not seen the hello), so the client is not sending more: they go first.
    let mut first = first.to_vec();
    let leftover = take_queued(client, &mut buf, &mut first)?;
    write_all(upstream, &first).await?;
    up.written = first.len() as u64;
    stats.relayed(route, up.written, 0);
    if leftover == Queued::Ended {
        up.done = true;
        drain_then_shutdown(upstream, up.written).await?;
    }
    let report = |up: &mut Direction, down: &mut Direction| {
        let (to_backend, to_client) = {
            let m = lock(maps);
            (m.relayed(&client_key), m.relayed(&upstream_key))
        };
        stats.relayed(
            route,
            to_backend.saturating_sub(up.reported),
            to_client.saturating_sub(down.reported),
        );
        up.reported = up.reported.max(to_backend);
        down.reported = down.reported.max(to_client);
    };
    // The daemon waits for the ends of the streams alone: an epoll set that asks only for
    // "peer closed" and errors, so the kernel's data wake-ups never reach it.
    let ends = Ends::new(client, upstream, !up.done)?;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    while !(up.done && down.done) {
        tokio::select! {
            ended = ends.next() => {
                let (side, end) = ended?;
                if end == End::Reset {
                    // The peer reset its connection: nothing more can be relayed either way.
                    // Closing both sockets ends the other side too.
                    report(&mut up, &mut down);
                    return Ok(());
                }
                let (from, to, d) = if side == CLIENT {
                    (client, upstream, &mut up)
                } else {
                    (upstream, client, &mut down)
                };
                // Whatever the kernel left in the queue goes on before the FIN.
                let mut rest = Vec::new();
                if take_queued(from, &mut buf, &mut rest).is_err() {
                    // Reset right after its FIN.
                    report(&mut up, &mut down);
                    return Ok(());
                }
                write_all(to, &rest).await?;
                d.written += rest.len() as u64;
                d.done = true;
                report(&mut up, &mut down);
                let expected = if side == CLIENT {
                    up.written + up.reported
                } else {
                    down.written + down.reported
                };
                drain_then_shutdown(to, expected).await?;
            }
            _ = tick.tick() => report(&mut up, &mut down),
        }
    }
    report(&mut up, &mut down);
    Ok(())
}

/// What [`take_queued`] found at the end of the queue.
#[derive(Debug, PartialEq, Eq)]
enum Queued {
    /// Nothing more for now.
    Open,
    /// The peer's FIN.
    Ended,
}

/// Appends to `out` what is queued on `from` without waiting.
fn take_queued(from: &TcpStream, buf: &mut [u8], out: &mut Vec<u8>) -> io::Result<Queued> {
    loop {
        match from.try_read(buf) {
            Ok(0) => return Ok(Queued::Ended),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Queued::Open),
            Err(e) => return Err(e),
        }
    }
}

/// How a peer finished.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// It sent a FIN: the other direction may go on.
    Fin,
    /// An error or reset: the connection is over.
    Reset,
}

const CLIENT: u64 = 0;
const UPSTREAM: u64 = 1;

/// An epoll set watching two sockets for the peer's FIN (`EPOLLRDHUP`) and errors only;
/// each socket leaves the set once reported.
struct Ends {
    epoll: tokio::io::unix::AsyncFd<OwnedFd>,
    fds: [RawFd; 2],
}

impl Ends {
    fn new(client: &TcpStream, upstream: &TcpStream, watch_client: bool) -> io::Result<Self> {
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor this process now owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let fds = [client.as_raw_fd(), upstream.as_raw_fd()];
        for (side, watch) in [(CLIENT, watch_client), (UPSTREAM, true)] {
            if !watch {
                continue;
            }
            #[allow(clippy::cast_sign_loss, reason = "epoll flag bits")]
            let mut event = libc::epoll_event {
                events: (libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32,
                u64: side,
            };
            #[allow(clippy::cast_possible_truncation, reason = "side is 0 or 1")]
            let target = fds[side as usize];
            // SAFETY: epoll_ctl on descriptors this process holds.
            if unsafe { libc::epoll_ctl(fd, libc::EPOLL_CTL_ADD, target, &raw mut event) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the descriptor, which stays open as long as it does.
        let epoll = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(Self { epoll, fds })
    }

    /// The next side whose peer is done, and how.
    async fn next(&self) -> io::Result<(u64, End)> {
        loop {
            let mut guard = self.epoll.readable().await?;
            let mut event = libc::epoll_event { events: 0, u64: 0 };
            // SAFETY: room for one event; no waiting.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &raw mut event, 1, 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            let side = event.u64;
            #[allow(clippy::cast_possible_truncation, reason = "side is 0 or 1")]
            let target = self.fds[side as usize & 1];
            // SAFETY: removing a descriptor this process holds from its set.
            unsafe {
                libc::epoll_ctl(
                    self.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    target,
                    std::ptr::null_mut(),
                );
            }
            // A FIN followed by a reset is reported at once: the FIN counts.
            #[allow(clippy::cast_sign_loss, reason = "epoll flag bits")]
            let end =
                if event.events & (libc::EPOLLRDHUP as u32) != 0 { End::Fin } else { End::Reset };
            return Ok((side, end));
        }
    }
}

/// Writes all of `bytes` to a shared stream.
async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until `expected` bytes in all have entered `sink` (acknowledged or queued), then
/// shuts its sending half: the FIN follows the last relayed byte.
async fn drain_then_shutdown(sink: &TcpStream, expected: u64) -> io::Result<()> {
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let mut pause = Duration::from_micros(200);
    while bytes_entered(sink.as_raw_fd())? < expected {
        if tokio::time::Instant::now() >= deadline {
            debug!(expected, "relayed bytes did not all arrive; shutting down anyway");
            break;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
    shutdown_write(sink.as_raw_fd())
}

/// Bytes that entered a TCP socket's send path so far: acknowledged plus still queued.
fn bytes_entered(fd: RawFd) -> io::Result<u64> {
    // SAFETY: an all-integer C struct; zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| io::Error::other("tcp_info size"))?;
    // SAFETY: `info` is writable for `len` bytes.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &raw mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one int.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + u64::try_from(queued).unwrap_or(0))
}

fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown on a socket this process holds.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } == 0 {
        Ok(())
    } else {
        let error = io::Error::last_os_error();
        // The peer may already be gone.
        if error.raw_os_error() == Some(libc::ENOTCONN) { Ok(()) } else { Err(error) }
    }
}

async fn splice(
    client: TcpStream,
    upstream: TcpStream,
    first: &[u8],
    stats: &Stats,
    route: &RouteId,
) -> io::Result<()> {
    let mut upstream = upstream;
    upstream.write_all(first).await?;
    stats.relayed(route, first.len() as u64, 0);
    let up = splice_direction(&client, &upstream, stats, route, true);
    let down = splice_direction(&upstream, &client, stats, route, false);
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

/// Splices `from` into `to` through a pipe until `from` ends, then shuts `to`'s sending half.
async fn splice_direction(
    from: &TcpStream,
    to: &TcpStream,
    stats: &Stats,
    route: &RouteId,
    to_backend: bool,
) -> io::Result<()> {
    let (pipe_r, pipe_w) = pipe()?;
    loop {
        from.readable().await?;
        let moved = match from.try_io(Interest::READABLE, || {
            splice_fd(from.as_raw_fd(), pipe_w.as_raw_fd(), SPLICE_CHUNK)
        }) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // A reset ends the relay as a FIN would; the other direction finds out too.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        };
        let mut left = moved;
        while left > 0 {
            to.writable().await?;
            match to
                .try_io(Interest::WRITABLE, || splice_fd(pipe_r.as_raw_fd(), to.as_raw_fd(), left))
            {
                Ok(n) => left -= n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let n = moved as u64;
        if to_backend { stats.relayed(route, n, 0) } else { stats.relayed(route, 0, n) }
    }
    shutdown_write(to.as_raw_fd())
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors this process now owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn splice_fd(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors this process holds; null offsets (streams).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

//! Moving a routed connection's bytes between the client and its backend without copying
//! them through the daemon: in the kernel by socket map (see `lb_common::passthrough`), or by
//! `splice(2)` through a pipe.
//!
//! Either way the daemon keeps the two sockets and ends the relay. A FIN from one side is
//! passed on as a shutdown of the other's sending half once every byte that side sent has
//! entered the other socket (TCP's own counters say so: bytes received on one, bytes sent or
//! queued on the other), so nothing is cut short; a reset is passed on as a reset.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use lb_common::passthrough::RelayKey;
use tokio::{io::Interest, net::TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::stats::{RouteId, Stats};
use crate::maps::RelayMaps;

/// How long the bytes of a finished direction may make no progress into the other socket
/// before the relay gives up on them (and resets, so the loss shows).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a socket-map relay reports its byte counts.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Bytes moved per `splice` call.
const SPLICE_CHUNK: usize = 1 << 16;

/// The socket maps, shared by every connection task.
pub type SharedMaps = Arc<Mutex<RelayMaps>>;

pub(super) fn lock(maps: &SharedMaps) -> std::sync::MutexGuard<'_, RelayMaps> {
    maps.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends `first` (the PROXY header and every byte the daemon read from the client, which
/// left nothing in its queue) to `upstream`, then relays until both sides have finished.
/// `client_ended`: the client's FIN came with its hello. `cut` ends it early, with resets.
/// Returns which relay ran. Whatever error ends it resets both sides: closing them plainly
/// would tell the client the backend finished cleanly (a backend's reset arriving before
/// the relay starts made its first socket call fail).
#[allow(clippy::too_many_arguments, reason = "one connection's whole state, passed once")]
pub async fn run(
    client: TcpStream,
    upstream: TcpStream,
    first: Vec<u8>,
    client_ended: bool,
    maps: Option<&SharedMaps>,
    stats: &Stats,
    route: &RouteId,
    cut: &CancellationToken,
) -> io::Result<&'static str> {
    let result = async {
        let (client, upstream) = (&client, &upstream);
        // Cut while it connected (its backend left service before answering): nothing of
        // the client's reaches that backend.
        if cut.is_cancelled() {
            return Err(io::Error::other("cut: its backend left service"));
        }
        // Written before any relaying: the kernel never sends into `upstream` ahead of it.
        write_all(upstream, &first).await?;
        stats.relayed(route, first.len() as u64, 0);
        if let Some(maps) = maps {
            let keys = (
                RelayKey::new(client.peer_addr()?, client.local_addr()?),
                RelayKey::new(upstream.peer_addr()?, upstream.local_addr()?),
            );
            for socket in [client.as_raw_fd(), upstream.as_raw_fd()] {
                fix_receive_buffer(socket);
            }
            // Where each direction starts, counted before the kernel takes over.
            let up = Flow::start(client, upstream, client_ended)?;
            let down = Flow::start(upstream, client, false)?;
            let linked = lock(maps).link(keys.0, client, keys.1, upstream);
            match linked {
                Ok(()) => {
                    let flows = [up, down];
                    let relayed =
                        sockmap(client, upstream, flows, client_ended, maps, keys, stats, route);
                    let result = tokio::select! {
                        result = relayed => result,
                        () = cut.cancelled() => Err(io::Error::other("cut: its backend left service")),
                    };
                    lock(maps).unlink(keys.0, keys.1);
                    return result.map(|()| "sockmap");
                }
                Err(error) => debug!(%error, "socket map refused the relay; splicing"),
            }
        }
        let result = tokio::select! {
            result = splice(client, upstream, client_ended, stats, route) => result,
            () = cut.cancelled() => Err(io::Error::other("cut: its backend left service")),
        };
        result.map(|()| "splice")
    }
    .await;
    if result.is_err() {
        abort(&client);
        abort(&upstream);
    }
    result
}

/// Receive buffer of relayed sockets. The kernel grows a TCP receive buffer as a reader
/// copies data out; the socket map takes it without copying, so the buffer would stay at
/// its initial size, and the window with it (bytes waiting to be relayed count against it).
const RELAY_RCVBUF: libc::c_int = 4 << 20;

/// Sets a relayed socket's receive buffer (forced past `net.core.rmem_max`: lbd runs with
/// CAP_NET_ADMIN); failure only costs throughput.
fn fix_receive_buffer(fd: RawFd) {
    if let Err(error) = set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RELAY_RCVBUF) {
        debug!(%error, "could not size a relayed socket's receive buffer");
    }
}

/// One direction, from a source socket into a sink socket, by TCP's counters: everything the
/// source receives from the moment the relay starts must enter the sink.
struct Flow {
    /// The source's received bytes the relay is responsible for start here (bytes the
    /// daemon read itself before are not its business; bytes still queued are).
    received_base: u64,
    /// The sink's sent-or-queued bytes when the relay started.
    entered_base: u64,
    /// The source's FIN had come when the relay started (and is in `received_base`).
    fin_in_base: bool,
    /// The source sent its FIN and the sink was shut down for writing.
    done: bool,
    /// Bytes the kernel relayed, as last reported (from `RELAY_BYTES`, for metrics).
    reported: u64,
}

impl Flow {
    fn start(source: &TcpStream, sink: &TcpStream, fin_in_base: bool) -> io::Result<Self> {
        // Each base is a counter from `tcp_info` and a queue length from an ioctl: read of one
        // moment (see `settled`), or a segment or an ACK arriving between the two would leave
        // the base off by its length: too low a received base waits at the FIN for bytes that
        // never come (then resets), too low an entered base sends the FIN before the last
        // bytes entered the sink (cutting them off).
        let fd = source.as_raw_fd();
        let received_base = settled(
            || Ok(tcp_info(fd)?.tcpi_bytes_received),
            || queued_in(fd),
            u64::saturating_sub,
        )?;
        let sink_fd = sink.as_raw_fd();
        let entered_base = settled(
            || Ok(tcp_info(sink_fd)?.tcpi_bytes_acked),
            || ioctl_int(sink_fd, libc::TIOCOUTQ),
            |acked, queued| acked + queued,
        )?;
        Ok(Self { received_base, entered_base, fin_in_base, done: false, reported: 0 })
    }

    /// What the sink's counter must reach for every byte received so far to have entered
    /// it, once the source's FIN (which TCP counts as a received byte) has come.
    fn expected(&self, source: &TcpStream) -> io::Result<u64> {
        let received = tcp_info(source.as_raw_fd())?.tcpi_bytes_received;
        let fin = u64::from(!self.fin_in_base);
        Ok((self.entered_base + received.saturating_sub(self.received_base)).saturating_sub(fin))
    }
}

#[allow(clippy::too_many_arguments, reason = "the relay's whole state, passed once")]
async fn sockmap(
    client: &TcpStream,
    upstream: &TcpStream,
    [mut up, mut down]: [Flow; 2],
    client_ended: bool,
    maps: &SharedMaps,
    (client_key, upstream_key): (RelayKey, RelayKey),
    stats: &Stats,
    route: &RouteId,
) -> io::Result<()> {
    let report = |up: &mut Flow, down: &mut Flow| {
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
    // Bytes that reached a socket before the link (the backend's first answer, often) sit
    // in its queue, where the kernel only looks again with the next segment. Setting the
    // receive low-water mark makes TCP signal "data ready" now, which runs the verdict on
    // them; should a kernel not do that, a read returns them and they go on by hand.
    let mut buf = vec![0u8; 16 * 1024];
    for (from, to) in [(client, upstream), (upstream, client)] {
        let _ = set_int(from.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVLOWAT, 1);
        let mut queued = Vec::new();
        let taken = take_queued(from, &mut buf, &mut queued, usize::MAX);
        write_all(to, &queued).await?;
        if taken.is_err() {
            // Reset already (the read took the error, so no poll will report it).
            abort(to);
            return Ok(());
        }
    }
    if client_ended {
        finish(client, upstream, &up).await?;
        up.done = true;
    }
    // The daemon waits for the ends of the streams alone: an epoll set that asks only for
    // "peer closed" and errors, so the kernel's data wake-ups never reach it.
    let ends = Ends::new(client, upstream, !up.done)?;
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    while !(up.done && down.done) {
        tokio::select! {
            ended = ends.next() => {
                let (side, end) = ended?;
                let (from, to, flow) = if side == CLIENT {
                    (client, upstream, &mut up)
                } else {
                    (upstream, client, &mut down)
                };
                // Whatever the kernel left in the queue goes on before the end. A read that
                // fails means a reset, whatever the poll said.
                let mut rest = Vec::new();
                let taken = take_queued(from, &mut buf, &mut rest, usize::MAX);
                write_all(to, &rest).await?;
                if end == End::Reset || taken.is_err() {
                    // Nothing more can reach the reset side; what it sent still goes on,
                    // then the other side is reset too.
                    wait_entered(from, to, flow).await?;
                    report(&mut up, &mut down);
                    abort(to);
                    return Ok(());
                }
                finish(from, to, flow).await?;
                flow.done = true;
            }
            _ = tick.tick() => report(&mut up, &mut down),
        }
    }
    report(&mut up, &mut down);
    Ok(())
}

/// `from` sent its FIN: once everything it sent has entered `to`, shut `to`'s sending half.
async fn finish(from: &TcpStream, to: &TcpStream, flow: &Flow) -> io::Result<()> {
    wait_entered(from, to, flow).await?;
    shutdown_write(to.as_raw_fd())
}

/// Waits until every byte `from` received has entered `to`; fails if they stop moving for
/// [`STALL_TIMEOUT`] (a peer that stopped reading).
async fn wait_entered(from: &TcpStream, to: &TcpStream, flow: &Flow) -> io::Result<()> {
    let expected = flow.expected(from)?;
    let mut last = bytes_entered(to.as_raw_fd())?;
    let mut stalled_since = tokio::time::Instant::now();
    let mut pause = Duration::from_micros(200);
    while last < expected {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
        let now = bytes_entered(to.as_raw_fd())?;
        if now > last {
            last = now;
            stalled_since = tokio::time::Instant::now();
        } else if stalled_since.elapsed() >= STALL_TIMEOUT {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{} relayed bytes did not move for {STALL_TIMEOUT:?}", expected - last),
            ));
        }
    }
    Ok(())
}

/// What [`take_queued`] found at the end of the queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    /// Nothing more for now.
    Open,
    /// The peer's FIN.
    Ended,
    /// `limit` bytes read; more may be queued.
    Full,
}

/// Appends to `out` what is queued on `from` without waiting, until a read leaves `out`
/// holding `limit` bytes or more (a sender as fast as the reads would otherwise keep the
/// loop going and `out` growing). By `recv(2)` itself, not tokio's `try_read`: that answers "would block"
/// without asking the kernel whenever tokio has not yet seen a readiness event, and bytes
/// that came just before (the backend's first answer, say) would stay in the queue with
/// nobody left to read them.
pub fn take_queued(
    from: &impl AsRawFd,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> io::Result<Queued> {
    loop {
        // SAFETY: recv into a buffer writable for its length, on a socket this process holds.
        let n = unsafe {
            libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT)
        };
        match usize::try_from(n) {
            Ok(0) => return Ok(Queued::Ended),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= limit {
                    return Ok(Queued::Full);
                }
            }
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(Queued::Open),
                    io::ErrorKind::Interrupted => {}
                    _ => return Err(e),
                }
            }
        }
    }
}

/// How a peer finished.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// It sent a FIN: the other direction may go on.
    Fin,
    /// A reset (or another error): the connection is over.
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
            // A reset also reports "peer closed" (both halves are shut): the error decides.
            #[allow(clippy::cast_sign_loss, reason = "epoll flag bits")]
            let end =
                if event.events & (libc::EPOLLERR as u32) != 0 { End::Reset } else { End::Fin };
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

fn tcp_info(fd: RawFd) -> io::Result<libc::tcp_info> {
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
    Ok(info)
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: these requests write one int.
    if unsafe { libc::ioctl(fd, request, &raw mut value) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(value).unwrap_or(0))
}

/// Bytes waiting in a TCP socket's receive queue.
fn queued_in(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// `combine(counter, queue)` from a counter and a queue length read with separate calls, of
/// one moment: the counter read again after the queue, until it has not moved (a segment or
/// an ACK came between); at most `SETTLE_TRIES` times, then the last reading (as one call
/// pair would give). The relay starts when the hello is through and before the bulk of the
/// bytes: the counters are nearly still then.
fn settled(
    mut counter: impl FnMut() -> io::Result<u64>,
    mut queue: impl FnMut() -> io::Result<u64>,
    combine: impl Fn(u64, u64) -> u64,
) -> io::Result<u64> {
    const SETTLE_TRIES: usize = 1000;
    let mut before = counter()?;
    let mut value = combine(before, queue()?);
    for _ in 0..SETTLE_TRIES {
        let after = counter()?;
        if after == before {
            break;
        }
        before = after;
        value = combine(before, queue()?);
    }
    Ok(value)
}

/// Bytes that entered a TCP socket's send path so far: acknowledged plus still queued. An
/// ACK between the two reads makes it low, never high: while waiting for a count to reach
/// a mark, that only means one more look.
fn bytes_entered(fd: RawFd) -> io::Result<u64> {
    Ok(tcp_info(fd)?.tcpi_bytes_acked + ioctl_int(fd, libc::TIOCOUTQ)?)
}

/// Sets an integer socket option.
pub fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with an int option value on a socket this process holds.
    let ret = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Makes the socket's close (when the relay drops it) send a reset: what the relay passes on
/// when one side reset, or when it gives up on bytes it cannot deliver. No shutdown here: it
/// would send a FIN first, which the peer would take for a clean end.
fn abort(socket: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a `linger` value on a socket this process holds. With a zero
    // timeout, close resets at once and never blocks.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>()).unwrap_or(8),
        );
    }
}

fn shutdown_write(fd: RawFd) -> io::Result<()> {
    shutdown(fd, libc::SHUT_WR)
}

fn shutdown(fd: RawFd, how: libc::c_int) -> io::Result<()> {
    // SAFETY: shutdown on a socket this process holds.
    if unsafe { libc::shutdown(fd, how) } == 0 {
        Ok(())
    } else {
        let error = io::Error::last_os_error();
        // The peer may already be gone.
        if error.raw_os_error() == Some(libc::ENOTCONN) { Ok(()) } else { Err(error) }
    }
}

async fn splice(
    client: &TcpStream,
    upstream: &TcpStream,
    client_ended: bool,
    stats: &Stats,
    route: &RouteId,
) -> io::Result<()> {
    let up = async {
        if client_ended {
            shutdown_write(upstream.as_raw_fd())
        } else {
            splice_direction(client, upstream, stats, route, true).await
        }
    };
    let down = splice_direction(upstream, client, stats, route, false);
    // The first error ends both directions (the caller resets both sockets).
    tokio::try_join!(up, down).map(|_| ())
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

#[cfg(test)]
mod tests {
    use std::{io::Write as _, os::unix::net::UnixStream};

    use super::*;

    #[test]
    fn a_base_is_read_of_one_moment() {
        // A segment of 4 bytes arrives between the first counter read (10) and the queue
        // read (which already holds it: 9 queued): 10 - 9 would put the base a segment low.
        // The counter, read again, has moved: the pair is read again (14, 9).
        let counters = std::cell::RefCell::new(vec![10, 14, 14].into_iter());
        let queues = std::cell::RefCell::new(vec![9, 9].into_iter());
        let base = settled(
            || Ok(counters.borrow_mut().next().unwrap()),
            || Ok(queues.borrow_mut().next().unwrap()),
            |received, queued| received - queued,
        );
        assert_eq!(base.unwrap(), 5);
    }

    #[test]
    fn taking_what_is_queued_stops_at_its_limit_and_reports_the_end() {
        let (mut writer, reader) = UnixStream::pair().unwrap();
        reader.set_nonblocking(true).unwrap();
        writer.write_all(&vec![7u8; 64 * 1024]).unwrap();
        let mut buf = [0u8; 4096];
        let mut out = b"hello".to_vec();
        // Stops once `out` holds the limit, with the rest left queued.
        let limit = 20_000;
        assert_eq!(take_queued(&reader, &mut buf, &mut out, limit).unwrap(), Queued::Full);
        assert!((limit..limit + buf.len()).contains(&out.len()), "{}", out.len());
        assert_eq!(&out[..5], b"hello");
        // A limit `out` is past already, with nothing queued: nothing more, not full.
        let (_idle_writer, idle) = UnixStream::pair().unwrap();
        idle.set_nonblocking(true).unwrap();
        let mut big = vec![1u8; 100];
        assert_eq!(take_queued(&idle, &mut buf, &mut big, 50).unwrap(), Queued::Open);
        // Without a limit: the rest, then nothing more for now; then the peer's end.
        let mut rest = Vec::new();
        assert_eq!(take_queued(&reader, &mut buf, &mut rest, usize::MAX).unwrap(), Queued::Open);
        assert_eq!(out.len() - 5 + rest.len(), 64 * 1024);
        assert!(out[5..].iter().chain(&rest).all(|b| *b == 7));
        drop(writer);
        assert_eq!(take_queued(&reader, &mut buf, &mut rest, usize::MAX).unwrap(), Queued::Ended);
    }
}

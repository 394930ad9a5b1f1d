//! A passthrough service's listener and connections: admit, read the ClientHello, route,
//! connect to the backend, relay.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::{Duration, Instant},
};

use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    hello::{ClientHello, HelloReader, MAX_HANDSHAKE_BYTES},
    policy::{Policy, RejectReason},
    proxy_v2::proxy_v2_header,
    relay::{self, SharedMaps},
    stats::Stats,
};

/// How long connecting to a backend may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes read while waiting for a complete hello, at most: a 16 KiB handshake in records of
/// one byte each comes to 96 KiB; anything larger is not a hello worth waiting for. Also the
/// most the hello and the bytes that came with it (a first flight's early data) may hold.
const MAX_HELLO_BUFFER: usize = 6 * (MAX_HANDSHAKE_BYTES + 5);
/// Listen backlog of the daemon's listeners: bursts of new connections queue in the kernel
/// rather than being refused.
const BACKLOG: libc::c_int = 4096;

/// What every connection of every passthrough service shares.
#[derive(Debug)]
pub struct Shared {
    /// The socket maps; `None` relays by splice.
    pub maps: Option<SharedMaps>,
    pub stats: Arc<Stats>,
    /// Relays running or connecting to their backend, so the daemon can cut those of a
    /// backend it takes out of service (see [`Shared::choose`]).
    pub relays: Mutex<HashMap<u64, RelayHandle>>,
    pub next_relay: std::sync::atomic::AtomicU64,
}

/// A relay, running or connecting: its backend (by id: a backend without a port of its own
/// and one with the service's port are two backends at one address), and how to end it.
#[derive(Debug)]
pub struct RelayHandle {
    pub backend_id: u32,
    pub cut: CancellationToken,
}

impl Shared {
    #[must_use]
    pub fn new(maps: Option<SharedMaps>, stats: Arc<Stats>) -> Self {
        Self {
            maps,
            stats,
            relays: Mutex::new(HashMap::new()),
            next_relay: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How many relays run or connect (not cut) to the backend `backend_id`.
    pub fn count(&self, backend_id: u32) -> usize {
        let relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        relays.values().filter(|r| !r.cut.is_cancelled() && r.backend_id == backend_id).count()
    }

    /// Ends (with resets) the relays to the backends `ids`: those running, and those still
    /// connecting, which end as soon as their backend answers. Returns how many.
    pub fn cut(&self, ids: &std::collections::HashSet<u32>) -> usize {
        let relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        let mut n = 0;
        for relay in relays.values().filter(|r| ids.contains(&r.backend_id)) {
            if !relay.cut.is_cancelled() {
                relay.cut.cancel();
                n += 1;
            }
        }
        n
    }

    /// Chooses the backend of `pool` for a connection from `peer` (none of those `tried`)
    /// by `runtime`'s policy as it is now, and registers the relay to it before connecting.
    /// Returns the policy, the backend's id and address, and the registration.
    ///
    /// The policy is read and the relay registered under the registry's lock, one step as
    /// a cut sees it: the daemon installs the policy that takes a backend out of service
    /// before it cuts the backend's relays, so a relay is either registered before the cut
    /// (which ends it, connected yet or not) or chosen by a policy without that backend.
    /// Registered only once connected, a relay whose backend was chosen before a cut and
    /// answered after it (up to `CONNECT_TIMEOUT` later) would run on to a backend out of
    /// service, the cut having come and gone.
    fn choose(
        &self,
        runtime: &ServiceRuntime,
        pool: &str,
        peer: SocketAddr,
        tried: &[u32],
    ) -> Option<(Arc<Policy>, u32, SocketAddr, Registered<'_>)> {
        let mut relays = self.relays.lock().unwrap_or_else(PoisonError::into_inner);
        let policy = runtime.policy();
        let (backend_id, backend) = policy.select(pool, peer, tried)?;
        let cut = CancellationToken::new();
        let id = self.next_relay.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        relays.insert(id, RelayHandle { backend_id, cut: cut.clone() });
        Some((policy, backend_id, backend, Registered { shared: self, id, cut }))
    }
}

/// A relay in the registry, removed when dropped (its connection failed, or its task ended).
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
    /// Cancelled when the daemon cuts the relay.
    cut: CancellationToken,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.relays.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}

/// One running service: its current policy and its pending handshakes.
#[derive(Debug)]
pub struct ServiceRuntime {
    policy: RwLock<Arc<Policy>>,
    /// Connections waiting for their hello or their backend: in all, and per client
    /// address (IPv6: per /64).
    pending: Mutex<(u32, HashMap<IpAddr, u32>)>,
}

impl ServiceRuntime {
    #[must_use]
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy: RwLock::new(policy), pending: Mutex::new((0, HashMap::new())) }
    }

    /// The policy new connections use.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the policy; connections already routed keep theirs.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = policy;
    }

    fn admit(self: &Arc<Self>, source: IpAddr, policy: &Policy) -> Option<PendingGuard> {
        // One IPv6 host commonly holds a whole /64: count it as one source.
        let source = match source {
            IpAddr::V6(a) => {
                let mut o = a.octets();
                o[8..].fill(0);
                IpAddr::from(o)
            }
            v4 @ IpAddr::V4(_) => v4,
        };
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        let per_source = pending.1.get(&source).copied().unwrap_or(0);
        if pending.0 >= policy.max_pending() || per_source >= policy.max_pending_per_source() {
            return None;
        }
        pending.0 += 1;
        *pending.1.entry(source).or_default() += 1;
        Some(PendingGuard { runtime: self.clone(), source })
    }
}

/// A connection counted as pending until dropped.
struct PendingGuard {
    runtime: Arc<ServiceRuntime>,
    source: IpAddr,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut pending = self.runtime.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.0 = pending.0.saturating_sub(1);
        if let Some(n) = pending.1.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                pending.1.remove(&self.source);
            }
        }
    }
}

/// A listening socket on the loopback address of `family_of`'s family and a free port: the
/// `sk_lookup` program hands it the service's connections, so it needs no service address.
pub fn bind_listener(family_of: SocketAddr) -> io::Result<std::net::TcpListener> {
    let local: SocketAddr = if family_of.is_ipv4() {
        (std::net::Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    };
    let listener = std::net::TcpListener::bind(local)?;
    // SAFETY: listen on a socket this process holds; raises the backlog std chose.
    if unsafe { libc::listen(listener.as_raw_fd(), BACKLOG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Accepts the service's connections until `cancel`; each runs in a task of its own.
pub async fn serve(
    listener: TcpListener,
    runtime: Arc<ServiceRuntime>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((client, peer)) => {
                tokio::spawn(handle(client, peer, runtime.clone(), shared.clone()));
            }
            Err(error) => {
                // Out of descriptors and the like: back off instead of spinning.
                warn!(%error, "accepting a passthrough connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    runtime: Arc<ServiceRuntime>,
    shared: Arc<Shared>,
) {
    let accepted = Instant::now();
    let policy = runtime.policy();
    let stats = &shared.stats;
    let service = policy.service.as_str();
    let Some(pending) = runtime.admit(peer.ip(), &policy) else {
        stats.reject(service, "too_many_pending");
        return;
    };
    stats.pending(service, 1);
    // Pending until the backend answers: a flood of hellos to a pool that black-holes SYNs
    // is held by the same caps as a flood of slow hellos.
    let connected = async {
        let (hello, route, routed) = decide(&mut client, peer, &policy, &runtime).await?;
        stats.decided(service, accepted.elapsed());
        let attempts = routed.connect_attempts();
        let (backend, stream, chosen, registered) =
            connect(attempts, &runtime, &shared, &route.pool, peer, stats).await?;
        Ok((hello, route, backend, stream, chosen, registered))
    }
    .await;
    // A refusal is counted while the connection still counts as pending: the last one of a
    // service a reload removed must not bring its series back after they were dropped.
    if let Err(reason) = connected {
        debug!(%peer, service, reason, "passthrough connection refused");
        stats.reject(service, reason);
    }
    stats.pending(service, -1);
    drop(pending);
    // From here on, the policy the backend was chosen by (its PROXY header and relay).
    let Ok((hello, route, backend, upstream, policy, registered)) = connected else { return };
    for socket in [&client, &upstream] {
        let _ = socket.set_nodelay(true);
        keep_alive(socket);
    }
    let mut first = Vec::new();
    if policy.proxy_protocol() {
        let local = client.local_addr().unwrap_or(policy.address);
        first.extend(proxy_v2_header(peer, local));
    }
    first.extend_from_slice(&hello.bytes);
    let route_id = (service.to_owned(), route.label, route.pool);
    stats.opened(&route_id);
    let maps = if policy.relay() == crate::config::RelayMode::Sockmap {
        shared.maps.as_ref()
    } else {
        None
    };
    // Cut while it connected, the relay resets both sides at once (see `relay::run`).
    let relayed =
        relay::run(client, upstream, first, hello.ended, maps, stats, &route_id, &registered.cut);
    let how = match relayed.await {
        Ok(how) => {
            debug!(%peer, %backend, how, "relay finished");
            Some(how)
        }
        Err(error) => {
            debug!(%peer, %backend, %error, "relay ended by an error");
            None
        }
    };
    stats.closed(&route_id, how);
}

/// What the daemon read from a client.
struct Hello {
    /// Every byte read: the hello and anything after it that had arrived.
    bytes: Vec<u8>,
    /// The client's FIN came too.
    ended: bool,
}

/// Keep-alive probes on a relayed socket, so a peer that vanished without a FIN or a reset
/// does not hold the relay for ever (about 2 minutes of silence, then 6 probes 10 s apart).
fn keep_alive(socket: &TcpStream) {
    let fd = socket.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 120),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ] {
        let _ = relay::set_int(fd, level, name, value);
    }
}

/// Connects to a backend of `pool` for the client `peer`: the one the pool's table gives,
/// then, while it refuses or does not answer in time, the next ones not tried (up to
/// `attempts` in all). Each choice is by the service's policy as it is then (an attempt may
/// take seconds, in which a backend may be disabled and its relays cut: a choice from the
/// old table would escape the cut), and registers the relay (see [`Shared::choose`]). Each
/// failed attempt is counted; the last one's reason is the connection's. Returns the policy
/// the backend was chosen by, and the relay's registration.
async fn connect<'s>(
    attempts: u32,
    runtime: &ServiceRuntime,
    shared: &'s Shared,
    pool: &str,
    peer: SocketAddr,
    stats: &Stats,
) -> Result<(SocketAddr, TcpStream, Arc<Policy>, Registered<'s>), RejectReason> {
    let mut tried = Vec::new();
    let mut reason = "no_backend";
    for _ in 0..attempts {
        let Some((policy, id, backend, registered)) = shared.choose(runtime, pool, peer, &tried)
        else {
            break;
        };
        tried.push(id);
        reason = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(stream)) => return Ok((backend, stream, policy, registered)),
            Ok(Err(error)) => {
                debug!(%peer, %backend, %error, "connecting to the backend failed");
                "connect_failed"
            }
            Err(_) => "connect_timeout",
        };
        stats.connect_failed(&policy.service, reason);
    }
    Err(reason)
}

/// Reads the hello within the policy's timeout and routes it: the bytes read, the route and
/// the policy that routed it.
async fn decide(
    client: &mut TcpStream,
    peer: SocketAddr,
    policy: &Policy,
    runtime: &ServiceRuntime,
) -> Result<(Hello, super::policy::Route, Arc<Policy>), RejectReason> {
    let (bytes, hello) = tokio::time::timeout(policy.hello_timeout(), read_hello(client))
        .await
        .map_err(|_| "hello_timeout")??;
    // Whatever followed the hello (early data) is taken too, so that no segment is left
    // half read: the kernel relay would send it again whole. Up to a bound: a client does
    // not send more than its first flight before the server's answer, and one that keeps
    // sending as fast as the reads take it would hold the loop and grow the buffer.
    let mut bytes = bytes;
    let mut chunk = [0u8; 4096];
    let queued = relay::take_queued(client, &mut chunk, &mut bytes, MAX_HELLO_BUFFER)
        .map_err(|_| "read_error")?;
    if queued == relay::Queued::Full {
        return Err("too_large");
    }
    let ended = queued == relay::Queued::Ended;
    if hello.has_ech {
        debug!(%peer, "hello with encrypted_client_hello: routed on its outer server name");
    }
    // Routed by the policy as it is now, not as it was when the connection came in: the
    // hello may take up to its timeout (minutes), in which a backend may be disabled and its
    // relays cut, which a choice made by the old policy would escape.
    let policy = runtime.policy();
    let route = policy.route(hello.server_name.as_deref())?;
    Ok((Hello { bytes, ended }, route, policy))
}

/// Reads until the buffer holds a whole ClientHello (record by record: it may come in any
/// number of segments and records).
async fn read_hello(client: &mut TcpStream) -> Result<(Vec<u8>, ClientHello), RejectReason> {
    let mut buffer = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    // Resumed read after read: each record header is walked once.
    let mut reader = HelloReader::default();
    loop {
        let n = client.read(&mut chunk).await.map_err(|_| "read_error")?;
        if n == 0 {
            return Err("closed_before_hello");
        }
        buffer.extend_from_slice(&chunk[..n]);
        match reader.parse(&buffer, MAX_HANDSHAKE_BYTES) {
            Ok(Some(hello)) => return Ok((buffer, hello)),
            Ok(None) if buffer.len() >= MAX_HELLO_BUFFER => return Err("too_large"),
            Ok(None) => {}
            Err(error) => return Err(error.reason()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relays_are_counted_and_cut_by_backend_id_not_address() {
        // A backend without a port of its own (id 1, removed) and one at the same address
        // with the service's port (id 2, live) relay to the same socket address: a cut of
        // the removed one, or its count keeping its id retired, must not take the other's.
        let shared = Shared::new(None, Arc::new(Stats::default()));
        let handle = |backend_id| RelayHandle { backend_id, cut: CancellationToken::new() };
        {
            let mut relays = shared.relays.lock().unwrap();
            relays.insert(10, handle(1));
            relays.insert(11, handle(2));
            relays.insert(12, handle(2));
        }
        assert_eq!((shared.count(1), shared.count(2)), (1, 2));
        assert_eq!(shared.cut(&[1].into()), 1);
        let relays = shared.relays.lock().unwrap();
        assert!(relays[&10].cut.is_cancelled());
        assert!(!relays[&11].cut.is_cancelled() && !relays[&12].cut.is_cancelled());
        drop(relays);
        assert_eq!((shared.count(1), shared.count(2)), (0, 2), "a cut relay counts no more");
    }
}

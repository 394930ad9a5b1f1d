//! The TLS-passthrough maps: `PASSTHROUGH_LISTENERS` (the daemon's listeners the `sk_lookup`
//! program hands connections to), `RELAY_SOCKETS` (each relayed socket under its own
//! connection: the stream-verdict program's map), `RELAY_PEERS` (each relayed socket under
//! its partner's connection) and `RELAY_BYTES` (bytes the kernel relayed per connection).

use std::os::fd::AsRawFd;

use aya::{
    maps::{Map, MapData, PerCpuHashMap, PerCpuValues, SockHash, sock::SockMapFd},
    util::nr_cpus,
};
use lb_common::{
    maps,
    passthrough::{ListenerKey, RelayKey},
};

use super::{MapError, typed};

pub struct RelayMaps {
    listeners: SockHash<MapData, ListenerKey>,
    sockets: SockHash<MapData, RelayKey>,
    peers: SockHash<MapData, RelayKey>,
    bytes: PerCpuHashMap<MapData, RelayKey, u64>,
}

impl std::fmt::Debug for RelayMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayMaps").finish_non_exhaustive()
    }
}

fn update(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |source| MapError::Update { name, source }
}

impl RelayMaps {
    pub(crate) fn new(
        listeners: Map,
        sockets: Map,
        peers: Map,
        bytes: Map,
    ) -> Result<Self, MapError> {
        Ok(Self {
            listeners: typed(maps::PASSTHROUGH_LISTENERS, listeners)?,
            sockets: typed(maps::RELAY_SOCKETS, sockets)?,
            peers: typed(maps::RELAY_PEERS, peers)?,
            bytes: typed(maps::RELAY_BYTES, bytes)?,
        })
    }

    /// `RELAY_SOCKETS`, to attach the stream-verdict program to.
    #[must_use]
    pub fn sockets_fd(&self) -> &SockMapFd {
        self.sockets.fd()
    }

    /// Hands connections to `service` to the listening socket `listener`.
    pub fn set_listener(
        &mut self,
        service: std::net::SocketAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), MapError> {
        self.listeners
            .insert(ListenerKey::from(service), listener.as_raw_fd(), 0)
            .map_err(update(maps::PASSTHROUGH_LISTENERS))
    }

    /// Stops handing connections to `service` to the daemon (missing is fine).
    pub fn remove_listener(&mut self, service: std::net::SocketAddr) {
        let _ = self.listeners.remove(&ListenerKey::from(service));
    }

    /// Starts relaying between two connected sockets, `a` (its connection `a_key`) and `b`
    /// (`b_key`): what arrives on either leaves through the other. Byte counters start at
    /// zero first, so no byte goes uncounted; both ways go into `RELAY_PEERS` before either
    /// socket enters `RELAY_SOCKETS` (and so reaches the program), so no byte finds its way
    /// missing. With one map, a byte arriving between the two inserts stayed on its socket,
    /// behind the program's back (one connection in a few thousand under a storm of them).
    pub fn link(
        &mut self,
        a_key: RelayKey,
        a: &impl AsRawFd,
        b_key: RelayKey,
        b: &impl AsRawFd,
    ) -> Result<(), MapError> {
        let cpus = nr_cpus().map_err(|(_, e)| MapError::Cpus(e))?;
        for key in [a_key, b_key] {
            let zero = PerCpuValues::try_from(vec![0u64; cpus]).map_err(MapError::Cpus)?;
            if let Err(source) = self.bytes.insert(key, zero, 0) {
                let _ = self.bytes.remove(&a_key);
                return Err(MapError::Update { name: maps::RELAY_BYTES, source });
            }
        }
        let linked = self
            .peers
            .insert(a_key, b.as_raw_fd(), 0)
            .and_then(|()| self.peers.insert(b_key, a.as_raw_fd(), 0))
            .map_err(|source| MapError::Update { name: maps::RELAY_PEERS, source })
            .and_then(|()| {
                self.sockets
                    .insert(a_key, a.as_raw_fd(), 0)
                    .and_then(|()| self.sockets.insert(b_key, b.as_raw_fd(), 0))
                    .map_err(|source| MapError::Update { name: maps::RELAY_SOCKETS, source })
            });
        if let Err(error) = linked {
            self.unlink(a_key, b_key);
            return Err(error);
        }
        Ok(())
    }

    /// Bytes the kernel relayed from the connection `key` so far.
    #[must_use]
    pub fn relayed(&self, key: &RelayKey) -> u64 {
        self.bytes.get(key, 0).map_or(0, |values| values.iter().sum())
    }

    /// Forgets a relay (entries already gone are fine: closing a socket removes it). The
    /// program lets go of both sockets before their partners leave `RELAY_PEERS`.
    pub fn unlink(&mut self, a_key: RelayKey, b_key: RelayKey) {
        for key in [a_key, b_key] {
            let _ = self.sockets.remove(&key);
        }
        for key in [a_key, b_key] {
            let _ = self.peers.remove(&key);
            let _ = self.bytes.remove(&key);
        }
    }
}

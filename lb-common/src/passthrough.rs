//! TLS passthrough: the kernel's half of the relay between a client's connection and its
//! backend's, both held by the daemon.
//!
//! An `sk_lookup` program hands a passthrough service's connections to the daemon's listening
//! socket (`PASSTHROUGH_LISTENERS`, keyed by [`ListenerKey`]). Once the daemon has read the
//! ClientHello and connected to the backend, it puts each socket in `RELAY_PEERS` under the
//! key of the *other* socket's connection ([`RelayKey`], as that socket sees it), then both in
//! `RELAY_SOCKETS`, whose stream-verdict program redirects every byte received on one socket
//! to the other's send queue: no copy through userspace. Two maps, because a socket's bytes
//! reach the program from the moment the socket enters the map the program is attached to:
//! by then both ways must be known, or a byte arriving between the two inserts has nowhere
//! to go.

/// Key of `PASSTHROUGH_LISTENERS`: a passthrough service's address and TCP port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    /// Network order; IPv4 in the first word.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ListenerKey>() == 20);
#[cfg(feature = "user")]
// SAFETY: repr(C), explicit padding, plain integers.
unsafe impl aya::Pod for ListenerKey {}

/// Key of `RELAY_SOCKETS`, `RELAY_PEERS` and `RELAY_BYTES`: a TCP connection as one of its sockets sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RelayKey {
    /// The peer's address, network order; IPv4 in the first word.
    pub remote: [u32; 4],
    /// The socket's own address, network order; IPv4 in the first word.
    pub local: [u32; 4],
    /// Host order.
    pub remote_port: u16,
    /// Host order.
    pub local_port: u16,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<RelayKey>() == 40);
#[cfg(feature = "user")]
// SAFETY: repr(C), explicit padding, plain integers.
unsafe impl aya::Pod for RelayKey {}

/// Passthrough services with a listener (one listening socket each).
pub const MAX_LISTENERS: u32 = 256;
/// Relayed connections at once: two sockets each, in two socket maps. A socket map holds
/// file references, not buffers, so the cost is a few hundred bytes per entry.
pub const MAX_RELAYS: u32 = 65_536;

/// `AF_INET` and `AF_INET6` as the socket contexts report them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

/// The host-order port in a `__sk_buff`'s `remote_port`: the kernel loads the big-endian
/// 16-bit port and, on little-endian machines, shifts it into the upper half. Whichever half
/// holds it (a real port is never zero), this finds it.
#[must_use]
#[allow(clippy::cast_possible_truncation, reason = "the port is in the low half by then")]
pub const fn skb_remote_port(raw: u32) -> u16 {
    let half = if raw >> 16 == 0 { raw } else { raw >> 16 };
    u16::from_be(half as u16)
}

#[cfg(feature = "user")]
mod user {
    use std::net::SocketAddr;

    use super::{ListenerKey, RelayKey};
    use crate::flow::addr_words;

    const fn family(addr: &SocketAddr) -> u8 {
        if addr.is_ipv4() { 4 } else { 6 }
    }

    impl From<SocketAddr> for ListenerKey {
        fn from(addr: SocketAddr) -> Self {
            Self { addr: addr_words(addr.ip()), port: addr.port(), family: family(&addr), _pad: 0 }
        }
    }

    impl RelayKey {
        /// The key of a connection as the socket at `local`, connected to `remote`, sees it.
        #[must_use]
        pub fn new(remote: SocketAddr, local: SocketAddr) -> Self {
            Self {
                remote: addr_words(remote.ip()),
                local: addr_words(local.ip()),
                remote_port: remote.port(),
                local_port: local.port(),
                family: family(&local),
                _pad: [0; 3],
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_port_in_either_half() {
        let be = 443u16.to_be();
        assert_eq!(skb_remote_port(u32::from(be) << 16), 443);
        assert_eq!(skb_remote_port(u32::from(be)), 443);
    }
}

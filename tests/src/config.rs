//! lbd configuration tables as the tests write them: a pool of backends, a TCP service, and a
//! TLS-passthrough service with its routes by server name, each a TOML fragment to join.

use std::{fmt::Write as _, net::IpAddr};

/// A `[[pool]]` named `name` with one `[[pool.backend]]` table per entry: the backend's
/// address, then its further keys (`port = 8443`, `weight = 50`; empty for none). Tables of
/// the pool's own (`[pool.health_check]`) may follow the returned text.
#[must_use]
pub fn pool<A, K>(name: &str, backends: &[(A, K)]) -> String
where
    A: Copy + Into<IpAddr>,
    K: AsRef<str>,
{
    let mut c = format!("[[pool]]\nname = \"{name}\"\n");
    for (addr, keys) in backends {
        let _ = write!(c, "[[pool.backend]]\naddress = \"{}\"\n", (*addr).into());
        let keys = keys.as_ref();
        if !keys.is_empty() {
            let _ = writeln!(c, "{keys}");
        }
    }
    c
}

/// A `[[service]]` named `name` taking TCP on `addr:port` to `pool`, then its further keys:
/// `mode` and what the mode needs (`nat_source`, a `[service.tls]` table).
#[must_use]
pub fn tcp_service(
    name: &str,
    addr: impl Into<IpAddr>,
    port: u16,
    pool: &str,
    keys: &str,
) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {port}\npool = \"{pool}\"\n{keys}\n",
        addr.into()
    )
}

/// A TLS-passthrough [`tcp_service`] whose `[service.tls]` table holds `tls`: its settings,
/// then its routes ([`tls_route`]).
#[must_use]
pub fn tls_passthrough_service(
    name: &str,
    addr: impl Into<IpAddr>,
    port: u16,
    pool: &str,
    tls: &str,
) -> String {
    tcp_service(
        name,
        addr,
        port,
        pool,
        &format!("mode = \"tls-passthrough\"\n[service.tls]\n{tls}"),
    )
}

/// A `[[service.tls.route]]` sending `server_name` (a name or a `*.` wildcard) to `pool`.
#[must_use]
pub fn tls_route(server_name: &str, pool: &str) -> String {
    format!("[[service.tls.route]]\nserver_name = \"{server_name}\"\npool = \"{pool}\"\n")
}

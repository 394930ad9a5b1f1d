//! One health check of one backend: a TCP connect, an HTTP(S) GET, a UDP exchange or an
//! external command, each bounded by a timeout.
//!
//! A check of a DSR backend goes to the service address, not the backend's own: the socket
//! carries a firewall mark that policy routing ([`super::route`]) sends to that backend, so a
//! pass proves the backend answers for the service address.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::config::CheckKind;

/// The most of a response a check reads.
const MAX_RESPONSE: usize = 64 * 1024;

/// Everything one check needs, built from the pool's `health_check` and the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub kind: CheckKind,
    /// Where to connect: the backend's address, or for DSR the service addresses.
    pub targets: Vec<SocketAddr>,
    /// Firewall mark of the check's sockets (DSR checks), routed to the backend.
    pub mark: Option<u32>,
    pub timeout: Duration,
    pub path: String,
    pub expect_status: u16,
    pub expect: Option<String>,
    pub send: Option<String>,
    pub sni: Option<String>,
    /// `Host` header; by default the target's address.
    pub host: Option<String>,
    /// Command and arguments, placeholders already replaced.
    pub command: Vec<String>,
}

impl Probe {
    /// Runs the check against every target; `Ok` if all pass, else why one failed.
    pub async fn run(&self) -> Result<(), String> {
        if self.kind == CheckKind::Command {
            return within(self.timeout, self.command()).await;
        }
        for target in &self.targets {
            let result = match self.kind {
                CheckKind::Tcp => {
                    within(self.timeout, async { connect(*target, self.mark).await.map(drop) })
                        .await
                }
                CheckKind::Http => within(self.timeout, self.http(*target, false)).await,
                CheckKind::Https => within(self.timeout, self.http(*target, true)).await,
                CheckKind::Udp => within(self.timeout, self.udp(*target)).await,
                CheckKind::Command => unreachable!("handled above"),
            };
            result.map_err(|e| format!("{target}: {e}"))?;
        }
        Ok(())
    }

    async fn http(&self, target: SocketAddr, tls: bool) -> Result<(), String> {
        let stream = connect(target, self.mark).await?;
        let host = self.host_header(target, tls);
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbd-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path
        );
        let response = if tls {
            let mut stream = tls_connect(stream, target.ip(), self.sni.as_deref()).await?;
            exchange(&mut stream, request.as_bytes()).await?
        } else {
            let mut stream = stream;
            exchange(&mut stream, request.as_bytes()).await?
        };
        check_http_response(&response, self.expect_status, self.expect.as_deref())
    }

    /// The `Host` header: the configured one as written; else the server name the TLS
    /// handshake sends (a server may refuse a Host that differs, 421), else the address,
    /// with the port when it is not the scheme's own (RFC 9110 §7.2).
    fn host_header(&self, target: SocketAddr, tls: bool) -> String {
        if let Some(host) = &self.host {
            return host.clone();
        }
        let name = match (self.sni.as_ref().filter(|_| tls), target.ip()) {
            (Some(sni), _) if sni.parse::<std::net::Ipv6Addr>().is_ok() => format!("[{sni}]"),
            (Some(sni), _) => sni.clone(),
            (None, IpAddr::V4(a)) => a.to_string(),
            (None, IpAddr::V6(a)) => format!("[{a}]"),
        };
        if target.port() == if tls { 443 } else { 80 } {
            name
        } else {
            format!("{name}:{}", target.port())
        }
    }

    async fn udp(&self, target: SocketAddr) -> Result<(), String> {
        let bind: SocketAddr = if target.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = tokio::net::UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        if let Some(mark) = self.mark {
            set_mark(&socket, mark)?;
        }
        socket.connect(target).await.map_err(|e| e.to_string())?;
        let request = self.send.as_deref().unwrap_or_default();
        socket.send(request.as_bytes()).await.map_err(|e| e.to_string())?;
        let mut buf = vec![0; MAX_RESPONSE];
        let n = socket.recv(&mut buf).await.map_err(|e| e.to_string())?;
        let response = String::from_utf8_lossy(&buf[..n]);
        match &self.expect {
            Some(text) if !response.contains(text.as_str()) => {
                Err(format!("response does not contain {text:?}"))
            }
            _ => Ok(()),
        }
    }

    async fn command(&self) -> Result<(), String> {
        let (program, args) = self.command.split_first().ok_or("no command")?;
        // In a process group of its own: a check timed out (this future dropped) takes the
        // whole group with it (see `process`), and so does one that exits, leaving nothing
        // behind to pile up one per interval.
        let mut child = crate::process::spawn(
            tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        )
        .map_err(|e| format!("{program}: {e}"))?;
        let status = child.wait_whole().await.map_err(|e| format!("{program}: {e}"))?;
        if status.success() { Ok(()) } else { Err(format!("{program} exited with {status}")) }
    }
}

async fn within<T>(
    timeout: Duration,
    f: impl Future<Output = Result<T, String>>,
) -> Result<T, String> {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {} ms", timeout.as_millis())))
}

async fn connect(target: SocketAddr, mark: Option<u32>) -> Result<tokio::net::TcpStream, String> {
    let socket = if target.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    if let Some(mark) = mark {
        set_mark(&socket, mark)?;
    }
    socket.connect(target).await.map_err(|e| e.to_string())
}

/// Size of the `SO_MARK` option's value (a u32).
const MARK_LEN: libc::socklen_t = 4;

fn set_mark(socket: &impl AsRawFd, mark: u32) -> Result<(), String> {
    // SAFETY: a valid socket and a u32 option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            MARK_LEN,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setting the socket mark: {}", std::io::Error::last_os_error()))
    }
}

async fn exchange<S>(stream: &mut S, request: &[u8]) -> Result<Vec<u8>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while response.len() < MAX_RESPONSE {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                // Complete by its own framing: a server that keeps the connection open
                // despite `Connection: close` is not waited for until the timeout.
                if body_of(&response).is_some() {
                    break;
                }
            }
            // Servers that close without a TLS close_notify end the response just the same.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {
                break;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(response)
}

/// Whether an HTTP response has the expected status and, if given, body text.
pub fn check_http_response(
    response: &[u8],
    expect_status: u16,
    expect: Option<&str>,
) -> Result<(), String> {
    let response = final_answer(response);
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(status)) = (parts.next(), parts.next()) else {
        return Err("no HTTP response".to_owned());
    };
    if !version.starts_with("HTTP/") {
        return Err(format!("not an HTTP response: {status_line:?}"));
    }
    let status: u16 = status.parse().map_err(|_| format!("bad status line {status_line:?}"))?;
    if status != expect_status {
        return Err(format!("status {status}, expected {expect_status}"));
    }
    if let Some(expect) = expect {
        // The body as sent, chunks joined (text split across chunks is still found); a
        // response cut short is matched as it came.
        let body = body_of(response).map_or_else(
            || text.split_once("\r\n\r\n").map_or(String::new(), |(_, b)| b.to_owned()),
            |body| String::from_utf8_lossy(&body).into_owned(),
        );
        if !body.contains(expect) {
            return Err(format!("body does not contain {expect:?}"));
        }
    }
    Ok(())
}

/// The body of a complete HTTP response by its framing — `Content-Length`, chunked transfer
/// coding (chunks joined), none for 1xx, 204 and 304 — or `None` while more is to come
/// (and for a response framed by the end of the connection alone).
fn body_of(response: &[u8]) -> Option<Vec<u8>> {
    let response = final_answer(response);
    let header_end = find(response, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&response[..header_end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    if status == 101 || status == 204 || status == 304 {
        return Some(Vec::new());
    }
    let (mut length, mut chunked) = (None, false);
    for (name, value) in lines.filter_map(|line| line.split_once(':')) {
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-length") {
            length = value.parse::<usize>().ok();
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        }
    }
    let rest = &response[header_end..];
    if chunked {
        return dechunk(rest);
    }
    length.and_then(|n| rest.get(..n)).map(<[u8]>::to_vec)
}

/// The response after any interim (1xx, but 101) answers before it, such as 103 Early
/// Hints: the final answer follows them on the same connection.
fn final_answer(mut response: &[u8]) -> &[u8] {
    loop {
        let Some(end) = find(response, b"\r\n\r\n") else { return response };
        let head = String::from_utf8_lossy(&response[..end]);
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(s) if (100..200).contains(&s) && s != 101 => response = &response[end + 4..],
            _ => return response,
        }
    }
}

/// A chunked body joined, once its last chunk has come (trailers ignored).
fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n")?;
        let size = std::str::from_utf8(&rest[..line_end]).ok()?.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

/// Where `needle` first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

async fn tls_connect(
    stream: tokio::net::TcpStream,
    addr: IpAddr,
    sni: Option<&str>,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    use rustls::pki_types::ServerName;
    let name = match sni {
        Some(name) => ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?,
        None => ServerName::IpAddress(addr.into()),
    };
    tokio_rustls::TlsConnector::from(tls_config())
        .connect(name, stream)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Accepts any certificate (signatures are still checked): backends often serve self-signed
/// or internal certificates, and a health check proves service, not identity.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A check of `kind` against `target` with the defaults the tests start from (2 s
    /// timeout, `GET /` expecting 200, nothing else set).
    pub(crate) fn check(kind: CheckKind, target: SocketAddr) -> Probe {
        Probe {
            kind,
            targets: vec![target],
            mark: None,
            timeout: Duration::from_secs(2),
            path: "/".into(),
            expect_status: 200,
            expect: None,
            send: None,
            sni: None,
            host: None,
            command: Vec::new(),
        }
    }

    /// Moves this test's thread (a `#[tokio::test]` runs its tasks on it) into a network
    /// namespace of its own with `lo` up, so the servers these tests start touch nothing of
    /// the host's. Needs root, as `cargo xtask test` runs; without it the test says so and
    /// skips, except in CI (`CI=true` or `1`), where it fails.
    pub(crate) fn own_netns(test: &str) -> bool {
        // SAFETY: a flag-only system call; it changes this thread's namespace alone.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            let error = std::io::Error::last_os_error();
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "{test}: a network namespace of its own needs root: {error}");
            eprintln!("SKIPPED {test}: a network namespace of its own needs root ({error})");
            return false;
        }
        let up = std::process::Command::new("ip").args(["link", "set", "lo", "up"]).status();
        assert!(up.is_ok_and(|s| s.success()), "{test}: ip link set lo up failed");
        true
    }

    #[test]
    fn http_bodies_are_read_by_their_framing() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nheal\r\n3;x=y\r\nthy\r\n0\r\n\r\n";
        assert_eq!(body_of(chunked).as_deref(), Some(&b"healthy"[..]));
        assert_eq!(
            check_http_response(chunked, 200, Some("healthy")),
            Ok(()),
            "split across chunks"
        );
        assert_eq!(body_of(&chunked[..chunked.len() - 5]), None, "the last chunk not yet here");
        let sized = b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nhealthy";
        assert_eq!(body_of(sized).as_deref(), Some(&b"healthy"[..]));
        assert_eq!(body_of(&sized[..sized.len() - 1]), None);
        assert_eq!(body_of(b"HTTP/1.1 204 No Content\r\n\r\n").as_deref(), Some(&b""[..]));
        // Interim answers (103 Early Hints) come before the final one.
        let hints = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n";
        assert_eq!(body_of(hints), None, "the final answer is still to come");
        let both = [&hints[..], &sized[..]].concat();
        assert_eq!(body_of(&both).as_deref(), Some(&b"healthy"[..]));
        assert_eq!(check_http_response(&both, 200, Some("healthy")), Ok(()));
        assert_eq!(body_of(b"HTTP/1.1 200 OK\r\n\r\nto the end"), None, "framed by the close");
        assert_eq!(
            check_http_response(b"HTTP/1.1 200 OK\r\n\r\nto the end", 200, Some("end")),
            Ok(())
        );
    }

    #[test]
    fn http_responses_are_judged_by_status_and_body() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nbackend-1\n";
        assert_eq!(check_http_response(ok, 200, None), Ok(()));
        assert_eq!(check_http_response(ok, 200, Some("backend-1")), Ok(()));
        assert!(check_http_response(ok, 200, Some("backend-2")).unwrap_err().contains("body"));
        assert!(check_http_response(ok, 204, None).unwrap_err().contains("status 200"));
        let error = b"HTTP/1.0 503 Service Unavailable\r\n\r\n";
        assert!(check_http_response(error, 200, None).is_err());
        assert!(check_http_response(b"", 200, None).is_err());
        assert!(check_http_response(b"SSH-2.0-OpenSSH\r\n", 200, None).is_err());
        // The body match looks at the body only.
        let header_only = b"HTTP/1.1 200 OK\r\nX-Name: backend-1\r\n\r\nother\n";
        assert!(check_http_response(header_only, 200, Some("backend-1")).is_err());
    }

    #[tokio::test]
    async fn tcp_and_http_checks_against_a_local_server() {
        if !own_netns("tcp_and_http_checks_against_a_local_server") {
            return;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\n\r\nhealthy\n").await;
            }
        });
        let probe = |kind, expect: Option<&str>| Probe {
            expect: expect.map(Into::into),
            ..check(kind, addr)
        };
        assert_eq!(probe(CheckKind::Tcp, None).run().await, Ok(()));
        assert_eq!(probe(CheckKind::Http, Some("healthy")).run().await, Ok(()));
        assert!(probe(CheckKind::Http, Some("sick")).run().await.is_err());
        // A server that keeps the connection open after a complete (chunked) answer, despite
        // `Connection: close`: the check ends with the answer, not at its timeout.
        let lingering = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lingering_addr = lingering.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = lingering.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let _ = stream.read(&mut buf).await;
                    let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nheal\r\n3\r\nthy\r\n0\r\n\r\n";
                    let _ = stream.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(10)).await;
                });
            }
        });
        let mut kept_open = probe(CheckKind::Http, Some("healthy"));
        kept_open.targets = vec![lingering_addr];
        assert_eq!(kept_open.run().await, Ok(()));
        // A closed port fails at once.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let mut refused = probe(CheckKind::Tcp, None);
        refused.targets = vec![closed_addr];
        assert!(refused.run().await.unwrap_err().contains(&closed_addr.to_string()));
        // A command check passes on exit 0 only.
        let mut command = probe(CheckKind::Command, None);
        command.command = vec!["true".into()];
        assert_eq!(command.run().await, Ok(()));
        command.command = vec!["false".into()];
        assert!(command.run().await.is_err());
        command.command = vec!["sleep".into(), "5".into()];
        command.timeout = Duration::from_millis(100);
        assert!(command.run().await.unwrap_err().contains("timed out"));
        // A timeout ends what the command started too: the shell's background job (which
        // would run 30 s) is gone.
        let pid_file = std::env::temp_dir().join(format!("lb-probe-group-{}", std::process::id()));
        let script = crate::process::tests::script_with_background_job(&pid_file);
        command.command = vec!["sh".into(), "-c".into(), script];
        command.timeout = Duration::from_millis(500);
        assert!(command.run().await.unwrap_err().contains("timed out"));
        let gone = crate::process::tests::gone_within(&pid_file, Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&pid_file);
        assert!(gone, "the timed-out check's background job ran on");
        // One that passes without waiting for its background job leaves nothing either.
        let script = format!("sleep 30 & echo $! > {}; exit 0", pid_file.display());
        command.command = vec!["sh".into(), "-c".into(), script];
        assert_eq!(command.run().await, Ok(()));
        let gone = crate::process::tests::gone_within(&pid_file, Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&pid_file);
        assert!(gone, "the passed check's background job ran on");
    }

    #[tokio::test]
    async fn udp_checks_send_their_payload_and_judge_the_answer() {
        if !own_netns("udp_checks_send_their_payload_and_judge_the_answer") {
            return;
        }
        // A server that answers "pong <what it got>".
        let server = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = server.recv_from(&mut buf).await {
                let answer = format!("pong {}", String::from_utf8_lossy(&buf[..n]));
                let _ = server.send_to(answer.as_bytes(), from).await;
            }
        });
        let probe = |send: &str, expect: Option<&str>| Probe {
            timeout: Duration::from_millis(500),
            expect: expect.map(Into::into),
            send: Some(send.into()),
            ..check(CheckKind::Udp, addr)
        };
        assert_eq!(probe("ping", Some("pong ping")).run().await, Ok(()));
        assert_eq!(probe("ping", None).run().await, Ok(()));
        let wrong = probe("ping", Some("pong other")).run().await.unwrap_err();
        assert!(wrong.contains("does not contain"), "{wrong}");
        // No answer (a socket that never reads, so no port-unreachable either): the check
        // times out.
        let quiet = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut silent = probe("ping", None);
        silent.targets = vec![quiet.local_addr().unwrap()];
        let error = silent.run().await.unwrap_err();
        assert!(error.contains("timed out"), "{error}");
    }

    #[tokio::test]
    async fn https_checks_speak_tls_with_the_configured_server_name() {
        if !own_netns("https_checks_speak_tls_with_the_configured_server_name") {
            return;
        }
        // A self-signed certificate (checks accept any: backends seldom have public ones).
        let dir = std::env::temp_dir().join(format!("lb-probe-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
            .args(["-nodes", "-days", "2", "-subj", "/CN=backend"])
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (cargo xtask test installs it)");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let config = crate::api::tls::server_config(&cert, &key).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Answers with the server name the client sent.
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(stream).await else { continue };
                let name = tls.get_ref().1.server_name().unwrap_or("none").to_owned();
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let answer = format!("HTTP/1.1 200 OK\r\n\r\nsecure sni={name}\n");
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        let probe = |kind, sni: Option<&str>, expect: &str| Probe {
            expect: Some(expect.into()),
            sni: sni.map(Into::into),
            ..check(kind, addr)
        };
        let sni = Some("app.example");
        assert_eq!(probe(CheckKind::Https, sni, "secure sni=app.example").run().await, Ok(()));
        assert!(probe(CheckKind::Https, sni, "insecure").run().await.is_err());
        // Plain HTTP to a TLS server is no answer.
        assert!(probe(CheckKind::Http, None, "secure").run().await.is_err());
    }

    #[tokio::test]
    async fn http_checks_send_the_configured_host() {
        if !own_netns("http_checks_send_the_configured_host") {
            return;
        }
        // A server that answers 200 for one virtual host only.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                let status = if request.contains("\r\nhost: app.example\r\n") { 200 } else { 404 };
                let _ = stream.write_all(format!("HTTP/1.1 {status} X\r\n\r\n").as_bytes()).await;
            }
        });
        let mut probe = check(CheckKind::Http, addr);
        assert!(probe.run().await.unwrap_err().contains("404"), "the address as host");
        probe.host = Some("app.example".into());
        assert_eq!(probe.run().await, Ok(()));
        // Defaults: the address and its port (not the scheme's), or the server name.
        let https = Probe { sni: Some("app.example".into()), ..check(CheckKind::Https, addr) };
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(check(CheckKind::Http, at(8080)).host_header(at(8080), false), "127.0.0.1:8080");
        assert_eq!(check(CheckKind::Http, at(80)).host_header(at(80), false), "127.0.0.1");
        assert_eq!(https.host_header(at(443), true), "app.example");
        assert_eq!(https.host_header(at(8443), true), "app.example:8443");
        let literal = Probe { sni: Some("fd00::7".into()), ..check(CheckKind::Https, addr) };
        assert_eq!(literal.host_header(at(443), true), "[fd00::7]");
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 8080));
        assert_eq!(check(CheckKind::Http, v6).host_header(v6, false), "[::1]:8080");
    }
}

//! Real TLS parts for the passthrough tests and bench: certificates made by the `openssl`
//! command, `openssl s_server` backends and `openssl s_client` clients, each in a namespace,
//! and a rustls server and client for transfers whose bytes are checked end to end.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};

use crate::netns::{ChildOutput, Netns, run_cmd};

/// A certificate and its private key, PEM files.
#[derive(Clone, Debug)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed P-256 server certificate (not a CA) for `cn`, valid for `names` (DNS names,
/// or IP addresses), written to `dir`.
pub fn make_cert(dir: &Path, cn: &str, names: &[&str]) -> anyhow::Result<Cert> {
    std::fs::create_dir_all(dir)?;
    let cert = dir.join(format!("{cn}.crt"));
    let key = dir.join(format!("{cn}.key"));
    let san: Vec<String> = names
        .iter()
        .map(|n| {
            if n.parse::<std::net::IpAddr>().is_ok() {
                format!("IP:{n}")
            } else {
                format!("DNS:{n}")
            }
        })
        .collect();
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={cn}")])
        // A server's certificate, not a CA's: webpki (rustls) refuses a CA as an end entity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    if !san.is_empty() {
        cmd.args(["-addext", &format!("subjectAltName={}", san.join(","))]);
    }
    run_cmd(&mut cmd).context("openssl req")?;
    Ok(Cert { cert, key })
}

/// Starts `openssl s_server` answering HTTP (`-www`) on `port` (both families) in `ns`, and
/// waits until it listens. Returns its pid.
pub fn s_server(ns: &Netns, port: u16, cert: &Cert) -> anyhow::Result<u32> {
    let pid = ns.spawn(
        &[
            "openssl".as_ref(),
            "s_server".as_ref(),
            "-quiet".as_ref(),
            "-www".as_ref(),
            "-accept".as_ref(),
            port.to_string().as_ref(),
            "-cert".as_ref(),
            cert.cert.as_os_str(),
            "-key".as_ref(),
            cert.key.as_os_str(),
        ],
        ChildOutput::Discard,
    )?;
    ns.wait_listening(port, "openssl s_server")?;
    Ok(pid)
}

/// Connects with `openssl s_client` from `ns` to `target`, sending `server_name` as SNI (or
/// none), and returns the common name of the certificate the server presented; `None` when
/// no handshake completed.
pub fn s_client_peer(ns: &Netns, target: SocketAddr, server_name: Option<&str>) -> Option<String> {
    let connect = target.to_string();
    let mut args = vec!["timeout", "10", "openssl", "s_client", "-connect", &connect];
    match server_name {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    let out = ns.exec_output(&args).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let subject = text.lines().find_map(|l| l.strip_prefix("subject=CN = "))?;
    Some(subject.trim().to_owned())
}

/// Bytes of the repeating block bulk transfers send.
const BLOCK: usize = 1 << 20;

/// The block a bulk transfer repeats (xorshift from `seed`), so both ends know what to
/// expect without holding the whole transfer.
#[must_use]
pub fn block(seed: u64) -> Vec<u8> {
    block_prefix(seed, BLOCK)
}

/// The first `len` bytes (at most a block) of [`block`]: short exchanges need no megabyte.
#[must_use]
pub fn block_prefix(seed: u64, len: usize) -> Vec<u8> {
    let len = len.min(BLOCK);
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of `len` bytes of `block` repeated.
#[must_use]
pub fn repeated_hash(block: &[u8], len: usize) -> Vec<u8> {
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        h.update(&block[..n]);
        left -= n;
    }
    h.finish().as_ref().to_vec()
}

/// A rustls server config presenting `cert`.
pub fn server_config(cert: &Cert) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = vec![CertificateDer::from_pem_file(&cert.cert)?];
    let key = PrivateKeyDer::from_pem_file(&cert.key)?;
    Ok(Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?,
    ))
}

/// A rustls client config that accepts exactly `cert`: a passthrough client must see the
/// backend's own certificate.
pub fn client_config(cert: &Cert) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let expected = CertificateDer::from_pem_file(&cert.cert)?;
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExactCert(expected)))
        .with_no_client_auth(),
    ))
}

/// A TLS server (rustls) in a namespace: per connection it reads a 16-byte request (bytes
/// the client uploads, bytes it wants back), takes the upload, answers with its SHA-256,
/// then sends the download (block 2 repeated) and closes. A thread per connection; stopped
/// on drop.
#[derive(Debug)]
pub struct TlsServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsServer {
    pub fn start(
        ns: &Netns,
        addr: SocketAddr,
        config: Arc<rustls::ServerConfig>,
    ) -> anyhow::Result<Self> {
        let listener = ns.enter(|| TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let download = Arc::new(block(2));
            while !flag.load(Ordering::Relaxed) {
                let mut fd =
                    libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&raw mut fd, 1, 100) } <= 0 {
                    continue;
                }
                let Ok((tcp, _)) = listener.accept() else { continue };
                let (config, download) = (config.clone(), download.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(tcp, config, &download);
                });
            }
        });
        Ok(Self { stop, thread: Some(thread) })
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve_one(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    download: &[u8],
) -> anyhow::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    tcp.set_nodelay(true)?;
    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, tcp);
    let mut request = [0u8; 16];
    tls.read_exact(&mut request)?;
    let (up, down) = lengths(&request);
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut left = up;
    while left > 0 {
        let want = left.min(buf.len());
        let n = tls.read(&mut buf[..want])?;
        if n == 0 {
            bail!("upload cut short");
        }
        hash.update(&buf[..n]);
        left -= n;
    }
    tls.write_all(hash.finish().as_ref())?;
    let mut left = down;
    while left > 0 {
        let n = left.min(download.len());
        tls.write_all(&download[..n])?;
        left -= n;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    Ok(())
}

fn lengths(request: &[u8; 16]) -> (usize, usize) {
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&request[..8]);
    b.copy_from_slice(&request[8..]);
    (
        usize::try_from(u64::from_be_bytes(a)).unwrap_or(0),
        usize::try_from(u64::from_be_bytes(b)).unwrap_or(0),
    )
}

/// What one exchange with a [`TlsServer`] brought back.
#[derive(Debug)]
pub struct Exchange {
    /// The server's SHA-256 of what it received.
    pub upload_hash: Vec<u8>,
    /// SHA-256 and length of what came back.
    pub download_hash: Vec<u8>,
    pub downloaded: usize,
}

/// One TLS connection to `target` naming `server_name` (call it inside the client's
/// namespace): uploads `upload` bytes of block 1 repeated, downloads `download` bytes.
pub fn exchange(
    config: Arc<rustls::ClientConfig>,
    target: SocketAddr,
    server_name: &str,
    upload: usize,
    download: usize,
) -> anyhow::Result<Exchange> {
    exchange_within(config, target, server_name, upload, download, Duration::from_secs(30))
}

/// [`exchange`], giving up when a read or a write waits longer than `read_timeout` (a relay
/// that stops forwarding fills the upload's buffers: the write would wait for ever).
pub fn exchange_within(
    config: Arc<rustls::ClientConfig>,
    target: SocketAddr,
    server_name: &str,
    upload: usize,
    download: usize,
    read_timeout: Duration,
) -> anyhow::Result<Exchange> {
    let tcp = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(read_timeout))?;
    tcp.set_write_timeout(Some(read_timeout))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(server_name.to_owned())?;
    let mut tls = rustls::StreamOwned::new(rustls::ClientConnection::new(config, name)?, tcp);
    let mut request = [0u8; 16];
    request[..8].copy_from_slice(&(upload as u64).to_be_bytes());
    request[8..].copy_from_slice(&(download as u64).to_be_bytes());
    tls.write_all(&request)?;
    let up = block_prefix(1, upload);
    let mut left = upload;
    while left > 0 {
        let n = left.min(up.len());
        tls.write_all(&up[..n])?;
        left -= n;
    }
    let mut upload_hash = vec![0u8; 32];
    tls.read_exact(&mut upload_hash)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut downloaded = 0;
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hash.update(&buf[..n]);
                downloaded += n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Exchange { upload_hash, download_hash: hash.finish().as_ref().to_vec(), downloaded })
}

#[derive(Debug)]
struct ExactCert(CertificateDer<'static>);

impl rustls::client::danger::ServerCertVerifier for ExactCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.0.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the backend's certificate".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        algorithms().supported_schemes()
    }
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

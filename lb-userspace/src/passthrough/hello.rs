//! Incremental reader of a TLS ClientHello: finds the SNI host name (and whether the client
//! offers Encrypted Client Hello) in the bytes a TLS-passthrough proxy has read so far, without
//! terminating TLS.
//!
//! The proxy appends every read to one buffer and gives the whole buffer to a
//! [`HelloReader`] each time: `Ok(None)` asks for more bytes, `Ok(Some(_))` has the hello,
//! and an error says the stream is not something to route by SNI. The reader walks the
//! buffer record by record (a ClientHello may be fragmented over any number of TLS records,
//! down to 1-byte ones), so it can reject a non-TLS stream as soon as its first bytes prove
//! it, and an oversized hello as soon as the handshake header announces its length; it
//! resumes after the records complete at the last read, so each header is walked once
//! however the client cuts its bytes ([`parse_client_hello`] parses one buffer from the
//! start).

use std::borrow::Cow;

/// Default cap on the ClientHello handshake body (the 24-bit handshake length). Post-quantum
/// key shares (X25519MLKEM768 alone is 1,216 bytes, and clients may offer more than one)
/// make ordinary hellos several KiB long, so 16 KiB leaves headroom while still bounding what
/// the proxy buffers per connection before it has picked a backend.
pub const MAX_HANDSHAKE_BYTES: usize = 16 * 1024;

/// Largest record payload accepted. TLS 1.3 caps plaintext records at 2^14 bytes; the
/// 2,048-byte allowance is what TLS 1.2 permits for protected records, and costs nothing
/// because the handshake cap bounds the total anyway.
const MAX_RECORD_PAYLOAD: usize = (1 << 14) + 2048;

/// Size of a TLS record header: content type, legacy version (2), length (2).
const RECORD_HEADER_LEN: usize = 5;

/// Size of a handshake message header: type, 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;

/// TLS record content type of handshake records.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;

/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

/// Extension carrying the server name indication (RFC 6066).
const EXT_SERVER_NAME: u16 = 0x0000;

/// Extension carrying an Encrypted Client Hello (RFC 9849).
const EXT_ENCRYPTED_CLIENT_HELLO: u16 = 0xfe0d;

/// `name_type` of a DNS host name in the server_name extension.
const NAME_TYPE_HOST_NAME: u8 = 0;

/// Longest session id a ClientHello may carry.
const MAX_SESSION_ID_LEN: usize = 32;

/// Longest DNS name, in its dotted text form without a trailing dot.
const MAX_DNS_NAME_LEN: usize = 253;

/// Longest DNS label.
const MAX_DNS_LABEL_LEN: usize = 63;

/// What the proxy needs from a complete ClientHello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The first `host_name` of the server_name extension, validated as a DNS name,
    /// lowercased and without a trailing dot; empty when it is not a valid host name (it
    /// matches no route); `None` when the client sent no SNI. With ECH this is the outer
    /// (public) name.
    pub server_name: Option<String>,
    /// Whether the hello carries an `encrypted_client_hello` extension.
    pub has_ech: bool,
    /// Bytes at the start of the buffer taken by the records that carried the hello.
    pub records_len: usize,
}

/// Why a stream cannot be routed by SNI.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum HelloError {
    /// The stream does not start with a TLS handshake record.
    #[error("not a TLS handshake")]
    NotTls,
    /// The first handshake message is not a ClientHello.
    #[error("the first TLS handshake message is not a ClientHello")]
    NotClientHello,
    /// A record or a ClientHello field is inconsistent; the label names the field.
    #[error("malformed TLS ClientHello: bad {0}")]
    Malformed(&'static str),
    /// The ClientHello is longer than the configured cap.
    #[error("TLS ClientHello larger than the configured maximum")]
    TooLarge,
}

impl HelloError {
    /// Short snake_case label for metrics (`reason="not_tls"`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotTls => "not_tls",
            Self::NotClientHello => "not_client_hello",
            Self::Malformed(_) => "malformed",
            Self::TooLarge => "too_large",
        }
    }
}

/// Parses the ClientHello at the start of `buf`, the bytes read from a client so far.
///
/// Returns `Ok(None)` while the hello is incomplete, `Ok(Some(_))` once the records carrying
/// it have all arrived, and an error as soon as the bytes prove the stream is not TLS, not a
/// ClientHello, malformed, or announces a handshake body longer than `max_handshake` bytes.
pub fn parse_client_hello(
    buf: &[u8],
    max_handshake: usize,
) -> Result<Option<ClientHello>, HelloError> {
    HelloReader::default().parse(buf, max_handshake)
}

/// [`parse_client_hello`] for a buffer that grows by appending, read after read: it walks
/// each record header once, resuming where the last call's complete records ended. Parsing
/// from the start at every read costs quadratic work in the records a client sends (a 16 KiB
/// hello in 1-byte records sent a byte per segment: tens of millions of header hops,
/// on the runtime every connection, the API and the health checks share).
#[derive(Clone, Debug, Default)]
pub struct HelloReader {
    /// The scan as of the last complete record.
    done: ScanState,
}

impl HelloReader {
    /// Parses the ClientHello at the start of `buf`, which holds the bytes of every earlier
    /// call and more (as [`parse_client_hello`]).
    pub fn parse(
        &mut self,
        buf: &[u8],
        max_handshake: usize,
    ) -> Result<Option<ClientHello>, HelloError> {
        let Some(scan) = scan_records(buf, max_handshake, &mut self.done)? else {
            return Ok(None);
        };
        parse_scanned(buf, &scan)
    }
}

/// The ClientHello in `buf`, whose records `scan` found complete.
fn parse_scanned(buf: &[u8], scan: &RecordScan) -> Result<Option<ClientHello>, HelloError> {
    let handshake = assemble_handshake(buf, scan)?;
    let body = handshake.get(HANDSHAKE_HEADER_LEN..).ok_or(HelloError::Malformed("handshake"))?;
    let fields = parse_client_hello_body(body)?;
    Ok(Some(ClientHello {
        server_name: fields.server_name,
        has_ech: fields.has_ech,
        records_len: scan.records_len,
    }))
}

/// Where a complete ClientHello lies in the buffer.
struct RecordScan {
    /// Bytes taken by the records carrying the hello.
    records_len: usize,
    /// Number of those records.
    records: usize,
    /// Length of the handshake message, header included.
    handshake_len: usize,
}

/// Where a scan of the records stands after its last complete record.
#[derive(Clone, Copy, Debug, Default)]
struct ScanState {
    pos: usize,
    records: usize,
    /// The handshake header, which may itself be split across records.
    header: [u8; HANDSHAKE_HEADER_LEN],
    header_len: usize,
    /// Handshake bytes in the complete records.
    seen: usize,
    handshake_len: Option<usize>,
}

/// Walks record headers until the ClientHello is complete, checking each record and the
/// handshake header as soon as their bytes arrive; copies nothing. Starts from `done` (the
/// records complete at an earlier call on a shorter prefix of `buf`) and leaves it at the
/// last complete record.
fn scan_records(
    buf: &[u8],
    max_handshake: usize,
    done: &mut ScanState,
) -> Result<Option<RecordScan>, HelloError> {
    loop {
        // A record still arriving is checked as far as it goes, and counted once whole.
        let ScanState { mut pos, mut records, mut header, mut header_len, mut seen, .. } = *done;
        let mut handshake_len = done.handshake_len;
        let rest = buf.get(pos..).unwrap_or_default();
        let Some(payload_len) = check_record_header(rest, records == 0)? else {
            return Ok(None);
        };
        let payload = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let payload = payload.get(..payload_len).unwrap_or(payload);

        for &byte in payload.iter().take(HANDSHAKE_HEADER_LEN - header_len) {
            header[header_len] = byte;
            header_len += 1;
        }
        if header_len >= 1 && header[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::NotClientHello);
        }
        if header_len == HANDSHAKE_HEADER_LEN && handshake_len.is_none() {
            let body_len =
                usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
            if body_len > max_handshake {
                return Err(HelloError::TooLarge);
            }
            handshake_len = Some(HANDSHAKE_HEADER_LEN + body_len);
        }
        seen += payload.len();
        if payload.len() < payload_len {
            return Ok(None);
        }
        pos += RECORD_HEADER_LEN + payload_len;
        records += 1;
        *done = ScanState { pos, records, header, header_len, seen, handshake_len };

        if let Some(needed) = handshake_len {
            if seen == needed {
                return Ok(Some(RecordScan { records_len: pos, records, handshake_len: needed }));
            }
            // A client sends nothing after its ClientHello until the server answers, so
            // further handshake bytes in the hello's last record are not a valid first flight.
            if seen > needed {
                return Err(HelloError::Malformed("handshake_trailing_data"));
            }
        }
    }
}

/// Checks the (possibly partial) record header at the start of `rest`; returns the payload
/// length once the whole header is there. Errors on the first record are `NotTls` (the stream
/// was never TLS); on later ones `Malformed` (a TLS stream went wrong mid-hello).
fn check_record_header(rest: &[u8], is_first: bool) -> Result<Option<usize>, HelloError> {
    let fail = |what| if is_first { HelloError::NotTls } else { HelloError::Malformed(what) };
    if let Some(&content_type) = rest.first()
        && content_type != CONTENT_TYPE_HANDSHAKE
    {
        return Err(fail("record_type"));
    }
    if let Some(&major) = rest.get(1)
        && major != 3
    {
        return Err(fail("record_version"));
    }
    if let Some(&minor) = rest.get(2)
        && minor > 3
    {
        return Err(fail("record_version"));
    }
    let (Some(&high), Some(&low)) = (rest.get(3), rest.get(4)) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([high, low]));
    // Empty handshake records are forbidden (RFC 8446 section 5.1) and would let a client
    // make the proxy walk headers that carry nothing.
    if len == 0 || len > MAX_RECORD_PAYLOAD {
        return Err(fail("record_length"));
    }
    Ok(Some(len))
}

/// The handshake message the scanned records carry: borrowed when one record holds it all,
/// otherwise the fragments concatenated.
fn assemble_handshake<'a>(buf: &'a [u8], scan: &RecordScan) -> Result<Cow<'a, [u8]>, HelloError> {
    let broken = HelloError::Malformed("record");
    if scan.records == 1 {
        let end = RECORD_HEADER_LEN + scan.handshake_len;
        return buf.get(RECORD_HEADER_LEN..end).map(Cow::Borrowed).ok_or(broken);
    }
    let mut handshake = Vec::with_capacity(scan.handshake_len);
    let mut pos = 0;
    while pos < scan.records_len {
        let header = buf.get(pos..pos + RECORD_HEADER_LEN).ok_or_else(|| broken.clone())?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let start = pos + RECORD_HEADER_LEN;
        let payload = buf.get(start..start + len).ok_or_else(|| broken.clone())?;
        handshake.extend_from_slice(payload);
        pos = start + len;
    }
    Ok(Cow::Owned(handshake))
}

/// What the ClientHello body says that the proxy cares about.
struct HelloFields {
    /// Normalised first host name of the server_name extension.
    server_name: Option<String>,
    /// Whether an encrypted_client_hello extension is present.
    has_ech: bool,
}

/// Parses a ClientHello body (RFC 8446 section 4.1.2, older versions alike).
fn parse_client_hello_body(body: &[u8]) -> Result<HelloFields, HelloError> {
    let mut reader = Reader::new(body);
    let legacy_version = reader.u16("legacy_version")?;
    if legacy_version >> 8 != 3 {
        return Err(HelloError::Malformed("legacy_version"));
    }
    reader.bytes(32, "random")?;
    let session_id = reader.vec8("session_id")?;
    if session_id.len() > MAX_SESSION_ID_LEN {
        return Err(HelloError::Malformed("session_id"));
    }
    let cipher_suites = reader.vec16("cipher_suites")?;
    if cipher_suites.len() < 2 || cipher_suites.len() % 2 != 0 {
        return Err(HelloError::Malformed("cipher_suites"));
    }
    if reader.vec8("compression_methods")?.is_empty() {
        return Err(HelloError::Malformed("compression_methods"));
    }
    let mut fields = HelloFields { server_name: None, has_ech: false };
    // SSL 3.0 and early TLS 1.0 hellos may end here, with no extensions block at all.
    if reader.is_empty() {
        return Ok(fields);
    }
    let mut extensions = Reader::new(reader.vec16("extensions")?);
    if !reader.is_empty() {
        return Err(HelloError::Malformed("extensions"));
    }
    let mut seen_server_name = false;
    while !extensions.is_empty() {
        let extension_type = extensions.u16("extensions")?;
        let data = extensions.vec16("extensions")?;
        match extension_type {
            EXT_SERVER_NAME => {
                // Two server_name extensions could make the proxy and the backend route
                // differently; RFC 8446 forbids repeating an extension anyway.
                if seen_server_name {
                    return Err(HelloError::Malformed("server_name"));
                }
                seen_server_name = true;
                fields.server_name = parse_server_name(data)?;
            }
            EXT_ENCRYPTED_CLIENT_HELLO => fields.has_ech = true,
            _ => {}
        }
    }
    Ok(fields)
}

/// Parses the server_name extension's data (RFC 6066 section 3): the first `host_name`
/// entry, validated and normalised.
fn parse_server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let bad = HelloError::Malformed("server_name");
    let mut outer = Reader::new(data);
    let list = outer.vec16("server_name")?;
    if !outer.is_empty() || list.is_empty() {
        return Err(bad);
    }
    let mut entries = Reader::new(list);
    let mut host_name = None;
    while !entries.is_empty() {
        let name_type = entries.u8("server_name")?;
        let name = entries.vec16("server_name")?;
        if name_type == NAME_TYPE_HOST_NAME && host_name.is_none() {
            host_name = Some(name);
        }
    }
    let Some(name) = host_name else {
        return Ok(None);
    };
    // RFC 6066: a HostName is at least one byte.
    if name.is_empty() {
        return Err(bad);
    }
    // A name that is no DNS host name (an underscore, an IP address, which clients do send)
    // is still a name: empty here, it matches no route and takes the `unknown_sni` path.
    let normalized = std::str::from_utf8(name).ok().and_then(normalize_host_name);
    Ok(Some(normalized.map(Cow::into_owned).unwrap_or_default()))
}

/// Validates a DNS host name and normalises it: ASCII letters, digits and hyphens in
/// dot-separated labels of 1–63 characters, at most 253 characters in all once one trailing
/// dot is stripped. Returns it lowercased and without the trailing dot (borrowed when already
/// in that form), or `None` when invalid. SNI names and route patterns share this rule.
pub fn normalize_host_name(name: &str) -> Option<Cow<'_, str>> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > MAX_DNS_NAME_LEN {
        return None;
    }
    let labels_valid = name.split('.').all(|label| {
        (1..=MAX_DNS_LABEL_LEN).contains(&label.len())
            && label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    });
    if !labels_valid {
        return None;
    }
    if name.bytes().any(|byte| byte.is_ascii_uppercase()) {
        Some(Cow::Owned(name.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(name))
    }
}

/// Bounds-checked cursor over a byte slice; every read names the field it belongs to, which
/// becomes the `Malformed` label when the bytes run out.
struct Reader<'a> {
    /// Bytes not read yet.
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `bytes` from the start.
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// Whether every byte has been read.
    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// Takes the next `len` bytes.
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if len > self.rest.len() {
            return Err(HelloError::Malformed(what));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    /// Takes one byte.
    fn u8(&mut self, what: &'static str) -> Result<u8, HelloError> {
        Ok(self.bytes(1, what)?[0])
    }

    /// Takes a big-endian `u16`.
    fn u16(&mut self, what: &'static str) -> Result<u16, HelloError> {
        let bytes = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// Takes a vector with a 1-byte length prefix.
    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u8(what)?;
        self.bytes(usize::from(len), what)
    }

    /// Takes a vector with a 2-byte length prefix.
    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u16(what)?;
        self.bytes(usize::from(len), what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello sent by `openssl s_client -servername www.example.com` (OpenSSL 3.0),
    /// as one record.
    const OPENSSL_SNI: &[u8] = include_bytes!("fixtures/openssl_hello_sni.bin");
    /// A ClientHello sent by `openssl s_client -noservername` (OpenSSL 3.0), as one record.
    const OPENSSL_NO_SNI: &[u8] = include_bytes!("fixtures/openssl_hello_no_sni.bin");

    fn parse(buf: &[u8]) -> Result<Option<ClientHello>, HelloError> {
        parse_client_hello(buf, MAX_HANDSHAKE_BYTES)
    }

    /// The handshake message inside a single-record capture.
    fn handshake_of(record: &[u8]) -> &[u8] {
        &record[RECORD_HEADER_LEN..]
    }

    /// Wraps `handshake` in handshake records whose payloads have the given sizes (the last
    /// size repeats until the message is used up).
    fn into_records(handshake: &[u8], sizes: &[usize]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = handshake;
        let mut index = 0;
        while !rest.is_empty() {
            let size = sizes[index.min(sizes.len() - 1)].min(rest.len());
            let (chunk, tail) = rest.split_at(size);
            out.extend_from_slice(&[22, 3, 1]);
            out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
            out.extend_from_slice(chunk);
            rest = tail;
            index += 1;
        }
        out
    }

    fn push_vec16(out: &mut Vec<u8>, data: &[u8]) {
        out.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
    }

    /// A server_name extension's data holding the given (name_type, name) entries.
    fn server_name_data(entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (name_type, name) in entries {
            list.push(*name_type);
            push_vec16(&mut list, name);
        }
        let mut data = Vec::new();
        push_vec16(&mut data, &list);
        data
    }

    /// A synthetic ClientHello handshake message (header included) with the given extensions;
    /// `None` leaves the extensions block out entirely, as very old clients did.
    fn build_hello(extensions: Option<&[(u16, Vec<u8>)]>) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[0xab; 32]);
        body.push(32);
        body.extend_from_slice(&[0xcd; 32]);
        push_vec16(&mut body, &[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]);
        body.extend_from_slice(&[1, 0]);
        if let Some(extensions) = extensions {
            let mut block = Vec::new();
            for (extension_type, data) in extensions {
                block.extend_from_slice(&extension_type.to_be_bytes());
                push_vec16(&mut block, data);
            }
            push_vec16(&mut body, &block);
        }
        wrap_handshake(&body)
    }

    /// Prefixes a ClientHello body with its handshake header.
    fn wrap_handshake(body: &[u8]) -> Vec<u8> {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut out = vec![HANDSHAKE_CLIENT_HELLO, len[1], len[2], len[3]];
        out.extend_from_slice(body);
        out
    }

    /// A synthetic hello whose only extension is server_name with one host name.
    fn hello_with_sni(name: &[u8]) -> Vec<u8> {
        build_hello(Some(&[(EXT_SERVER_NAME, server_name_data(&[(0, name)]))]))
    }

    /// Appends an extension to an existing ClientHello handshake message, fixing the
    /// extensions-block and handshake lengths.
    fn append_extension(handshake: &[u8], extension_type: u16, data: &[u8]) -> Vec<u8> {
        let body = &handshake[HANDSHAKE_HEADER_LEN..];
        let mut offset = 2 + 32;
        offset += 1 + usize::from(body[offset]);
        offset += 2 + usize::from(u16::from_be_bytes([body[offset], body[offset + 1]]));
        offset += 1 + usize::from(body[offset]);
        let old_len = usize::from(u16::from_be_bytes([body[offset], body[offset + 1]]));
        let mut new_body = body[..offset].to_vec();
        let mut block = body[offset + 2..offset + 2 + old_len].to_vec();
        block.extend_from_slice(&extension_type.to_be_bytes());
        push_vec16(&mut block, data);
        push_vec16(&mut new_body, &block);
        wrap_handshake(&new_body)
    }

    fn expect_name(buf: &[u8], name: Option<&str>) -> ClientHello {
        let hello = parse(buf).unwrap().expect("complete hello");
        assert_eq!(hello.server_name.as_deref(), name);
        assert_eq!(hello.records_len, buf.len());
        hello
    }

    #[test]
    fn openssl_hello_with_sni() {
        let hello = expect_name(OPENSSL_SNI, Some("www.example.com"));
        assert!(!hello.has_ech);
    }

    #[test]
    fn openssl_hello_without_sni() {
        expect_name(OPENSSL_NO_SNI, None);
    }

    #[test]
    fn hello_split_into_one_byte_records() {
        let buf = into_records(handshake_of(OPENSSL_SNI), &[1]);
        assert_eq!(buf.len(), 6 * handshake_of(OPENSSL_SNI).len());
        expect_name(&buf, Some("www.example.com"));
    }

    #[test]
    fn hello_split_into_three_uneven_records() {
        let handshake = handshake_of(OPENSSL_SNI);
        // The first record ends inside the handshake header, the second inside the SNI.
        let buf = into_records(handshake, &[3, 150, handshake.len()]);
        assert_eq!(buf.len(), handshake.len() + 3 * RECORD_HEADER_LEN);
        expect_name(&buf, Some("www.example.com"));
    }

    #[test]
    fn every_prefix_needs_more_bytes() {
        for buf in [
            OPENSSL_SNI.to_vec(),
            OPENSSL_NO_SNI.to_vec(),
            into_records(handshake_of(OPENSSL_SNI), &[1]),
            into_records(handshake_of(OPENSSL_SNI), &[7, 100, 2]),
        ] {
            for end in 0..buf.len() {
                assert_eq!(parse(&buf[..end]), Ok(None), "prefix of {end} bytes");
            }
            assert!(parse(&buf).unwrap().is_some());
        }
    }

    #[test]
    fn bytes_after_the_hello_are_not_counted() {
        let mut buf = OPENSSL_SNI.to_vec();
        buf.extend_from_slice(&[23, 3, 3, 0, 5, 1, 2, 3, 4, 5]);
        let hello = parse(&buf).unwrap().unwrap();
        assert_eq!(hello.records_len, OPENSSL_SNI.len());
    }

    #[test]
    fn large_hello_in_4k_records() {
        let padded = append_extension(handshake_of(OPENSSL_SNI), 0x0015, &vec![0; 12 * 1024]);
        assert!(padded.len() > 12 * 1024);
        let buf = into_records(&padded, &[4096]);
        assert_eq!(buf.len(), padded.len() + 4 * RECORD_HEADER_LEN);
        expect_name(&buf, Some("www.example.com"));
    }

    #[test]
    fn hello_over_the_cap_is_too_large_from_its_header() {
        let padded = append_extension(handshake_of(OPENSSL_SNI), 0x0015, &vec![0; 12 * 1024]);
        let buf = into_records(&padded, &[4096]);
        assert_eq!(parse_client_hello(&buf, 8 * 1024), Err(HelloError::TooLarge));
        // The record and handshake headers alone are enough to tell.
        let header = &buf[..RECORD_HEADER_LEN + HANDSHAKE_HEADER_LEN];
        assert_eq!(parse_client_hello(header, 8 * 1024), Err(HelloError::TooLarge));
        // Even when the handshake header is spread over 1-byte records.
        let tiny = into_records(&padded[..HANDSHAKE_HEADER_LEN], &[1]);
        assert_eq!(parse_client_hello(&tiny, 8 * 1024), Err(HelloError::TooLarge));
        // A body exactly at the cap is fine.
        let body_len = padded.len() - HANDSHAKE_HEADER_LEN;
        assert!(parse_client_hello(&buf, body_len).unwrap().is_some());
        assert_eq!(parse_client_hello(&buf, body_len - 1), Err(HelloError::TooLarge));
    }

    #[test]
    fn http_request_is_not_tls_from_its_first_byte() {
        let request = b"GET / HTTP/1.1\r\n";
        for end in 1..=request.len() {
            assert_eq!(parse(&request[..end]), Err(HelloError::NotTls));
        }
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn bad_record_header_is_not_tls_within_five_bytes() {
        assert_eq!(parse(&[22, 2]), Err(HelloError::NotTls));
        assert_eq!(parse(&[22, 3, 4]), Err(HelloError::NotTls));
        assert_eq!(parse(&[22, 3, 1, 0, 0]), Err(HelloError::NotTls));
        assert_eq!(parse(&[22, 3, 1, 0xff, 0xff]), Err(HelloError::NotTls));
        assert_eq!(parse(&[22, 3, 0, 0, 1]), Ok(None));
        assert_eq!(parse(&[22, 3, 1, 0x48, 0x00]), Ok(None));
    }

    #[test]
    fn alert_record_is_rejected() {
        // A fatal handshake_failure alert.
        assert_eq!(parse(&[21, 3, 3, 0, 2, 2, 40]), Err(HelloError::NotTls));
        // An alert between two fragments of a hello.
        let mut buf = into_records(&handshake_of(OPENSSL_SNI)[..10], &[10]);
        buf.extend_from_slice(&[21, 3, 3, 0, 2, 2, 40]);
        assert_eq!(parse(&buf), Err(HelloError::Malformed("record_type")));
    }

    #[test]
    fn bad_later_record_is_malformed() {
        let head = into_records(&handshake_of(OPENSSL_SNI)[..10], &[10]);
        for (header, label) in [
            (&[22, 4][..], "record_version"),
            (&[22, 3, 9], "record_version"),
            (&[22, 3, 3, 0, 0], "record_length"),
            (&[22, 3, 3, 0x50, 0], "record_length"),
        ] {
            let mut buf = head.clone();
            buf.extend_from_slice(header);
            assert_eq!(parse(&buf), Err(HelloError::Malformed(label)));
        }
    }

    #[test]
    fn server_hello_is_not_a_client_hello() {
        assert_eq!(parse(&[22, 3, 3, 0, 60, 2]), Err(HelloError::NotClientHello));
        let mut handshake = handshake_of(OPENSSL_SNI).to_vec();
        handshake[0] = 2;
        assert_eq!(parse(&into_records(&handshake, &[1])), Err(HelloError::NotClientHello));
    }

    #[test]
    fn extra_handshake_data_after_the_hello_is_malformed() {
        let mut handshake = handshake_of(OPENSSL_SNI).to_vec();
        handshake.extend_from_slice(&[20, 0, 0, 0]);
        assert_eq!(
            parse(&into_records(&handshake, &[handshake.len()])),
            Err(HelloError::Malformed("handshake_trailing_data"))
        );
    }

    #[test]
    fn encrypted_client_hello_is_detected() {
        let with_ech = append_extension(handshake_of(OPENSSL_SNI), 0xfe0d, &[0, 0, 1, 0, 1, 7]);
        let hello = expect_name(&into_records(&with_ech, &[100]), Some("www.example.com"));
        assert!(hello.has_ech);
    }

    #[test]
    fn server_name_is_lowercased_without_trailing_dot() {
        let buf = into_records(&hello_with_sni(b"WWW.Example.COM."), &[512]);
        expect_name(&buf, Some("www.example.com"));
    }

    #[test]
    fn first_host_name_wins_and_other_name_types_are_skipped() {
        let data = server_name_data(&[(7, b"ignored"), (0, b"a.example"), (0, b"b.example")]);
        let buf = into_records(&build_hello(Some(&[(EXT_SERVER_NAME, data)])), &[512]);
        expect_name(&buf, Some("a.example"));
        let data = server_name_data(&[(7, b"only-other")]);
        let buf = into_records(&build_hello(Some(&[(EXT_SERVER_NAME, data)])), &[512]);
        expect_name(&buf, None);
    }

    #[test]
    fn invalid_server_names_match_nothing() {
        let long_label = "a".repeat(64);
        let long_name = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(62)].join(".");
        assert_eq!(long_name.len(), 254);
        for name in [
            &b"bad_name.example"[..],
            b"sp ace.example",
            b"a..example",
            b".example",
            b"..",
            b".",
            b"caf\xc3\xa9.example",
            b"\xff\xfe",
            b"a/b",
            b"*.example.com",
            long_label.as_bytes(),
            long_name.as_bytes(),
        ] {
            let buf = into_records(&hello_with_sni(name), &[512]);
            expect_name(&buf, Some(""));
        }
        // An empty name is no name: the extension is malformed.
        let buf = into_records(&hello_with_sni(b""), &[512]);
        assert_eq!(parse(&buf), Err(HelloError::Malformed("server_name")));
        let longest = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
        let buf = into_records(&hello_with_sni(format!("{longest}.").as_bytes()), &[512]);
        expect_name(&buf, Some(&longest));
    }

    #[test]
    fn duplicate_or_empty_server_name_extension_is_malformed() {
        let data = server_name_data(&[(0, b"a.example")]);
        let twice = [(EXT_SERVER_NAME, data.clone()), (EXT_SERVER_NAME, data)];
        let buf = into_records(&build_hello(Some(&twice)), &[512]);
        assert_eq!(parse(&buf), Err(HelloError::Malformed("server_name")));
        let empty = [(EXT_SERVER_NAME, Vec::new())];
        let buf = into_records(&build_hello(Some(&empty)), &[512]);
        assert_eq!(parse(&buf), Err(HelloError::Malformed("server_name")));
    }

    #[test]
    fn hello_without_extensions_block_parses() {
        let buf = into_records(&build_hello(None), &[512]);
        let hello = expect_name(&buf, None);
        assert!(!hello.has_ech);
        let buf = into_records(&build_hello(Some(&[])), &[512]);
        expect_name(&buf, None);
    }

    #[test]
    fn inconsistent_body_lengths_are_malformed() {
        let good = hello_with_sni(b"a.example");
        let cases: [(usize, u8, &str); 5] = [
            (HANDSHAKE_HEADER_LEN, 2, "legacy_version"),
            (HANDSHAKE_HEADER_LEN + 34, 33, "session_id"),
            (HANDSHAKE_HEADER_LEN + 34 + 33 + 1, 5, "cipher_suites"),
            (HANDSHAKE_HEADER_LEN + 34 + 33 + 1, 0, "cipher_suites"),
            (HANDSHAKE_HEADER_LEN + 34 + 33 + 8, 0, "compression_methods"),
        ];
        for (offset, value, label) in cases {
            let mut handshake = good.clone();
            handshake[offset] = value;
            let buf = into_records(&handshake, &[512]);
            assert_eq!(parse(&buf), Err(HelloError::Malformed(label)), "{label}");
        }
        // Bytes after the extensions block.
        let mut body = good[HANDSHAKE_HEADER_LEN..].to_vec();
        body.push(0);
        let buf = into_records(&wrap_handshake(&body), &[512]);
        assert_eq!(parse(&buf), Err(HelloError::Malformed("extensions")));
        // A truncated body announced with its shorter length.
        let body = &good[HANDSHAKE_HEADER_LEN..good.len() - 3];
        let buf = into_records(&wrap_handshake(body), &[512]);
        assert!(matches!(parse(&buf), Err(HelloError::Malformed(_))));
    }

    /// Feeds `buf` to one [`HelloReader`] in pieces cut at `cuts` (growing prefixes, as the
    /// proxy's reads grow its buffer) and checks every answer is the stateless parser's for
    /// the same prefix; stops at the first final answer (a hello or an error), as the
    /// proxy does. Returns how many pieces it took.
    fn reads_agree(buf: &[u8], cuts: impl Iterator<Item = usize>) -> usize {
        let mut reader = HelloReader::default();
        let mut pieces = 0;
        for end in cuts.chain([buf.len()]) {
            let end = end.min(buf.len());
            pieces += 1;
            let read = reader.parse(&buf[..end], MAX_HANDSHAKE_BYTES);
            assert_eq!(read, parse(&buf[..end]), "{end} of {} bytes", buf.len());
            if !matches!(read, Ok(None)) {
                break;
            }
        }
        pieces
    }

    #[test]
    fn a_reader_resumed_read_after_read_answers_as_a_parse_from_the_start() {
        for buf in [
            OPENSSL_SNI.to_vec(),
            into_records(handshake_of(OPENSSL_SNI), &[1]),
            into_records(handshake_of(OPENSSL_SNI), &[3, 150, 2]),
        ] {
            // A byte at a time, and in pieces of 7 (records and headers cut anywhere).
            assert_eq!(reads_agree(&buf, 1..buf.len()), buf.len());
            assert!(reads_agree(&buf, (7..buf.len()).step_by(7)) > 1);
        }
    }

    #[test]
    fn truncations_and_mutations_never_panic() {
        let mut rng = crate::rng::XorShift::new(0x5eed_1234_abcd_ef01);
        let samples = [
            OPENSSL_SNI.to_vec(),
            OPENSSL_NO_SNI.to_vec(),
            into_records(handshake_of(OPENSSL_SNI), &[1]),
            into_records(handshake_of(OPENSSL_SNI), &[3, 40, 17]),
            into_records(&hello_with_sni(b"Mixed.Case.example"), &[20]),
        ];
        for sample in &samples {
            for end in 0..=sample.len() {
                let _ = parse(&sample[..end]);
                let _ = parse_client_hello(&sample[..end], 64);
            }
            for i in 0..20_000 {
                let mut mutated = sample.clone();
                for _ in 0..=rng.below(4) {
                    let at = rng.below(mutated.len());
                    match rng.below(4) {
                        0 => mutated[at] = rng.next_u64().to_le_bytes()[0],
                        1 => mutated[at] ^= 1 << rng.below(8),
                        2 => mutated[at] = [0, 0xff, 1, 0x7f][rng.below(4)],
                        _ => mutated.truncate(at.max(1)),
                    }
                }
                let end = rng.below(mutated.len() + 1);
                let _ = parse(&mutated);
                let _ = parse(&mutated[..end]);
                // Read in random pieces, the resumed reader agrees with the parser (one in
                // ten: the parser's answers from the start are the slow part).
                if i % 10 == 0 {
                    let step = 1 + rng.below(64);
                    reads_agree(&mutated, (step..mutated.len()).step_by(step));
                }
            }
        }
    }

    #[test]
    fn reasons_are_metric_labels() {
        assert_eq!(HelloError::NotTls.reason(), "not_tls");
        assert_eq!(HelloError::NotClientHello.reason(), "not_client_hello");
        assert_eq!(HelloError::Malformed("x").reason(), "malformed");
        assert_eq!(HelloError::TooLarge.reason(), "too_large");
    }
}

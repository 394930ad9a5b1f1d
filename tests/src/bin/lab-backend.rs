//! `lab-backend`: the lab's backend server. Answers every HTTP request with its own name and
//! every UDP datagram with its name followed by the datagram, so a test can tell which
//! backend served it.
//!
//! `lab-backend --name backend-1 --http [::]:80 --udp [::]:5353` (each flag may repeat).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::Duration,
};

fn main() {
    let mut name = String::from("backend");
    let mut http = Vec::new();
    let mut udp = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--name" => name = value,
            "--http" => http.push(parse_addr(&value)),
            "--udp" => udp.push(parse_addr(&value)),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if http.is_empty() && udp.is_empty() {
        usage("give at least one --http or --udp address");
    }
    let mut threads = Vec::new();
    for addr in http {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| fail(&format!("bind {addr}: {e}")));
        let name = name.clone();
        threads.push(thread::spawn(move || serve_http(&listener, &name)));
    }
    for addr in udp {
        let socket = bind_udp(addr).unwrap_or_else(|e| fail(&format!("bind {addr}: {e}")));
        let name = name.clone();
        threads.push(thread::spawn(move || serve_udp(&socket, &name)));
    }
    for t in threads {
        let _ = t.join();
    }
}

fn serve_http(listener: &TcpListener, name: &str) {
    for stream in listener.incoming().flatten() {
        let name = name.to_owned();
        thread::spawn(move || {
            let _ = handle_http(stream, &name);
        });
    }
}

/// Largest body `GET /bytes/N` serves.
const MAX_BYTES: usize = 64 << 20;

/// HTTP/1.1 with keep-alive: reads request heads, drains any `Content-Length` body and
/// answers `<name>\n` (or, for `GET /bytes/N`, N bytes: a large answer, in full-size
/// segments) until the client closes or asks to.
fn handle_http(stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_mins(1)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let body = format!("{name}\n");
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut close = request_line.ends_with("HTTP/1.0\r\n");
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let mut remaining = content_length;
        while remaining > 0 {
            let buf = reader.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let n = buf.len().min(remaining);
            reader.consume(n);
            remaining -= n;
        }
        let connection = if close { "close" } else { "keep-alive" };
        let size = request_line
            .strip_prefix("GET /bytes/")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| *n <= MAX_BYTES);
        let content = match size {
            Some(n) => vec![b'x'; n],
            None => body.clone().into_bytes(),
        };
        // One write: a response in pieces meets Nagle and delayed ACKs (40 ms a request).
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             X-Backend: {name}\r\nConnection: {connection}\r\n\r\n",
            content.len()
        )
        .into_bytes();
        response.extend_from_slice(&content);
        writer.write_all(&response)?;
        if close {
            return Ok(());
        }
    }
}

fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let mut reply = Vec::with_capacity(name.len() + 1 + n);
        reply.extend_from_slice(name.as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(&buf[..n]);
        let _ = socket.send_to(&reply, peer);
    }
}

/// Binds with `SO_REUSEADDR`, so a socket on a specific address (a DSR service address, from
/// which replies must come) can sit beside the wildcard one.
fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket =
        socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn parse_addr(value: &str) -> SocketAddr {
    value.parse().unwrap_or_else(|e| usage(&format!("bad address {value}: {e}")))
}

fn usage(message: &str) -> ! {
    fail(&format!("{message}\nusage: lab-backend --name NAME [--http ADDR]... [--udp ADDR]..."))
}

fn fail(message: &str) -> ! {
    eprintln!("lab-backend: {message}");
    std::process::exit(2)
}

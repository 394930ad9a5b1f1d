//! `lbctl`, the command-line client of `lbd`'s REST API: status, services, pools and backends
//! as tables for people or JSON for scripts (`--json`), and changes to backends.

use std::{net::IpAddr, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::api::{ChangeResult, FirewallView, PoolView, ServiceView, Status};
use serde::de::DeserializeOwned;

#[derive(Debug, Parser)]
#[command(name = "lbctl", version, about = "Control lbd through its REST API")]
struct Cli {
    /// Base URL of lbd's API.
    #[arg(long, env = "LB_API", default_value = "http://127.0.0.1:7070", global = true)]
    api: String,
    /// Bearer token (prefer LB_TOKEN or --token-file: a flag is visible in `ps`).
    #[arg(long, env = "LB_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "LB_TOKEN_FILE", global = true)]
    token_file: Option<String>,
    /// PEM certificate(s) to trust for an `https://` API (lbd's own, or the CA that signed
    /// it), instead of the public web roots.
    #[arg(long, env = "LB_CA", global = true)]
    ca: Option<String>,
    /// Seconds to wait for lbd's answer, connecting included, before giving up.
    #[arg(long, env = "LB_TIMEOUT", default_value_t = 30, global = true,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Interfaces, counts and connection-table occupancy.
    Status,
    /// Services and their traffic.
    Services,
    /// Pools, their backends, weights and traffic.
    Pools,
    /// Change a pool's backends.
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// The firewall's rules and their hit counters.
    Firewall,
    /// Re-read lbd's configuration file.
    Reload,
}

#[derive(Debug, Subcommand)]
enum BackendAction {
    /// Add a backend to a pool.
    Add {
        pool: String,
        address: IpAddr,
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a backend from a pool (its established flows continue until they end).
    Remove {
        pool: String,
        address: IpAddr,
        /// Which backend at the address, when several share it (0: the one without a port).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Set a backend's weight.
    Weight {
        pool: String,
        address: IpAddr,
        weight: u32,
        /// Which backend at the address, when several share it (0: the one without a port).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Stop sending new flows to a backend; established flows continue until they end or
    /// the pool's drain_timeout_secs passes.
    Drain {
        pool: String,
        address: IpAddr,
        /// Which backend at the address, when several share it (0: the one without a port).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Take a backend out entirely: no new flows, established flows cut.
    Disable {
        pool: String,
        address: IpAddr,
        /// Which backend at the address, when several share it (0: the one without a port).
        #[arg(long)]
        port: Option<u16>,
    },
    /// Make a draining or disabled backend active again (slow start applies).
    Enable {
        pool: String,
        address: IpAddr,
        /// Which backend at the address, when several share it (0: the one without a port).
        #[arg(long)]
        port: Option<u16>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("lbctl: {error}");
            ExitCode::FAILURE
        }
    }
}

struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<String, String> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        let result = match body {
            Some(body) => {
                let request = builder
                    .header("content-type", "application/json")
                    .body(body.to_string())
                    .map_err(|e| e.to_string())?;
                self.agent.run(request)
            }
            None => self.agent.run(builder.body(()).map_err(|e| e.to_string())?),
        };
        let mut response = result.map_err(|e| format!("{url}: {e}"))?;
        let status = response.status();
        // ureq stops at 10 MiB by default: `/v1/pools` of tens of thousands of backends, each
        // with its last check's error during an outage, is larger (about 250 bytes each).
        let text = response
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER_BYTES)
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        if status.is_success() {
            Ok(text)
        } else {
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or(text);
            Err(format!(
                "{} {}: {message}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ))
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<(T, String), String> {
        let text = self.request("GET", path, None)?;
        let value =
            serde_json::from_str(&text).map_err(|e| format!("unexpected answer from lbd: {e}"))?;
        Ok((value, text))
    }
}

/// The largest answer read from lbd: `/v1/pools` with every backend allowed (65,536) and a
/// check error on each fits several times over.
const MAX_ANSWER_BYTES: u64 = 256 << 20;
/// The API client the options ask for: its token, timeout and trusted certificates.
fn client(cli: &Cli) -> Result<Client, String> {
    let token = match (cli.token.as_ref().filter(|t| !t.is_empty()), &cli.token_file) {
        (Some(_), Some(file)) => {
            return Err(format!(
                "both a token (--token or LB_TOKEN) and a token file ({file}) are given: use one"
            ));
        }
        (Some(token), None) => Some(token.clone()),
        (None, Some(file)) => Some(
            std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?.trim().to_owned(),
        ),
        (None, None) => None,
    };
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(cli.timeout)));
    if let Some(ca) = &cli.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("{ca}: {e}"))?;
        let certs: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(format!("{ca}: no PEM certificate in it"));
        }
        let roots = ureq::tls::RootCerts::new_with_certs(&certs);
        config = config.tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build());
    }
    let agent: ureq::Agent = config.build().into();
    Ok(Client { base: cli.api.clone(), token, agent })
}

fn run(cli: &Cli) -> Result<(), String> {
    let client = client(cli)?;
    match &cli.command {
        Command::Status => {
            let (s, text): (Status, _) = client.get("/v1/status")?;
            if cli.json {
                println!("{text}");
                return Ok(());
            }
            println!(
                "lbd {}  services {}  pools {}  backends {}",
                s.version, s.services, s.pools, s.backends
            );
            println!(
                "connections {} of {}  pinned {}",
                s.conntrack_entries, s.conntrack_capacity, s.pinned
            );
            for i in &s.interfaces {
                println!("interface {:<16} {}", i.name, i.mode);
            }
        }
        Command::Firewall => {
            let (fw, text): (FirewallView, _) = client.get("/v1/firewall")?;
            if cli.json {
                println!("{text}");
                return Ok(());
            }
            print_firewall(&fw);
        }
        Command::Services => {
            let (services, text): (Vec<ServiceView>, _) = client.get("/v1/services")?;
            if cli.json {
                println!("{text}");
                return Ok(());
            }
            println!(
                "{:<16} {:<28} {:<5} {:<6} {:<12} {:<7} {:>12} {:>14} {:>10}",
                "SERVICE", "ADDRESS", "PROTO", "PORT", "POOL", "MODE", "PACKETS", "BYTES", "FLOWS"
            );
            for s in services {
                let port = s.port.map_or_else(|| "all".to_owned(), |p| p.to_string());
                println!(
                    "{:<16} {:<28} {:<5} {:<6} {:<12} {:<7} {:>12} {:>14} {:>10}",
                    s.name,
                    s.address,
                    s.protocol,
                    port,
                    s.pool,
                    s.mode,
                    s.packets,
                    s.bytes,
                    s.new_flows
                );
            }
        }
        Command::Pools => {
            let (pools, text): (Vec<PoolView>, _) = client.get("/v1/pools")?;
            if cli.json {
                println!("{text}");
                return Ok(());
            }
            println!(
                "{:<12} {:<28} {:<6} {:<9} {:<7} {:>11} {:>12} {:>14} {:>10} {:>8}",
                "POOL",
                "BACKEND",
                "PORT",
                "STATE",
                "HEALTH",
                "WEIGHT",
                "PACKETS",
                "BYTES",
                "FLOWS",
                "ACTIVE"
            );
            for p in pools {
                let pool = if p.panic { format!("{} (PANIC)", p.name) } else { p.name.clone() };
                for b in p.backends {
                    let port = b.port.map_or_else(|| "-".to_owned(), |p| p.to_string());
                    let health = match b.healthy {
                        None => "-",
                        Some(true) => "up",
                        Some(false) => "DOWN",
                    };
                    let state = if b.removed { "removed" } else { b.state.name() };
                    println!(
                        "{:<12} {:<28} {:<6} {:<9} {:<7} {:>11} {:>12} {:>14} {:>10} {:>8}",
                        pool,
                        b.address,
                        port,
                        state,
                        health,
                        format!("{}/{}", b.effective_weight, b.weight),
                        b.packets,
                        b.bytes,
                        b.new_flows,
                        b.active_flows
                    );
                }
            }
        }
        Command::Backend { action } => {
            let (method, path, body) = match action {
                BackendAction::Add { pool, address, port, weight } => (
                    "POST",
                    format!("/v1/pools/{pool}/backends"),
                    Some(serde_json::json!({ "address": address, "port": port, "weight": weight })),
                ),
                BackendAction::Remove { pool, address, port } => (
                    "DELETE",
                    with_port(format!("/v1/pools/{pool}/backends/{address}"), *port),
                    None,
                ),
                BackendAction::Weight { pool, address, weight, port } => (
                    "PUT",
                    with_port(format!("/v1/pools/{pool}/backends/{address}/weight"), *port),
                    Some(serde_json::json!({ "weight": weight })),
                ),
                BackendAction::Drain { pool, address, port }
                | BackendAction::Disable { pool, address, port }
                | BackendAction::Enable { pool, address, port } => {
                    let state = match action {
                        BackendAction::Drain { .. } => "draining",
                        BackendAction::Disable { .. } => "disabled",
                        _ => "active",
                    };
                    (
                        "PUT",
                        with_port(format!("/v1/pools/{pool}/backends/{address}/state"), *port),
                        Some(serde_json::json!({ "state": state })),
                    )
                }
            };
            print_change(&client.request(method, &path, body)?, cli.json)?;
        }
        Command::Reload => print_change(&client.request("POST", "/v1/reload", None)?, cli.json)?,
    }
    Ok(())
}

fn print_firewall(fw: &FirewallView) {
    if !fw.enabled {
        println!("firewall off (no [firewall] section)");
        return;
    }
    println!(
        "policy {}{}; generation {}; {} source and {} destination prefixes",
        fw.default,
        if fw.audit { " (audit: nothing dropped)" } else { "" },
        fw.generation.unwrap_or(0),
        fw.source_prefixes,
        fw.destination_prefixes
    );
    println!("{:<4} {:<24} {:<11} {:>14} {:>16}", "#", "RULE", "ACTION", "PACKETS", "BYTES");
    for (i, r) in fw.rules.iter().enumerate() {
        println!("{:<4} {:<24} {:<11} {:>14} {:>16}", i, r.name, r.action, r.packets, r.bytes);
    }
    println!(
        "{:<4} {:<24} {:<11} {:>14} {:>16}",
        "-", "(default)", fw.default, fw.default_packets, fw.default_bytes
    );
    if fw.audit {
        println!("would have dropped: {}", fw.audit_would_drop);
    }
}

fn with_port(path: String, port: Option<u16>) -> String {
    match port {
        Some(port) => format!("{path}?port={port}"),
        None => path,
    }
}

fn print_change(text: &str, json: bool) -> Result<(), String> {
    if json {
        println!("{text}");
        return Ok(());
    }
    let c: ChangeResult =
        serde_json::from_str(text).map_err(|e| format!("unexpected answer from lbd: {e}"))?;
    println!(
        "applied: {} services added, {} updated, {} removed; {} tables installed; {} backends added, {} retired",
        c.services_added,
        c.services_updated,
        c.services_removed,
        c.tables_installed,
        c.backends_added,
        c.backends_retired
    );
    if !c.pending_restart.is_empty() {
        println!(
            "changed in the file, applied when lbd restarts: {}",
            c.pending_restart.join(", ")
        );
    }
    Ok(())
}

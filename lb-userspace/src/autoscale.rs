//! Autoscaling hooks: per-pool policies on signals the daemon already has (new flows per
//! second, active flows per backend, bytes per second, healthy backends). A policy fires when
//! its condition has held for `for_secs`, then not again for `cooldown_secs`; firing POSTs a
//! signed JSON event to a webhook and/or runs a command with the event on standard input.
//!
//! The event format is documented in `docs/autoscaling.md`; receivers verify
//! `X-Lb-Signature: sha256=<hex HMAC-SHA256 of the body with the shared secret>`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt as _;
use tracing::{info, warn};

use crate::{
    balancer::BackendIdentity,
    config::{AutoscaleConfig, BackendState, Config, Signal},
    lifecycle::Lifecycle,
};

/// Webhook attempts per event, and the first retry's delay (doubling after each).
const WEBHOOK_ATTEMPTS: u32 = 4;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest time a rate is taken over (see [`Engine::sample`]).
const MIN_SAMPLE: Duration = Duration::from_millis(500);

/// One policy's clock: since when its condition holds, and when it last fired. Times are
/// offsets from any fixed instant, so tests drive it with fake time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    holding_since: Option<Duration>,
    last_fired: Option<Duration>,
}

impl PolicyState {
    /// Takes one sample of the policy's signal at `now`; returns whether the policy fires.
    pub fn evaluate(&mut self, policy: &AutoscaleConfig, value: f64, now: Duration) -> bool {
        let holds =
            policy.above.is_some_and(|t| value > t) || policy.below.is_some_and(|t| value < t);
        if !holds {
            self.holding_since = None;
            return false;
        }
        let since = *self.holding_since.get_or_insert(now);
        let held = now.saturating_sub(since) >= Duration::from_secs(policy.for_secs);
        let cooled = self
            .last_fired
            .is_none_or(|t| now.saturating_sub(t) >= Duration::from_secs(policy.cooldown_secs));
        if held && cooled {
            self.last_fired = Some(now);
            return true;
        }
        false
    }
}

/// One backend as an event lists it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EventBackend {
    pub address: std::net::IpAddr,
    pub port: Option<u16>,
    pub weight: u32,
    pub state: String,
    pub healthy: bool,
}

/// What a hook receives.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// Format version of this event.
    pub version: u32,
    /// Unique per event (retries of one delivery carry the same id).
    pub id: String,
    /// Unix time in seconds when the policy fired.
    pub time: u64,
    pub pool: String,
    pub policy: String,
    pub signal: String,
    pub value: f64,
    pub threshold: f64,
    /// `above` or `below`.
    pub direction: String,
    pub for_secs: u64,
    pub backends: Vec<EventBackend>,
    pub healthy_backends: usize,
}

/// Counts of fired events and of deliveries, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// (pool, policy) -> events fired.
    pub fired: BTreeMap<(String, String), u64>,
    /// (pool, policy, target "webhook"/"command", result "ok"/"failed"/"skipped") ->
    /// deliveries.
    pub deliveries: BTreeMap<(String, String, &'static str, &'static str), u64>,
    /// (pool, policy) whose delivery runs now.
    pub in_flight: std::collections::HashSet<(String, String)>,
}

/// Marks a policy's delivery as running until dropped (the task's end, however it ends).
struct Running {
    counters: SharedCounters,
    key: (String, String),
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut c = self.counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.in_flight.remove(&self.key);
    }
}

pub type SharedCounters = Arc<Mutex<Counters>>;

/// Per-pool signal values at one sample.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Signals {
    pub new_flows_per_second: f64,
    pub bytes_per_second: f64,
    pub active_flows_per_backend: f64,
    pub healthy_backends: f64,
}

impl Signals {
    #[must_use]
    pub const fn get(&self, signal: Signal) -> f64 {
        match signal {
            Signal::NewFlowsPerSecond => self.new_flows_per_second,
            Signal::ActiveFlowsPerBackend => self.active_flows_per_backend,
            Signal::BytesPerSecond => self.bytes_per_second,
            Signal::HealthyBackends => self.healthy_backends,
        }
    }
}

/// Counters of one backend id: (new flows, bytes).
pub type BackendCounters = HashMap<u32, (u64, u64)>;

/// TLS-passthrough counters by route (service, route, pool): passthrough connections are
/// lbd's sockets, not the data path's flows, and a pool that passthrough services use is
/// busy by them too. By route, not summed by pool: a route's series goes when a reload
/// removes it and its last relay ends, and a pool total would fall with it (a rate of 0).
pub type RouteRelays = std::collections::BTreeMap<
    crate::passthrough::stats::RouteId,
    crate::passthrough::stats::RouteCounters,
>;

/// Samples signals and evaluates every policy.
#[derive(Debug)]
pub struct Engine {
    epoch: Instant,
    states: HashMap<(String, String), PolicyState>,
    last: Option<(Instant, BackendCounters, RouteRelays)>,
    sequence: u64,
    pub counters: SharedCounters,
    /// The latest signal values per pool (for the API and metrics).
    pub signals: BTreeMap<String, Signals>,
}

impl Default for Engine {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            states: HashMap::new(),
            last: None,
            sequence: 0,
            counters: SharedCounters::default(),
            signals: BTreeMap::new(),
        }
    }
}

/// What the engine needs to know about the running state at one sample.
#[derive(Debug)]
pub struct Inputs<'a> {
    pub config: &'a Config,
    pub lifecycle: &'a Lifecycle,
    /// Backend ids of live backends.
    pub ids: &'a HashMap<BackendIdentity, u32>,
    /// Current counters per backend id.
    pub counters: BackendCounters,
    /// Live flows per backend id (last sweep).
    pub live: &'a HashMap<u32, u64>,
    /// TLS-passthrough counters by route.
    pub relays: RouteRelays,
}

impl Engine {
    /// Takes a sample at `now`; returns the events of policies that fire, with the policy.
    pub fn sample(&mut self, inputs: &Inputs<'_>, now: Instant) -> Vec<(Event, AutoscaleConfig)> {
        // Samples closer than this to the last (ticks missed while the daemon was busy,
        // fired back to back) are skipped, the last kept: a rate over a few microseconds is
        // noise, and a zero would reset every policy's holding time.
        if let Some((then, _, _)) = &self.last
            && now.saturating_duration_since(*then) < MIN_SAMPLE
        {
            return Vec::new();
        }
        let previous = self.last.replace((now, inputs.counters.clone(), inputs.relays.clone()));
        let Some((then, before, relays_before)) = previous else { return Vec::new() };
        let secs = now.saturating_duration_since(then).as_secs_f64();
        let mut events = Vec::new();
        let mut keep = std::collections::HashSet::new();
        self.signals.clear();
        for pool in &inputs.config.pools {
            let name = pool.name.get_ref();
            let members: Vec<(BackendIdentity, &crate::config::BackendConfig)> =
                crate::lifecycle::pool_backends(pool).collect();
            let mut signals = Signals::default();
            let mut active = 0usize;
            let mut live = 0u64;
            let mut healthy = 0usize;
            for (identity, b) in &members {
                let Some(id) = inputs.ids.get(identity) else { continue };
                if let (Some(now_c), Some(before_c)) = (inputs.counters.get(id), before.get(id)) {
                    #[allow(clippy::cast_precision_loss, reason = "rates")]
                    {
                        signals.new_flows_per_second += now_c.0.saturating_sub(before_c.0) as f64;
                        signals.bytes_per_second += now_c.1.saturating_sub(before_c.1) as f64;
                    }
                }
                live += inputs.live.get(id).copied().unwrap_or(0);
                if b.state == BackendState::Active {
                    active += 1;
                    if inputs.lifecycle.is_healthy(identity) {
                        healthy += 1;
                    }
                }
            }
            // Routes to the pool: their growth since the last sample (a route new since then
            // from zero), and their open relays. Bytes to the backends, as the data path
            // counts them.
            for (route, now_r) in inputs.relays.iter().filter(|(route, _)| route.2 == *name) {
                let before_r = relays_before.get(route).copied().unwrap_or_default();
                #[allow(clippy::cast_precision_loss, reason = "rates")]
                {
                    signals.new_flows_per_second +=
                        now_r.connections.saturating_sub(before_r.connections) as f64;
                    signals.bytes_per_second +=
                        now_r.bytes_to_backend.saturating_sub(before_r.bytes_to_backend) as f64;
                }
                live += now_r.active;
            }
            #[allow(clippy::cast_precision_loss, reason = "counts")]
            {
                signals.new_flows_per_second /= secs;
                signals.bytes_per_second /= secs;
                signals.active_flows_per_backend = live as f64 / active.max(1) as f64;
                signals.healthy_backends = healthy as f64;
            }
            for policy in &pool.autoscale {
                let key = (name.clone(), policy.name.clone());
                keep.insert(key.clone());
                let value = signals.get(policy.signal);
                let state = self.states.entry(key).or_default();
                if state.evaluate(policy, value, now.saturating_duration_since(self.epoch)) {
                    self.sequence += 1;
                    let event =
                        self.event(pool.name.get_ref(), policy, value, &members, inputs, healthy);
                    events.push((event, policy.clone()));
                }
            }
            self.signals.insert(name.clone(), signals);
        }
        self.states.retain(|k, _| keep.contains(k));
        events
    }

    fn event(
        &self,
        pool: &str,
        policy: &AutoscaleConfig,
        value: f64,
        members: &[(BackendIdentity, &crate::config::BackendConfig)],
        inputs: &Inputs<'_>,
        healthy: usize,
    ) -> Event {
        let time = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let (direction, threshold) = match (policy.above, policy.below) {
            (Some(t), _) => ("above", t),
            (None, Some(t)) => ("below", t),
            (None, None) => ("above", f64::NAN),
        };
        Event {
            version: 1,
            id: format!("{}-{}-{}", time.as_millis(), std::process::id(), self.sequence),
            time: time.as_secs(),
            pool: pool.to_owned(),
            policy: policy.name.clone(),
            signal: policy.signal.name().to_owned(),
            value,
            threshold,
            direction: direction.to_owned(),
            for_secs: policy.for_secs,
            backends: members
                .iter()
                .map(|(identity, b)| EventBackend {
                    address: identity.addr,
                    port: identity.port,
                    weight: *b.weight.get_ref(),
                    state: b.state.name().to_owned(),
                    healthy: inputs.lifecycle.is_healthy(identity),
                })
                .collect(),
            healthy_backends: healthy,
        }
    }
}

/// The signature header's value for `body`: `sha256=` and the hex HMAC-SHA256.
#[must_use]
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let hex = tag.as_ref().iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    });
    format!("sha256={hex}")
}

/// Reads a webhook secret (surrounding whitespace trimmed).
pub fn read_secret(path: &str) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("secret file {path}: {e}"))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(format!("secret file {path} is empty"));
    }
    Ok(secret.as_bytes().to_vec())
}

/// Delivers `event` to the policy's webhook and command; logs and counts each outcome.
pub async fn deliver(event: Event, policy: AutoscaleConfig, counters: SharedCounters) {
    let body = match serde_json::to_vec(&event) {
        Ok(body) => body,
        Err(error) => {
            warn!(%error, "cannot encode the autoscaling event");
            return;
        }
    };
    let count_as = |target: &'static str, result: &'static str| {
        let mut c = counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *c.deliveries
            .entry((event.pool.clone(), event.policy.clone(), target, result))
            .or_default() += 1;
    };
    let count = |target: &'static str, ok: bool| count_as(target, if ok { "ok" } else { "failed" });
    // One delivery per policy at a time: with an endpoint that hangs (each attempt up to its
    // timeout, four attempts) and a short cooldown, deliveries would pile up.
    let key = (event.pool.clone(), event.policy.clone());
    let fresh = {
        let mut c = counters.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.in_flight.insert(key.clone())
    };
    if !fresh {
        warn!(pool = %event.pool, policy = %event.policy, id = %event.id, "the policy's previous delivery still runs: this event is skipped");
        for (target, set) in
            [("webhook", policy.webhook.is_some()), ("command", !policy.command.is_empty())]
        {
            if set {
                count_as(target, "skipped");
            }
        }
        return;
    }
    let _running = Running { counters: counters.clone(), key };
    if let Some(url) = &policy.webhook {
        let ok = post_with_retries(url, policy.secret_file.as_deref(), &body, &event).await;
        count("webhook", ok);
    }
    if !policy.command.is_empty() {
        let result = run_command(&policy.command, &body).await;
        match &result {
            Ok(()) => info!(pool = %event.pool, policy = %event.policy, "autoscaling command ran"),
            Err(error) => {
                warn!(pool = %event.pool, policy = %event.policy, %error, "autoscaling command failed");
            }
        }
        count("command", result.is_ok());
    }
}

async fn post_with_retries(url: &str, secret: Option<&str>, body: &[u8], event: &Event) -> bool {
    let mut delay = FIRST_RETRY;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        // The secret is read at each delivery, so rotating it needs no restart.
        let signed = match secret.map(read_secret).transpose() {
            Ok(secret) => secret.map(|s| signature(&s, body)),
            Err(error) => {
                warn!(pool = %event.pool, policy = %event.policy, %error, "autoscaling webhook not sent");
                return false;
            }
        };
        let shown = redacted(url);
        let (url_owned, body_owned, id) = (url.to_owned(), body.to_vec(), event.id.clone());
        let result = tokio::task::spawn_blocking(move || {
            post(&url_owned, &body_owned, signed.as_deref(), &id)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match result {
            Ok(status) => {
                info!(pool = %event.pool, policy = %event.policy, url = %shown, status, attempt, "autoscaling webhook delivered");
                return true;
            }
            Err(error) => {
                warn!(pool = %event.pool, policy = %event.policy, url = %shown, attempt, %error, "autoscaling webhook failed");
            }
        }
        if attempt < WEBHOOK_ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
    false
}

/// A webhook URL as logged: scheme, host and port only. Tokens ride in paths and queries
/// (chat webhooks) and credentials in the authority: none of them belong in a log.
pub(crate) fn redacted(url: &str) -> String {
    match axum::http::Uri::try_from(url) {
        Ok(uri) => {
            let scheme = uri.scheme_str().unwrap_or("?");
            let host = uri.host().unwrap_or("?");
            match uri.port_u16() {
                Some(port) => format!("{scheme}://{host}:{port}/…"),
                None => format!("{scheme}://{host}/…"),
            }
        }
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

fn post(url: &str, body: &[u8], signature: Option<&str>, id: &str) -> Result<u16, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .http_status_as_error(false)
        // A redirect would turn the POST into a GET without the event, and its 2xx count as
        // delivered: the redirect's status is the answer.
        .max_redirects(0)
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(trust_roots()).build())
        .build()
        .into();
    let mut request = agent
        .post(url)
        .header("Content-Type", "application/json")
        .header("User-Agent", concat!("lbd/", env!("CARGO_PKG_VERSION")))
        .header("X-Lb-Event-Id", id);
    if let Some(signature) = signature {
        request = request.header("X-Lb-Signature", signature);
    }
    let response = request.send(body).map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    if (200..300).contains(&status) { Ok(status) } else { Err(format!("status {status}")) }
}

/// Bundles of trusted CA certificates where distributions keep them, tried in order after
/// `SSL_CERT_FILE`.
const SYSTEM_CA_BUNDLES: [&str; 3] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"];

/// The CAs webhook servers are verified against: the host's trust store (`SSL_CERT_FILE`,
/// else the distribution's bundle), where a private CA is added with
/// `update-ca-certificates`; Mozilla's list built into lbd when the host has none. Read once.
fn trust_roots() -> ureq::tls::RootCerts {
    static ROOTS: std::sync::OnceLock<ureq::tls::RootCerts> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
            let candidates = from_env
                .iter()
                .cloned()
                .chain(SYSTEM_CA_BUNDLES.iter().map(std::path::PathBuf::from));
            for path in candidates {
                let read = std::fs::read(&path).map_err(|e| e.to_string());
                match read.and_then(|pem| certificates(&pem).ok_or_else(|| "no certificates".into()))
                {
                    Ok(certs) => {
                        info!(bundle = %path.display(), certificates = certs.len(), "webhook CAs");
                        return ureq::tls::RootCerts::Specific(Arc::new(certs));
                    }
                    // Said when it was asked for; the distributions' paths are only tried.
                    Err(error) if from_env.as_ref() == Some(&path) => {
                        warn!(bundle = %path.display(), %error, "SSL_CERT_FILE unusable for webhook CAs");
                    }
                    Err(_) => {}
                }
            }
            warn!("no CA bundle on this host: webhooks trust lbd's built-in list");
            ureq::tls::RootCerts::WebPki
        })
        .clone()
}

/// The certificates in a PEM bundle, if it holds any.
fn certificates(pem: &[u8]) -> Option<Vec<ureq::tls::Certificate<'static>>> {
    let certs: Vec<_> = ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(cert)) => Some(cert),
            _ => None,
        })
        .collect();
    (!certs.is_empty()).then_some(certs)
}

async fn run_command(command: &[String], body: &[u8]) -> Result<(), String> {
    run_command_within(command, body, COMMAND_TIMEOUT).await
}

async fn run_command_within(
    command: &[String],
    body: &[u8],
    limit: Duration,
) -> Result<(), String> {
    let (program, args) = command.split_first().ok_or("no command")?;
    // In a process group of its own, killed whole at the timeout (see `process`).
    let mut child = crate::process::spawn(
        tokio::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null()),
    )
    .map_err(|e| format!("{program}: {e}"))?;
    let stdin = child.child.stdin.take();
    // The event and the run under one bound: a hook that never reads its input would
    // otherwise hold the write (and itself) for ever once the event outgrows the pipe.
    let run = async {
        // Written while the hook runs, not before waiting for it: the write ends when the
        // hook does (dropped, which closes the pipe), even if a job it left behind holds
        // the pipe open unread, and the hook's exit status alone says how it went.
        let feed = async {
            if let Some(mut stdin) = stdin {
                // A hook that exits without reading all of it closes the pipe.
                if let Err(e) = stdin.write_all(body).await
                    && e.kind() != std::io::ErrorKind::BrokenPipe
                {
                    return Err(format!("{program} stdin: {e}"));
                }
            }
            Ok(())
        };
        // Once the hook exits, what it started in the background is killed with its group:
        // a hook that leaves a stuck job behind would otherwise leave one per firing.
        let exited = child.wait_whole();
        tokio::pin!(feed, exited);
        let status = tokio::select! {
            status = &mut exited => status,
            fed = &mut feed => {
                fed?;
                exited.await
            }
        };
        status.map_err(|e| e.to_string())
    };
    let status = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| format!("{program} did not finish within {limit:?}"))??;
    if status.success() { Ok(()) } else { Err(format!("{program} exited with {status}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_urls_are_logged_without_path_query_or_credentials() {
        assert_eq!(
            redacted("https://user:pw@hooks.example.com:8443/services/T0/B1/secret?x=1"),
            "https://hooks.example.com:8443/…"
        );
        assert_eq!(redacted("http://198.18.0.9/scale"), "http://198.18.0.9/…");
        assert_eq!(redacted("not a url"), "(unparsable URL)");
    }

    fn policy(
        above: Option<f64>,
        below: Option<f64>,
        for_secs: u64,
        cooldown: u64,
    ) -> AutoscaleConfig {
        AutoscaleConfig {
            name: "p".into(),
            signal: Signal::NewFlowsPerSecond,
            above,
            below,
            for_secs,
            cooldown_secs: cooldown,
            webhook: Some("http://198.18.0.1/".into()),
            secret_file: None,
            command: Vec::new(),
        }
    }

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn fires_once_the_condition_has_held_for_the_duration() {
        let p = policy(Some(100.0), None, 10, 300);
        let mut s = PolicyState::default();
        assert!(!s.evaluate(&p, 150.0, at(0)));
        assert!(!s.evaluate(&p, 150.0, at(9)));
        assert!(s.evaluate(&p, 150.0, at(10)));
        assert!(!s.evaluate(&p, 150.0, at(11)), "cooling down");
    }

    #[test]
    fn an_interruption_restarts_the_duration() {
        let p = policy(Some(100.0), None, 10, 300);
        let mut s = PolicyState::default();
        s.evaluate(&p, 150.0, at(0));
        assert!(!s.evaluate(&p, 100.0, at(5)), "at the threshold is not above it");
        assert!(!s.evaluate(&p, 150.0, at(6)));
        assert!(!s.evaluate(&p, 150.0, at(15)));
        assert!(s.evaluate(&p, 150.0, at(16)));
    }

    #[test]
    fn fires_again_only_after_the_cooldown() {
        let p = policy(None, Some(2.0), 0, 60);
        let mut s = PolicyState::default();
        assert!(s.evaluate(&p, 1.0, at(100)), "for_secs 0 fires at once");
        assert!(!s.evaluate(&p, 1.0, at(130)));
        assert!(!s.evaluate(&p, 1.0, at(159)));
        assert!(s.evaluate(&p, 1.0, at(160)));
        // A recovery does not reset the cooldown.
        assert!(!s.evaluate(&p, 3.0, at(170)));
        assert!(!s.evaluate(&p, 1.0, at(171)));
        assert!(s.evaluate(&p, 1.0, at(220)));
    }

    /// A self-signed certificate (a test CA of no use beyond this test).
    const TEST_CA: &str = "-----BEGIN CERTIFICATE-----
MIIBgDCCASegAwIBAgIUHciXsHrYB810ZmuC7dLkKH91aFUwCgYIKoZIzj0EAwIw
FTETMBEGA1UEAwwKbGIgdGVzdCBDQTAgFw0yNjExMjcwODIwMTdaGA8yMTI2MTEw
MzA4MjAxN1owFTETMBEGA1UEAwwKbGIgdGVzdCBDQTBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABMjAJHiPAkSHEHOZ8Y/is76V1cZ6OfZgxGy580yCdoHqzo8JtiEs
Op6aiKAWIVe1/lIwBwz4DTYiRCYmw7wul8mjUzBRMB0GA1UdDgQWBBTQHLvT4dn0
e0M1ZV9EcrqhgrUJcjAfBgNVHSMEGDAWgBTQHLvT4dn0e0M1ZV9EcrqhgrUJcjAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCIEwwd7Fvj1dnHhNudGBG
gLPk03KmblW0WVM/O+4OilFnAiB4I9IzDlM9aU35VCPfgNOksMe62nTsSSoEWLa9
d5uJNQ==
-----END CERTIFICATE-----\n";

    #[test]
    fn a_ca_bundle_gives_its_certificates() {
        let bundle = format!("# comment\n{TEST_CA}{TEST_CA}");
        assert_eq!(certificates(bundle.as_bytes()).map(|c| c.len()), Some(2));
        assert!(certificates(b"no certificates here").is_none());
    }

    #[test]
    fn a_pool_that_passthrough_services_use_is_busy_by_their_relays() {
        // No data path flow at all (the pool serves TLS passthrough only): its signals come
        // from the relays, and a scale-in policy ("below 50 new flows a second") must not
        // fire while 100 connections a second go through them. A route that a reload
        // removed (its series gone) takes nothing away from the others' growth.
        use crate::passthrough::stats::RouteCounters;
        let text = "[[interface]]\nname = \"eth0\"\n[[pool]]\nname = \"web\"\n[[pool.backend]]\naddress = \"198.18.1.11\"\n[[pool.backend]]\naddress = \"198.18.1.12\"\n[[pool.autoscale]]\nname = \"in\"\nsignal = \"new_flows_per_second\"\nbelow = 50.0\nfor_secs = 0\ncooldown_secs = 0\ncommand = [\"true\"]\n";
        let config = Config::parse(text, "t").unwrap();
        let t0 = Instant::now();
        let lifecycle = Lifecycle::starting(&config, t0, &std::collections::HashSet::new());
        let ids: HashMap<BackendIdentity, u32> =
            crate::lifecycle::backends(&config).map(|(b, _)| b).zip(0..).collect();
        let live = HashMap::new();
        let mut engine = Engine::default();
        let route = |label: &str, pool: &str| ("tls".to_owned(), label.to_owned(), pool.to_owned());
        let counters = |connections, active| RouteCounters {
            connections,
            active,
            bytes_to_backend: 10_000 * connections,
            bytes_to_client: 99_999,
        };
        let mut sample = |secs: u64, relays: RouteRelays| {
            let inputs = Inputs {
                config: &config,
                lifecycle: &lifecycle,
                ids: &ids,
                counters: HashMap::from([(0, (0, 0)), (1, (0, 0))]),
                live: &live,
                relays,
            };
            engine.sample(&inputs, t0 + Duration::from_secs(secs)).len()
        };
        let www = |n| (route("www.example.com", "web"), counters(n, 20));
        let old = (route("old.example.com", "web"), counters(5_000, 0));
        let elsewhere = (route("default", "other"), counters(1_000_000, 7));
        assert_eq!(sample(0, [www(0), old, elsewhere.clone()].into()), 0, "the baseline");
        // A second later: 100 more on www, old's series gone, another pool's ignored.
        assert_eq!(sample(1, [www(100), elsewhere].into()), 0, "100 a second is not below 50");
        let signals = &engine.signals["web"];
        assert!((signals.new_flows_per_second - 100.0).abs() < 1e-9, "{signals:?}");
        assert!((signals.bytes_per_second - 1e6).abs() < 1e-3, "to the backends: {signals:?}");
        assert!((signals.active_flows_per_backend - 10.0).abs() < 1e-9, "{signals:?}");
    }

    #[test]
    fn samples_closer_than_half_a_second_are_skipped() {
        let text = "[[interface]]\nname = \"eth0\"\n[[pool]]\nname = \"web\"\n[[pool.backend]]\naddress = \"198.18.1.11\"\n[[pool.autoscale]]\nname = \"out\"\nsignal = \"new_flows_per_second\"\nabove = 50.0\nfor_secs = 0\ncooldown_secs = 0\ncommand = [\"true\"]\n";
        let config = Config::parse(text, "t").unwrap();
        let t0 = Instant::now();
        let lifecycle = Lifecycle::starting(&config, t0, &std::collections::HashSet::new());
        let identity = crate::lifecycle::backends(&config).next().unwrap().0;
        let ids = HashMap::from([(identity, 0u32)]);
        let live = HashMap::new();
        let mut engine = Engine::default();
        let mut sample = |flows: u64, at: Duration| {
            let inputs = Inputs {
                config: &config,
                lifecycle: &lifecycle,
                ids: &ids,
                counters: HashMap::from([(0, (flows, 0))]),
                live: &live,
                relays: RouteRelays::new(),
            };
            engine.sample(&inputs, t0 + at).len()
        };
        assert_eq!(sample(0, Duration::ZERO), 0, "the first sample is the baseline");
        // 10 flows 1 ms later (a missed tick fired late) is no rate of 10,000 a second.
        assert_eq!(sample(10, Duration::from_millis(1)), 0);
        // A second after the baseline: 40 flows in 1 s, below 50.
        assert_eq!(sample(40, Duration::from_secs(1)), 0);
        // 100 more in the next second fires.
        assert_eq!(sample(140, Duration::from_secs(2)), 1);
    }

    #[tokio::test]
    async fn a_hook_that_does_not_read_its_event_is_bounded() {
        let event = vec![b'x'; 1 << 20];
        // Ended by the bound (its error says so), not by the 30 s program.
        let stuck = ["sleep".to_owned(), "30".to_owned()];
        let error = run_command_within(&stuck, &event, Duration::from_millis(500)).await;
        assert!(error.is_err_and(|e| e.contains("did not finish")));
        // What a timed-out hook started goes with it (its process group).
        let pid_file = std::env::temp_dir().join(format!("lb-hook-group-{}", std::process::id()));
        let script = crate::process::tests::script_with_background_job(&pid_file);
        let shell = ["sh".to_owned(), "-c".to_owned(), script];
        assert!(run_command_within(&shell, b"{}", Duration::from_millis(500)).await.is_err());
        let gone = crate::process::tests::gone_within(&pid_file, Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&pid_file);
        assert!(gone, "the timed-out hook's background job ran on");
        // One that exits at once without reading it succeeded: its status says so.
        assert_eq!(
            run_command_within(&["true".to_owned()], &event, Duration::from_secs(5)).await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_hook_that_exits_takes_its_background_jobs_with_it() {
        let pid_file =
            std::env::temp_dir().join(format!("lb-hook-leftover-{}", std::process::id()));
        let script = crate::process::tests::script_leaving_a_job_behind(&pid_file);
        let shell = ["sh".to_owned(), "-c".to_owned(), script];
        let result = run_command_within(&shell, b"{}", Duration::from_secs(5)).await;
        let gone = crate::process::tests::gone_within(&pid_file, Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&pid_file);
        assert_eq!(result, Ok(()));
        assert!(gone, "the hook's background job ran on after the hook exited");
    }

    #[tokio::test]
    async fn an_event_a_leftover_job_holds_unread_does_not_outlast_the_hook() {
        // Larger than a pipe's buffer (64 KiB): the write cannot finish while the job holds
        // the pipe and reads nothing.
        let event = vec![b'x'; 1 << 20];
        let pid_file = std::env::temp_dir().join(format!("lb-hook-stdin-{}", std::process::id()));
        let script = crate::process::tests::script_leaving_a_job_behind(&pid_file);
        let shell = ["sh".to_owned(), "-c".to_owned(), script];
        let result = run_command_within(&shell, &event, Duration::from_secs(10)).await;
        let _ = crate::process::tests::gone_within(&pid_file, Duration::from_secs(5)).await;
        let _ = std::fs::remove_file(&pid_file);
        // The hook exited 0 at once: that is the delivery's result (a write waiting on the
        // job would have run into the bound, an error).
        assert_eq!(result, Ok(()));
    }

    #[tokio::test]
    async fn a_policy_delivers_one_event_at_a_time() {
        let counters = SharedCounters::default();
        let mut hook = policy(Some(1.0), None, 0, 0);
        hook.webhook = None;
        // A hook that runs until the test lets it end (by a file; at most 20 s).
        let release = std::env::temp_dir().join(format!("lb-hook-release-{}", std::process::id()));
        let _ = std::fs::remove_file(&release);
        hook.command = vec![
            "sh".into(),
            "-c".into(),
            format!(
                "i=0; while [ ! -e '{}' ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done",
                release.display()
            ),
        ];
        let event = |id: &str| Event {
            version: 1,
            id: id.into(),
            time: 0,
            pool: "web".into(),
            policy: "p".into(),
            signal: "new_flows_per_second".into(),
            value: 2.0,
            threshold: 1.0,
            direction: "above".into(),
            for_secs: 0,
            backends: Vec::new(),
            healthy_backends: 0,
        };
        let first = tokio::spawn(deliver(event("1"), hook.clone(), counters.clone()));
        // In flight once the policy counts it (bounded: the spawned task may start late).
        for _ in 0..500 {
            if !counters.lock().unwrap().in_flight.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!counters.lock().unwrap().in_flight.is_empty(), "the first delivery started");
        // The first still runs: the second is skipped, without waiting for it.
        let second = tokio::time::timeout(
            Duration::from_secs(10),
            deliver(event("2"), hook.clone(), counters.clone()),
        )
        .await;
        std::fs::write(&release, b"").unwrap();
        second.expect("a skipped delivery does not wait for the one in flight");
        first.await.unwrap();
        // Then the policy delivers again (its hook ends at once: the file is there).
        deliver(event("3"), hook, counters.clone()).await;
        let _ = std::fs::remove_file(&release);
        let c = counters.lock().unwrap();
        let n = |result: &'static str| {
            c.deliveries.get(&("web".into(), "p".into(), "command", result)).copied().unwrap_or(0)
        };
        assert_eq!((n("ok"), n("skipped")), (2, 1));
        assert!(c.in_flight.is_empty());
    }

    #[test]
    fn signature_is_hmac_sha256_in_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

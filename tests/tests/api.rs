//! The REST API against a real daemon: the data path loaded and attached to a veth in a
//! namespace of the test's own, requests sent to the router with `oneshot` (and one through a
//! real socket with curl). Every rejected request must leave the maps byte for byte as they
//! were, and the configuration file untouched.

#![allow(clippy::too_many_lines, reason = "request tables read best as one list")]

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    http::{Method, Request, StatusCode},
};
use http_body_util::BodyExt as _;
use lb_tests::{
    config,
    daemon::{self, LbdSandbox},
    lab,
    netns::{ChildOutput, Netns, wait_for},
    privileged::require_privileges,
};
use lb_userspace::{
    Config,
    api::{self, AppState},
    daemon::{ConfigFile, Daemon},
};
use tower::ServiceExt as _;

const TOKEN: &str = "s3cret-token-for-tests-0123456789";

/// The pool and service every test here runs: two backends, one at half weight, behind a NAT
/// service.
fn body() -> String {
    let backends = [(lab::backend_v4(0), ""), (lab::backend_v4(1), "weight = 50")];
    let nat = format!("mode = \"nat\"\nnat_source = \"{}\"", lab::LB_BACK_V4);
    config::pool("web", &backends)
        + &config::tcp_service("web", lab::VIP_V4, lab::HTTP_PORT, "web", &nat)
}

/// The configuration of the daemon a [`Fixture`] runs: the API socket off (requests go to the
/// router directly).
fn fixture_config() -> String {
    daemon::sandbox_config("listen = \"\"", &body())
}

/// A daemon on a veth in its own namespace, its configuration in a temporary file.
struct Fixture {
    ns: Netns,
    state: AppState,
    config_path: PathBuf,
}

impl Fixture {
    fn new(name: &str, token: Option<&str>) -> Option<Self> {
        Self::edited_at_start(name, token, None)
    }

    /// With `edit` appended to the file after lbd read it and before it started (as lbd's
    /// own `main` reads it, then starts).
    fn edited_at_start(name: &str, token: Option<&str>, edit: Option<&str>) -> Option<Self> {
        if !require_privileges(name) {
            return None;
        }
        let ns = daemon::veth_netns().unwrap();
        ns.ip(&["link", "set", "veth1", "up"]).unwrap();
        let config_path = std::env::temp_dir().join(format!("{}-api.toml", ns.name()));
        std::fs::write(&config_path, fixture_config()).unwrap();
        let (config, text) = Config::load_with_text(&config_path).unwrap();
        if let Some(edit) = edit {
            std::fs::write(&config_path, format!("{text}{edit}")).unwrap();
        }
        let file = ConfigFile { path: config_path.clone(), text };
        let daemon = ns.enter(move || Daemon::start(config, Some(file), None)).unwrap().unwrap();
        let state = AppState { daemon: Arc::new(Mutex::new(daemon)), token: token.map(Into::into) };
        Some(Self { ns, state, config_path })
    }

    /// Sends one request to the router inside the namespace; returns status and body.
    fn send(
        &self,
        method: Method,
        uri: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let state = self.state.clone();
        let (uri, body) = (uri.to_owned(), body.map(str::to_owned));
        self.ns
            .enter(move || {
                let runtime =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let mut request = Request::builder().method(method).uri(uri);
                    if let Some(token) = token {
                        request = request.header("authorization", format!("Bearer {token}"));
                    }
                    if body.is_some() {
                        request = request.header("content-type", "application/json");
                    }
                    let request = request.body(body.map_or_else(Body::empty, Body::from)).unwrap();
                    let response = api::router(state).oneshot(request).await.unwrap();
                    let status = response.status();
                    let bytes = response.into_body().collect().await.unwrap().to_bytes();
                    (status, String::from_utf8_lossy(&bytes).into_owned())
                })
            })
            .unwrap()
    }

    fn fingerprint(&self) -> String {
        self.state.daemon.lock().unwrap().datapath.maps().fingerprint().unwrap()
    }

    fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config_path);
        let _ = std::fs::remove_file(self.config_path.with_extension("toml.orig"));
    }
}

#[test]
fn every_endpoint_answers_and_the_openapi_document_matches_the_routes() {
    let Some(f) = Fixture::new("every_endpoint_answers", Some(TOKEN)) else { return };
    let t = Some(TOKEN);
    let (status, body) = f.send(Method::GET, "/v1/status", t, None);
    assert_eq!(status, StatusCode::OK, "{body}");
    let s: api::Status = serde_json::from_str(&body).unwrap();
    assert_eq!((s.services, s.pools, s.backends), (1, 1, 2));
    assert_eq!(s.interfaces[0].name, "veth0");

    let (status, body) = f.send(Method::GET, "/v1/services", t, None);
    assert_eq!(status, StatusCode::OK);
    let services: Vec<api::ServiceView> = serde_json::from_str(&body).unwrap();
    assert_eq!(services[0].name, "web");
    assert_eq!(services[0].mode, "nat");

    // Asking for what is already so changes nothing: 200, nothing applied, the operator's
    // file (comments and all) not rewritten.
    let text = f.config_text();
    let (status, body) = f.send(
        Method::PUT,
        "/v1/pools/web/backends/198.18.1.12/state",
        t,
        Some(r#"{"state": "active"}"#),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let unchanged: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(unchanged["tables_installed"], 0, "{body}");
    assert_eq!(f.config_text(), text, "the file was rewritten for no change");
    assert!(!f.config_path.with_extension("toml.orig").exists());

    let (status, body) = f.send(
        Method::POST,
        "/v1/pools/web/backends",
        t,
        Some(r#"{"address": "198.18.1.13", "weight": 70}"#),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = f.send(
        Method::PUT,
        "/v1/pools/web/backends/198.18.1.12/weight",
        t,
        Some(r#"{"weight": 0}"#),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = f.send(Method::DELETE, "/v1/pools/web/backends/198.18.1.11", t, None);
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = f.send(Method::GET, "/v1/pools", t, None);
    let pools: Vec<api::PoolView> = serde_json::from_str(&body).unwrap();
    let backends: Vec<(String, u32)> =
        pools[0].backends.iter().map(|b| (b.address.to_string(), b.weight)).collect();
    assert_eq!(backends, vec![("198.18.1.12".to_owned(), 0), ("198.18.1.13".to_owned(), 70)]);

    // The changes are in the configuration file: they survive a restart.
    let saved = Config::parse(&f.config_text(), "saved").unwrap();
    assert_eq!(saved.pools[0].backends.len(), 2);
    assert!(f.config_path.with_extension("toml.orig").exists());
    let (status, body) = f.send(Method::POST, "/v1/reload", t, None);
    assert_eq!(status, StatusCode::OK, "{body}");

    let (status, body) = f.send(Method::GET, "/metrics", t, None);
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("lb_backend_weight{pool=\"web\",backend=\"198.18.1.13\"} 70"), "{body}");
    assert!(body.contains("lb_xdp_attached{interface=\"veth0\",mode=\"driver\"} 1"), "{body}");

    // The document lists exactly the routes, and every route it lists is served.
    let (status, body) = f.send(Method::GET, "/v1/openapi.json", t, None);
    assert_eq!(status, StatusCode::OK);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object().unwrap().keys().map(move |m| (m.clone(), path.clone()))
        })
        .collect();
    let listed: BTreeSet<(String, String)> =
        api::openapi::OPERATIONS.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(documented, listed);
    for (method, path) in api::openapi::OPERATIONS {
        let concrete = path.replace("{pool}", "nosuchpool").replace("{address}", "198.18.9.9");
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
        let body = matches!(method, Method::POST | Method::PUT)
            .then_some(r#"{"address": "198.18.9.9", "weight": 1}"#);
        let (status, text) = f.send(method.clone(), &concrete, t, body);
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{method} {concrete}: {text}");
        assert!(
            status != StatusCode::NOT_FOUND || text.contains("no pool"),
            "{method} {concrete} is not routed: {status} {text}"
        );
    }
    // Unknown endpoints and methods answer JSON errors like every other.
    for (method, path, want) in [
        (Method::GET, "/v1/nonexistent", StatusCode::NOT_FOUND),
        (Method::DELETE, "/v1/status", StatusCode::METHOD_NOT_ALLOWED),
    ] {
        let (status, text) = f.send(method.clone(), path, t, None);
        assert_eq!(status, want, "{method} {path}: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(error["error"].as_str().is_some_and(|e| e.contains("openapi")), "{text}");
    }
}

#[test]
fn missing_or_wrong_token_is_refused_and_changes_nothing() {
    let Some(f) = Fixture::new("missing_or_wrong_token", Some(TOKEN)) else { return };
    let before = (f.fingerprint(), f.config_text());
    for (method, path, body) in [
        (Method::GET, "/v1/status", None),
        (Method::GET, "/metrics", None),
        (Method::POST, "/v1/pools/web/backends", Some(r#"{"address": "198.18.1.13"}"#)),
        (Method::PUT, "/v1/pools/web/backends/198.18.1.11/weight", Some(r#"{"weight": 0}"#)),
        (Method::DELETE, "/v1/pools/web/backends/198.18.1.11", None),
        (Method::POST, "/v1/reload", None),
    ] {
        for token in [None, Some("wrong-token-wrong-token-wrong-tok"), Some("")] {
            let (status, text) = f.send(method.clone(), path, token, body);
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}: {text}");
            assert!(text.contains("bearer token"), "{text}");
        }
    }
    assert_eq!((f.fingerprint(), f.config_text()), before, "a refused request changed something");
}

#[test]
fn invalid_input_gets_a_4xx_with_a_message_and_changes_nothing() {
    let Some(f) = Fixture::new("invalid_input", None) else { return };
    let before = (f.fingerprint(), f.config_text());
    for (method, path, body, want, needle) in [
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
            "JSON",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "198.18.1.13", "colour": 1}"#),
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "not-an-ip"}"#),
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "198.18.1.13", "weight": 70000}"#),
            StatusCode::BAD_REQUEST,
            "weight",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "fd00:1::9"}"#),
            StatusCode::BAD_REQUEST,
            "address family",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "127.0.0.1"}"#),
            StatusCode::BAD_REQUEST,
            "unicast",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "198.18.1.11"}"#),
            StatusCode::CONFLICT,
            "already has backend 198.18.1.11 (without a port)",
        ),
        (
            Method::POST,
            "/v1/pools/nope/backends",
            Some(r#"{"address": "198.18.1.13"}"#),
            StatusCode::NOT_FOUND,
            "no pool",
        ),
        (
            Method::PUT,
            "/v1/pools/web/backends/198.18.1.11/weight",
            Some(r#"{"weight": -1}"#),
            StatusCode::BAD_REQUEST,
            "weight",
        ),
        (
            Method::PUT,
            "/v1/pools/web/backends/198.18.1.99/weight",
            Some(r#"{"weight": 5}"#),
            StatusCode::NOT_FOUND,
            "no backend",
        ),
        (
            Method::DELETE,
            "/v1/pools/web/backends/198.18.1.99",
            None,
            StatusCode::NOT_FOUND,
            "no backend",
        ),
        (
            Method::DELETE,
            "/v1/pools/web/backends/nonsense",
            None,
            StatusCode::BAD_REQUEST,
            "not an IP",
        ),
        (
            Method::DELETE,
            "/v1/pools/web/backends/198.18.1.11?Port=8080",
            None,
            StatusCode::BAD_REQUEST,
            "Port",
        ),
        (
            Method::DELETE,
            "/v1/pools/web/backends/198.18.1.11?port=abc",
            None,
            StatusCode::BAD_REQUEST,
            "port",
        ),
        (
            Method::PUT,
            "/v1/pools/web/backends/198.18.1.11/weight?port=9999",
            Some(r#"{"weight": 5}"#),
            StatusCode::NOT_FOUND,
            "port 9999",
        ),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "198.18.100.1"}"#),
            StatusCode::BAD_REQUEST,
            "is the address of service",
        ),
        // The port belongs in the body: taken from the query, it would be silently lost.
        (
            Method::POST,
            "/v1/pools/web/backends?port=8080",
            Some(r#"{"address": "198.18.1.13"}"#),
            StatusCode::BAD_REQUEST,
            "takes no query parameters",
        ),
        (Method::POST, "/v1/reload?force=1", None, StatusCode::BAD_REQUEST, "no query"),
        (Method::GET, "/v1/pools?name=web", None, StatusCode::BAD_REQUEST, "no query"),
        (Method::GET, "/v1/openapi.json?v=2", None, StatusCode::BAD_REQUEST, "no query"),
        (
            Method::POST,
            "/v1/pools/web/backends",
            Some(r#"{"address": "255.255.255.255"}"#),
            StatusCode::BAD_REQUEST,
            "broadcast",
        ),
    ] {
        let (status, text) = f.send(method.clone(), path, None, body);
        assert_eq!(status, want, "{method} {path} {body:?}: {text}");
        let message: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "error": text }));
        let message = message["error"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(needle), "{method} {path}: {message:?} should mention {needle:?}");
    }
    // A path that cannot be read is answered in JSON like every other error.
    let (status, text) = f.send(Method::DELETE, "/v1/pools/%FF/backends/198.18.1.11", None, None);
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
    let error: serde_json::Value = serde_json::from_str(&text).expect("a JSON error body");
    assert!(error["error"].as_str().is_some_and(|e| e.contains("UTF-8")), "{text}");
    assert_eq!((f.fingerprint(), f.config_text()), before, "a rejected request changed something");
    for leftover in ["toml.orig", "toml.tmp"] {
        let path = f.config_path.with_extension(leftover);
        assert!(!path.exists(), "a rejected request left {}", path.display());
    }
}

#[test]
fn backends_sharing_an_address_are_named_by_port() {
    let Some(f) = Fixture::new("backends_by_port", None) else { return };
    let (status, body) = f.send(
        Method::POST,
        "/v1/pools/web/backends",
        None,
        Some(r#"{"address": "198.18.1.11", "port": 8081}"#),
    );
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // Two backends at 198.18.1.11 (one without a port): a request without a port would
    // have changed both.
    let before = (f.fingerprint(), f.config_text());
    let path = "/v1/pools/web/backends/198.18.1.11/state";
    let (status, body) = f.send(Method::PUT, path, None, Some(r#"{"state": "draining"}"#));
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("ports: none, 8081"), "{body}");
    assert_eq!(
        (f.fingerprint(), f.config_text()),
        before,
        "an ambiguous request changed something"
    );
    let (status, body) =
        f.send(Method::DELETE, "/v1/pools/web/backends/198.18.1.11?port=0", None, None);
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = f.send(Method::GET, "/v1/pools", None, None);
    let pools: Vec<api::PoolView> = serde_json::from_str(&body).unwrap();
    let at: Vec<_> = pools[0]
        .backends
        .iter()
        .filter(|b| b.address.to_string() == "198.18.1.11")
        .map(|b| b.port)
        .collect();
    assert_eq!(at, vec![Some(8081)], "{body}");
}

#[test]
fn a_reload_that_fails_validation_leaves_every_map_as_it_was() {
    let Some(f) = Fixture::new("failed_reload", None) else { return };
    let before = f.fingerprint();
    // Valid TOML, invalid configuration (unknown pool), then invalid TOML.
    for broken in [
        fixture_config().replace("pool = \"web\"\nmode", "pool = \"nope\"\nmode"),
        fixture_config().replace("[[pool]]", "[[pool"),
    ] {
        std::fs::write(&f.config_path, &broken).unwrap();
        let (status, text) = f.send(Method::POST, "/v1/reload", None, None);
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains("line"), "the error names its place: {text}");
        assert_eq!(f.fingerprint(), before, "the rejected reload changed the maps");
    }
    // A valid change does change them (the fingerprint is not blind).
    std::fs::write(&f.config_path, fixture_config().replace("weight = 50", "weight = 60")).unwrap();
    let (status, text) = f.send(Method::POST, "/v1/reload", None, None);
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_ne!(f.fingerprint(), before);
}

/// Settings read only at start (the API socket, the pin directory, the stats interval) keep
/// their running values through a reload, which applies everything else; the file keeps its
/// own values, through an API change too, for the next start.
#[test]
fn a_reload_keeps_settings_read_at_start_and_applies_the_rest() {
    let Some(f) = Fixture::new("a_reload_keeps_settings_read_at_start", None) else { return };
    let edited = fixture_config()
        .replace("listen = \"\"", "listen = \"127.0.0.1:7071\"")
        .replace(
            "pin_dir = \"\"",
            "pin_dir = \"/sys/fs/bpf/elsewhere\"\nstats_log_interval_secs = 7",
        )
        .replace("weight = 50", "weight = 60");
    std::fs::write(&f.config_path, &edited).unwrap();
    let (status, text) = f.send(Method::POST, "/v1/reload", None, None);
    assert_eq!(status, StatusCode::OK, "{text}");
    let result: api::ChangeResult = serde_json::from_str(&text).unwrap();
    assert_eq!(
        result.pending_restart,
        ["api.listen", "daemon.pin_dir", "daemon.stats_log_interval_secs"],
        "{text}"
    );
    {
        let d = f.state.daemon.lock().unwrap();
        assert_eq!(d.config.api.listen, "", "the API socket is bound at start");
        assert_eq!(d.config.daemon.pin_dir, "");
        assert_eq!(d.config.daemon.stats_log_interval_secs, 10);
        assert_eq!(*d.config.pools[0].backends[1].weight.get_ref(), 60, "the rest is applied");
    }
    // An API change writes the running pools and the file's own start settings.
    let (status, text) = f.send(
        Method::PUT,
        "/v1/pools/web/backends/198.18.1.12/weight",
        None,
        Some(r#"{"weight": 70}"#),
    );
    assert_eq!(status, StatusCode::OK, "{text}");
    let saved = Config::parse(&f.config_text(), "saved").unwrap();
    assert_eq!(saved.api.listen, "127.0.0.1:7071");
    assert_eq!(saved.daemon.pin_dir, "/sys/fs/bpf/elsewhere");
    assert_eq!(saved.daemon.stats_log_interval_secs, 7);
    assert_eq!(*saved.pools[0].backends[1].weight.get_ref(), 70);
}

#[test]
fn lbd_serves_the_api_on_a_socket_and_refuses_a_readable_token_file() {
    if !require_privileges("lbd_serves_the_api_on_a_socket") {
        return;
    }
    let sandbox = LbdSandbox::create("api", TOKEN).unwrap();
    let (ns, token_file) = (&sandbox.ns, &sandbox.token_file);
    sandbox.write_config("127.0.0.1:7070", "", &body()).unwrap();

    // Readable by others: refused before anything is loaded.
    std::fs::set_permissions(token_file, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .unwrap();
    let out = sandbox.run_lbd_to_exit().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let link = ns.ip(&["link", "show", "veth0"]).unwrap();
    assert!(!link.contains("xdp"), "a refused start attached XDP: {link}");

    std::fs::set_permissions(token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let pid = sandbox.spawn_lbd(ChildOutput::Capture).unwrap();
    let status = wait_for(std::time::Duration::from_secs(20), || {
        let out = ns
            .exec(&[
                "curl",
                "-sS",
                "--max-time",
                "2",
                "-H",
                &format!("Authorization: Bearer {TOKEN}"),
                "http://127.0.0.1:7070/v1/status",
            ])
            .ok()?;
        out.contains("\"services\":1").then_some(out)
    });
    let unauthorized = ns
        .exec(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:7070/v1/status",
        ])
        .unwrap();
    sandbox.stop_lbd(pid);
    assert!(status.is_some(), "the API did not answer");
    assert_eq!(unauthorized, "401");
}

/// With `tls_cert_file` and `tls_key_file` the API, `/metrics` included, speaks HTTPS only:
/// curl and lbctl that trust the certificate get answers, plain HTTP gets none, and a
/// certificate file that is not one stops lbd before it loads anything.
#[test]
fn the_api_serves_https_with_its_certificate() {
    if !require_privileges("the_api_serves_https_with_its_certificate") {
        return;
    }
    let sandbox = LbdSandbox::create("api-tls", TOKEN).unwrap();
    let (ns, token_file) = (&sandbox.ns, &sandbox.token_file);
    let cert = lb_tests::tls::make_cert(sandbox.dir(), "lbd-api", &["127.0.0.1"]).unwrap();
    let write_tls_config = |cert_file: &std::path::Path| {
        let tls = format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"",
            cert_file.display(),
            cert.key.display()
        );
        sandbox.write_config("127.0.0.1:7443", &tls, &body()).unwrap();
    };

    // Not a certificate: lbd says so and attaches nothing.
    write_tls_config(token_file);
    let out = sandbox.run_lbd_to_exit().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("API certificate"), "{stderr}");
    assert!(!ns.ip(&["link", "show", "veth0"]).unwrap().contains("xdp"));

    write_tls_config(&cert.cert);
    let pid = sandbox.spawn_lbd(ChildOutput::Capture).unwrap();
    let cacert = cert.cert.display().to_string();
    let bearer = format!("Authorization: Bearer {TOKEN}");
    let https = |path: &str| {
        let url = format!("https://127.0.0.1:7443{path}");
        ns.exec(&["curl", "-sS", "--max-time", "2", "--cacert", &cacert, "-H", &bearer, &url])
    };
    let status = wait_for(std::time::Duration::from_secs(20), || {
        https("/v1/status").ok().filter(|out| out.contains("\"services\":1"))
    });
    let metrics = https("/metrics");
    let plain = ns.exec(&["curl", "-sS", "--max-time", "2", "http://127.0.0.1:7443/v1/status"]);
    // Without the certificate to trust, curl refuses the server.
    let untrusted = ns.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "2",
        "-H",
        &bearer,
        "https://127.0.0.1:7443/v1/status",
    ]);
    let lbctl = lab::bin_path("lbctl").unwrap();
    let lbctl_out = ns.exec(&[
        lbctl.to_str().unwrap(),
        "--api",
        "https://127.0.0.1:7443",
        "--ca",
        &cacert,
        "--token-file",
        token_file.to_str().unwrap(),
        "status",
    ]);
    sandbox.stop_lbd(pid);
    assert!(status.is_some(), "the API did not answer over HTTPS");
    assert!(metrics.as_ref().is_ok_and(|m| m.contains("lb_packets_total")), "{metrics:?}");
    assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    assert!(untrusted.is_err(), "an untrusted certificate was accepted: {untrusted:?}");
    assert!(lbctl_out.as_ref().is_ok_and(|o| o.contains("veth0")), "lbctl: {lbctl_out:?}");
}

#[test]
fn a_change_that_cannot_be_saved_is_refused_before_it_applies() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(f) = Fixture::new("change_cannot_be_saved", Some(TOKEN)) else { return };
    let t = Some(TOKEN);
    // The file may hold secrets, and a group may edit it: written back, it keeps its mode
    // exactly (group-writable, which lbd's umask alone would take away).
    std::fs::set_permissions(&f.config_path, std::fs::Permissions::from_mode(0o660)).unwrap();
    let (status, body) = f.send(
        Method::PUT,
        "/v1/pools/web/backends/198.18.1.12/weight",
        t,
        Some(r#"{"weight": 20}"#),
    );
    assert_eq!(status, StatusCode::OK, "{body}");
    let mode = std::fs::metadata(&f.config_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "the written-back file's mode");

    // Where the new file would be written, something that is not a file: nothing can be
    // saved, so nothing may change (the backend is not removed and put back).
    let blocker = f.config_path.with_extension("toml.tmp");
    std::fs::create_dir(&blocker).unwrap();
    std::fs::write(blocker.join("keep"), "x").unwrap();
    let (before, text) = (f.fingerprint(), f.config_text());
    let (status, body) = f.send(Method::DELETE, "/v1/pools/web/backends/198.18.1.11", t, None);
    std::fs::remove_dir_all(&blocker).unwrap();
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(f.fingerprint(), before, "the running state changed");
    assert_eq!(f.config_text(), text, "the file changed");
    let (_, body) = f.send(Method::GET, "/v1/pools", t, None);
    let pools: Vec<api::PoolView> = serde_json::from_str(&body).unwrap();
    assert_eq!(pools[0].backends.len(), 2, "{body}");
}

#[test]
fn an_edit_made_while_lbd_starts_is_not_written_over() {
    // lbd parsed the file, then it was edited before lbd had started: what lbd runs is the
    // text it parsed, so an API change must see the edit as not reloaded.
    let edit = "# edited by hand while lbd started\n";
    let Some(f) = Fixture::edited_at_start("edit_while_starting", Some(TOKEN), Some(edit)) else {
        return;
    };
    let edited = f.config_text();
    assert!(edited.ends_with(edit));
    let before = f.fingerprint();
    let path = "/v1/pools/web/backends/198.18.1.12/weight";
    let (status, body) = f.send(Method::PUT, path, Some(TOKEN), Some(r#"{"weight": 30}"#));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(f.config_text(), edited, "the edit was written over");
    assert_eq!(f.fingerprint(), before, "the running state changed");
}

#[test]
fn an_api_change_does_not_write_over_edits_not_yet_reloaded() {
    let Some(f) = Fixture::new("change_over_edits", Some(TOKEN)) else { return };
    let t = Some(TOKEN);
    let edited = format!("{}# edited by hand, not reloaded yet\n", f.config_text());
    std::fs::write(&f.config_path, &edited).unwrap();
    let before = f.fingerprint();
    let weight = |w: u32| format!(r#"{{"weight": {w}}}"#);
    let path = "/v1/pools/web/backends/198.18.1.12/weight";
    let (status, body) = f.send(Method::PUT, path, t, Some(&weight(30)));
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("reload"), "the answer says what to do: {body}");
    assert_eq!(f.config_text(), edited, "the edit was written over");
    assert_eq!(f.fingerprint(), before, "the running state changed");
    // Once reloaded, the API changes it again (and the edit's content is what it builds on).
    let (status, body) = f.send(Method::POST, "/v1/reload", t, None);
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = f.send(Method::PUT, path, t, Some(&weight(30)));
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = f.send(Method::PUT, path, t, Some(&weight(40)));
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(f.config_text().contains("weight = 40"), "{}", f.config_text());
}

/// A change that fails part-way, after its services and firewall are in the data path (here
/// the TLS-passthrough service it adds cannot start: lbd's async runtime is missing, as a
/// direct call outside it has none), is undone: the maps hold what they held, the file is
/// the original again (no `.orig` left), and a change after it applies.
#[test]
fn a_change_that_fails_part_way_is_undone() {
    let Some(f) = Fixture::new("fails_part_way", None) else { return };
    let before = (f.fingerprint(), f.config_text());
    let nat = format!("mode = \"nat\"\nnat_source = \"{}\"", lab::LB_BACK_V4);
    // A backend removed, the service replaced by another, a passthrough service and a
    // firewall added.
    let body = format!(
        "{}{}{}[firewall]\n[[firewall.rule]]\nname = \"no-telnet\"\naction = \"deny\"\nprotocol = \"tcp\"\nports = [23]\n",
        config::pool("web", &[(lab::backend_v4(0), "weight = 70")]),
        config::tcp_service("extra", lab::VIP_V4, 8080, "web", &nat),
        config::tls_passthrough_service(
            "tls",
            lab::VIP_V4,
            443,
            "web",
            &config::tls_route("www.example.com", "web")
        ),
    );
    let text = daemon::sandbox_config("listen = \"\"", &body);
    let new = Config::parse(&text, "change").unwrap();
    let daemon = f.state.daemon.clone();
    let failed = f.ns.enter(move || daemon.lock().unwrap().change(new).map(drop)).unwrap();
    let error = failed.unwrap_err().to_string();
    assert!(error.contains("runtime"), "{error}");
    assert_eq!((f.fingerprint(), f.config_text()), before, "the failed change left something");
    let orig = f.config_path.with_extension("toml.orig");
    assert!(!orig.exists(), "the failed change left {}", orig.display());
    // The removed backend is live again under its id, not retired (its flows would be cut
    // at its drain deadline).
    assert_eq!(f.state.daemon.lock().unwrap().balancer.retired().count(), 0);
    // The daemon still applies a change (its in-memory state matches the maps again).
    let (status, text) = f.send(
        Method::PUT,
        &format!("/v1/pools/web/backends/{}/weight", lab::backend_v4(1)),
        None,
        Some(r#"{"weight": 60}"#),
    );
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_ne!(f.fingerprint(), before.0, "the weight change reached the maps");
}

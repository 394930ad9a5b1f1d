//! `lbctl` against a running `lbd`: every command, tables and `--json`, and the token from a
//! flag, the environment and a file.

use std::{process::Command, time::Duration};

use lb_tests::{
    config,
    daemon::LbdSandbox,
    lab,
    netns::{ChildOutput, wait_for},
    privileged::require_privileges,
};

const TOKEN: &str = "lbctl-test-token-0123456789abcdef";

/// One backend behind a DSR service.
fn body() -> String {
    config::pool("web", &[(lab::backend_v4(0), "")])
        + &config::tcp_service("web", lab::VIP_V4, lab::HTTP_PORT, "web", "mode = \"dsr-l2\"")
}

#[test]
fn every_lbctl_command_against_a_running_daemon() {
    if !require_privileges("every_lbctl_command_against_a_running_daemon") {
        return;
    }
    let sandbox = LbdSandbox::create("lbctl", TOKEN).unwrap();
    let (ns, token_file) = (&sandbox.ns, &sandbox.token_file);
    sandbox.write_config("127.0.0.1:7070", "", &body()).unwrap();
    let lbctl = lab::bin_path("lbctl").unwrap();
    let pid = sandbox.spawn_lbd(ChildOutput::Capture).unwrap();

    let run = |args: &[&str], token: &str| -> (bool, String, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", ns.name()])
            .arg(&lbctl)
            .args(args)
            .env("LB_TOKEN", token)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let up = wait_for(Duration::from_secs(20), || run(&["status"], TOKEN).0.then_some(()));
    assert!(up.is_some(), "lbd's API did not come up");

    let (ok, out, err) = run(&["status"], TOKEN);
    assert!(ok && out.contains("services 1") && out.contains("interface veth0"), "{out}{err}");
    let (ok, out, _) = run(&["--json", "status"], TOKEN);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && status["services"] == 1);
    let (ok, out, _) = run(&["services"], TOKEN);
    assert!(
        ok && out.contains("web") && out.contains("198.18.100.1") && out.contains("dsr-l2"),
        "{out}"
    );
    let (ok, out, err) = run(&["backend", "add", "web", "198.18.1.12", "--weight", "30"], TOKEN);
    assert!(ok && out.contains("1 backends added"), "{out}{err}");
    let (ok, out, err) = run(&["backend", "weight", "web", "198.18.1.12", "60"], TOKEN);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = run(&["backend", "drain", "web", "198.18.1.11"], TOKEN);
    assert!(ok, "{out}{err}");
    let (ok, out, _) = run(&["--json", "pools"], TOKEN);
    let pools: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    let weights: Vec<(String, String, u64, u64)> = pools[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["state"].as_str().unwrap().to_owned(),
                b["weight"].as_u64().unwrap(),
                b["effective_weight"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        weights,
        vec![
            ("198.18.1.11".to_owned(), "draining".to_owned(), 100, 0),
            ("198.18.1.12".to_owned(), "active".to_owned(), 60, 60)
        ]
    );
    let (ok, out, _) = run(&["pools"], TOKEN);
    assert!(ok && out.contains("198.18.1.12") && out.contains("60/60"), "{out}");
    assert!(out.contains("draining") && out.contains("0/100"), "{out}");
    let (ok, out, err) = run(&["backend", "disable", "web", "198.18.1.11"], TOKEN);
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(&["pools"], TOKEN);
    assert!(out.contains("disabled") && out.contains("0/100"), "disable took: {out}");
    let (ok, out, err) = run(&["backend", "enable", "web", "198.18.1.11"], TOKEN);
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(&["pools"], TOKEN);
    assert!(
        out.contains("active") && !out.contains("draining") && !out.contains("disabled"),
        "{out}"
    );
    let (ok, out, err) = run(&["backend", "remove", "web", "198.18.1.12"], TOKEN);
    assert!(ok && out.contains("1 retired"), "{out}{err}");
    let (ok, out, err) = run(&["reload"], TOKEN);
    assert!(ok && out.starts_with("applied"), "{out}{err}");

    // Errors are the API's, with a failing exit status.
    let (ok, _, err) = run(&["backend", "remove", "web", "198.18.1.99"], TOKEN);
    assert!(!ok && err.contains("404") && err.contains("no backend"), "{err}");
    let (ok, _, err) = run(&["status"], "wrong-token");
    assert!(!ok && err.contains("401"), "{err}");
    // The token from a file and from a flag.
    let (ok, _, err) = run(&["--token-file", token_file.to_str().unwrap(), "status"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["--token", TOKEN, "status"], "");
    assert!(ok, "{err}");
    // Both at once: refused rather than one silently chosen.
    let (ok, _, err) = run(&["--token-file", token_file.to_str().unwrap(), "status"], TOKEN);
    assert!(!ok && err.contains("use one"), "{err}");
    // A daemon that does not answer (stopped: the kernel still accepts the connection)
    // fails the command once its timeout passes, instead of hanging.
    let signal = |sig: &str| {
        assert!(Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success());
    };
    signal("-STOP");
    let started = std::time::Instant::now();
    // Bounded from outside too: a regression must fail the test, not hang it.
    let out = Command::new("timeout")
        .args(["20", "ip", "netns", "exec", ns.name()])
        .arg(&lbctl)
        .args(["--timeout", "1", "status"])
        .env("LB_TOKEN", TOKEN)
        .output()
        .unwrap();
    let took = started.elapsed();
    let (ok, err) = (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned());
    signal("-CONT");
    assert!(!ok && err.contains("timeout") && took < Duration::from_secs(10), "{took:?}: {err}");
    let (ok, _, err) = run(&["status"], TOKEN);
    assert!(ok, "{err}");

    sandbox.stop_lbd(pid);
}

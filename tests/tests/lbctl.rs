//! `lbctl` against a running `lbd`: every command, tables and `--json`, and the token from a
//! flag, the environment and a file.

use std::{process::Command, time::Duration};

use lb_tests::{
    lab,
    netns::{ChildOutput, Netns, unique_id, wait_for},
    privileged::require_privileges,
};

const TOKEN: &str = "lbctl-test-token-0123456789abcdef";

fn config(token_file: &std::path::Path) -> String {
    format!(
        r#"
[daemon]
pin_dir = ""
[api]
listen = "127.0.0.1:7070"
token_file = "{}"
[[interface]]
name = "veth0"
[[pool]]
name = "web"
[[pool.backend]]
address = "198.18.1.11"
[[service]]
name = "web"
address = "198.18.100.1"
protocol = "tcp"
port = 80
pool = "web"
mode = "dsr-l2"
"#,
        token_file.display()
    )
}

#[test]
fn every_lbctl_command_against_a_running_daemon() {
    if !require_privileges("every_lbctl_command_against_a_running_daemon") {
        return;
    }
    let ns = Netns::create(&unique_id()).unwrap();
    ns.ip(&["link", "add", "name", "veth0", "type", "veth", "peer", "name", "veth1"]).unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-lbctl", ns.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, TOKEN).unwrap();
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .unwrap();
    let config_path = dir.join("lb.toml");
    std::fs::write(&config_path, config(&token_file)).unwrap();
    let lbctl = lab::bin_path("lbctl").unwrap();
    let pid = lb_tests::daemon::spawn_lbd(&ns, &config_path, ChildOutput::Capture).unwrap();

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
    let (ok, out, err) = run(&["backend", "enable", "web", "198.18.1.11"], TOKEN);
    assert!(ok, "{out}{err}");
    let (_, out, _) = run(&["pools"], TOKEN);
    assert!(out.contains("active") && !out.contains("draining"), "{out}");
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

    let mut child = ns.take_child(pid).unwrap();
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

//! `lbd` as the lab runs it: started in the load balancer's namespace with a configuration
//! file of the test's own, reloaded with SIGHUP, stopped with SIGTERM (its log returned), and
//! killed if the test fails first.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use crate::{
    lab::{self, Lab},
    netns::{ChildOutput, Netns, wait_for},
};

/// Starts `lbd --config CONFIG --detach-on-exit` in `ns` (so its programs go when it stops);
/// returns its pid, as [`Netns::spawn`] does.
pub fn spawn_lbd(ns: &Netns, config: &Path, output: ChildOutput) -> anyhow::Result<u32> {
    let lbd = lab::bin_path("lbd")?;
    ns.spawn(
        &[lbd.as_os_str(), "--config".as_ref(), config.as_os_str(), "--detach-on-exit".as_ref()],
        output,
    )
}

/// `lbd` running in the lab with a configuration file it can be told to reload.
#[derive(Debug)]
pub struct LabDaemon {
    child: Option<Child>,
    config: PathBuf,
}

impl LabDaemon {
    pub fn start(lab: &Lab, config: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-lbd.toml", lab.id));
        std::fs::write(&path, config).unwrap();
        let pid = spawn_lbd(&lab.lb, &path, ChildOutput::Capture).unwrap();
        let child = lab.lb.take_child(pid).unwrap();
        let mut daemon = Self { child: Some(child), config: path };
        // Ready when the service answers.
        let ready =
            wait_for(Duration::from_secs(20), || lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok());
        assert!(ready.is_some(), "lbd did not start serving: {}", daemon.stop());
        daemon
    }

    /// Writes `config` to lbd's configuration file and tells lbd to reload it.
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Stops lbd (SIGTERM) and returns its log; empty if it was stopped already.
    pub fn stop(&mut self) -> String {
        let Some(child) = self.child.take() else { return String::new() };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        child
            .wait_with_output()
            .map(|output| String::from_utf8_lossy(&output.stderr).into_owned())
            .unwrap_or_default()
    }

    /// Stops lbd, removes its configuration file and returns its log.
    pub fn finish(mut self) -> String {
        let log = self.stop();
        let _ = std::fs::remove_file(&self.config);
        log
    }
}

impl Drop for LabDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

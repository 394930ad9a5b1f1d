//! Programs lbd runs on an operator's behalf (command health checks, autoscaling hooks):
//! each in a process group of its own, killed whole when lbd gives up on it — what a shell
//! started too, which would otherwise pile up one per timeout.

use std::{io, process::ExitStatus};

/// A program started by [`spawn`]. Dropped before [`Grouped::wait`] saw it exit (a timeout
/// dropped the future waiting for it), it takes its whole process group with it.
#[derive(Debug)]
pub struct Grouped {
    pub child: tokio::process::Child,
    /// The group to kill on drop; `None` once the program has exited.
    group: Option<u32>,
}

/// Starts `command` as the leader of a new process group.
pub fn spawn(command: &mut tokio::process::Command) -> io::Result<Grouped> {
    let child = command.process_group(0).kill_on_drop(true).spawn()?;
    Ok(Grouped { group: child.id(), child })
}

impl Grouped {
    /// Waits for the program to exit, then kills what is left of its group (what it started
    /// in the background): for programs run again and again (health checks), whose
    /// leftovers would pile up one per run.
    pub async fn wait_whole(&mut self) -> io::Result<ExitStatus> {
        let group = self.group;
        let status = self.wait().await?;
        if let Some(pgid) = group.and_then(|id| libc::pid_t::try_from(id).ok()) {
            // SAFETY: a signal to the group the program led, sent right after it was reaped:
            // its id cannot be handed to another process while the group has members, and
            // an empty group's is only reused after the whole pid space wrapped.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
        Ok(status)
    }

    /// Waits for the program to exit; its group is left alone from then on.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
        if status.is_ok() {
            self.group = None;
        }
        status
    }
}

impl Drop for Grouped {
    fn drop(&mut self) {
        if let Some(pgid) = self.group.and_then(|id| libc::pid_t::try_from(id).ok()) {
            // SAFETY: a signal to the group this program leads (the leader not yet reaped:
            // `child` is dropped after this, so the id is still the group's).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// Test helpers for programs a group kill should have ended.
#[cfg(test)]
pub(crate) mod tests {
    use std::time::{Duration, Instant};

    /// A shell script whose background job writes its process id to `pid_file` at once and
    /// would then run for 30 s; the script waits for it.
    pub(crate) fn script_with_background_job(pid_file: &std::path::Path) -> String {
        format!("sleep 30 & echo $! > {}; wait", pid_file.display())
    }

    /// A shell script that leaves a background job behind, holding the script's standard
    /// input unread (a shell gives a background job `/dev/null` unless told otherwise), and
    /// exits 0 at once; the job writes its process id to `pid_file` and would run for 30 s.
    pub(crate) fn script_leaving_a_job_behind(pid_file: &std::path::Path) -> String {
        format!("exec 3<&0; sleep 30 <&3 & echo $! > {}", pid_file.display())
    }

    /// Whether the process whose id `pid_file` holds is gone (no such process, or a zombie
    /// nobody reaped yet) within `limit`.
    pub(crate) async fn gone_within(pid_file: &std::path::Path, limit: Duration) -> bool {
        let pid: libc::pid_t = std::fs::read_to_string(pid_file)
            .expect("the background job wrote its id")
            .trim()
            .parse()
            .expect("a process id");
        let started = Instant::now();
        while started.elapsed() < limit {
            // SAFETY: signal 0 only checks that the process exists.
            let exists = unsafe { libc::kill(pid, 0) } == 0;
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit(')').next().is_some_and(|s| s.trim_start().starts_with('Z'))
            });
            if !exists || zombie {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

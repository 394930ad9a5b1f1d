//! Tier (b) harness: runs the real XDP object on a frame inside the kernel with
//! `BPF_PROG_TEST_RUN` (no interface involved) and checks a table of cases Katran-style:
//! description, input frame, expected verdict, expected output frame, expected counters.

use std::fmt::Write as _;

use anyhow::{Context as _, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{Action, Reason};
use lb_userspace::{Datapath, datapath::LoadOptions, maps::StatsSnapshot};

/// Connection-table size of test beds.
pub const TEST_CONNTRACK_ENTRIES: u32 = 65_536;

/// What a case expects the program to do with the frame.
#[derive(Clone, Debug)]
pub enum Output {
    /// The frame leaves exactly as it came.
    Unchanged,
    /// The frame leaves as these bytes.
    Frame(Vec<u8>),
}

/// One row of a datapath test table.
#[derive(Clone, Debug)]
pub struct Case {
    pub description: String,
    pub input: Vec<u8>,
    pub verdict: Action,
    /// The reason counted, for packets that are passed or dropped.
    pub reason: Option<Reason>,
    pub output: Output,
}

impl Case {
    /// A case whose frame is passed to the kernel untouched for `reason`.
    #[must_use]
    pub fn pass(description: impl Into<String>, input: Vec<u8>, reason: Reason) -> Self {
        Self {
            description: description.into(),
            input,
            verdict: Action::Pass,
            reason: Some(reason),
            output: Output::Unchanged,
        }
    }
}

/// The verdict and output frame of one run.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub verdict: Option<Action>,
    pub raw_verdict: u32,
    pub output: Vec<u8>,
}

/// A freshly loaded data path (own maps, nothing attached) to run frames through.
#[derive(Debug)]
pub struct TestBed {
    pub datapath: Datapath,
    /// The loading thread stays on its CPU while the bed lives (see [`TestBed::load`]).
    _pin: CpuPin,
}

impl TestBed {
    /// Loads the object with a small connection table (tests need thousands of flows, not
    /// millions, and several test beds load at once). The calling thread, which runs the
    /// frames, stays on the CPU it is on while the bed lives: the program keeps per-CPU
    /// state (the flow cache), and a flow's packets meet on one CPU, as they do on one NIC
    /// queue.
    pub fn load() -> anyhow::Result<Self> {
        let pin = stay_on_this_cpu()?;
        let options =
            LoadOptions { conntrack_entries: TEST_CONNTRACK_ENTRIES, ..LoadOptions::default() };
        Ok(Self {
            datapath: Datapath::load_with(&options).context("failed to load the XDP object")?,
            _pin: pin,
        })
    }

    /// Runs the ingress program once on `frame`.
    pub fn run(&mut self, frame: &[u8]) -> anyhow::Result<RunResult> {
        // Room for encapsulation headers added by the program.
        let mut out = vec![0u8; frame.len() + 256];
        let program = self.datapath.ingress_program()?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_TEST_RUN failed")?;
        out.truncate(usize::try_from(result.data_size_out)?);
        Ok(RunResult {
            verdict: Action::from_u32(result.return_value),
            raw_verdict: result.return_value,
            output: out,
        })
    }

    pub fn stats(&self) -> anyhow::Result<StatsSnapshot> {
        Ok(self.datapath.stats().read()?)
    }

    /// Runs one case and describes every way it differs from its expectations.
    pub fn check(&mut self, case: &Case) -> anyhow::Result<Option<String>> {
        let before = self.stats()?;
        let result = self.run(&case.input)?;
        let delta = self.stats()?.since(&before);
        let mut problems = String::new();
        if result.verdict != Some(case.verdict) {
            let _ = write!(
                problems,
                "\n  verdict {:?} (raw {}), expected {:?}",
                result.verdict, result.raw_verdict, case.verdict
            );
        }
        let expected_output = match &case.output {
            Output::Unchanged => &case.input,
            Output::Frame(frame) => frame,
        };
        if &result.output != expected_output {
            let _ = write!(
                problems,
                "\n  output frame differs:\n    got      {}\n    expected {}",
                hex(&result.output),
                hex(expected_output)
            );
        }
        let frame_len = u64::try_from(case.input.len())?;
        let action = delta.action(case.verdict);
        if delta.packets() != 1 || action.packets != 1 || action.bytes != frame_len {
            let _ = write!(problems, "\n  verdict counters moved wrongly: {}", delta.summary());
        }
        let reasons: u64 = delta.reasons.iter().map(|c| c.packets).sum();
        match case.reason {
            Some(reason) => {
                let counted = delta.reason(reason);
                if reasons != 1 || counted.packets != 1 || counted.bytes != frame_len {
                    let _ = write!(
                        problems,
                        "\n  expected reason {} counted once, got {}",
                        reason.name(),
                        delta.summary()
                    );
                }
            }
            None if reasons != 0 => {
                let _ = write!(problems, "\n  expected no reason counted, got {}", delta.summary());
            }
            None => {}
        }
        Ok((!problems.is_empty()).then(|| format!("{}:{problems}", case.description)))
    }

    /// Checks every case and fails with all the differences at once.
    pub fn check_all(&mut self, cases: &[Case]) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for case in cases {
            if let Some(problem) = self.check(case)? {
                failures.push(problem);
            }
        }
        if !failures.is_empty() {
            bail!("{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
        }
        Ok(())
    }
}

/// Lower-case hex of `bytes`, for frame diffs.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Pins the calling thread to the CPU it runs on until the returned guard is dropped (the
/// data path keeps per-CPU caches: a thread moving between CPUs would find them cold, and a
/// NAT flow cached on one CPU stale on the other). Threads and processes it starts
/// meanwhile inherit the pin.
pub fn stay_on_this_cpu() -> anyhow::Result<CpuPin> {
    // SAFETY: plain system calls on the calling thread (pid 0) with zeroed, then filled, CPU
    // sets of the size passed.
    unsafe {
        let mut previous: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut previous) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        let cpu = libc::sched_getcpu();
        if cpu < 0 {
            bail!("sched_getcpu: {}", std::io::Error::last_os_error());
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(usize::try_from(cpu)?, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
        }
        Ok(CpuPin { previous, cpu: usize::try_from(cpu)? })
    }
}

/// The CPUs a thread pinned by [`stay_on_this_cpu`] ran on before, given back on drop.
pub struct CpuPin {
    previous: libc::cpu_set_t,
    cpu: usize,
}

impl CpuPin {
    /// Pins the calling thread (another than the pinned one: threads inherit the pin) to
    /// one other CPU the pinned thread had, so the two run side by side, each on its own
    /// (per-CPU state, such as the bench wrappers' counters, stays one CPU's). Keeps the
    /// pin if there is no other CPU.
    pub fn elsewhere(&self) {
        let other = (0..libc::CPU_SETSIZE as usize)
            // SAFETY: reads of a CPU set within its size.
            .find(|cpu| *cpu != self.cpu && unsafe { libc::CPU_ISSET(*cpu, &self.previous) });
        if let Some(cpu) = other {
            // SAFETY: a zeroed, then filled, CPU set of the size passed, and the calling
            // thread's affinity.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
            }
        }
    }
}

impl std::fmt::Debug for CpuPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuPin").finish_non_exhaustive()
    }
}

impl Drop for CpuPin {
    fn drop(&mut self) {
        // SAFETY: the calling thread's affinity set back to a set it had.
        unsafe {
            libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const self.previous);
        }
    }
}

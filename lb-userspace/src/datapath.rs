//! Loading the XDP object into the kernel and attaching its programs to interfaces.

use aya::programs::{TestRun as _, TestRunOptions};
use aya::{
    Ebpf, EbpfLoader,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    conntrack::{REFRESH_SECS, TimeoutSecs, Timeouts},
    maps as names,
    service::{DEFAULT_CONNTRACK_ENTRIES, Globals},
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing::{info, warn};

use crate::{
    maps::{MapError, Maps, RelayMaps, StatsMap},
    pins::PinDir,
};

/// The compiled data path, built for the BPF target by this crate's build script.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb"));

/// Name of the main XDP program in [`EBPF_OBJECT`].
pub const INGRESS_PROGRAM: &str = "lb_ingress";
/// Bench-only programs (see `lb-ebpf/src/bench.rs`), loaded on demand by the benchmarks.
pub const BENCH_INGRESS: &str = "bench_ingress";
pub const BENCH_FLOOR: &str = "bench_floor";
pub const BENCH_NEW_FLOW: &str = "bench_new_flow";
pub const BENCH_NEW_FLOW_FLOOR: &str = "bench_new_flow_floor";
pub const BENCH_CONNTRACK_INSERT: &str = "bench_conntrack_insert";
pub const BENCH_CONNTRACK_LOOKUP: &str = "bench_conntrack_lookup";
pub const BENCH_REOPEN: &str = "bench_reopen";
pub const BENCH_REOPEN_FLOOR: &str = "bench_reopen_floor";
pub const BENCH_UNCACHED: &str = "bench_uncached";
pub const BENCH_UNCACHED_FLOOR: &str = "bench_uncached_floor";

/// Program that reports the data path's clock (see [`Datapath::now_ticks`]).
pub const CLOCK_PROGRAM: &str = "lb_clock";

/// TLS passthrough: the `sk_lookup` program that hands connections to the daemon's listeners,
/// and the stream-verdict program that relays between sockets.
pub const PASSTHROUGH_LOOKUP_PROGRAM: &str = "lb_passthrough_lookup";
pub const RELAY_VERDICT_PROGRAM: &str = "lb_relay_verdict";

/// Name of the pass-through program the lab attaches to veth peers.
pub const LAB_PEER_PROGRAM: &str = "lab_peer_pass";

/// How to attach XDP, as configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeSetting {
    /// Driver (native) mode, falling back to generic mode when the driver lacks XDP support.
    #[default]
    Auto,
    /// Driver mode only: fail rather than run slower.
    Driver,
    /// Generic (skb) mode: works on every interface, at the cost of an skb per packet.
    Generic,
}

/// The mode a program was actually attached in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachedMode {
    Driver,
    Generic,
    /// An earlier run's pinned link now runs this run's program (in the mode it was made in).
    Pinned,
}

impl AttachedMode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Driver => "driver",
            Self::Generic => "generic",
            Self::Pinned => "pinned link",
        }
    }
}

impl DatapathError {
    /// A failed load, with a hint for the two likely causes the kernel's bare error number
    /// does not name: missing privileges, and a connection table too large for the memory.
    fn object(source: aya::EbpfError) -> Self {
        let source = Box::new(source);
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*source);
        let mut errno = None;
        while let Some(e) = cause {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                errno = io.raw_os_error();
            }
            cause = e.source();
        }
        let hint = match errno {
            Some(libc::EPERM | libc::EACCES) => {
                "; lbd needs root (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_ADMIN)"
            }
            Some(libc::ENOMEM) => {
                "; out of memory: the connection table is allocated whole, 184 bytes per entry \
                 (368 MiB at the default 2,097,152): lower conntrack.max_entries"
            }
            _ => "",
        };
        Self::Object { source, hint }
    }
}

/// Failure to load or attach the data path.
#[derive(Debug, Error)]
pub enum DatapathError {
    #[error("failed to load the XDP object (its maps and programs): {source}{hint}")]
    Object {
        #[source]
        source: Box<aya::EbpfError>,
        /// What the most likely causes need (see [`DatapathError::object`]).
        hint: &'static str,
    },
    #[error("program {name} is missing from the XDP object")]
    MissingProgram { name: &'static str },
    #[error("program {name} is not an XDP program: {source}")]
    NotXdp { name: &'static str, source: ProgramError },
    #[error("program {name} is of a type this daemon does not load ({kind})")]
    UnsupportedProgram { name: &'static str, kind: String },
    #[error("the kernel rejected program {name}: {source}\n{log}")]
    Verifier { name: &'static str, source: ProgramError, log: String },
    #[error("no interface named {interface}")]
    UnknownInterface { interface: String },
    #[error(
        "the pinned XDP link on {interface} refused this lbd's program ({error}); the running program stays attached and forwarding. Remove {path} to detach it and let lbd attach afresh"
    )]
    LinkTakeover { interface: String, path: String, error: String },
    #[error(
        "failed to attach XDP to {interface} in driver mode: {source}; \
         try `xdp_mode = \"generic\"` or `\"auto\"`"
    )]
    AttachDriver { interface: String, source: ProgramError },
    #[error("failed to attach XDP to {interface}: {source}")]
    Attach { interface: String, source: ProgramError },
    #[error("failed to read the data path's clock: {source}")]
    Clock { source: ProgramError },
    #[error("the data path's clock program gave no time in nanoseconds (an older BPF object?)")]
    ClockUnreadable,
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Pins(#[from] crate::pins::PinError),
    #[error("TLS passthrough: {0}")]
    Passthrough(String),
    #[error("failed to pin the XDP link of {interface}: {source}")]
    PinLink { interface: String, source: aya::pin::PinError },
}

#[derive(Debug)]
struct Attachment {
    program: &'static str,
    interface: String,
    link: XdpLinkId,
}

/// Choices made when the data path is loaded (they size kernel memory).
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Entries of the connection table (`CONNTRACK`); see `docs/configuration.md` for memory.
    pub conntrack_entries: u32,
    /// Connection timeouts the data path starts with.
    pub timeouts: TimeoutSecs,
    /// Seed of the flow hash.
    pub hash_seed: u32,
    /// Pin maps and links under this bpffs directory so they outlive the process (and adopt
    /// what an earlier run pinned there). `None` keeps everything tied to this process.
    pub pin_dir: Option<std::path::PathBuf>,
    /// Another BPF object to load instead of [`EBPF_OBJECT`] (with the same maps and
    /// programs): the bench's comparison of two builds. `None` in the daemon.
    pub object: Option<&'static [u8]>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
            timeouts: TimeoutSecs::default(),
            hash_seed: 0,
            pin_dir: None,
            object: None,
        }
    }
}

/// The settings the data path reads, for a clock of `hz` ticks a second.
#[must_use]
pub fn globals(timeouts: &TimeoutSecs, hash_seed: u32, hz: u64, flags: u32) -> Globals {
    Globals {
        timeouts: Timeouts::from_secs(timeouts, hz),
        refresh: REFRESH_SECS * hz,
        hash_seed,
        flags,
    }
}

/// The loaded XDP object, its maps, and the interfaces its programs are attached to.
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    maps: Maps,
    attachments: Vec<Attachment>,
    pins: Option<PinDir>,
    /// Links this run created and pinned (adopted links live among the program's links).
    pinned_links: Vec<(String, PinnedLink)>,
    /// The maps were pinned by an earlier run and are reused (their contents included).
    adopted: bool,
}

impl Datapath {
    /// Loads [`EBPF_OBJECT`] with default options (nothing is attached yet).
    pub fn load() -> Result<Self, DatapathError> {
        Self::load_with(&LoadOptions::default())
    }

    /// Loads [`EBPF_OBJECT`] (or `options.object`) and its programs into the kernel and writes
    /// the initial settings.
    pub fn load_with(options: &LoadOptions) -> Result<Self, DatapathError> {
        raise_memlock_limit();
        let object = options.object.unwrap_or(EBPF_OBJECT);
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(names::CONNTRACK, options.conntrack_entries);
        let pins = options.pin_dir.as_deref().map(PinDir::open).transpose()?;
        let mut adopted = false;
        let mut globals_adopted = false;
        if let Some(pins) = &pins {
            let prepared = pins.prepare(object, options.conntrack_entries)?;
            adopted = prepared.reused.contains(&names::SERVICES);
            globals_adopted = prepared.reused.contains(&names::GLOBALS);
            if !prepared.reused.is_empty() {
                info!(maps = ?prepared.reused, "adopting pinned maps");
            }
            for (name, path) in prepared.paths {
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(object).map_err(DatapathError::object)?;
        for name in [INGRESS_PROGRAM, LAB_PEER_PROGRAM, CLOCK_PROGRAM] {
            load_program(&mut ebpf, name)?;
        }
        let maps = Maps::take(&mut ebpf)?;
        let mut datapath =
            Self { ebpf, maps, attachments: Vec::new(), pins, pinned_links: Vec::new(), adopted };
        // An adopted GLOBALS is left as the data path forwarding by it has it (its hash
        // seed and timeouts) until the daemon applies its configuration, which may still be
        // refused; a fresh one gets `options`' at once.
        if !globals_adopted {
            let hz = datapath.ticks_per_second()?;
            datapath.maps.globals.set(&globals(&options.timeouts, options.hash_seed, hz, 0))?;
        }
        // A pinned epoch may be one an earlier program's slots were filled in.
        datapath.maps.conntrack.invalidate_cache()?;
        Ok(datapath)
    }

    /// Whether the maps were pinned by an earlier run and reused with their contents.
    #[must_use]
    pub const fn adopted(&self) -> bool {
        self.adopted
    }

    /// The data path's clock now and the timeouts it judges connections by, to judge them
    /// alike (the daemon's sweep and cuts).
    pub fn flow_clock(&mut self) -> Result<crate::maps::FlowClock, DatapathError> {
        let hz = self.ticks_per_second()?;
        let now = self.now_ticks()?;
        let read_at = std::time::Instant::now();
        let globals = self.maps.globals.get()?;
        Ok(crate::maps::FlowClock {
            timeouts: globals.timeouts,
            refresh: globals.refresh,
            now,
            hz,
            read_at,
        })
    }

    /// The data path's clock now (`bpf_jiffies64`), which connection timestamps use.
    pub fn now_ticks(&mut self) -> Result<u64, DatapathError> {
        Ok(self.clock_pair()?.0)
    }

    /// `bpf_jiffies64` and `bpf_ktime_get_ns`, read in one program run.
    fn clock_pair(&mut self) -> Result<(u64, u64), DatapathError> {
        let program = xdp_program(&mut self.ebpf, CLOCK_PROGRAM)?;
        let frame = [0u8; 64];
        let mut out = [0u8; 64];
        program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .map_err(|source| DatapathError::Clock { source })?;
        let word = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&out[at..at + 8]);
            u64::from_ne_bytes(bytes)
        };
        Ok((word(0), word(8)))
    }

    /// Ticks a second of the data path's clock (the kernel's `HZ`), measured once per process
    /// and rounded to the nearest value kernels are built with. Each end of the measurement
    /// reads the tick count and the nanosecond clock in one program run, so a stall of this
    /// process between the reads (a busy machine) does not skew it; over 100 ms the count is
    /// off by two ticks at most (a tickless kernel's jiffies may lag one more), which keeps
    /// 250 and 300 apart.
    pub fn ticks_per_second(&mut self) -> Result<u64, DatapathError> {
        static HZ: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        if let Some(hz) = HZ.get() {
            return Ok(*hz);
        }
        let (j0, n0) = self.clock_pair()?;
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (j1, n1) = self.clock_pair()?;
        // An object whose clock program writes no nanoseconds (an older build's) reads 0.
        if n1 <= n0 || n0 == 0 {
            return Err(DatapathError::ClockUnreadable);
        }
        Ok(*HZ.get_or_init(|| nearest_hz(j1.saturating_sub(j0), n1 - n0)))
    }

    /// The data path's maps.
    #[must_use]
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut Maps {
        &mut self.maps
    }

    /// The main XDP program, for `test_run` in datapath tests and benchmarks.
    pub fn ingress_program(&mut self) -> Result<&mut Xdp, DatapathError> {
        xdp_program(&mut self.ebpf, INGRESS_PROGRAM)
    }

    /// A bench-only program (`BENCH_*`), loaded into the kernel on first use.
    pub fn bench_program(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        if xdp_program(&mut self.ebpf, name)?.fd().is_err() {
            load_program(&mut self.ebpf, name)?;
        }
        xdp_program(&mut self.ebpf, name)
    }

    /// A bench-only program (loaded on first use) and the maps at once: a benchmark runs
    /// the one on a thread while it reads the other on another.
    pub fn bench_program_and_maps(
        &mut self,
        name: &'static str,
    ) -> Result<(&Xdp, &Maps), DatapathError> {
        self.bench_program(name)?;
        let program: &Xdp = self
            .ebpf
            .program(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(|source| DatapathError::NotXdp { name, source })?;
        Ok((program, &self.maps))
    }

    /// The names of every program in the object.
    pub fn program_names(&self) -> Vec<String> {
        self.ebpf.programs().map(|(name, _)| name.to_owned()).collect()
    }

    /// Loads the program `name`, of any type, into the kernel without attaching it (if not
    /// loaded already). Tests prove with it that every program passes the verifier,
    /// including the relay's, whose refusal the daemon survives by splicing instead.
    pub fn load_unattached(&mut self, name: &'static str) -> Result<(), DatapathError> {
        use aya::programs::Program;
        let program = self.ebpf.program_mut(name).ok_or(DatapathError::MissingProgram { name })?;
        if program.fd().is_ok() {
            return Ok(());
        }
        let loaded = match program {
            Program::Xdp(p) => retrying_eagain(|| p.load()),
            Program::SkLookup(p) => retrying_eagain(|| p.load()),
            Program::SkSkb(p) => retrying_eagain(|| p.load()),
            other => {
                let kind = format!("{:?}", other.prog_type());
                return Err(DatapathError::UnsupportedProgram { name, kind });
            }
        };
        loaded.map_err(|source| {
            let log = match &source {
                ProgramError::LoadError { verifier_log, .. } => verifier_log.to_string(),
                _ => String::new(),
            };
            DatapathError::Verifier { name, source, log }
        })
    }

    /// Bench only: the tuple whose entry the reused-tuple wrappers (`BENCH_REOPEN*`) age.
    pub fn set_bench_reopen(&mut self, key: &lb_common::FlowKey) -> Result<(), DatapathError> {
        const NAME: &str = "BENCH_REOPEN";
        let map = self.ebpf.map_mut(NAME).ok_or(MapError::Missing { name: NAME })?;
        let mut array: aya::maps::Array<_, lb_common::FlowKey> = aya::maps::Array::try_from(map)
            .map_err(|source| MapError::Layout { name: NAME, source })?;
        array.set(0, key, 0).map_err(|source| MapError::Update { name: NAME, source })?;
        Ok(())
    }

    /// Starts the kernel's half of TLS passthrough and hands over its maps: the `sk_lookup`
    /// program on the calling thread's network namespace (required), and the relay's
    /// stream-verdict program on `RELAY_SOCKETS` (`false` when the kernel refuses it: the
    /// relay then splices). Both stay attached as long as this data path is loaded.
    pub fn start_passthrough(&mut self) -> Result<(RelayMaps, bool), DatapathError> {
        use aya::programs::{SkLookup, SkSkb};
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            DatapathError::Passthrough(format!("{what}: {e}"))
        };
        let lookup: &mut SkLookup = self
            .ebpf
            .program_mut(PASSTHROUGH_LOOKUP_PROGRAM)
            .ok_or(DatapathError::MissingProgram { name: PASSTHROUGH_LOOKUP_PROGRAM })?
            .try_into()
            .map_err(|e| fail("not an sk_lookup program", &e))?;
        if lookup.fd().is_err() {
            lookup.load().map_err(|e| fail("loading the sk_lookup program", &e))?;
        }
        // This thread's namespace: `/proc/self` is the main thread's, another one when the
        // daemon runs in a thread moved into a namespace (as the tests run it).
        let netns = std::fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| fail("opening this network namespace", &e))?;
        lookup.attach(netns).map_err(|e| fail("attaching the sk_lookup program", &e))?;
        // Taken only now: a failure above leaves them for a later attempt.
        let relay = self
            .maps
            .relay
            .take()
            .ok_or_else(|| DatapathError::Passthrough("already started".into()))?;
        let verdict: &mut SkSkb = self
            .ebpf
            .program_mut(RELAY_VERDICT_PROGRAM)
            .ok_or(DatapathError::MissingProgram { name: RELAY_VERDICT_PROGRAM })?
            .try_into()
            .map_err(|e| fail("not an sk_skb program", &e))?;
        let sockmap = match verdict.load().and_then(|()| verdict.attach(relay.sockets_fd())) {
            Ok(_) => true,
            Err(error) => {
                warn!(%error, "the kernel refused the relay's socket map program; relaying by splice");
                false
            }
        };
        Ok((relay, sockmap))
    }

    /// Attaches the main program to `interface` and reports the mode it runs in.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: XdpModeSetting,
    ) -> Result<AttachedMode, DatapathError> {
        self.attach_program(INGRESS_PROGRAM, interface, mode)
    }

    /// Detaches the data path from interfaces an earlier run pinned a link on and this one
    /// does not serve (`keep`); returns their names.
    pub fn detach_unconfigured(&self, keep: &[&str]) -> Vec<String> {
        self.pins.as_ref().map(|p| p.remove_links_except(keep)).unwrap_or_default()
    }

    /// Attaches the pass-through program (lab veth peers only).
    pub fn attach_lab_peer(&mut self, interface: &str) -> Result<AttachedMode, DatapathError> {
        self.attach_program(LAB_PEER_PROGRAM, interface, XdpModeSetting::Driver)
    }

    fn attach_program(
        &mut self,
        name: &'static str,
        interface: &str,
        mode: XdpModeSetting,
    ) -> Result<AttachedMode, DatapathError> {
        if name == INGRESS_PROGRAM
            && let Some(path) = self.pins.as_ref().map(|p| p.link_path(interface))
            && path.exists()
        {
            // An earlier run's link: switch it to this run's program in one step, so traffic
            // never meets an interface without the data path.
            let program = xdp_program(&mut self.ebpf, name)?;
            match adopt_link(program, &path) {
                Ok(link) => {
                    info!(%interface, "replaced the program of the pinned XDP link");
                    self.attachments.push(Attachment {
                        program: name,
                        interface: interface.to_owned(),
                        link,
                    });
                    let ifindex = if_index(interface)?;
                    self.maps.tx_ports.add(ifindex)?;
                    return Ok(AttachedMode::Pinned);
                }
                Err(LinkTakeover::Defunct(error)) => {
                    warn!(%interface, %error, "pinned XDP link unusable; attaching afresh");
                    let _ = std::fs::remove_file(&path);
                }
                Err(LinkTakeover::Refused(error)) => {
                    // The link lives and its program forwards: removing the pin would
                    // detach it, and a fresh attach would likely be refused likewise.
                    return Err(DatapathError::LinkTakeover {
                        interface: interface.to_owned(),
                        path: path.display().to_string(),
                        error,
                    });
                }
            }
        }
        let program = xdp_program(&mut self.ebpf, name)?;
        let unknown = |source: ProgramError| match source {
            ProgramError::UnknownInterface { .. } => {
                DatapathError::UnknownInterface { interface: interface.to_owned() }
            }
            source => DatapathError::Attach { interface: interface.to_owned(), source },
        };
        let (link, attached) = match mode {
            XdpModeSetting::Generic => {
                (program.attach(interface, XdpMode::Skb).map_err(unknown)?, AttachedMode::Generic)
            }
            XdpModeSetting::Driver => {
                let link = program.attach(interface, XdpMode::Driver).map_err(|source| {
                    match unknown(source) {
                        DatapathError::Attach { interface, source } => {
                            DatapathError::AttachDriver { interface, source }
                        }
                        other => other,
                    }
                })?;
                (link, AttachedMode::Driver)
            }
            XdpModeSetting::Auto => match program.attach(interface, XdpMode::Driver) {
                Ok(link) => (link, AttachedMode::Driver),
                Err(ProgramError::UnknownInterface { .. }) => {
                    return Err(DatapathError::UnknownInterface {
                        interface: interface.to_owned(),
                    });
                }
                Err(error) => {
                    warn!(%interface, %error, "driver-mode XDP unavailable, falling back to generic mode");
                    let link = program.attach(interface, XdpMode::Skb).map_err(unknown)?;
                    (link, AttachedMode::Generic)
                }
            },
        };
        if name == INGRESS_PROGRAM
            && let Some(path) = self.pins.as_ref().map(|p| p.link_path(interface))
        {
            let program = xdp_program(&mut self.ebpf, name)?;
            let owned = program.take_link(link).map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
            match FdLink::try_from(owned) {
                Ok(fd_link) => {
                    let pinned = fd_link.pin(&path).map_err(|source| DatapathError::PinLink {
                        interface: interface.to_owned(),
                        source,
                    })?;
                    self.pinned_links.push((interface.to_owned(), pinned));
                }
                Err(_) => {
                    warn!(%interface, "XDP attached through netlink: it cannot be pinned and goes with this process");
                }
            }
            let ifindex = if_index(interface)?;
            self.maps.tx_ports.add(ifindex)?;
            return Ok(attached);
        }
        self.attachments.push(Attachment { program: name, interface: interface.to_owned(), link });
        if name == INGRESS_PROGRAM {
            // Frames may be redirected out of every interface the data path serves.
            let ifindex = if_index(interface)?;
            self.maps.tx_ports.add(ifindex)?;
        }
        Ok(attached)
    }

    /// Detaches every program this `Datapath` attached or adopted, and removes every pin.
    pub fn detach_all(&mut self) {
        for (interface, pinned) in self.pinned_links.drain(..) {
            match pinned.unpin() {
                Ok(link) => drop(link),
                Err(error) => warn!(%interface, %error, "failed to unpin the XDP link"),
            }
        }
        if let Some(pins) = &self.pins {
            for attachment in &self.attachments {
                let _ = std::fs::remove_file(pins.link_path(&attachment.interface));
            }
            pins.remove_all();
        }
        for Attachment { program, interface, link } in self.attachments.drain(..) {
            match xdp_program(&mut self.ebpf, program) {
                Ok(xdp) => {
                    if let Err(error) = xdp.detach(link) {
                        warn!(%interface, %error, "failed to detach XDP program");
                    }
                }
                Err(error) => warn!(%interface, %error, "failed to detach XDP program"),
            }
        }
    }

    /// The verdict and reason counters.
    #[must_use]
    pub fn stats(&self) -> &StatsMap {
        &self.maps.stats
    }
}

/// The index of `interface` in the current network namespace.
pub fn if_index(interface: &str) -> Result<u32, DatapathError> {
    let name = std::ffi::CString::new(interface)
        .map_err(|_| DatapathError::UnknownInterface { interface: interface.to_owned() })?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DatapathError::UnknownInterface { interface: interface.to_owned() });
    }
    Ok(index)
}

/// Switches the pinned link at `path` to `program`.
/// Why a pinned link could not be taken over.
enum LinkTakeover {
    /// Unreadable, not an XDP link, or detached (its interface gone: `ENOLINK`).
    Defunct(String),
    /// A live link that refused this run's program: it keeps the one it has.
    Refused(String),
}

fn adopt_link(program: &mut Xdp, path: &std::path::Path) -> Result<XdpLinkId, LinkTakeover> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| LinkTakeover::Defunct(e.to_string()))?;
    let fd_link: FdLink = pinned.into();
    let link = XdpLink::try_from(fd_link).map_err(|e| LinkTakeover::Defunct(e.to_string()))?;
    program.attach_to_link(link).map_err(|error| match &error {
        ProgramError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOLINK) => {
            LinkTakeover::Defunct(error.to_string())
        }
        _ => LinkTakeover::Refused(error.to_string()),
    })
}

/// The kernel tick rate (of those kernels are built with) closest to `ticks` ticks in
/// `nanos` nanoseconds.
fn nearest_hz(ticks: u64, nanos: u64) -> u64 {
    let measured = u128::from(ticks) * 1_000_000_000 / u128::from(nanos.max(1));
    [100u64, 250, 300, 1000]
        .into_iter()
        .min_by_key(|hz| u128::from(*hz).abs_diff(measured))
        .unwrap_or(250)
}

fn xdp_program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(|source| DatapathError::NotXdp { name, source })
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError> {
    let program = xdp_program(ebpf, name)?;
    retrying_eagain(|| program.load()).map_err(|source| {
        let log = match &source {
            ProgramError::LoadError { verifier_log, .. } => verifier_log.to_string(),
            _ => String::new(),
        };
        DatapathError::Verifier { name, source, log }
    })
}

/// Runs `load` again while the kernel answers EAGAIN, up to five attempts in all: the
/// verifier gives up with EAGAIN when a signal is pending on the loading thread during a
/// long verification (`lb_ingress` takes ~200,000 verifier steps), and libbpf retries the
/// same way. Seen once in a CI run, with the test harness's child processes exiting.
fn retrying_eagain(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let mut attempts = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempts < 5 =>
            {
                attempts += 1;
            }
            other => return other,
        }
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so large maps load there.
fn raise_memlock_limit() {
    let limit = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit only reads the struct we pass.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const limit) };
    if ret != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_refused_load_names_privileges_or_memory() {
        let failed = |errno| {
            let source = aya::EbpfError::MapError(aya::maps::MapError::CreateError {
                name: "CONNTRACK".into(),
                io_error: std::io::Error::from_raw_os_error(errno),
            });
            super::DatapathError::object(source).to_string()
        };
        assert!(failed(libc::EPERM).contains("lbd needs root"), "{}", failed(libc::EPERM));
        assert!(failed(libc::ENOMEM).contains("lower conntrack.max_entries"));
        assert!(!failed(libc::EINVAL).contains(';'), "{}", failed(libc::EINVAL));
    }
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _, RelocationTarget};

    /// No program calls a `mem*` builtin: an assignment LLVM cannot prove disjoint, or a copy
    /// loop it recognises, becomes a call to a byte loop from `compiler_builtins` (a 16-byte
    /// `memmove` cost a NAT flow's opening ~40 ns), where `lb-ebpf/src/mem.rs`'s helpers keep
    /// copies inline. Read from the object's relocations, no kernel needed.
    #[test]
    fn no_program_calls_a_mem_builtin() {
        let file = object::File::parse(super::EBPF_OBJECT).unwrap();
        let mut calls = Vec::new();
        for section in file.sections() {
            for (offset, relocation) in section.relocations() {
                let RelocationTarget::Symbol(index) = relocation.target() else { continue };
                let name = file.symbol_by_index(index).and_then(|s| s.name()).unwrap_or("");
                if ["memcpy", "memmove", "memset", "memcmp", "bcmp"].contains(&name) {
                    calls.push(format!("{} +{offset:#x}: {name}", section.name().unwrap_or("?")));
                }
            }
        }
        assert!(calls.is_empty(), "calls to byte-loop builtins:\n{}", calls.join("\n"));
    }

    /// 100 ms of ticks, off by two either way, still names the kernel's rate.
    #[test]
    fn the_tick_rate_is_the_nearest_kernel_rate() {
        let ns = 100_000_000;
        for hz in [100u64, 250, 300, 1000] {
            let ticks = hz / 10;
            for t in ticks - 2..=ticks + 2 {
                assert_eq!(super::nearest_hz(t, ns), hz, "{t} ticks in 100 ms");
            }
        }
    }
}

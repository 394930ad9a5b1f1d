//! Pinning under bpffs: the maps and XDP links outlive `lbd`, so the data path keeps running
//! while the daemon restarts or is upgraded, and a new daemon adopts them.
//!
//! Layout: `<pin_dir>/maps-v<MAPS_LAYOUT_VERSION>/<MAP>` and `<pin_dir>/links/<interface>`.
//! A pinned map is reused only if its type, key size, value size, maximum entries and flags
//! match what this build expects (a pinned map is never misread); otherwise it is unpinned
//! and replaced, and with it every other pinned map, as they name each other's ids (a
//! connection table of another size alone replaces only itself). Replacements are logged.
//! The directory is locked while a `PinDir` lives: one lbd per pin directory.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use lb_common::maps::{self as names, MAPS_LAYOUT_VERSION};
use thiserror::Error;
use tracing::{info, warn};

/// bpffs magic number (`statfs.f_type`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Flags the kernel gives a map of this type whatever it was created with, which a pinned
/// map's info then reports: devmaps are read-only to programs (`dev_map_alloc_check`).
fn flags_set_by_kernel(map_type: u32) -> u32 {
    use aya::maps::MapType;
    if map_type == MapType::DevMap as u32 || map_type == MapType::DevMapHash as u32 {
        aya_obj::generated::BPF_F_RDONLY_PROG
    } else {
        0
    }
}

/// Failure to prepare the pin directory.
#[derive(Debug, Error)]
pub enum PinError {
    #[error(
        "{path} is not on a BPF filesystem; mount one (`mount -t bpf bpf {path}`) or choose another pin_dir"
    )]
    NotBpffs { path: String },
    #[error("failed to prepare pin directory {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("failed to parse the XDP object's maps: {0}")]
    Object(String),
    #[error(
        "{path} is in use by another lbd (it holds the directory's lock); one lbd per pin_dir: stop the other, or give this one another pin_dir"
    )]
    InUse { path: String },
}

/// Where this build's maps and links are pinned, locked for this process: two lbd on one
/// pin directory would each adopt the other's maps and hand out the same backend ids.
#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
    /// The directory opened with an exclusive `flock`, held as long as any copy lives (the
    /// descriptor is close-on-exec: programs lbd starts do not inherit it).
    _lock: std::sync::Arc<std::fs::File>,
}

/// What preparing the pins found.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    /// (map name, pin path) for the loader.
    pub paths: Vec<(&'static str, PathBuf)>,
    /// Maps already pinned with the expected layout (they will be reused).
    pub reused: Vec<&'static str>,
    /// Maps that were pinned with another layout and were replaced.
    pub replaced: Vec<&'static str>,
}

impl PinDir {
    /// Uses `root` (created if missing; it, or a parent, must be on bpffs). Mounts bpffs at
    /// `/sys/fs/bpf` first if `root` is below it and nothing is mounted there (as inside
    /// `ip netns exec`, which remounts `/sys`).
    pub fn open(root: &Path) -> Result<Self, PinError> {
        let sys_bpf = Path::new("/sys/fs/bpf");
        if root.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
            let _ = std::fs::create_dir_all(sys_bpf);
            let status = std::process::Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status();
            if !status.is_ok_and(|s| s.success()) {
                warn!("could not mount bpffs at /sys/fs/bpf");
            }
        }
        std::fs::create_dir_all(root)
            .map_err(|source| PinError::Io { path: root.display().to_string(), source })?;
        if !is_bpffs(root) {
            return Err(PinError::NotBpffs { path: root.display().to_string() });
        }
        let io = |source| PinError::Io { path: root.display().to_string(), source };
        let lock = std::fs::File::open(root).map_err(io)?;
        // SAFETY: flock(2) on a descriptor this process holds.
        if unsafe {
            libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB)
        } != 0
        {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(PinError::InUse { path: root.display().to_string() });
            }
            return Err(io(error));
        }
        Ok(Self { root: root.to_owned(), _lock: std::sync::Arc::new(lock) })
    }

    fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("maps-v{MAPS_LAYOUT_VERSION}"))
    }

    /// The pin path of the XDP link on `interface`.
    #[must_use]
    pub fn link_path(&self, interface: &str) -> PathBuf {
        self.root.join("links").join(interface)
    }

    /// Checks every pinned map against the object's definitions (`conntrack_entries` for the
    /// connection table) and returns the paths to load with.
    pub fn prepare(&self, object: &[u8], conntrack_entries: u32) -> Result<Prepared, PinError> {
        let dir = self.maps_dir();
        for d in [dir.clone(), self.root.join("links")] {
            std::fs::create_dir_all(&d)
                .map_err(|source| PinError::Io { path: d.display().to_string(), source })?;
        }
        let obj = aya_obj::Object::parse(object).map_err(|e| PinError::Object(e.to_string()))?;
        // Which pinned maps differ from the object's definitions.
        let mut mismatched = Vec::new();
        for name in names::PINNED {
            let Some(def) = obj.maps.get(*name) else { continue };
            let max_entries =
                if *name == names::CONNTRACK { conntrack_entries } else { def.max_entries() };
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let flags = def.map_flags() | flags_set_by_kernel(def.map_type());
            let wanted = (def.map_type(), def.key_size(), def.value_size(), max_entries, flags);
            let found = MapInfo::from_pin(&path).map(|info| {
                (
                    info.map_type().map_or(u32::MAX, |t| t as u32),
                    info.key_size(),
                    info.value_size(),
                    info.max_entries(),
                    info.map_flags(),
                )
            });
            if !found.as_ref().is_ok_and(|f| *f == wanted) {
                warn!(map = name, path = %path.display(), ?wanted, ?found, "pinned map has another layout or size (type, key, value, entries, flags)");
                mismatched.push(*name);
            }
        }
        // The maps name each other's entries (service, backend and rule ids, the flows'
        // backends): one replaced alone would leave the others pointing into an empty map
        // that hands the same ids out afresh. So any map but the connection table (a size
        // change; its flows are lost with it) replaces them all.
        let replace_all = mismatched.iter().any(|name| *name != names::CONNTRACK);
        if replace_all {
            warn!(maps = ?mismatched, "pinned maps of another layout: replacing every pinned map (the flows and state they hold are lost)");
        }
        let mut prepared = Prepared::default();
        for name in names::PINNED {
            if !obj.maps.contains_key(*name) {
                continue;
            }
            let path = dir.join(name);
            if path.exists() {
                if replace_all || mismatched.contains(name) {
                    std::fs::remove_file(&path).map_err(|source| PinError::Io {
                        path: path.display().to_string(),
                        source,
                    })?;
                    prepared.replaced.push(name);
                } else {
                    prepared.reused.push(name);
                }
            }
            prepared.paths.push((name, path));
        }
        // Maps of older layouts are no longer used by this build.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with("maps-v") && entry.path() != dir {
                    info!(dir = %entry.path().display(), "removing maps pinned by another layout version");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(prepared)
    }

    /// Removes the pinned links of interfaces not in `keep` and returns their names: a link
    /// nobody else holds detaches its program as its pin goes.
    pub fn remove_links_except(&self, keep: &[&str]) -> Vec<String> {
        let mut removed = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.root.join("links")) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(&name.as_str()) && std::fs::remove_file(entry.path()).is_ok() {
                    removed.push(name);
                }
            }
        }
        removed
    }

    /// Removes every pin (maps and links): the data path goes when the last program using it
    /// does.
    pub fn remove_all(&self) {
        for dir in [self.maps_dir(), self.root.join("links")] {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        let _ = std::fs::remove_dir(&self.root);
    }
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs writes the struct we pass; the path is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::statfs(c.as_ptr(), &raw mut st) };
    #[allow(clippy::unnecessary_cast, reason = "f_type's width differs between libcs")]
    let kind = st.f_type as i64;
    ret == 0 && kind == BPF_FS_MAGIC
}

//! Host settings the daemon adjusts: keeping the kernel's own connections out of the NAT
//! source port ranges (`net.ipv4.ip_local_reserved_ports`, which covers IPv6 too), and
//! giving the ports back once no service needs them.
//!
//! Reservations lbd did not make (an administrator's) are never removed: lbd records the
//! ranges it reserved itself under its pin directory, so a restarted lbd knows them too, for
//! as long as the pins live (a reboot clears both the pins and the kernel's list). The pin
//! directory is a BPF filesystem, which holds directories but no files: the record is one
//! empty directory per range, `reserved-ports/<first>-<last>`. Without a pin directory lbd
//! only ever adds.

use std::{
    fs,
    io::{self, Read as _},
    path::{Path, PathBuf},
};

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// lbd's record of the ports it reserved: a directory of ranges.
const RECORD_DIR: &str = "reserved-ports";

/// A set of ports.
#[derive(Clone, PartialEq, Eq)]
pub struct Ports(Box<[u64; 1024]>);

impl Default for Ports {
    fn default() -> Self {
        Self(Box::new([0; 1024]))
    }
}

impl std::fmt::Debug for Ports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ports({})", self.to_list())
    }
}

impl Ports {
    /// The ports of the inclusive ranges `ranges`.
    #[must_use]
    pub fn of_ranges(ranges: &[(u16, u16)]) -> Self {
        let mut ports = Self::default();
        for &(first, last) in ranges {
            for port in first..=last {
                ports.insert(port);
            }
        }
        ports
    }

    /// Parses the kernel's list: comma-separated ports and `first-last` ranges.
    pub fn parse(list: &str) -> io::Result<Self> {
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        let mut ranges = Vec::new();
        for item in list.trim().split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (first, last) = item.split_once('-').unwrap_or((item, item));
            let first: u16 = first.trim().parse().map_err(|_| invalid(item))?;
            let last: u16 = last.trim().parse().map_err(|_| invalid(item))?;
            if last < first {
                return Err(invalid(item));
            }
            ranges.push((first, last));
        }
        Ok(Self::of_ranges(&ranges))
    }

    fn insert(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    fn zip(&self, other: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        let mut out = Self::default();
        for (i, word) in out.0.iter_mut().enumerate() {
            *word = f(self.0[i], other.0[i]);
        }
        out
    }

    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a | b)
    }

    #[must_use]
    pub fn minus(&self, other: &Self) -> Self {
        self.zip(other, |a, b| a & !b)
    }

    /// The kernel's list format, ranges merged.
    #[must_use]
    pub fn to_list(&self) -> String {
        self.ranges().join(",")
    }

    /// The merged ranges, `first-last` (or `port` alone), in order.
    fn ranges(&self) -> Vec<String> {
        let item = |first: u16, last: u16| {
            if first == last { first.to_string() } else { format!("{first}-{last}") }
        };
        let mut items = Vec::new();
        let mut open: Option<u16> = None;
        for port in 0..=u16::MAX {
            match (self.contains(port), open) {
                (true, None) => open = Some(port),
                (false, Some(first)) => {
                    items.push(item(first, port - 1));
                    open = None;
                }
                _ => {}
            }
        }
        if let Some(first) = open {
            items.push(item(first, u16::MAX));
        }
        items
    }
}

/// The kernel's new reservations and lbd's new record, from the kernel's current list
/// (`kernel`), the ports lbd reserved before (`ours`) and the ports services need now
/// (`wanted`): everything wanted is reserved, lbd's own reservations that are no longer
/// wanted are given back, anyone else's stay.
#[must_use]
pub fn plan(kernel: &Ports, ours: &Ports, wanted: &Ports) -> (Ports, Ports) {
    let others = kernel.minus(ours);
    (others.union(wanted), wanted.minus(&others))
}

/// Reserves `wanted` from the kernel's ephemeral ports and, with `give_back` and a pin
/// directory (`state_dir`), gives back the ports lbd reserved earlier that `wanted` no
/// longer holds. Without `give_back` (before a change applies) or without a usable record,
/// it only adds. The kernel's list is written only when it changes.
pub fn reserve_nat_ports(
    wanted: &Ports,
    state_dir: Option<&Path>,
    give_back: bool,
) -> io::Result<()> {
    reserve_in(Path::new(RESERVED_PORTS), wanted, state_dir, give_back)
}

fn reserve_in(
    sysctl: &Path,
    wanted: &Ports,
    state_dir: Option<&Path>,
    give_back: bool,
) -> io::Result<()> {
    let kernel = Ports::parse(&read_sysctl(sysctl)?)?;
    let mut record: Option<PathBuf> = state_dir.map(|d| d.join(RECORD_DIR));
    // No record (or an unreadable one) counts as nothing of ours: nothing is given back.
    let ours = match record.as_deref().map(read_record) {
        Some(Ok(ours)) => ours,
        Some(Err(error)) => {
            tracing::warn!(%error, "cannot read lbd's record of its reserved ports; only adding");
            record = None;
            Ports::default()
        }
        None => Ports::default(),
    };
    let wanted = if give_back { wanted.clone() } else { wanted.union(&ours) };
    let (mut new_kernel, new_ours) = plan(&kernel, &ours, &wanted);
    // Recorded before the kernel's list grows, forgotten after it shrinks: a failure in
    // between leaves a range recorded that is wanted anyway, never one of ours unrecorded.
    if let Some(dir) = &record
        && let Err(error) = write_record(dir, &new_ours.union(&ours))
    {
        tracing::warn!(%error, "cannot record lbd's reserved ports; only adding");
        record = None;
        new_kernel = kernel.union(&wanted);
    }
    if new_kernel != kernel {
        // A bare newline clears the list; an empty write would leave it as it was.
        fs::write(sysctl, format!("{}\n", new_kernel.to_list()))?;
        tracing::info!(
            reserved = %new_kernel.to_list(),
            released = %kernel.minus(&new_kernel).to_list(),
            "NAT ports reserved from the kernel's ephemeral range"
        );
    }
    if let Some(dir) = &record
        && let Err(error) = write_record(dir, &new_ours)
    {
        tracing::warn!(%error, "cannot record lbd's reserved ports");
    }
    Ok(())
}

/// Reads the whole list in one read: the kernel answers nothing past offset 0 for this file,
/// so a reader that starts small (as `read_to_string` does, 32 bytes) gets it truncated.
fn read_sysctl(path: &Path) -> io::Result<String> {
    // Every other port reserved alone: 32,768 items of up to six bytes.
    let mut buf = vec![0u8; 256 << 10];
    let n = fs::File::open(path)?.read(&mut buf)?;
    let text = std::str::from_utf8(&buf[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    if n == buf.len() || (n > 0 && !text.ends_with('\n')) {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "reserved ports list truncated"));
    }
    Ok(text.to_owned())
}

/// The ports the record directory `dir` names (none if it does not exist).
fn read_record(dir: &Path) -> io::Result<Ports> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Ports::default()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ports::parse(&names.join(","))
}

/// Removes lbd's record of its reservations under `state_dir` if it names no range (all
/// given back), then `state_dir` itself if that leaves it empty.
pub fn remove_empty_record(state_dir: &Path) {
    let _ = fs::remove_dir(state_dir.join(RECORD_DIR));
    let _ = fs::remove_dir(state_dir);
}

/// Makes the record directory `dir` name exactly `ports`' ranges: the new names first, then
/// the old ones go (a failure in between leaves more recorded, never less).
fn write_record(dir: &Path, ports: &Ports) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let wanted = ports.ranges();
    for range in &wanted {
        match fs::create_dir(dir.join(range)) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !wanted.contains(&entry.file_name().to_string_lossy().into_owned()) {
            fs::remove_dir(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(list: &str) -> Ports {
        Ports::parse(list).unwrap()
    }

    #[test]
    fn the_kernel_list_format_round_trips() {
        assert_eq!(p("").to_list(), "");
        assert_eq!(p("\n").to_list(), "");
        assert_eq!(p("20000-20999,30000\n").to_list(), "20000-20999,30000");
        assert_eq!(p("5,3-4,1").to_list(), "1,3-5");
        assert_eq!(p("0,65535").to_list(), "0,65535");
        assert_eq!(p("65000-65535").to_list(), "65000-65535");
        assert!(Ports::parse("10-5").is_err());
        assert!(Ports::parse("x").is_err());
        assert!(Ports::parse("70000").is_err());
    }

    #[test]
    fn only_lbds_own_reservations_are_given_back() {
        // An administrator's 8000-8100; lbd had reserved 20000-20999 and 30000-30099.
        let kernel = p("8000-8100,20000-20999,30000-30099");
        let ours = p("20000-20999,30000-30099");
        // A reload drops the second range and adds one overlapping the administrator's.
        let wanted = p("20000-20999,8050-8200");
        let (new_kernel, new_ours) = plan(&kernel, &ours, &wanted);
        assert_eq!(new_kernel.to_list(), "8000-8200,20000-20999");
        // 8050-8100 was the administrator's already: not lbd's to give back later.
        assert_eq!(new_ours.to_list(), "8101-8200,20000-20999");
        // No NAT service left: the administrator's ports alone remain.
        let (kernel, ours) = plan(&new_kernel, &new_ours, &Ports::default());
        assert_eq!(kernel.to_list(), "8000-8100");
        assert_eq!(ours.to_list(), "");
    }

    #[test]
    fn reserving_writes_the_list_and_the_record() {
        let dir = std::env::temp_dir().join(format!("lb-sysctl-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let sysctl = dir.join("ip_local_reserved_ports");
        fs::write(&sysctl, "8000\n").unwrap();
        reserve_in(&sysctl, &p("20000-20009"), Some(&dir), true).unwrap();
        assert_eq!(fs::read_to_string(&sysctl).unwrap(), "8000,20000-20009\n");
        assert_eq!(read_record(&dir.join(RECORD_DIR)).unwrap().to_list(), "20000-20009");
        // Before a change applies: the new range is added, nothing given back yet.
        reserve_in(&sysctl, &p("30000"), Some(&dir), false).unwrap();
        assert_eq!(fs::read_to_string(&sysctl).unwrap(), "8000,20000-20009,30000\n");
        reserve_in(&sysctl, &p("30000"), Some(&dir), true).unwrap();
        assert_eq!(fs::read_to_string(&sysctl).unwrap(), "8000,30000\n");
        assert_eq!(read_record(&dir.join(RECORD_DIR)).unwrap().to_list(), "30000");
        // Without a pin directory nothing is given back.
        reserve_in(&sysctl, &p("40000"), None, true).unwrap();
        assert_eq!(fs::read_to_string(&sysctl).unwrap(), "8000,30000,40000\n");
        // A list cut short (no final newline) is refused, not half read.
        fs::write(&sysctl, "8000,300").unwrap();
        assert!(reserve_in(&sysctl, &p("40000"), None, true).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! What the outpost's host offers, for the `hello` frame: CPUs, memory and
//! the free disk space of the agent's data directory. Every probe degrades
//! to 0 ("unknown") instead of failing: a missing number must not keep an
//! outpost offline.

use std::path::Path;

use trellis_link::protocol::Capacity;

/// Probes the host; `data_dir` is where free disk space is measured.
/// This host's CPU architecture as OCI platforms (and manifests'
/// `docker.platform`) name it: `amd64`, `arm64`, ….
pub fn arch() -> &'static str {
    trellis_model::manifest::Arch::oci_name(std::env::consts::ARCH)
}

pub fn capacity(data_dir: &Path) -> Capacity {
    Capacity {
        cpus: std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(0),
        memory_bytes: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| mem_total(&text))
            .unwrap_or(0),
        disk_free_bytes: disk_free(data_dir).unwrap_or(0),
    }
}

/// `MemTotal:  16314368 kB` → bytes.
pub fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let mut parts = line["MemTotal:".len()..].split_whitespace();
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        None => 1,
        Some("kB") => 1024,
        Some(_) => return None,
    };
    value.checked_mul(unit)
}

/// Bytes available to unprivileged users on the file system of `path`.
fn disk_free(path: &Path) -> Option<u64> {
    let stat = rustix::fs::statvfs(path).ok()?;
    stat.f_bavail.checked_mul(stat.f_frsize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mem_total() {
        let text = "MemFree:  1 kB\nMemTotal:       16314368 kB\n";
        assert_eq!(mem_total(text), Some(16314368 * 1024));
        assert_eq!(mem_total("MemTotal: x kB"), None);
        assert_eq!(mem_total(""), None);
    }

    #[test]
    fn probes_this_host() {
        let c = capacity(Path::new("/"));
        assert!(c.cpus >= 1);
    }
}

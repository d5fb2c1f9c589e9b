//! Keeps the hardware address of a stage network's bridge from changing.
//!
//! Linux gives a bridge whose address nobody set the lowest address of its
//! ports, so it changes whenever a container with a lower one joins or the
//! port it came from leaves. Containers on the network have the gateway's
//! old address in their ARP cache and send their packets — answers to the
//! entry point, traffic to the internet — to an address nobody owns until
//! the entry goes stale: seconds of silence on established connections,
//! exactly when a release starts new replicas beside the old ones and
//! removes those. Docker sets an address on its bridges, and netavark does
//! since 1.9; Debian 12's netavark (1.4) does not, so the agent does it:
//! once a container has started, the bridge that holds the network's
//! gateway address keeps the address it has then.
//!
//! This needs `CAP_NET_ADMIN` (an agent running as root has it) and
//! iproute2's `ip`. Without them the agent warns once per bridge and goes
//! on: requests may stall during releases, nothing else changes.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;

use tokio::process::Command;

/// `NET_ADDR_SET` in `/sys/class/net/<if>/addr_assign_type`: the address
/// was set explicitly, and the kernel leaves it alone.
const ADDRESS_SET: &str = "3";

/// Pins bridge addresses, warning once per bridge it cannot pin.
#[derive(Default)]
pub(crate) struct BridgePins {
    warned: Mutex<HashSet<String>>,
}

impl BridgePins {
    /// Pins the address of the bridge holding `gateway` (see the module
    /// docs). Cheap when it is pinned already.
    pub(crate) async fn pin(&self, gateway: IpAddr) {
        let outcome = pin_bridge_of(gateway, Path::new("/sys/class/net")).await;
        match outcome {
            Ok(Pinned::Already) => {}
            Ok(Pinned::Now { interface, address }) => {
                tracing::info!(%interface, %address, %gateway,
                    "pinned the stage network bridge's hardware address, so that starting and removing containers does not change it");
            }
            Err(e) => {
                let first = self
                    .warned
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(gateway.to_string());
                if first {
                    tracing::warn!(%gateway, error = %e,
                        "could not pin the hardware address of the bridge holding the stage network's gateway; \
                         while containers start and stop, connections to the others may stall for seconds \
                         (run the agent as root with iproute2 installed, or use netavark 1.9 or newer)");
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Pinned {
    Already,
    Now { interface: String, address: String },
}

async fn pin_bridge_of(gateway: IpAddr, sys_class_net: &Path) -> Result<Pinned, String> {
    let listed = run(&["-o", "addr", "show", "to", &gateway.to_string()]).await?;
    let interface = interface_in(&listed)
        .ok_or_else(|| format!("no interface of this host has the address {gateway}"))?;
    let dir = sys_class_net.join(&interface);
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("reading {}: {e}", dir.join(file).display()))
    };
    if !dir.join("bridge").is_dir() {
        return Err(format!(
            "{interface}, which holds {gateway}, is not a bridge"
        ));
    }
    if read("addr_assign_type")? == ADDRESS_SET {
        return Ok(Pinned::Already);
    }
    let address = read("address")?;
    run(&["link", "set", "dev", &interface, "address", &address]).await?;
    Ok(Pinned::Now { interface, address })
}

/// The interface name in `ip -o addr` output: `5: podman1    inet …`.
fn interface_in(listed: &str) -> Option<String> {
    let line = listed.lines().find(|l| !l.trim().is_empty())?;
    let name = line.split_whitespace().nth(1)?;
    // A VLAN or veth shows as `name@parent`.
    let name = name.split('@').next().unwrap_or(name);
    (!name.is_empty()).then(|| name.to_owned())
}

async fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interface_is_the_second_field_of_ip_addr_output() {
        let listed = "5: podman1    inet 10.89.0.1/24 brd 10.89.0.255 scope global podman1\\       valid_lft forever preferred_lft forever\n";
        assert_eq!(interface_in(listed).as_deref(), Some("podman1"));
        assert_eq!(
            interface_in("7: br0@eth0    inet 10.0.0.1/24 scope global br0\n").as_deref(),
            Some("br0")
        );
        assert_eq!(interface_in(""), None);
        assert_eq!(interface_in("\n"), None);
    }
}

//! The devices an outpost offers its stages' components: device nodes of
//! the host (a camera at `/dev/video0`, a PLC on `/dev/ttyUSB0`) and GPUs.
//!
//! The administrator offers them when starting the agent, under names of
//! their choice (`--device camera=/dev/video0:rw`, `--gpu all`), may make a
//! device exclusive (`--device-exclusive camera`: one replica on the whole
//! outpost holds it) and may grant it to some projects only
//! (`--device-grant camera=shop,kasse`). A manifest asks for devices by
//! those names (`devices: [{name: camera}]`), never by host path, so one
//! manifest runs on outposts wired differently.
//!
//! This module parses and checks the offer, resolves what a component asks
//! for into [`PlannedDevice`]s (refusing a device that is not offered, or
//! not granted to the stage's project, with the names), tells whether a
//! device node is on the host now, and describes the offer for the `hello`
//! frame (the outpost description). Who holds an exclusive device is the
//! deployer's to decide (it knows every stage); how a device reaches a
//! workload is each runtime's (device mappings and CDI requests for
//! containers, an ACL entry for processes).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use trellis_link::protocol::DeviceOffer as WireOffer;
use trellis_model::manifest::DeviceRequest;
use trellis_model::{NameKind, validate_name};

use crate::runtime::plan::PlannedDevice;

/// The name GPUs are offered under (`--gpu`).
pub const GPU: &str = "gpu";

/// The CDI kind bare GPU indexes and `all` are named under.
const NVIDIA_GPU: &str = "nvidia.com/gpu";

/// Access to a device node, as device cgroups name it: read, write, mknod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub read: bool,
    pub write: bool,
    pub mknod: bool,
}

impl Access {
    /// Without a mode: read and write.
    pub const READ_WRITE: Access = Access {
        read: true,
        write: true,
        mknod: false,
    };

    /// `rw`, `r`, `rwm`, …: the cgroup permission string.
    pub fn as_cgroup(&self) -> String {
        let mut out = String::new();
        for (on, c) in [(self.read, 'r'), (self.write, 'w'), (self.mknod, 'm')] {
            if on {
                out.push(c);
            }
        }
        out
    }
}

impl FromStr for Access {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "{text:?} is not an access mode; use r, w or m (mknod), each at most once, like rw"
            )
        };
        let mut access = Access {
            read: false,
            write: false,
            mknod: false,
        };
        for c in text.chars() {
            let flag = match c {
                'r' => &mut access.read,
                'w' => &mut access.write,
                'm' => &mut access.mknod,
                _ => return Err(bad()),
            };
            if *flag {
                return Err(bad());
            }
            *flag = true;
        }
        if !access.read && !access.write {
            return Err(bad());
        }
        Ok(access)
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_cgroup())
    }
}

/// `--device NAME=PATH[:MODE]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFlag {
    pub name: String,
    pub path: PathBuf,
    pub access: Access,
}

impl FromStr for DeviceFlag {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((name, rest)) = text.split_once('=') else {
            return Err(format!(
                "{text:?} names no device; write NAME=PATH[:MODE], like camera=/dev/video0:rw"
            ));
        };
        check_device_name(name)?;
        let (path, access) = match rest.rsplit_once(':') {
            Some((path, mode)) => (path, mode.parse::<Access>()?),
            None => (rest, Access::READ_WRITE),
        };
        if !path.starts_with('/') {
            return Err(format!(
                "device {name}: {path:?} is not an absolute path; give the device node, like /dev/ttyUSB0"
            ));
        }
        Ok(DeviceFlag {
            name: name.to_owned(),
            path: PathBuf::from(path),
            access,
        })
    }
}

/// `--gpu all|0,1|vendor.com/class=name,…`: the GPUs offered as `gpu`, as
/// CDI device names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuFlag {
    pub cdi: Vec<String>,
}

impl FromStr for GpuFlag {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut cdi: Vec<String> = Vec::new();
        let tokens: Vec<&str> = text.split(',').map(str::trim).collect();
        for token in &tokens {
            let name = if is_cdi_name(token) {
                (*token).to_owned()
            } else if *token == "all" {
                if tokens.len() > 1 {
                    return Err(format!(
                        "{text:?}: `all` stands alone; give all, or the GPUs' indexes like 0,1"
                    ));
                }
                format!("{NVIDIA_GPU}=all")
            } else if !token.is_empty()
                && token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                // An index (`0`) or a GPU's UUID, as the vendor's CDI
                // specification names its devices.
                format!("{NVIDIA_GPU}={token}")
            } else {
                return Err(format!(
                    "{token:?} is not a GPU; give all, indexes like 0,1, or CDI device names like nvidia.com/gpu=0"
                ));
            };
            if cdi.contains(&name) {
                return Err(format!("{text:?} lists {token} twice"));
            }
            cdi.push(name);
        }
        Ok(GpuFlag { cdi })
    }
}

/// A fully qualified CDI device name: `vendor.com/class=name`.
fn is_cdi_name(text: &str) -> bool {
    let Some((kind, name)) = text.split_once('=') else {
        return false;
    };
    let Some((vendor, class)) = kind.split_once('/') else {
        return false;
    };
    let word = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || extra.contains(&b))
    };
    word(vendor, b".") && word(class, b"") && word(name, b".:")
}

/// `--device-grant NAME=PROJECT[,PROJECT…]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantFlag {
    pub device: String,
    pub projects: Vec<String>,
}

impl FromStr for GrantFlag {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((device, projects)) = text.split_once('=') else {
            return Err(format!(
                "{text:?} grants nothing; write DEVICE=PROJECT[,PROJECT…], like camera=shop"
            ));
        };
        check_device_name(device)?;
        let mut out: Vec<String> = Vec::new();
        for project in projects.split(',').map(str::trim) {
            validate_name(NameKind::Project, project).map_err(|e| e.to_string())?;
            if !out.iter().any(|p| p == project) {
                out.push(project.to_owned());
            }
        }
        Ok(GrantFlag {
            device: device.to_owned(),
            projects: out,
        })
    }
}

fn check_device_name(name: &str) -> Result<(), String> {
    validate_name(NameKind::Device, name).map_err(|e| e.to_string())
}

/// What a device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferKind {
    /// A device node of the host; containers get it at the same path.
    Node { path: PathBuf, access: Access },
    /// GPUs, by CDI device name.
    Gpu { cdi: Vec<String> },
}

/// One device the outpost offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub name: String,
    pub kind: OfferKind,
    /// Held by at most one replica on the whole outpost.
    pub exclusive: bool,
    /// The projects whose stages may ask for it; empty: every project.
    pub projects: Vec<String>,
}

impl Offer {
    /// Whether stages of `project` may ask for it.
    pub fn granted_to(&self, project: &str) -> bool {
        self.projects.is_empty() || self.projects.iter().any(|p| p == project)
    }
}

/// Whether a device node is on the host now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// A character or block device.
    Present,
    Missing,
    /// Something else is at the path (a file, a directory).
    NotADevice,
}

/// Looks at `path` now.
pub fn node_state(path: &Path) -> NodeState {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_char_device() || m.file_type().is_block_device() => {
            NodeState::Present
        }
        Ok(_) => NodeState::NotADevice,
        Err(_) => NodeState::Missing,
    }
}

/// Whether the host shows a GPU: an NVIDIA device node, or a CDI
/// specification of some vendor's devices.
fn host_has_gpu() -> bool {
    Path::new("/dev/nvidia0").exists()
        || ["/etc/cdi", "/var/run/cdi"]
            .iter()
            .any(|dir| std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()))
}

/// The variable a component finds a device node's path in:
/// `TRELLIS_DEVICE_PLC_SERIAL` for `plc-serial`.
pub fn env_name(device: &str) -> String {
    format!(
        "TRELLIS_DEVICE_{}",
        device.to_ascii_uppercase().replace('-', "_")
    )
}

/// Everything the outpost offers; see the module docs. Empty by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceOffers {
    /// The outpost's name, for messages.
    outpost: String,
    offers: Vec<Offer>,
}

impl DeviceOffers {
    /// The offer the flags describe. Every device named by `exclusive` and
    /// `grants` must be offered; a device node that is missing now is
    /// offered anyway (a camera may be plugged in later: releases asking
    /// for it fail until it is), one that is not a device is refused.
    pub fn new(
        devices: &[DeviceFlag],
        gpu: Option<&GpuFlag>,
        exclusive: &[String],
        grants: &[GrantFlag],
    ) -> Result<DeviceOffers, String> {
        let mut offers: Vec<Offer> = Vec::new();
        for flag in devices {
            if offers.iter().any(|o| o.name == flag.name) {
                return Err(format!(
                    "device {} is offered twice (--device); give each name once",
                    flag.name
                ));
            }
            if flag.name == GPU && gpu.is_some() {
                return Err(
                    "the name gpu is taken by --gpu; offer the device node under another name"
                        .into(),
                );
            }
            match node_state(&flag.path) {
                NodeState::Present => {}
                NodeState::Missing => tracing::warn!(
                    device = %flag.name, path = %flag.path.display(),
                    "an offered device node is not on the host; releases asking for it fail until it is"
                ),
                NodeState::NotADevice => {
                    return Err(format!(
                        "device {}: {} is not a device node (character or block device)",
                        flag.name,
                        flag.path.display()
                    ));
                }
            }
            offers.push(Offer {
                name: flag.name.clone(),
                kind: OfferKind::Node {
                    path: flag.path.clone(),
                    access: flag.access,
                },
                exclusive: false,
                projects: Vec::new(),
            });
        }
        if let Some(gpu) = gpu {
            if !host_has_gpu() {
                tracing::warn!(
                    "GPUs are offered (--gpu), but this host shows none (no /dev/nvidia0, no CDI \
                     specification in /etc/cdi or /var/run/cdi); releases asking for them will fail"
                );
            }
            offers.push(Offer {
                name: GPU.to_owned(),
                kind: OfferKind::Gpu {
                    cdi: gpu.cdi.clone(),
                },
                exclusive: false,
                projects: Vec::new(),
            });
        }
        let names = |offers: &[Offer]| {
            offers
                .iter()
                .map(|o| o.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unoffered = |flag: &str, name: &str, offers: &[Offer]| {
            if offers.is_empty() {
                format!(
                    "{flag} {name}: the agent offers no devices; offer it with --device {name}=PATH or --gpu"
                )
            } else {
                format!(
                    "{flag} {name}: the agent offers no device {name}; it offers {}",
                    names(offers)
                )
            }
        };
        for name in exclusive {
            match offers.iter_mut().find(|o| &o.name == name) {
                Some(offer) => offer.exclusive = true,
                None => return Err(unoffered("--device-exclusive", name, &offers)),
            }
        }
        for grant in grants {
            match offers.iter_mut().find(|o| o.name == grant.device) {
                Some(offer) => {
                    for project in &grant.projects {
                        if !offer.projects.contains(project) {
                            offer.projects.push(project.clone());
                        }
                    }
                }
                None => return Err(unoffered("--device-grant", &grant.device, &offers)),
            }
        }
        Ok(DeviceOffers {
            outpost: String::new(),
            offers,
        })
    }

    /// The same offer, on the outpost named `outpost` (for messages).
    pub fn for_outpost(mut self, outpost: &str) -> Self {
        self.outpost = outpost.to_owned();
        self
    }

    pub fn is_empty(&self) -> bool {
        self.offers.is_empty()
    }

    pub fn offers(&self) -> &[Offer] {
        &self.offers
    }

    pub fn get(&self, name: &str) -> Option<&Offer> {
        self.offers.iter().find(|o| o.name == name)
    }

    /// "outpost factory-7", or "this outpost" before the name is known.
    pub fn outpost_words(&self) -> String {
        if self.outpost.is_empty() {
            "this outpost".to_owned()
        } else {
            format!("outpost {}", self.outpost)
        }
    }

    /// The offer as the `hello` frame carries it.
    pub fn wire(&self) -> Vec<WireOffer> {
        self.offers
            .iter()
            .map(|o| {
                let (kind, path, access, cdi) = match &o.kind {
                    OfferKind::Node { path, access } => (
                        "device",
                        path.to_string_lossy().into_owned(),
                        access.as_cgroup(),
                        Vec::new(),
                    ),
                    OfferKind::Gpu { cdi } => ("gpu", String::new(), String::new(), cdi.clone()),
                };
                WireOffer {
                    name: o.name.clone(),
                    kind: kind.into(),
                    path,
                    access,
                    cdi,
                    exclusive: o.exclusive,
                    projects: o.projects.clone(),
                }
            })
            .collect()
    }

    /// What `component` of a stage of `project` gets for the devices it
    /// asks for. Refuses, naming the device and the outpost, one that is
    /// not offered or not granted to the project.
    pub fn resolve(
        &self,
        project: &str,
        component: &str,
        asked: &[DeviceRequest],
    ) -> Result<Vec<PlannedDevice>, String> {
        let mut out = Vec::with_capacity(asked.len());
        for request in asked {
            let Some(offer) = self.get(&request.name) else {
                let offered = if self.offers.is_empty() {
                    "it offers no devices".to_owned()
                } else {
                    format!(
                        "it offers {}",
                        self.offers
                            .iter()
                            .map(|o| o.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(format!(
                    "component {component:?} asks for device {:?}, which {} does not offer ({offered}); \
                     ask the outpost's administrator to offer it (trellis agent run --device {}=PATH), \
                     or place the stage on an outpost that does (`trellis validate outpost-uri` lists them)",
                    request.name,
                    self.outpost_words(),
                    request.name
                ));
            };
            if !offer.granted_to(project) {
                return Err(format!(
                    "component {component:?} asks for device {:?}, which {} does not grant to project {project}; \
                     ask the outpost's administrator to grant it (--device-grant {}={project})",
                    request.name,
                    self.outpost_words(),
                    request.name
                ));
            }
            out.push(match &offer.kind {
                OfferKind::Node { path, access } => PlannedDevice {
                    name: offer.name.clone(),
                    path: Some(path.to_string_lossy().into_owned()),
                    access: access.as_cgroup(),
                    cdi: Vec::new(),
                    exclusive: offer.exclusive,
                },
                OfferKind::Gpu { cdi } => PlannedDevice {
                    name: offer.name.clone(),
                    path: None,
                    access: String::new(),
                    cdi: cdi.clone(),
                    exclusive: offer.exclusive,
                },
            });
        }
        Ok(out)
    }

    /// The environment a component holding `devices` gets: the path of
    /// each device node under [`env_name`].
    pub fn env(devices: &[PlannedDevice]) -> BTreeMap<String, String> {
        devices
            .iter()
            .filter_map(|d| d.path.as_ref().map(|p| (env_name(&d.name), p.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> DeviceRequest {
        DeviceRequest { name: name.into() }
    }

    #[test]
    fn device_flags_name_a_node_and_its_access() {
        let flag: DeviceFlag = "plc-serial=/dev/ttyUSB0:rw".parse().unwrap();
        assert_eq!(flag.name, "plc-serial");
        assert_eq!(flag.path, Path::new("/dev/ttyUSB0"));
        assert_eq!(flag.access.as_cgroup(), "rw");
        let flag: DeviceFlag = "camera=/dev/video0".parse().unwrap();
        assert_eq!(flag.access, Access::READ_WRITE, "rw without a mode");
        let flag: DeviceFlag = "disk=/dev/sdb:rwm".parse().unwrap();
        assert_eq!(flag.access.as_cgroup(), "rwm");
        let flag: DeviceFlag = "cam=/dev/video0:r".parse().unwrap();
        assert!(flag.access.read && !flag.access.write);

        for (bad, says) in [
            ("camera", "NAME=PATH"),
            ("Camera=/dev/video0", "not valid"),
            ("camera=dev/video0", "absolute"),
            ("camera=/dev/video0:rx", "not an access mode"),
            ("camera=/dev/video0:rr", "not an access mode"),
            ("camera=/dev/video0:m", "not an access mode"),
            ("camera=/dev/video0:", "not an access mode"),
        ] {
            let err = bad.parse::<DeviceFlag>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn gpu_flags_become_cdi_names() {
        let all: GpuFlag = "all".parse().unwrap();
        assert_eq!(all.cdi, ["nvidia.com/gpu=all"]);
        let two: GpuFlag = "0,1".parse().unwrap();
        assert_eq!(two.cdi, ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]);
        let named: GpuFlag = "amd.com/gpu=0,nvidia.com/gpu=GPU-1f2e".parse().unwrap();
        assert_eq!(named.cdi, ["amd.com/gpu=0", "nvidia.com/gpu=GPU-1f2e"]);
        for bad in ["all,0", "0,0", "", "0;1", "a b"] {
            assert!(bad.parse::<GpuFlag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn grants_name_projects() {
        let grant: GrantFlag = "camera=shop, kasse,shop".parse().unwrap();
        assert_eq!(grant.device, "camera");
        assert_eq!(grant.projects, ["shop", "kasse"]);
        assert!("camera".parse::<GrantFlag>().is_err());
        assert!("camera=Shop".parse::<GrantFlag>().is_err());
    }

    fn offers() -> DeviceOffers {
        // /dev/null is a character device on every Linux host.
        DeviceOffers::new(
            &[
                "camera=/dev/null:r".parse().unwrap(),
                "plc=/dev/null".parse().unwrap(),
            ],
            Some(&"all".parse().unwrap()),
            &["camera".into()],
            &["plc=shop".parse().unwrap()],
        )
        .unwrap()
        .for_outpost("factory-7")
    }

    #[test]
    fn the_offer_is_checked_when_the_agent_starts() {
        let o = offers();
        assert!(o.get("camera").unwrap().exclusive);
        assert!(!o.get("plc").unwrap().exclusive);
        assert!(o.get("plc").unwrap().granted_to("shop"));
        assert!(!o.get("plc").unwrap().granted_to("kasse"));
        assert!(
            o.get("gpu").unwrap().granted_to("kasse"),
            "no grant: every project"
        );

        let node = |s: &str| s.parse::<DeviceFlag>().unwrap();
        let err = DeviceOffers::new(&[node("a=/dev/null"), node("a=/dev/zero")], None, &[], &[])
            .unwrap_err();
        assert!(err.contains("offered twice"), "{err}");
        let err = DeviceOffers::new(
            &[node("gpu=/dev/null")],
            Some(&"0".parse().unwrap()),
            &[],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("taken by --gpu"), "{err}");
        let err = DeviceOffers::new(&[node("a=/dev/null")], None, &["b".into()], &[]).unwrap_err();
        assert!(
            err.contains("--device-exclusive b") && err.contains("offers a"),
            "{err}"
        );
        let err = DeviceOffers::new(&[], None, &[], &["b=shop".parse().unwrap()]).unwrap_err();
        assert!(err.contains("offers no devices"), "{err}");
        let err = DeviceOffers::new(&[node("a=/etc/hostname")], None, &[], &[]).unwrap_err();
        assert!(err.contains("is not a device node"), "{err}");
        // Unplugged now: offered anyway.
        let o = DeviceOffers::new(&[node("cam=/dev/no-such-camera")], None, &[], &[]).unwrap();
        assert!(o.get("cam").is_some());
    }

    #[test]
    fn requests_resolve_to_the_offered_nodes_and_gpus() {
        let o = offers();
        let planned = o
            .resolve(
                "shop",
                "inspect",
                &[request("camera"), request("gpu"), request("plc")],
            )
            .unwrap();
        assert_eq!(planned[0].path.as_deref(), Some("/dev/null"));
        assert_eq!(planned[0].access, "r");
        assert!(planned[0].exclusive);
        assert_eq!(planned[1].cdi, ["nvidia.com/gpu=all"]);
        assert!(planned[1].path.is_none());
        let env = DeviceOffers::env(&planned);
        assert_eq!(env["TRELLIS_DEVICE_CAMERA"], "/dev/null");
        assert_eq!(env["TRELLIS_DEVICE_PLC"], "/dev/null");
        assert!(!env.contains_key("TRELLIS_DEVICE_GPU"), "GPUs have no path");
        assert_eq!(env_name("plc-serial"), "TRELLIS_DEVICE_PLC_SERIAL");
    }

    #[test]
    fn unoffered_and_ungranted_devices_are_refused_with_the_names() {
        let o = offers();
        let err = o
            .resolve("shop", "inspect", &[request("scanner")])
            .unwrap_err();
        assert!(
            err.contains("\"inspect\"")
                && err.contains("\"scanner\"")
                && err.contains("outpost factory-7 does not offer")
                && err.contains("camera, plc, gpu"),
            "{err}"
        );
        let err = o.resolve("kasse", "bridge", &[request("plc")]).unwrap_err();
        assert!(
            err.contains("\"plc\"")
                && err.contains("outpost factory-7 does not grant to project kasse")
                && !err.contains("shop"),
            "names neither the device's other projects: {err}"
        );
        let none = DeviceOffers::default();
        let err = none
            .resolve("shop", "web", &[request("camera")])
            .unwrap_err();
        assert!(
            err.contains("this outpost does not offer (it offers no devices)"),
            "{err}"
        );
    }

    #[test]
    fn the_hello_lists_every_offer() {
        let wire = offers().wire();
        assert_eq!(wire.len(), 3);
        assert_eq!(
            (
                wire[0].kind.as_str(),
                wire[0].path.as_str(),
                wire[0].access.as_str()
            ),
            ("device", "/dev/null", "r")
        );
        assert!(wire[0].exclusive);
        assert_eq!(wire[1].projects, ["shop"]);
        assert_eq!((wire[2].kind.as_str(), wire[2].cdi.len()), ("gpu", 1));
    }
}

//! From a [`ComponentPlan`] to the engine's container-create request.

use std::collections::HashMap;
use std::path::PathBuf;

use bollard::models::{
    ContainerCreateBody, DeviceMapping, DeviceRequest, EndpointSettings, HostConfig, Mount,
    MountTmpfsOptions, MountType, NetworkingConfig, PortBinding, RestartPolicy,
    RestartPolicyNameEnum,
};
use trellis_model::manifest::StorageKind;

use super::engine::GpuRequests;
use super::naming;
use crate::runtime::{ComponentPlan, PlannedDevice, Workload};
use crate::state::StageKey;

/// One container to create.
#[derive(Debug, Clone)]
pub struct ContainerSpec<'a> {
    pub stage: &'a StageKey,
    pub plan: &'a ComponentPlan,
    pub labels: HashMap<String, String>,
    /// `(host path, path inside)` of each of the component's files.
    pub files: &'a [(PathBuf, String)],
    /// The host address to publish the ports on (this replica only).
    pub publish_on: Option<&'a str>,
    /// Seconds between the stop signal and the kill.
    pub stop_timeout: i64,
    /// How the engine takes GPUs.
    pub gpus: GpuRequests,
}

/// The device nodes of `devices` as the engine's device mappings: each at
/// its host path inside the container too, with the access given (the
/// device cgroup allows exactly that; nothing else of the host's `/dev`
/// is added, and the container is never privileged).
pub fn device_mappings(devices: &[PlannedDevice]) -> Vec<DeviceMapping> {
    devices
        .iter()
        .filter_map(|d| {
            d.path.as_ref().map(|path| DeviceMapping {
                path_on_host: Some(path.clone()),
                path_in_container: Some(path.clone()),
                cgroup_permissions: Some(d.access.clone()),
            })
        })
        .collect()
}

/// The device requests that give a container the GPUs of `devices`, in
/// the form the engine takes: CDI device names for the `cdi` driver, or
/// for Docker without CDI the request `docker run --gpus` makes (NVIDIA
/// GPUs only). Refuses what the engine cannot be asked for.
pub fn gpu_requests(
    devices: &[PlannedDevice],
    how: GpuRequests,
) -> Result<Vec<DeviceRequest>, String> {
    let cdi: Vec<String> = devices.iter().flat_map(|d| d.cdi.clone()).collect();
    if cdi.is_empty() {
        return Ok(Vec::new());
    }
    match how {
        GpuRequests::Cdi => Ok(vec![DeviceRequest {
            driver: Some("cdi".into()),
            device_ids: Some(cdi),
            ..Default::default()
        }]),
        GpuRequests::NvidiaCapability => {
            let mut ids = Vec::new();
            let mut all = false;
            for name in &cdi {
                match name.strip_prefix("nvidia.com/gpu=") {
                    Some("all") => all = true,
                    Some(id) => ids.push(id.to_owned()),
                    None => {
                        return Err(format!(
                            "the engine takes no CDI device requests (CDI is not enabled in Docker), \
                             so it can give NVIDIA GPUs only, not {name}; enable CDI in the daemon's \
                             configuration (Docker 25 or later)"
                        ));
                    }
                }
            }
            Ok(vec![DeviceRequest {
                count: all.then_some(-1),
                device_ids: (!all).then_some(ids),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }])
        }
        GpuRequests::Unsupported => Err(
            "the container engine (Podman before version 5) takes no CDI device requests \
             through its API, so it cannot give a container GPUs; run Podman 5 or later, or Docker"
                .into(),
        ),
    }
}

/// The create request for `spec`.
pub fn create_body(spec: &ContainerSpec<'_>) -> ContainerCreateBody {
    let plan = spec.plan;
    let network = naming::network_name(spec.stage);
    let image = match &plan.workload {
        // A stored image is run by id: the tag may name something else on
        // this engine.
        Workload::Image {
            archive: Some(archive),
            ..
        } => archive.image_id.clone(),
        Workload::Image { reference, .. } => reference.clone(),
        Workload::Package { .. } => String::new(),
    };

    let mut mounts: Vec<Mount> = spec
        .files
        .iter()
        .map(|(host, target)| Mount {
            target: Some(target.clone()),
            source: Some(host.to_string_lossy().into_owned()),
            typ: Some(MountType::BIND),
            read_only: Some(true),
            ..Default::default()
        })
        .collect();
    for volume in &plan.volumes {
        mounts.push(match volume.kind {
            StorageKind::Standard | StorageKind::Premium => Mount {
                target: Some(volume.path.clone()),
                source: Some(naming::volume_name(spec.stage, &plan.name, &volume.name)),
                typ: Some(MountType::VOLUME),
                ..Default::default()
            },
            // Both live as long as the container: a tmpfs, capped at the
            // storage's size when it has one.
            StorageKind::Temporary | StorageKind::Memory => Mount {
                target: Some(volume.path.clone()),
                typ: Some(MountType::TMPFS),
                tmpfs_options: volume.size_bytes.map(|size| MountTmpfsOptions {
                    size_bytes: Some(i64::try_from(size).unwrap_or(i64::MAX)),
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
    }

    let exposed: Vec<String> = plan.ports.iter().map(|p| format!("{p}/tcp")).collect();
    let port_bindings = spec
        .publish_on
        .filter(|_| !plan.ports.is_empty())
        .map(|ip| {
            plan.ports
                .iter()
                .map(|p| {
                    (
                        format!("{p}/tcp"),
                        Some(vec![PortBinding {
                            host_ip: Some(ip.to_owned()),
                            host_port: Some(p.to_string()),
                        }]),
                    )
                })
                .collect()
        });

    let restart = if plan.schedule.is_some() {
        // A job is started by the agent at its time; the engine must not
        // restart it behind the retry count's back.
        RestartPolicyNameEnum::NO
    } else {
        RestartPolicyNameEnum::UNLESS_STOPPED
    };

    let devices = device_mappings(&plan.devices);
    // `cannot_hold` refused a plan whose GPUs the engine cannot take before
    // anything was created; should one get here, it gets none.
    let gpus = gpu_requests(&plan.devices, spec.gpus).unwrap_or_default();

    ContainerCreateBody {
        image: Some(image),
        user: plan.user.clone().filter(|u| !u.is_empty()),
        env: Some(plan.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        entrypoint: plan.command.clone().filter(|c| !c.is_empty()),
        cmd: plan.args.clone().filter(|a| !a.is_empty()),
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        labels: Some(spec.labels.clone()),
        stop_timeout: Some(spec.stop_timeout),
        host_config: Some(HostConfig {
            network_mode: Some(network.clone()),
            restart_policy: Some(RestartPolicy {
                name: Some(restart),
                maximum_retry_count: None,
            }),
            nano_cpus: plan
                .cpu_millis
                .map(|m| i64::try_from(m.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory: plan
                .memory_bytes
                .map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            mounts: (!mounts.is_empty()).then_some(mounts),
            port_bindings,
            devices: (!devices.is_empty()).then_some(devices),
            device_requests: (!gpus.is_empty()).then_some(gpus),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                network,
                EndpointSettings {
                    aliases: Some(vec![plan.name.clone()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_model::manifest::Schedule;

    use super::*;
    use crate::runtime::PlannedVolume;

    fn plan() -> ComponentPlan {
        ComponentPlan {
            name: "web".to_owned(),
            workload: Workload::Image {
                reference: "localhost/web:1".to_owned(),
                platform: None,
                archive: None,
            },
            ports: vec![8080, 9090],
            env: BTreeMap::from([
                ("B".to_owned(), "2".to_owned()),
                ("A".to_owned(), "1".to_owned()),
            ]),
            files: vec![],
            volumes: vec![
                PlannedVolume {
                    name: "data".into(),
                    path: "/data".into(),
                    kind: StorageKind::Standard,
                    size_bytes: None,
                },
                PlannedVolume {
                    name: "scratch".into(),
                    path: "/scratch".into(),
                    kind: StorageKind::Memory,
                    size_bytes: Some(1 << 20),
                },
            ],
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            replicas: 2,
            command: Some(vec!["httpd".into()]),
            args: Some(vec!["-f".into()]),
            user: Some("nobody".into()),
            schedule: None,
            timezone: None,
            max_retries: 0,
            stopped: false,
            killed: false,
            restart_generation: 0,
            spec_hash: "h".into(),
            devices: vec![],
        }
    }

    #[test]
    fn maps_the_plan() {
        let stage = StageKey::new("p", "s");
        let plan = plan();
        let files = vec![(PathBuf::from("/host/f"), "/etc/f".to_owned())];
        let body = create_body(&ContainerSpec {
            stage: &stage,
            plan: &plan,
            labels: HashMap::new(),
            files: &files,
            publish_on: Some("127.0.0.1"),
            stop_timeout: 3,
            gpus: GpuRequests::Cdi,
        });
        assert_eq!(body.env.as_deref().unwrap(), ["A=1", "B=2"]);
        assert_eq!(body.entrypoint.as_deref().unwrap(), ["httpd"]);
        assert_eq!(body.cmd.as_deref().unwrap(), ["-f"]);
        assert_eq!(body.user.as_deref(), Some("nobody"));
        let host = body.host_config.unwrap();
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.memory, Some(64 << 20));
        assert_eq!(host.network_mode.as_deref(), Some("trellis-p_s"));
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::UNLESS_STOPPED)
        );
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].source.as_deref(), Some("trellis-p_s_web_data"));
        assert_eq!(mounts[2].typ, Some(MountType::TMPFS));
        let ports = host.port_bindings.unwrap();
        assert_eq!(
            ports["8080/tcp"].as_ref().unwrap()[0].host_port.as_deref(),
            Some("8080")
        );
        let aliases = body.networking_config.unwrap().endpoints_config.unwrap()["trellis-p_s"]
            .aliases
            .clone();
        assert_eq!(aliases.unwrap(), ["web"]);
    }

    #[test]
    fn jobs_are_not_restarted_by_the_engine_and_nothing_is_published_when_off() {
        let stage = StageKey::new("p", "s");
        let mut plan = plan();
        plan.schedule = Some(Schedule::OnRelease);
        plan.command = Some(vec![]);
        let body = create_body(&ContainerSpec {
            stage: &stage,
            plan: &plan,
            labels: HashMap::new(),
            files: &[],
            publish_on: None,
            stop_timeout: 3,
            gpus: GpuRequests::Cdi,
        });
        assert!(body.entrypoint.is_none());
        let host = body.host_config.unwrap();
        assert_eq!(
            host.restart_policy.unwrap().name,
            Some(RestartPolicyNameEnum::NO)
        );
        assert!(host.port_bindings.is_none());
        assert!(host.devices.is_none() && host.device_requests.is_none());
        assert_eq!(host.privileged, None, "never privileged");
    }

    fn camera_and_gpu(gpus: &[&str]) -> Vec<PlannedDevice> {
        vec![
            PlannedDevice {
                name: "camera".into(),
                path: Some("/dev/video0".into()),
                access: "r".into(),
                cdi: vec![],
                exclusive: true,
            },
            PlannedDevice {
                name: "gpu".into(),
                path: None,
                access: String::new(),
                cdi: gpus.iter().map(|g| (*g).to_owned()).collect(),
                exclusive: false,
            },
        ]
    }

    /// The create body as the engine receives it (JSON, the Engine API's
    /// field names).
    fn wire_body(devices: Vec<PlannedDevice>, gpus: GpuRequests) -> serde_json::Value {
        let stage = StageKey::new("p", "s");
        let mut plan = plan();
        plan.devices = devices;
        let body = create_body(&ContainerSpec {
            stage: &stage,
            plan: &plan,
            labels: HashMap::new(),
            files: &[],
            publish_on: None,
            stop_timeout: 3,
            gpus,
        });
        serde_json::to_value(&body).unwrap()
    }

    #[test]
    fn a_device_node_is_mapped_at_its_path_with_its_access_and_nothing_more() {
        let body = wire_body(camera_and_gpu(&[]), GpuRequests::Unsupported);
        let host = &body["HostConfig"];
        assert_eq!(
            host["Devices"],
            serde_json::json!([{
                "PathOnHost": "/dev/video0",
                "PathInContainer": "/dev/video0",
                "CgroupPermissions": "r"
            }])
        );
        assert!(host.get("DeviceRequests").is_none(), "{host}");
        assert!(host.get("Privileged").is_none(), "{host}");
        assert!(host.get("CapAdd").is_none(), "{host}");
    }

    #[test]
    fn gpus_are_cdi_device_requests_where_the_engine_takes_them() {
        let body = wire_body(camera_and_gpu(&["nvidia.com/gpu=all"]), GpuRequests::Cdi);
        assert_eq!(
            body["HostConfig"]["DeviceRequests"],
            serde_json::json!([{"Driver": "cdi", "DeviceIDs": ["nvidia.com/gpu=all"]}])
        );
        let body = wire_body(
            camera_and_gpu(&["nvidia.com/gpu=0", "amd.com/gpu=1"]),
            GpuRequests::Cdi,
        );
        assert_eq!(
            body["HostConfig"]["DeviceRequests"][0]["DeviceIDs"],
            serde_json::json!(["nvidia.com/gpu=0", "amd.com/gpu=1"])
        );
        assert_eq!(
            body["HostConfig"]["Devices"][0]["PathOnHost"], "/dev/video0",
            "device nodes beside GPUs"
        );
    }

    #[test]
    fn docker_without_cdi_gets_the_gpus_request_of_docker_run() {
        let body = wire_body(
            camera_and_gpu(&["nvidia.com/gpu=all"]),
            GpuRequests::NvidiaCapability,
        );
        assert_eq!(
            body["HostConfig"]["DeviceRequests"],
            serde_json::json!([{"Count": -1, "Capabilities": [["gpu"]]}])
        );
        let body = wire_body(
            camera_and_gpu(&["nvidia.com/gpu=0", "nvidia.com/gpu=1"]),
            GpuRequests::NvidiaCapability,
        );
        assert_eq!(
            body["HostConfig"]["DeviceRequests"],
            serde_json::json!([{"DeviceIDs": ["0", "1"], "Capabilities": [["gpu"]]}])
        );
        let other = camera_and_gpu(&["amd.com/gpu=0"]);
        let err = gpu_requests(&other, GpuRequests::NvidiaCapability).unwrap_err();
        assert!(
            err.contains("amd.com/gpu=0") && err.contains("enable CDI"),
            "{err}"
        );
        let err = gpu_requests(&other, GpuRequests::Unsupported).unwrap_err();
        assert!(err.contains("Podman before version 5"), "{err}");
        assert!(
            gpu_requests(&[], GpuRequests::Unsupported)
                .unwrap()
                .is_empty()
        );
    }
}

//! Installing agents from the hub, end to end with the real binaries: the
//! hub's install script run with `dash` in a network namespace that reaches
//! nothing but the hub, the unit file it writes checked by `systemd-analyze
//! verify` and its ExecStart run as systemd would; agent binaries uploaded,
//! listed and refused; the Debian package built and installed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{Cli, HubProcess, describe, wait_until};

/// The `trellis-agent` binary beside `trellis` (what the hub offers by
/// itself, and what the Debian package holds), built if this test run did
/// not build it (`cargo test -p trellis --test install` alone does not).
fn agent_binary() -> PathBuf {
    let path = common::bin().with_file_name("trellis-agent");
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        if path.exists() {
            return;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "trellis-agent", "--bin", "trellis-agent"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p trellis-agent");
        assert!(status.success(), "building trellis-agent failed");
    });
    assert!(path.exists(), "no trellis-agent at {}", path.display());
    path
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace joined to the host by a veth pair and nothing
/// else: from inside, the host's side of the pair is the only address
/// there is (no default route, no other interface but its own loopback).
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    /// `None` (with the reason printed) when namespaces cannot be made
    /// here: not root, or no `ip netns`.
    fn create() -> Option<Netns> {
        if !is_root() {
            eprintln!("SKIPPED: network namespaces need root");
            return None;
        }
        if Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            eprintln!("SKIPPED: `ip netns` is not available (install iproute2)");
            return None;
        }
        let n = std::process::id() % 250;
        let ns = Netns {
            name: format!("trellis-install-{}", std::process::id()),
            host_if: format!("tri{n}h"),
            host_ip: format!("10.231.{n}.1"),
        };
        let peer = format!("tri{n}n");
        let ns_ip = format!("10.231.{n}.2/30");
        ok("ip", &["netns", "add", &ns.name]);
        ok(
            "ip",
            &[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
            ],
        );
        ok("ip", &["link", "set", &peer, "netns", &ns.name]);
        ok(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/30", ns.host_ip),
                "dev",
                &ns.host_if,
            ],
        );
        ok("ip", &["link", "set", &ns.host_if, "up"]);
        ok("ip", &["-n", &ns.name, "addr", "add", &ns_ip, "dev", &peer]);
        ok("ip", &["-n", &ns.name, "link", "set", &peer, "up"]);
        ok("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// A command run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.host_if]);
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// The install command `trellis create outpost` printed.
fn install_command(create_outpost_output: &str) -> String {
    create_outpost_output
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("curl "))
        .unwrap_or_else(|| panic!("no install command in:\n{create_outpost_output}"))
        .to_owned()
}

/// The printed install command, piped to `dash` (what `sh` is on Debian,
/// named so a bash-ism fails here wherever `sh` points), with the
/// directories to install into.
fn with_dirs(command: &str, root: &Path) -> String {
    assert!(command.contains("| sh -s -- --token "), "{command}");
    format!(
        "{} --prefix {p} --data {d} --unit-dir {u}",
        command.replace("| sh -s --", "| dash -s --"),
        p = root.join("prefix").display(),
        d = root.join("data").display(),
        u = root.join("units").display(),
    )
}

#[test]
fn the_install_script_joins_an_outpost_that_reaches_only_the_hub() {
    let Some(ns) = Netns::create() else { return };
    agent_binary();
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start_with(
        &tmp.path().join("hub"),
        &["--listen", &format!("{}:0", ns.host_ip)],
    );
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let created = cli.ok(&["create", "outpost", "plant-7"]);
    let command = install_command(&created);
    assert!(
        command.starts_with("curl -fsSL -k --pinnedpubkey 'sha256//")
            && command.contains(&format!("https://{}:", ns.host_ip)),
        "{command}"
    );
    let uri = cli.ok(&["get", "outpost-uri", "plant-7"]).trim().to_owned();

    // Inside, there is no way out but the veth to the hub.
    let routes = ns.command("ip").args(["route", "show"]).output().unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    assert!(!routes.contains("default"), "{routes}");

    let root = tmp.path().join("outpost");
    std::fs::create_dir_all(root.join("units")).unwrap();
    let out = ns
        .command("dash")
        .args(["-c", &with_dirs(&command, &root)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the install script: {}",
        describe(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("joined the hub at"), "{stdout}");
    // Not PID 1 here: the agent says how to start it.
    if !Path::new("/run/systemd/system").is_dir() {
        assert!(
            stdout.contains("systemd does not run on this host"),
            "{stdout}"
        );
    }

    let binary = root.join("prefix/bin/trellis-agent");
    assert!(binary.is_file(), "{stdout}");
    let unit_path = root.join("units/trellis-agent.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    assert!(unit.contains("KillMode=process"), "{unit}");
    assert!(unit.contains("Restart=always"), "{unit}");
    assert!(root.join("data/agent.redb").is_file());

    // The unit is one systemd accepts.
    let verify = run("systemd-analyze", &["verify", unit_path.to_str().unwrap()]);
    assert!(
        verify.status.success() && verify.stderr.is_empty(),
        "systemd-analyze verify: {}",
        describe(&verify)
    );

    // Started as the unit's ExecStart starts it, in the namespace: it links.
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart");
    let words: Vec<&str> = exec_start.split_whitespace().collect();
    let mut agent = ns
        .command(words[0])
        .args(&words[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let linked = std::panic::catch_unwind(|| {
        wait_until(
            "the installed agent to link",
            Duration::from_secs(60),
            || {
                let d = cli.json(&["validate", "outpost-uri", &uri]);
                d["link"]["state"] == "online"
            },
        )
    });
    let _ = agent.kill();
    let _ = agent.wait();
    common::kill_processes_under(&root);
    assert!(linked.is_ok(), "the agent did not link");
}

/// `curl` against the hub's API: `(status, body)`.
fn api(hub: &HubProcess, method: &str, path: &str, body: Option<&Path>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert"])
        .arg(hub.ca_cert())
        .args(["-H", &format!("Authorization: Bearer {}", hub.admin_key())])
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(body) = body {
        cmd.args(["-H", "Content-Type: application/octet-stream"])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()));
    }
    let out = cmd
        .arg(format!("{}/api/v1{path}", hub.endpoint))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn agent_binaries_are_checked_listed_and_served() {
    let agent = agent_binary();
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let arch = std::env::consts::ARCH;

    // Not an executable, empty, a bad version, an unknown architecture.
    let script = tmp.path().join("script.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let (status, body) = api(
        &hub,
        "PUT",
        &format!("/agent-binaries/0.1.0/{arch}"),
        Some(&script),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (422, "not-an-executable"),
        "{body}"
    );
    let empty = tmp.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let (status, body) = api(
        &hub,
        "PUT",
        &format!("/agent-binaries/0.1.0/{arch}"),
        Some(&empty),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (422, "empty-binary"),
        "{body}"
    );
    let (status, body) = api(
        &hub,
        "PUT",
        &format!("/agent-binaries/latest/{arch}"),
        Some(&agent),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "invalid-version"),
        "{body}"
    );
    let (status, body) = api(&hub, "PUT", "/agent-binaries/0.1.0/mips", Some(&agent));
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "unknown-arch"),
        "{body}"
    );

    // An ELF of another machine (the agent with its header's machine
    // rewritten to aarch64, or to x86_64 on an aarch64 host) under this
    // host's architecture.
    let mut foreign = std::fs::read(&agent).unwrap();
    let (other, machine): (&str, u16) = if arch == "aarch64" {
        ("x86_64", 62)
    } else {
        ("aarch64", 183)
    };
    foreign[18..20].copy_from_slice(&machine.to_le_bytes());
    let foreign_path = tmp.path().join("foreign");
    std::fs::write(&foreign_path, &foreign).unwrap();
    let (status, body) = api(
        &hub,
        "PUT",
        &format!("/agent-binaries/0.1.0/{arch}"),
        Some(&foreign_path),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (422, "arch-mismatch"),
        "{body}"
    );
    assert!(
        body.contains(&format!("built for {other}, not {arch}")),
        "{body}"
    );
    // The CLI reads the header before sending anything.
    let out = cli.run(&[
        "upload",
        "agent-binary",
        foreign_path.to_str().unwrap(),
        "--version",
        "0.1.0",
        "--arch",
        arch,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("built for {other}, not {arch}")),
        "{}",
        describe(&out)
    );
    // Nothing was recorded by any of these.
    assert_eq!(cli.json(&["list", "agent-binaries"]), serde_json::json!([]));

    // Uploaded with the CLI (architecture from the header), listed, served.
    let uploaded = cli.json(&[
        "upload",
        "agent-binary",
        agent.to_str().unwrap(),
        "--version",
        "0.1.0",
    ]);
    assert_eq!(uploaded["arch"], arch, "{uploaded}");
    let bytes = std::fs::read(&agent).unwrap();
    assert_eq!(uploaded["size"], bytes.len() as u64);
    assert_eq!(uploaded["blake3"], trellis_cas::Digest::of(&bytes).as_hex());
    // The same binary again is fine; another one under the same version is not.
    let (status, _) = api(
        &hub,
        "PUT",
        &format!("/agent-binaries/0.1.0/{arch}"),
        Some(&agent),
    );
    assert_eq!(status, 200);
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 0xff;
    let changed_path = tmp.path().join("changed");
    std::fs::write(&changed_path, &changed).unwrap();
    let (status, body) = api(
        &hub,
        "PUT",
        &format!("/agent-binaries/0.1.0/{arch}"),
        Some(&changed_path),
    );
    assert_eq!(
        (status, error_code(&body).as_str()),
        (409, "agent-binary-exists"),
        "{body}"
    );
    let listed = cli.json(&["list", "agent-binaries"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["version"], "0.1.0");

    // Downloaded without a key: the same bytes.
    let download = tmp.path().join("download");
    let out = Command::new("curl")
        .args(["-fsS", "--cacert"])
        .arg(hub.ca_cert())
        .arg("-o")
        .arg(&download)
        .arg(format!(
            "{}/api/v1/agent-binaries/0.1.0/{arch}",
            hub.endpoint
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        std::fs::read(&download).unwrap() == bytes,
        "the download differs"
    );

    // The install endpoint names it for this host's `uname -m`, and says
    // why for a machine no agent is built for.
    let which = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(hub.ca_cert())
        .arg(format!("{}/install/agent?machine={arch}", hub.endpoint))
        .output()
        .unwrap();
    let which = String::from_utf8_lossy(&which.stdout).into_owned();
    assert!(which.starts_with(&format!("0.1.0 {arch} ")), "{which}");
    let mips = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(hub.ca_cert())
        .arg(format!("{}/install/agent?machine=mips", hub.endpoint))
        .output()
        .unwrap();
    let mips = String::from_utf8_lossy(&mips.stdout).into_owned();
    assert!(
        mips.contains("not one Trellis agents are built for"),
        "{mips}"
    );

    cli.ok(&["delete", "agent-binary", &format!("0.1.0/{arch}")]);
    assert_eq!(cli.json(&["list", "agent-binaries"]), serde_json::json!([]));
}

#[test]
fn a_bad_token_installs_nothing() {
    agent_binary();
    let tmp = tempfile::tempdir().unwrap();
    let hub = HubProcess::start(&tmp.path().join("hub"));
    let cli = Cli::for_hub(&hub, &hub.admin_key(), &tmp.path().join("config"));
    let created = cli.ok(&["create", "outpost", "plant-9"]);
    let command = install_command(&created);
    let token = command.rsplit(' ').next().unwrap().to_owned();

    let nothing_installed = |root: &Path| {
        assert!(!root.join("prefix/bin/trellis-agent").exists());
        assert!(!root.join("units/trellis-agent.service").exists());
        assert!(!root.join("data").exists());
    };
    let attempt = |root: &Path, bad_token: &str| -> Output {
        std::fs::create_dir_all(root.join("units")).unwrap();
        let line = with_dirs(&command.replace(&token, bad_token), root);
        Command::new("dash").args(["-c", &line]).output().unwrap()
    };

    // Not a token at all: refused before anything is downloaded.
    let root = tmp.path().join("a");
    let out = attempt(&root, "hello");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("that is not a join token"),
        "{}",
        describe(&out)
    );
    nothing_installed(&root);

    // A token that looks right but was cut short.
    let root = tmp.path().join("b");
    let out = attempt(&root, &token[..token.len() - 10]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("join token") && stderr.contains("nothing was installed"),
        "{}",
        describe(&out)
    );
    nothing_installed(&root);

    // A genuine token used once already (here: by a first install).
    let first = tmp.path().join("first");
    let out = attempt(&first, &token);
    assert!(out.status.success(), "{}", describe(&out));
    let root = tmp.path().join("c");
    let out = attempt(&root, &token);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already used") && stderr.contains("nothing was installed"),
        "{}",
        describe(&out)
    );
    nothing_installed(&root);
}

#[test]
fn the_deb_builds_and_installs() {
    let agent = agent_binary();
    let tmp = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/deb/build-deb");
    let out = Command::new(&script)
        .arg(&agent)
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "build-deb: {}", describe(&out));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(deb.ends_with(".deb"), "{deb}");
    let info = ok("dpkg-deb", &["--info", &deb]);
    assert!(info.contains("Package: trellis-agent"), "{info}");
    let contents = ok("dpkg-deb", &["--contents", &deb]);
    assert!(contents.contains("./usr/bin/trellis-agent"), "{contents}");
    assert!(
        contents.contains("./lib/systemd/system/trellis-agent.service"),
        "{contents}"
    );
    // The unit in the package is the one the agent writes.
    let unpacked = tmp.path().join("unpacked");
    ok("dpkg-deb", &["-x", &deb, unpacked.to_str().unwrap()]);
    let unit =
        std::fs::read_to_string(unpacked.join("lib/systemd/system/trellis-agent.service")).unwrap();
    let printed = ok(
        agent.to_str().unwrap(),
        &[
            "unit",
            "--binary",
            "/usr/bin/trellis-agent",
            "--data",
            "/var/lib/trellis-agent",
        ],
    );
    assert_eq!(unit, printed);

    // Installed into this system (CI runs as root) and removed again.
    if !is_root() {
        eprintln!("SKIPPED: installing the package needs root");
        return;
    }
    let installed = run("dpkg", &["-i", &deb]);
    let removed_after = std::panic::catch_unwind(|| {
        assert!(
            installed.status.success(),
            "dpkg -i: {}",
            describe(&installed)
        );
        let version = ok("/usr/bin/trellis-agent", &["--version"]);
        assert!(version.starts_with("trellis-agent "), "{version}");
        let verify = run(
            "systemd-analyze",
            &["verify", "/lib/systemd/system/trellis-agent.service"],
        );
        assert!(verify.status.success(), "{}", describe(&verify));
    });
    let removed = run("dpkg", &["--purge", "trellis-agent"]);
    assert!(removed_after.is_ok(), "the installed package did not work");
    assert!(
        removed.status.success(),
        "dpkg --purge: {}",
        describe(&removed)
    );
    assert!(!Path::new("/usr/bin/trellis-agent").exists());
}

//! Client verbs on the hub's records: create, add, remove, list, get,
//! delete, push release, login, whoami.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, bail};
use trellis_hub::api::types::{
    AddConfigDataRequest, CreateKeyRequest, CreateOutpostRequest, CreateProjectRequest,
    CreateStageRequest, CreateUserRequest, CreatedKey, CreatedOutpost, JoinTokenRequest,
    JoinTokenResponse, PushReleaseRequest, PushReleasesRequest, SetMemberRequest,
    UpdateProjectRequest, UpdateStageRequest, UpdateUserRequest, WhoAmI,
};
use trellis_model::{
    AccessKey, AccessKeyInfo, Build, Config, ConfigData, Member, Outpost, Project, Release, Role,
    Stage, StageType, User,
};

use crate::cli::{
    AddCommand, CreateCommand, DeleteArgs, GetArgs, GlobalArgs, Kind, ListArgs, OutputFormat,
    RemoveCommand, RestoreCommand,
};
use crate::client::{HubClient, seg};
use crate::output::{self, short, time};
use crate::settings::{self, SavedLogin};

fn need<'a>(value: &'a Option<String>, flag: &str, kind: Kind) -> anyhow::Result<&'a str> {
    value
        .as_deref()
        .with_context(|| format!("{} needs {flag}", kind_name(kind)))
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Project => "project",
        Kind::Stage => "stage",
        Kind::Build => "build",
        Kind::Release => "release",
        Kind::Config => "config",
        Kind::Outpost => "outpost",
        Kind::User => "user",
        Kind::Key => "key",
        Kind::Member => "member",
        Kind::OutpostUri => "outpost-uri",
        Kind::Component => "component",
        Kind::Audit => "audit",
        Kind::ConfigData => "config-data",
        Kind::Backup => "backup",
        Kind::Rollout => "rollout",
        Kind::AgentBinary => "agent-binary",
    }
}

/// `path`, asking for secret values when `yes`.
fn with_values(path: &str, yes: bool) -> String {
    if yes {
        format!("{path}?with_values=true")
    } else {
        path.to_owned()
    }
}

/// A config's keys for a table: secret ones marked.
fn keys_of(
    values: &BTreeMap<String, String>,
    secret: &std::collections::BTreeSet<String>,
) -> String {
    let mut keys: Vec<String> = values
        .keys()
        .filter(|k| !secret.contains(*k))
        .cloned()
        .collect();
    keys.extend(secret.iter().map(|k| format!("{k} (secret)")));
    keys.sort();
    keys.join(", ")
}

/// One key of a config, as `list config-data` prints it.
#[derive(serde::Serialize)]
struct ConfigEntry {
    config: String,
    kind: &'static str,
    key: String,
    /// Absent for a secret whose value was not asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    secret: bool,
}

fn config_entries(c: &Config) -> Vec<ConfigEntry> {
    let mut out = Vec::new();
    for (kind, values, secret) in [
        ("env", &c.data.env, &c.data.secret_env),
        ("file", &c.data.files, &c.data.secret_files),
    ] {
        let mut keys: Vec<&String> = values.keys().chain(secret.iter()).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            out.push(ConfigEntry {
                config: c.name.clone(),
                kind,
                key: key.clone(),
                value: values.get(key).cloned(),
                secret: secret.contains(key),
            });
        }
    }
    out
}

pub async fn login(global: &GlobalArgs) -> anyhow::Result<()> {
    let endpoint = global
        .endpoint
        .clone()
        .context("give the hub with --endpoint URL (or TRELLIS_ENDPOINT)")?;
    let key = global
        .key
        .clone()
        .context("give your access key with --key (or TRELLIS_KEY)")?;
    key.parse::<AccessKey>()?;
    let client = HubClient::new(&endpoint, Some(key.clone()), global.ca_cert.as_deref())?;
    let me: WhoAmI = client.get("/whoami", "checking the key").await?;
    // Saved as an absolute path, so later commands work from any directory.
    let ca_cert = global
        .ca_cert
        .as_ref()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()));
    let path = settings::save(&SavedLogin {
        endpoint,
        key,
        ca_cert,
    })?;
    println!(
        "logged in to {} as {}; saved to {}",
        client.endpoint(),
        me.user,
        path.display()
    );
    Ok(())
}

/// `trellis update user NAME --admin true|false`.
pub async fn update_user(
    client: &HubClient,
    name: &str,
    admin: bool,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let user: User = client
        .patch(
            &format!("/users/{}", seg(name)),
            &UpdateUserRequest { admin: Some(admin) },
            "changing the user",
        )
        .await?;
    if output::machine(format, &user)? {
        return Ok(());
    }
    if user.admin {
        println!("{} is an administrator", user.name);
    } else {
        println!("{} is not an administrator", user.name);
    }
    Ok(())
}

/// What `trellis info` prints.
#[derive(serde::Serialize)]
struct Info {
    cli_version: &'static str,
    endpoint: Option<String>,
    hub_version: Option<String>,
    user: Option<String>,
    admin: Option<bool>,
    /// Why the hub or the user is not shown.
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// `trellis info`: this command line, the hub it would talk to and who the
/// key is there. Works without a hub (it says so).
pub async fn info(global: &GlobalArgs) -> anyhow::Result<()> {
    let mut info = Info {
        cli_version: env!("CARGO_PKG_VERSION"),
        endpoint: None,
        hub_version: None,
        user: None,
        admin: None,
        note: None,
    };
    match settings::client(global) {
        Err(e) => info.note = Some(format!("{e:#}")),
        Ok(client) => {
            info.endpoint = Some(client.endpoint().to_owned());
            match client
                .get::<trellis_hub::health::Health>("/health", "asking the hub")
                .await
            {
                Err(e) => info.note = Some(e.to_string()),
                Ok(health) => {
                    info.hub_version = Some(health.version);
                    match client.get::<WhoAmI>("/whoami", "asking who you are").await {
                        Ok(me) => {
                            info.user = Some(me.user);
                            info.admin = Some(me.admin);
                        }
                        Err(e) => info.note = Some(e.to_string()),
                    }
                }
            }
        }
    }
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut fields = vec![
        ("trellis", info.cli_version.to_owned()),
        ("hub", dash(&info.endpoint)),
        ("hub version", dash(&info.hub_version)),
        (
            "user",
            match (&info.user, info.admin) {
                (Some(u), Some(true)) => format!("{u} (administrator)"),
                (Some(u), _) => u.clone(),
                _ => "-".into(),
            },
        ),
    ];
    if let Some(note) = &info.note {
        fields.push(("note", note.replace('\n', " ")));
    }
    output::one(global.output, &info, &fields)
}

pub async fn whoami(client: &HubClient, format: OutputFormat) -> anyhow::Result<()> {
    let me: WhoAmI = client.get("/whoami", "asking who you are").await?;
    output::one(
        format,
        &me,
        &[("user", me.user.clone()), ("admin", me.admin.to_string())],
    )
}

fn parse_pairs(items: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .with_context(|| format!("{what} {item:?} has no '='; write it as KEY=VALUE"))?;
        map.insert(k.to_owned(), v.to_owned());
    }
    Ok(map)
}

pub async fn create(client: &HubClient, command: CreateCommand) -> anyhow::Result<()> {
    match command {
        CreateCommand::Rollout { .. } => {
            unreachable!("`create rollout` is dispatched by commands::run, with its output format")
        }
        CreateCommand::Backup {
            project,
            stage,
            display_name,
            wait,
        } => {
            super::backups::create(client, &project, &stage, display_name, wait).await?;
        }
        CreateCommand::Project {
            name,
            description,
            display_name,
        } => {
            let p: Project = client
                .post(
                    "/projects",
                    &CreateProjectRequest {
                        name,
                        description,
                        display_name,
                    },
                    "creating the project",
                )
                .await?;
            println!("created project {}", p.name);
        }
        CreateCommand::Stage {
            name,
            project,
            stage_type,
            display_name,
            outpost_uri,
        } => {
            let stage_type: StageType = stage_type.parse().map_err(anyhow::Error::msg)?;
            let s: Stage = client
                .post(
                    &format!("/projects/{}/stages", seg(&project)),
                    &CreateStageRequest {
                        name,
                        stage_type,
                        display_name,
                        outpost_uri,
                    },
                    "creating the stage",
                )
                .await?;
            if s.outpost == trellis_model::LOCAL_OUTPOST {
                println!(
                    "created stage {} ({}) in project {}",
                    s.name, s.stage_type, s.project
                );
            } else {
                println!(
                    "created stage {} ({}) in project {} on outpost {}; its link is set up in the \
                     background, and releases can be pushed to it now",
                    s.name, s.stage_type, s.project, s.outpost
                );
            }
        }
        CreateCommand::Outpost {
            name,
            display_name,
            description,
            labels,
            max_stages,
            ingress_domain,
            token_ttl_secs,
        } => {
            let labels = parse_pairs(&labels, "label")?;
            let created: CreatedOutpost = client
                .post(
                    "/outposts",
                    &CreateOutpostRequest {
                        name,
                        display_name,
                        description,
                        labels,
                        max_stages,
                        ingress_domain,
                        token_ttl_secs,
                    },
                    "registering the outpost",
                )
                .await?;
            println!("registered outpost {}", created.outpost.name);
            super::outposts::print_join(&created.join);
        }
        CreateCommand::JoinToken {
            outpost,
            token_ttl_secs,
        } => {
            let join: JoinTokenResponse = client
                .post(
                    &format!("/outposts/{}/join-tokens", seg(&outpost)),
                    &JoinTokenRequest {
                        ttl_secs: token_ttl_secs,
                    },
                    "creating a join token",
                )
                .await?;
            super::outposts::print_join(&join);
        }
        CreateCommand::User { name, admin } => {
            let k: CreatedKey = client
                .post(
                    "/users",
                    &CreateUserRequest { name, admin },
                    "creating the user",
                )
                .await?;
            print_key(&k);
        }
        CreateCommand::Key { user, description } => {
            let user = match user {
                Some(u) => u,
                None => {
                    client
                        .get::<WhoAmI>("/whoami", "asking who you are")
                        .await?
                        .user
                }
            };
            let k: CreatedKey = client
                .post(
                    &format!("/users/{}/keys", seg(&user)),
                    &CreateKeyRequest { description },
                    "creating the key",
                )
                .await?;
            print_key(&k);
        }
    }
    Ok(())
}

fn print_key(k: &CreatedKey) {
    println!(
        "access key for {} (shown only now; keep it secret):",
        k.user
    );
    println!("{}", k.key);
}

/// `trellis push release`: the releases it recorded.
pub async fn push_release(
    client: &HubClient,
    project: &str,
    stages: &[String],
    build: Option<String>,
    config: Option<String>,
) -> anyhow::Result<Vec<Release>> {
    let stage = match stages {
        [stage] => stage,
        _ => return push_releases(client, project, stages, build, config).await,
    };
    let r: Release = client
        .post(
            &format!("/projects/{}/stages/{}/releases", seg(project), seg(stage)),
            &PushReleaseRequest { build, config },
            "pushing the release",
        )
        .await?;
    println!(
        "pushed release {} of stage {} (build {}{}), desired revision {}",
        r.number,
        r.stage,
        r.build,
        r.config
            .as_ref()
            .map(|c| format!(", config {} v{}", c.name, c.version))
            .unwrap_or_default(),
        r.revision
    );
    Ok(vec![r])
}

/// One build to every stage whose outpost the selector matches, in one
/// request: all or none.
pub async fn push_selected(
    client: &HubClient,
    project: &str,
    selector: &str,
    build: Option<String>,
    config: Option<String>,
) -> anyhow::Result<Vec<Release>> {
    if let Some(config) = config {
        anyhow::bail!(
            "--config {config} names a config of one stage; with -l, use `trellis create rollout -c {config}`, which takes each stage's config of that name"
        );
    }
    let releases: Vec<Release> = client
        .post(
            &format!("/projects/{}/releases", seg(project)),
            &PushReleasesRequest {
                stages: Vec::new(),
                build,
                selector: Some(selector.to_owned()),
            },
            "pushing the releases",
        )
        .await?;
    for r in &releases {
        println!(
            "pushed release {} of stage {} (build {}), desired revision {}",
            r.number, r.stage, r.build, r.revision
        );
    }
    Ok(releases)
}

/// One build to several stages, in one request: all or none.
async fn push_releases(
    client: &HubClient,
    project: &str,
    stages: &[String],
    build: Option<String>,
    config: Option<String>,
) -> anyhow::Result<Vec<Release>> {
    if let Some(config) = config {
        anyhow::bail!(
            "--config {config} names a config of one stage; push to each stage on its own to release it with a config"
        );
    }
    let releases: Vec<Release> = client
        .post(
            &format!("/projects/{}/releases", seg(project)),
            &PushReleasesRequest {
                stages: stages.to_vec(),
                build,
                selector: None,
            },
            "pushing the releases",
        )
        .await?;
    for r in &releases {
        println!(
            "pushed release {} of stage {} (build {}), desired revision {}",
            r.number, r.stage, r.build, r.revision
        );
    }
    Ok(releases)
}

pub async fn add(client: &HubClient, command: AddCommand) -> anyhow::Result<()> {
    match command {
        AddCommand::ConfigData {
            config,
            project,
            stage,
            env,
            files,
            secret_env,
            secret_files,
            secret,
        } => {
            let mut data = ConfigData {
                env: parse_pairs(&env, "env value")?,
                files: read_files(&files)?,
                ..ConfigData::default()
            };
            for item in &secret_env {
                let (key, value) = match item.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => {
                        let value = std::env::var(item).with_context(|| {
                            format!(
                                "--secret-env {item}: the environment variable {item} is not set; \
                                 set it, or write --secret-env {item}=VALUE"
                            )
                        })?;
                        (item.clone(), value)
                    }
                };
                data.secret_env.insert(key.clone());
                data.env.insert(key, value);
            }
            for (name, content) in read_files(&secret_files)? {
                data.secret_files.insert(name.clone());
                data.files.insert(name, content);
            }
            let path = config_path(&project, &stage, &config);
            if !secret.is_empty() {
                mark_secret(client, &path, &config, &secret, &mut data).await?;
            }
            if data.env.is_empty() && data.files.is_empty() && secret.is_empty() {
                bail!(
                    "nothing to add: give --env KEY=VALUE, --file PATH, --secret-env KEY=VALUE, \
                     --secret-file PATH and/or --secret KEY"
                );
            }
            let c: Config = client
                .post(
                    &format!("{path}/data"),
                    &AddConfigDataRequest { data },
                    "adding config data",
                )
                .await?;
            println!(
                "config {} of stage {} is now version {} ({} env values, {} files; {} secret)",
                c.name,
                c.stage,
                c.version,
                c.data.env.len() + c.data.secret_env.len(),
                c.data.files.len() + c.data.secret_files.len(),
                c.data.secret_env.len() + c.data.secret_files.len()
            );
        }
        AddCommand::Member {
            user,
            project,
            role,
        } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let m: Member = client
                .put(
                    &format!("/projects/{}/members/{}", seg(&project), seg(&user)),
                    &SetMemberRequest { role },
                    "adding the member",
                )
                .await?;
            println!("{} is now {} of project {}", m.user, m.role, m.project);
        }
    }
    Ok(())
}

/// `--file`/`--secret-file` arguments: a path (the file's name is its
/// key) or `NAME=PATH`, read as UTF-8 text.
fn read_files(specs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut files = BTreeMap::new();
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) => (n.to_owned(), p.to_owned()),
            None => {
                let name = Path::new(spec)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| format!("{spec:?} names no file"))?
                    .to_owned();
                (name, spec.clone())
            }
        };
        let content = std::fs::read_to_string(&path).with_context(|| {
            format!("reading config file {path} (config files must be UTF-8 text)")
        })?;
        files.insert(name, content);
    }
    Ok(files)
}

fn config_path(project: &str, stage: &str, config: &str) -> String {
    format!(
        "/projects/{}/stages/{}/configs/{}",
        seg(project),
        seg(stage),
        seg(config)
    )
}

/// `--secret KEY`: marks keys the config holds, as env values or files.
async fn mark_secret(
    client: &HubClient,
    path: &str,
    config: &str,
    keys: &[String],
    data: &mut ConfigData,
) -> anyhow::Result<()> {
    let existing: Config = client.get(path, "reading the config").await?;
    for key in keys {
        let d = &existing.data;
        if d.env.contains_key(key) || d.secret_env.contains(key) || data.env.contains_key(key) {
            data.secret_env.insert(key.clone());
        } else if d.files.contains_key(key)
            || d.secret_files.contains(key)
            || data.files.contains_key(key)
        {
            data.secret_files.insert(key.clone());
        } else {
            bail!(
                "config {config} has no env value or file {key:?} to mark secret; give its value \
                 with --secret-env {key}=VALUE or --secret-file PATH"
            );
        }
    }
    Ok(())
}

pub async fn remove(client: &HubClient, command: RemoveCommand) -> anyhow::Result<()> {
    match command {
        RemoveCommand::ConfigData {
            config,
            project,
            stage,
            keys,
            access_key: _,
        } => {
            let path = config_path(&project, &stage, &config);
            let mut last: Option<Config> = None;
            for key in &keys {
                last = Some(
                    client
                        .delete_json(
                            &format!("{path}/keys/{}", seg(key)),
                            &format!("removing {key:?} from config {config}"),
                        )
                        .await?,
                );
            }
            if let Some(c) = last {
                println!(
                    "removed {} from config {} of stage {}; it is now version {}",
                    keys.join(", "),
                    c.name,
                    c.stage,
                    c.version
                );
            }
        }
        RemoveCommand::Member { user, project } => {
            client
                .delete(
                    &format!("/projects/{}/members/{}", seg(&project), seg(&user)),
                    "removing the member",
                )
                .await?;
            println!("removed {user} from project {project}");
        }
    }
    Ok(())
}

pub async fn list(client: &HubClient, args: ListArgs, format: OutputFormat) -> anyhow::Result<()> {
    let kind = args.kind;
    match kind {
        Kind::Backup => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            super::backups::list(client, project, stage, format).await
        }
        Kind::Rollout => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            super::rollouts::list(client, project, format).await
        }
        Kind::AgentBinary => super::agent_binaries::list(client, format).await,
        Kind::Project if args.archived => {
            let items: Vec<Project> = client
                .get("/projects?archived=true", "listing archived projects")
                .await?;
            output::list(
                format,
                &items,
                &["name", "display name", "description", "deleted"],
                |p| {
                    vec![
                        p.name.clone(),
                        p.display_name.clone(),
                        p.description.clone(),
                        p.archived_at.as_ref().map(time).unwrap_or_default(),
                    ]
                },
            )
        }
        Kind::Project => {
            let items: Vec<Project> = client.get("/projects", "listing projects").await?;
            output::list(
                format,
                &items,
                &["name", "display name", "description", "created"],
                |p| {
                    vec![
                        p.name.clone(),
                        p.display_name.clone(),
                        p.description.clone(),
                        time(&p.created_at),
                    ]
                },
            )
        }
        Kind::Stage => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let mut query = Vec::new();
            if args.archived {
                query.push("archived=true".to_owned());
            }
            if let Some(selector) = &args.selector {
                query.push(format!("selector={}", seg(selector)));
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            let items: Vec<Stage> = client
                .get(
                    &format!("/projects/{}/stages{query}", seg(project)),
                    "listing stages",
                )
                .await?;
            output::list(
                format,
                &items,
                &[
                    "name",
                    "type",
                    "display name",
                    "outpost",
                    "release",
                    "revision",
                    "suspended",
                ],
                |s| {
                    vec![
                        s.name.clone(),
                        s.stage_type.to_string(),
                        s.display_name.clone(),
                        s.outpost.clone(),
                        s.latest_release
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                        s.desired_revision.to_string(),
                        if s.suspended {
                            "yes".into()
                        } else {
                            "no".into()
                        },
                    ]
                },
            )
        }
        Kind::Build => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let items: Vec<Build> = client
                .get(
                    &format!("/projects/{}/builds", seg(project)),
                    "listing builds",
                )
                .await?;
            output::list(
                format,
                &items,
                &["name", "branch", "commit", "components", "created", "by"],
                |b| {
                    vec![
                        b.name.clone(),
                        b.branch.clone(),
                        short(&b.commit),
                        b.components
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                        time(&b.created_at),
                        b.created_by.clone(),
                    ]
                },
            )
        }
        Kind::Release => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            let items: Vec<Release> = client
                .get(
                    &format!("/projects/{}/stages/{}/releases", seg(project), seg(stage)),
                    "listing releases",
                )
                .await?;
            output::list(
                format,
                &items,
                &[
                    "number", "build", "config", "revision", "state", "created", "by",
                ],
                |r| {
                    vec![
                        r.number.to_string(),
                        r.build.clone(),
                        r.config
                            .as_ref()
                            .map(|c| format!("{} v{}", c.name, c.version))
                            .unwrap_or_else(|| "-".into()),
                        r.revision.to_string(),
                        r.state.as_str().into(),
                        time(&r.created_at),
                        r.created_by.clone(),
                    ]
                },
            )
        }
        Kind::Config => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let path = match &args.stage {
                Some(stage) => format!("/projects/{}/stages/{}/configs", seg(project), seg(stage)),
                None => format!("/projects/{}/configs", seg(project)),
            };
            let items: Vec<Config> = client
                .get(&with_values(&path, args.with_values), "listing configs")
                .await?;
            output::list(
                format,
                &items,
                &["name", "stage", "version", "env", "files", "updated"],
                |c| {
                    vec![
                        c.name.clone(),
                        c.stage.clone(),
                        c.version.to_string(),
                        keys_of(&c.data.env, &c.data.secret_env),
                        keys_of(&c.data.files, &c.data.secret_files),
                        time(&c.updated_at),
                    ]
                },
            )
        }
        Kind::ConfigData => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            let path = format!("/projects/{}/stages/{}/configs", seg(project), seg(stage));
            let configs: Vec<Config> = client
                .get(&with_values(&path, args.with_values), "listing config data")
                .await?;
            let entries: Vec<ConfigEntry> = configs
                .iter()
                .filter(|c| args.config.as_ref().is_none_or(|name| &c.name == name))
                .flat_map(config_entries)
                .collect();
            if let Some(name) = &args.config
                && !configs.iter().any(|c| &c.name == name)
            {
                bail!(
                    "stage {stage} has no config {name:?}; `trellis list config -p {project} -s \
                     {stage}` shows its configs"
                );
            }
            output::list(
                format,
                &entries,
                &["config", "kind", "key", "value", "secret"],
                |e| {
                    vec![
                        e.config.clone(),
                        e.kind.into(),
                        e.key.clone(),
                        match (&e.value, e.kind) {
                            (None, _) => "(secret; --with-values shows it)".into(),
                            (Some(v), "file") if !args.with_values => {
                                format!("({} bytes)", v.len())
                            }
                            (Some(v), _) => v.clone(),
                        },
                        if e.secret { "yes".into() } else { "no".into() },
                    ]
                },
            )
        }
        Kind::Outpost => {
            let mut items: Vec<Outpost> = client.get("/outposts", "listing outposts").await?;
            if let Some(text) = &args.selector {
                let selector = trellis_model::Selector::parse(text)?;
                items.retain(|o| selector.matches(&o.labels));
            }
            // Each agent's version and its latest update, for the table.
            let agents: std::collections::HashMap<String, (String, String)> =
                if matches!(format, OutputFormat::Table) {
                    let agents: Vec<trellis_hub::api::agent_updates::OutpostAgent> = client
                        .get("/agent-updates", "listing the outposts' agents")
                        .await?;
                    agents
                        .into_iter()
                        .map(|a| {
                            let update = a.update.map_or_else(|| "-".to_owned(), |u| u.summary());
                            (a.outpost, (a.version.unwrap_or_else(|| "-".into()), update))
                        })
                        .collect()
                } else {
                    Default::default()
                };
            let none = ("-".to_owned(), "-".to_owned());
            output::list(
                format,
                &items,
                &[
                    "name",
                    "display name",
                    "labels",
                    "max stages",
                    "agent",
                    "agent update",
                    "description",
                ],
                |o| {
                    let (version, update) = agents.get(&o.name).unwrap_or(&none);
                    vec![
                        o.name.clone(),
                        o.display_name.clone(),
                        o.labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        o.max_stages
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                        version.clone(),
                        update.clone(),
                        o.description.clone(),
                    ]
                },
            )
        }
        Kind::User => {
            let items: Vec<User> = client.get("/users", "listing users").await?;
            output::list(format, &items, &["name", "admin", "created"], |u| {
                vec![u.name.clone(), u.admin.to_string(), time(&u.created_at)]
            })
        }
        Kind::Key => {
            let path = match &args.user {
                Some(u) => format!("/keys?user={}", seg(u)),
                None => "/keys".into(),
            };
            let items: Vec<AccessKeyInfo> = client.get(&path, "listing keys").await?;
            output::list(
                format,
                &items,
                &["key id", "user", "description", "created"],
                |k| {
                    vec![
                        k.id.clone(),
                        k.user.clone(),
                        k.description.clone(),
                        time(&k.created_at),
                    ]
                },
            )
        }
        Kind::OutpostUri => bail!("use `trellis get outpost-uri NAME` for one outpost's URI"),
        Kind::Component => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            super::lifecycle::list_components(client, project, stage, format).await
        }
        Kind::Audit => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let items: Vec<trellis_model::AuditEntry> = client
                .get(
                    &format!("/projects/{}/audit", seg(project)),
                    "reading the audit log",
                )
                .await?;
            output::list(
                format,
                &items,
                &[
                    "time",
                    "user",
                    "stage",
                    "component",
                    "action",
                    "detail",
                    "result",
                ],
                |e| {
                    vec![
                        e.time.format("%Y-%m-%d %H:%M:%S").to_string(),
                        e.user.clone(),
                        e.stage.clone(),
                        e.component.clone(),
                        e.action.clone(),
                        e.detail.clone(),
                        e.result.clone(),
                    ]
                },
            )
        }
        Kind::Member => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let items: Vec<Member> = client
                .get(
                    &format!("/projects/{}/members", seg(project)),
                    "listing members",
                )
                .await?;
            output::list(format, &items, &["user", "role"], |m| {
                vec![m.user.clone(), m.role.to_string()]
            })
        }
    }
}

pub async fn get(client: &HubClient, args: GetArgs, format: OutputFormat) -> anyhow::Result<()> {
    let kind = args.kind;
    let name = &args.name;
    match kind {
        Kind::Backup => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            super::backups::show(client, project, stage, name, format).await
        }
        Kind::AgentBinary => {
            anyhow::bail!("agent binaries are shown by `trellis list agent-binaries`")
        }
        Kind::Rollout => {
            let id: u64 = name
                .parse()
                .with_context(|| format!("{name:?} is not a rollout's number"))?;
            super::rollouts::status(client, id, format).await
        }
        Kind::Project => {
            let p: Project = client
                .get(&format!("/projects/{}", seg(name)), "getting the project")
                .await?;
            output::one(
                format,
                &p,
                &[
                    ("name", p.name.clone()),
                    ("display name", p.display_name.clone()),
                    ("description", p.description.clone()),
                    ("created", time(&p.created_at)),
                    (
                        "deleted",
                        p.archived_at
                            .as_ref()
                            .map(|t| format!("{} (archived)", time(t)))
                            .unwrap_or_else(|| "-".into()),
                    ),
                ],
            )
        }
        Kind::Stage => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let s: Stage = client
                .get(
                    &format!("/projects/{}/stages/{}", seg(project), seg(name)),
                    "getting the stage",
                )
                .await?;
            output::one(
                format,
                &s,
                &[
                    ("name", s.name.clone()),
                    ("project", s.project.clone()),
                    ("type", s.stage_type.to_string()),
                    ("display name", s.display_name.clone()),
                    ("outpost", s.outpost.clone()),
                    (
                        "latest release",
                        s.latest_release
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "-".into()),
                    ),
                    ("desired revision", s.desired_revision.to_string()),
                    ("suspended", s.suspended.to_string()),
                    ("created", time(&s.created_at)),
                    (
                        "deleted",
                        s.archived_at
                            .as_ref()
                            .map(|t| format!("{} (archived)", time(t)))
                            .unwrap_or_else(|| "-".into()),
                    ),
                ],
            )
        }
        Kind::Build => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let b: Build = client
                .get(
                    &format!("/projects/{}/builds/{}", seg(project), seg(name)),
                    "getting the build",
                )
                .await?;
            let mut fields = vec![
                ("name", b.name.clone()),
                ("branch", b.branch.clone()),
                ("commit", b.commit.clone()),
                ("manifest", b.manifest_file.clone()),
                (
                    "created",
                    format!("{} by {}", time(&b.created_at), b.created_by),
                ),
            ];
            for c in &b.components {
                let what = match &c.artifact {
                    trellis_model::Artifact::Image {
                        reference,
                        archive: Some(archive),
                        ..
                    } => format!(
                        "image {reference} (stored, {})",
                        crate::output::bytes(archive.size)
                    ),
                    trellis_model::Artifact::Image {
                        reference,
                        platforms,
                        ..
                    } if !platforms.is_empty() => {
                        let each: Vec<String> = platforms
                            .iter()
                            .map(|p| match &p.archive {
                                Some(a) => {
                                    format!("{} (stored, {})", p.arch, crate::output::bytes(a.size))
                                }
                                None => p.arch.to_string(),
                            })
                            .collect();
                        format!("image {reference} for {}", each.join(", "))
                    }
                    trellis_model::Artifact::Image { reference, .. } => {
                        format!("image {reference}")
                    }
                    trellis_model::Artifact::Package { digest, size } => {
                        format!("package {} ({size} bytes)", short(digest))
                    }
                };
                fields.push(("component", format!("{}: {what}", c.name)));
            }
            output::one(format, &b, &fields)
        }
        Kind::Release => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            let number: u64 = name
                .parse()
                .with_context(|| format!("{name:?} is not a release number"))?;
            let r: Release = client
                .get(
                    &format!(
                        "/projects/{}/stages/{}/releases/{number}",
                        seg(project),
                        seg(stage)
                    ),
                    "getting the release",
                )
                .await?;
            output::one(
                format,
                &r,
                &[
                    ("number", r.number.to_string()),
                    ("stage", r.stage.clone()),
                    ("build", r.build.clone()),
                    (
                        "config",
                        r.config
                            .as_ref()
                            .map(|c| format!("{} v{}", c.name, c.version))
                            .unwrap_or_else(|| "-".into()),
                    ),
                    ("revision", r.revision.to_string()),
                    ("state", r.state.as_str().into()),
                    (
                        "created",
                        format!("{} by {}", time(&r.created_at), r.created_by),
                    ),
                ],
            )
        }
        Kind::Config => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            let c: Config = client
                .get(
                    &with_values(&config_path(project, stage, name), args.with_values),
                    "getting the config",
                )
                .await?;
            let mut fields = vec![
                ("name", c.name.clone()),
                ("stage", c.stage.clone()),
                ("version", c.version.to_string()),
            ];
            for e in config_entries(&c) {
                let shown = match (&e.value, e.kind) {
                    (None, _) => "(secret)".to_owned(),
                    (Some(v), "file") => format!("({} bytes)", v.len()),
                    (Some(v), _) => v.clone(),
                };
                let secret = if e.secret && e.value.is_some() {
                    " (secret)"
                } else {
                    ""
                };
                let label = if e.kind == "env" { "env" } else { "file" };
                fields.push((label, format!("{}={shown}{secret}", e.key)));
            }
            output::one(format, &c, &fields)
        }
        Kind::Outpost => {
            let o: Outpost = client
                .get(&format!("/outposts/{}", seg(name)), "getting the outpost")
                .await?;
            let profile: trellis_hub::api::types::LinkProfileView = client
                .get(
                    &format!("/outposts/{}/link-profile", seg(name)),
                    "getting the outpost's link profile",
                )
                .await?;
            // The record with its profile, as one document.
            let mut value = serde_json::to_value(&o)?;
            value["link_profile"] = serde_json::to_value(&profile)?;
            let mut lines = vec![
                ("name", o.name.clone()),
                ("display name", o.display_name.clone()),
                ("description", o.description.clone()),
                (
                    "labels",
                    o.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                (
                    "max stages",
                    o.max_stages
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "no limit".into()),
                ),
            ];
            lines.extend(super::outposts::link_profile_lines(&profile));
            output::one(format, &value, &lines)
        }
        Kind::OutpostUri => super::outposts::get_uri(client, name).await,
        Kind::User
        | Kind::Key
        | Kind::Member
        | Kind::Component
        | Kind::ConfigData
        | Kind::Audit => {
            bail!(
                "`trellis get {}` is not available; use `trellis list {}`",
                kind_name(kind),
                kind_name(kind)
            )
        }
    }
}

pub async fn delete(client: &HubClient, args: DeleteArgs) -> anyhow::Result<()> {
    let kind = args.kind;
    let name = &args.name;
    let force = if args.force { "?force=true" } else { "" };
    let archives = matches!(kind, Kind::Project | Kind::Stage) && !(args.purge || args.force);
    if args.purge && !matches!(kind, Kind::Project | Kind::Stage) {
        bail!(
            "--purge is for projects and stages, which are otherwise archived; a {} is deleted \
             for good anyway",
            kind_name(kind)
        );
    }
    let purge = if args.purge || args.force {
        "?purge=true"
    } else {
        ""
    };
    let path = match kind {
        Kind::Backup => {
            let project = need(&args.project, "-p PROJECT", kind)?;
            let stage = need(&args.stage, "-s STAGE", kind)?;
            return super::backups::delete(client, project, stage, name).await;
        }
        Kind::AgentBinary => {
            return super::agent_binaries::delete(client, name).await;
        }
        Kind::Rollout => anyhow::bail!(
            "rollouts are kept as history and not deleted; stop one with `trellis abort rollout {name}`"
        ),
        Kind::Project => format!("/projects/{}{purge}", seg(name)),
        Kind::Stage => format!(
            "/projects/{}/stages/{}{purge}",
            seg(need(&args.project, "-p PROJECT", kind)?),
            seg(name)
        ),
        Kind::Build => format!(
            "/projects/{}/builds/{}",
            seg(need(&args.project, "-p PROJECT", kind)?),
            seg(name)
        ),
        Kind::Config => format!(
            "/projects/{}/stages/{}/configs/{}",
            seg(need(&args.project, "-p PROJECT", kind)?),
            seg(need(&args.stage, "-s STAGE", kind)?),
            seg(name)
        ),
        Kind::Outpost => format!("/outposts/{}{force}", seg(name)),
        Kind::Key => format!("/keys/{}", seg(name)),
        Kind::ConfigData => bail!(
            "config data is removed key by key: `trellis remove config-data CONFIG -p PROJECT -s \
             STAGE --key KEY`; `trellis delete config` deletes a whole config"
        ),
        Kind::Release
        | Kind::User
        | Kind::Member
        | Kind::OutpostUri
        | Kind::Component
        | Kind::Audit => bail!(
            "{}s cannot be deleted{}",
            kind_name(kind),
            match kind {
                Kind::Release => ": releases are the stage's history",
                Kind::Component => {
                    "; they come with the release (use `trellis stop component` to stop one)"
                }
                Kind::Member => "; use `trellis remove member`",
                Kind::Audit => ": the audit log is kept with its project",
                Kind::OutpostUri =>
                    "; use `trellis rotate outpost-uri` or `trellis revoke outpost`",
                _ => "",
            }
        ),
    };
    client
        .delete(&path, &format!("deleting the {}", kind_name(kind)))
        .await?;
    if archives {
        let restore = match kind {
            Kind::Project => format!("trellis restore project {name}"),
            _ => format!(
                "trellis restore stage {name} -p {}",
                args.project.as_deref().unwrap_or("PROJECT")
            ),
        };
        println!(
            "deleted {} {name}: it is archived, with its releases and configs (and its \
             outpost keeps its volumes) until the hub's retention period ends; `{restore}` \
             brings it back, `--purge` deletes it for good",
            kind_name(kind)
        );
    } else {
        println!("deleted {} {name}", kind_name(kind));
    }
    Ok(())
}

/// `trellis restore project|stage|backup`.
pub async fn restore(client: &HubClient, command: RestoreCommand) -> anyhow::Result<()> {
    match command {
        RestoreCommand::Backup {
            id,
            project,
            stage,
            no_wait,
        } => {
            super::backups::restore(client, &project, &stage, id, !no_wait).await?;
        }
        RestoreCommand::Project { name } => {
            let p: Project = client
                .post(
                    &format!("/projects/{}/restore", seg(&name)),
                    &serde_json::json!({}),
                    "restoring the project",
                )
                .await?;
            println!(
                "restored project {} with the stages deleted with it",
                p.name
            );
        }
        RestoreCommand::Stage { name, project } => {
            let s: Stage = client
                .post(
                    &format!("/projects/{}/stages/{}/restore", seg(&project), seg(&name)),
                    &serde_json::json!({}),
                    "restoring the stage",
                )
                .await?;
            println!(
                "restored stage {} of project {}; desired revision {}, its outpost runs its \
                 release again",
                s.name, s.project, s.desired_revision
            );
        }
    }
    Ok(())
}

/// `trellis update project`.
pub async fn update_project(
    client: &HubClient,
    name: &str,
    update: &UpdateProjectRequest,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let p: Project = client
        .patch(
            &format!("/projects/{}", seg(name)),
            update,
            "changing the project",
        )
        .await?;
    if output::machine(format, &p)? {
        return Ok(());
    }
    println!(
        "project {} is now displayed as {:?}: {}",
        p.name, p.display_name, p.description
    );
    Ok(())
}

/// `trellis update stage`.
pub async fn update_stage(
    client: &HubClient,
    project: &str,
    name: &str,
    display_name: Option<String>,
    stage_type: Option<String>,
    format: OutputFormat,
) -> anyhow::Result<()> {
    let stage_type = stage_type
        .map(|t| t.parse::<StageType>().map_err(anyhow::Error::msg))
        .transpose()?;
    if display_name.is_none() && stage_type.is_none() {
        bail!("nothing to change: give --display-name and/or --type");
    }
    let s: Stage = client
        .patch(
            &format!("/projects/{}/stages/{}", seg(project), seg(name)),
            &UpdateStageRequest {
                display_name,
                stage_type,
                suspended: None,
            },
            "changing the stage",
        )
        .await?;
    if output::machine(format, &s)? {
        return Ok(());
    }
    println!(
        "stage {} of project {} is now {:?} ({})",
        s.name, s.project, s.display_name, s.stage_type
    );
    Ok(())
}

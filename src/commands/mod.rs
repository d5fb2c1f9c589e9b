//! One module per group of commands; `run` dispatches.

mod agent_binaries;
mod backups;
mod build;
mod dev;
mod hub;
mod lifecycle;
mod outposts;
mod ready;
mod resources;
mod rollouts;
mod streams;

use crate::cli::{
    Cli, Client, Command, HubAction, HubCommand, PushCommand, RevokeCommand, RotateCommand,
    StatusCommand, UpdateCommand, UploadCommand, ValidateCommand,
};
use crate::settings;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Hub(hub) => match *hub {
            HubCommand { action: None, run } => hub::hub(run).await,
            HubCommand {
                action: Some(HubAction::ResetAdminKey(args)),
                ..
            } => hub::reset_admin_key(args).await,
            HubCommand {
                action: Some(HubAction::Migrate { from, to }),
                ..
            } => hub::migrate(&from, &to).await,
        },
        Command::Dev(args) => dev::dev(args).await,
        Command::Agent(command) => trellis_agent::cli::execute(command, "trellis agent").await,
        Command::Validate(Client {
            command: ValidateCommand::Manifest { path },
            ..
        }) => build::validate_manifest(&path),
        Command::Validate(Client {
            global,
            command: ValidateCommand::OutpostUri { uri, project },
        }) => outposts::validate(&settings::client(&global)?, &uri, project, global.output).await,
        Command::Rotate(Client {
            global,
            command: RotateCommand::OutpostUri { outpost },
        }) => outposts::rotate(&settings::client(&global)?, &outpost).await,
        Command::Status(Client {
            global,
            command:
                StatusCommand::Stage {
                    name: Some(name),
                    project,
                    ..
                },
        }) => {
            outposts::stage_status(&settings::client(&global)?, &project, &name, global.output)
                .await
        }
        Command::Status(Client {
            global,
            command:
                StatusCommand::Stage {
                    name: None,
                    project,
                    selector,
                },
        }) => {
            rollouts::project_status(
                &settings::client(&global)?,
                &project,
                selector.as_deref(),
                global.output,
            )
            .await
        }
        Command::Status(Client {
            global,
            command: StatusCommand::Rollout { id },
        }) => rollouts::status(&settings::client(&global)?, id, global.output).await,
        Command::Pause(Client {
            global,
            command: crate::cli::RolloutTarget::Rollout { id },
        }) => {
            rollouts::act(
                &settings::client(&global)?,
                id,
                "pause",
                false,
                global.output,
            )
            .await
        }
        Command::Abort(Client {
            global,
            command: crate::cli::AbortCommand::Rollout { id, rollback },
        }) => {
            rollouts::act(
                &settings::client(&global)?,
                id,
                "abort",
                rollback,
                global.output,
            )
            .await
        }
        Command::Update(Client { global, command }) => {
            let client = settings::client(&global)?;
            match command {
                UpdateCommand::Outpost {
                    name,
                    display_name,
                    description,
                    ingress_domain,
                    selector,
                    agent_version: Some(version),
                    deadline,
                    waves,
                    success_threshold,
                    wave_timeout,
                    heartbeat: _,
                    bandwidth: _,
                    windows: _,
                    timezone: _,
                } => {
                    let _ = (display_name, description, ingress_domain);
                    let request = trellis_hub::api::agent_updates::CreateAgentUpdatesRequest {
                        outposts: name.map(|n| vec![n]),
                        selector,
                        version,
                        deadline_secs: deadline
                            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
                        waves,
                        success_threshold,
                        wave_timeout_seconds: wave_timeout.map(|d| d.as_secs()),
                    };
                    outposts::update_agents(&client, &request, global.output).await
                }
                UpdateCommand::Outpost {
                    name,
                    display_name,
                    description,
                    ingress_domain,
                    heartbeat,
                    bandwidth,
                    windows,
                    timezone,
                    ..
                } => {
                    let Some(name) = name else {
                        anyhow::bail!(
                            "name the outpost to change (-l SELECTOR goes with --agent-version)"
                        );
                    };
                    let update = trellis_hub::api::types::UpdateOutpostRequest {
                        display_name,
                        description,
                        ingress_domain,
                    };
                    let profile = trellis_hub::api::types::LinkProfileRequest {
                        heartbeat,
                        bandwidth,
                        windows,
                        timezone,
                    };
                    outposts::update(&client, &name, &update, &profile, global.output).await
                }
                UpdateCommand::User { name, admin } => {
                    resources::update_user(&client, &name, admin, global.output).await
                }
                UpdateCommand::Project {
                    name,
                    display_name,
                    description,
                } => {
                    let update = trellis_hub::api::types::UpdateProjectRequest {
                        display_name,
                        description,
                    };
                    resources::update_project(&client, &name, &update, global.output).await
                }
                UpdateCommand::Stage {
                    name,
                    project,
                    display_name,
                    stage_type,
                    backup_schedule,
                    backup_keep,
                    no_backup_schedule,
                } => {
                    let scheduling = backup_schedule.is_some() || no_backup_schedule;
                    if scheduling {
                        backups::schedule(
                            &client,
                            &project,
                            &name,
                            backup_schedule.zip(backup_keep),
                        )
                        .await?;
                        if display_name.is_none() && stage_type.is_none() {
                            return Ok(());
                        }
                    }
                    resources::update_stage(
                        &client,
                        &project,
                        &name,
                        display_name,
                        stage_type,
                        global.output,
                    )
                    .await
                }
            }
        }
        Command::Upload(Client {
            global,
            command:
                UploadCommand::AgentBinary {
                    file,
                    agent_version,
                    arch,
                },
        }) => {
            agent_binaries::upload(
                &settings::client(&global)?,
                &file,
                &agent_version,
                arch.as_deref(),
                global.output,
            )
            .await
        }
        Command::Revoke(Client {
            global,
            command: RevokeCommand::Outpost { name },
        }) => outposts::revoke(&settings::client(&global)?, &name).await,
        Command::Start(Client { global, command }) => {
            lifecycle::component(&settings::client(&global)?, "start", command, global.output).await
        }
        Command::Stop(Client { global, command }) => {
            lifecycle::component(&settings::client(&global)?, "stop", command, global.output).await
        }
        Command::Restart(Client { global, command }) => {
            lifecycle::component(
                &settings::client(&global)?,
                "restart",
                command,
                global.output,
            )
            .await
        }
        Command::Suspend(Client { global, command }) => {
            lifecycle::stage(&settings::client(&global)?, true, command, global.output).await
        }
        Command::Resume(Client {
            global,
            command: crate::cli::ResumeCommand::Stage { name, project },
        }) => {
            lifecycle::stage(
                &settings::client(&global)?,
                false,
                crate::cli::StageTarget::Stage { name, project },
                global.output,
            )
            .await
        }
        Command::Resume(Client {
            global,
            command: crate::cli::ResumeCommand::Rollout { id },
        }) => {
            rollouts::act(
                &settings::client(&global)?,
                id,
                "resume",
                false,
                global.output,
            )
            .await
        }
        Command::Logs(Client { global, command }) => lifecycle::logs(&global, command).await,
        Command::Exec(args) => {
            let global = args.global.clone();
            let code = streams::exec(&global, args).await?;
            // The command's own exit code, as a local command's would be.
            std::process::exit(code)
        }
        Command::PortForward(args) => {
            let global = args.global.clone();
            streams::port_forward(&global, args).await
        }
        Command::Login(args) => resources::login(&args.global).await,
        Command::Info(args) => resources::info(&args.global).await,
        Command::Completion { shell } => {
            use clap::CommandFactory;
            let shell = match shell {
                crate::cli::CompletionShell::Bash => clap_complete::Shell::Bash,
                crate::cli::CompletionShell::Zsh => clap_complete::Shell::Zsh,
                crate::cli::CompletionShell::Fish => clap_complete::Shell::Fish,
            };
            clap_complete::generate(
                shell,
                &mut crate::cli::Cli::command(),
                "trellis",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Whoami(args) => {
            resources::whoami(&settings::client(&args.global)?, args.global.output).await
        }
        Command::Create(Client {
            global,
            command:
                crate::cli::CreateCommand::Rollout {
                    project,
                    build,
                    config,
                    selector,
                    waves,
                    success_threshold,
                    wave_timeout,
                    pause,
                    manual,
                    dry_run,
                },
        }) => {
            let options = rollouts::CreateOptions {
                project,
                build,
                config,
                selector,
                waves,
                success_threshold,
                wave_timeout,
                pause,
                manual,
                dry_run,
            };
            rollouts::create(&settings::client(&global)?, options, global.output).await
        }
        Command::Create(Client { global, command }) => {
            resources::create(&settings::client(&global)?, command).await
        }
        Command::Push(Client {
            global,
            command:
                PushCommand::Build {
                    project,
                    path,
                    engine,
                    pull,
                },
        }) => {
            let client = settings::client(&global)?;
            let options = build::PushOptions {
                engine,
                pull,
                verbose: true,
            };
            let build = build::push_build_with(&client, &project, &path, &options).await?;
            println!(
                "pushed build {} ({} on {})",
                build.name,
                crate::output::short(&build.commit),
                build.branch
            );
            Ok(())
        }
        Command::Push(Client {
            global,
            command:
                PushCommand::Release {
                    project,
                    stage,
                    selector,
                    build,
                    config,
                    when_ready,
                    timeout,
                },
        }) => {
            let client = settings::client(&global)?;
            let releases = match selector {
                Some(selector) => {
                    resources::push_selected(&client, &project, &selector, build, config).await?
                }
                None => resources::push_release(&client, &project, &stage, build, config).await?,
            };
            if when_ready {
                ready::wait(&client, &releases, timeout).await?;
            }
            Ok(())
        }
        Command::Add(Client { global, command }) => {
            resources::add(&settings::client(&global)?, command).await
        }
        Command::Remove(Client {
            mut global,
            command,
        }) => {
            // `remove config-data --key` is a config key; the access key
            // comes with its own --access-key there.
            if let crate::cli::RemoveCommand::ConfigData {
                access_key: Some(key),
                ..
            } = &command
            {
                global.key = Some(key.clone());
            }
            resources::remove(&settings::client(&global)?, command).await
        }
        Command::List(args) => {
            let output = args.global.output;
            resources::list(&settings::client(&args.global)?, args, output).await
        }
        Command::Get(args) => {
            let output = args.global.output;
            resources::get(&settings::client(&args.global)?, args, output).await
        }
        Command::Delete(args) => resources::delete(&settings::client(&args.global)?, args).await,
        Command::Restore(Client { global, command }) => {
            resources::restore(&settings::client(&global)?, command).await
        }
    }
}

//! One module per group of commands; `run` dispatches.

mod build;
mod dev;
mod hub;
mod lifecycle;
mod outposts;
mod resources;
mod streams;

use crate::cli::{Cli, Command, ValidateCommand};
use crate::settings;

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let global = cli.global;
    match cli.command {
        Command::Hub(args) => hub::hub(args).await,
        Command::Dev(args) => dev::dev(args).await,
        Command::Validate(ValidateCommand::Manifest { path }) => build::validate_manifest(&path),
        Command::Validate(ValidateCommand::OutpostUri { uri, project }) => {
            outposts::validate(&settings::client(&global)?, &uri, project, global.output).await
        }
        Command::Rotate(crate::cli::RotateCommand::OutpostUri { outpost }) => {
            outposts::rotate(&settings::client(&global)?, &outpost).await
        }
        Command::Agent(command) => trellis_agent::cli::execute(command, "trellis agent").await,
        Command::Status(crate::cli::StatusCommand::Stage { name, project }) => {
            outposts::stage_status(&settings::client(&global)?, &project, &name, global.output)
                .await
        }
        Command::Update(crate::cli::UpdateCommand::Outpost {
            name,
            display_name,
            description,
            ingress_domain,
        }) => {
            let update = trellis_hub::api::types::UpdateOutpostRequest {
                display_name,
                description,
                ingress_domain,
            };
            outposts::update(&settings::client(&global)?, &name, &update, global.output).await
        }
        Command::Revoke(crate::cli::RevokeCommand::Outpost { name }) => {
            outposts::revoke(&settings::client(&global)?, &name).await
        }
        Command::Start(target) => {
            lifecycle::component(&settings::client(&global)?, "start", target, global.output).await
        }
        Command::Stop(target) => {
            lifecycle::component(&settings::client(&global)?, "stop", target, global.output).await
        }
        Command::Restart(target) => {
            lifecycle::component(
                &settings::client(&global)?,
                "restart",
                target,
                global.output,
            )
            .await
        }
        Command::Suspend(target) => {
            lifecycle::stage(&settings::client(&global)?, true, target, global.output).await
        }
        Command::Resume(target) => {
            lifecycle::stage(&settings::client(&global)?, false, target, global.output).await
        }
        Command::Logs(command) => lifecycle::logs(&global, command).await,
        Command::Exec(args) => {
            let code = streams::exec(&global, args).await?;
            // The command's own exit code, as a local command's would be.
            std::process::exit(code)
        }
        Command::PortForward(args) => streams::port_forward(&global, args).await,
        Command::Login => resources::login(&global).await,
        Command::Whoami => resources::whoami(&settings::client(&global)?, global.output).await,
        Command::Create(c) => resources::create(&settings::client(&global)?, c).await,
        Command::Push(crate::cli::PushCommand::Build {
            project,
            path,
            engine,
            pull,
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
        Command::Push(crate::cli::PushCommand::Release {
            project,
            stage,
            build,
            config,
        }) => {
            resources::push_release(&settings::client(&global)?, &project, &stage, build, config)
                .await
        }
        Command::Add(c) => resources::add(&settings::client(&global)?, c).await,
        Command::Remove(c) => resources::remove(&settings::client(&global)?, c).await,
        Command::List(args) => {
            resources::list(&settings::client(&global)?, args, global.output).await
        }
        Command::Get(args) => {
            resources::get(&settings::client(&global)?, args, global.output).await
        }
        Command::Delete(args) => resources::delete(&settings::client(&global)?, args).await,
    }
}

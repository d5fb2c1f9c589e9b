//! From what the engine says about a component's containers (and what
//! the runtime remembers of it) to a [`ComponentObservation`].
//!
//! Long-running components: `running` when every replica runs and none
//! restarted in the last [`CRASH_WINDOW`]; `crash-looping` when they exit
//! and are restarted (Podman restarts at once, so a crash-looping
//! container is often caught running: a fresh restart counts); `failed`
//! when an apply could not create or start it (the recorded reason);
//! `stopped` on request. Scheduled components report their job: `waiting`,
//! `running`, `succeeded`, `failed`, with the last and next run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::PublishPolicy;
use super::engine::Inspected;
use super::exits::ExitLog;
use super::jobs::{exit_code, parse_time};
use super::naming;
use super::state::{ComponentRecord, Failure, JobOutcome};
use crate::runtime::{ComponentObservation, ComponentState};
use crate::state::StageKey;

/// A restarted replica counts as crash-looping this long after its start.
pub const CRASH_WINDOW: Duration = Duration::from_secs(10);

/// Where and when an observation is made.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub stage: &'a StageKey,
    pub publish: &'a PublishPolicy,
    /// What the engine's events said of restarted containers' exits.
    pub exits: &'a ExitLog,
    pub now: DateTime<Utc>,
}

/// What the agent can reach of a running container: the published
/// port, or its address on the stage network.
pub fn endpoint(stage: &StageKey, publish: &PublishPolicy, c: &Inspected) -> Option<SocketAddr> {
    let port: u16 = c
        .config
        .labels
        .get(naming::PORTS)?
        .split(',')
        .next()?
        .parse()
        .ok()?;
    if c.config.labels.get(naming::PUBLISHED).map(String::as_str) == Some("true") {
        let ip: IpAddr = publish.host_ip.parse().ok()?;
        let ip = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        return Some(SocketAddr::new(ip, port));
    }
    let network = naming::network_name(stage);
    let ip: IpAddr = c.network.networks.get(&network)?.ip_address.parse().ok()?;
    Some(SocketAddr::new(ip, port))
}

pub fn observe_component(
    seen: Seen<'_>,
    name: &str,
    mut replicas: Vec<Inspected>,
    record: Option<&ComponentRecord>,
) -> ComponentObservation {
    let Seen {
        stage,
        publish,
        exits,
        now,
    } = seen;
    replicas.sort_by_key(|c| {
        c.config
            .labels
            .get(naming::REPLICA)
            .and_then(|r| r.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    let mut obs = ComponentObservation::missing(name);
    let Some(first) = replicas.first() else {
        if let Some(failure) = record.and_then(|r| r.failure.as_ref()) {
            fill_failure(&mut obs, failure);
        }
        return obs;
    };
    let labels = &first.config.labels;
    obs.revision = labels
        .get(naming::REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    obs.release = labels.get(naming::RELEASE).and_then(|r| r.parse().ok());
    obs.spec_hash = labels.get(naming::SPEC_HASH).cloned().unwrap_or_default();
    obs.replicas_desired = labels
        .get(naming::REPLICAS)
        .and_then(|r| r.parse().ok())
        .unwrap_or(replicas.len() as u32);
    obs.replicas_running = replicas.iter().filter(|c| c.state.running).count() as u32;
    obs.ids = replicas.iter().map(|c| c.id.clone()).collect();
    // A container running again after an exit is inspected with code 0
    // (the engine reset it when it restarted the container); its last code
    // is the one its `die` event carried, if the agent saw it.
    let last_exit = replicas
        .iter()
        .filter_map(|c| {
            let code = if c.state.running {
                exits.code(&c.id)
            } else {
                Some(c.state.exit_code)
            };
            parse_time(&c.state.finished_at).map(|t| (t, code))
        })
        .max_by_key(|(t, _)| *t);
    obs.exit_code = last_exit.and_then(|(_, code)| code).map(exit_code);
    let started = parse_time(&first.state.started_at);
    let stopped = record.is_some_and(|r| r.stopped);
    let failure = record.and_then(|r| r.failure.as_ref());
    obs.endpoint = replicas
        .iter()
        .find(|c| c.state.running)
        .and_then(|c| endpoint(stage, publish, c));
    let network = naming::network_name(stage);
    obs.addresses = replicas
        .iter()
        .filter(|c| c.state.running)
        .filter_map(|c| c.network.networks.get(&network)?.ip_address.parse().ok())
        .collect();

    if let Some(schedule) = labels.get(naming::SCHEDULE) {
        let job = record
            .and_then(|r| r.job.as_ref())
            .filter(|j| j.container_id == first.id);
        obs.restarts = job.map(|j| j.retries).unwrap_or(0);
        obs.exit_code = job.and_then(|j| j.exit_code).or(obs.exit_code);
        obs.last_run = job
            .and_then(|j| j.last_run)
            .or_else(|| last_exit.map(|(t, _)| t));
        obs.next_run = job.and_then(|j| j.next_run).or_else(|| {
            (schedule != "@release")
                .then(|| {
                    crate::runtime::schedule::next_run(
                        schedule,
                        labels.get(naming::TIMEZONE).map(String::as_str),
                        now,
                    )
                    .ok()
                })
                .flatten()
        });
        obs.message = job.and_then(|j| j.message.clone());
        obs.since = obs.last_run.or(started);
        obs.state = if stopped && !first.state.running {
            ComponentState::Stopped
        } else if let Some(failure) = failure {
            fill_failure(&mut obs, failure);
            ComponentState::Failed
        } else if first.state.running {
            ComponentState::Running
        } else {
            match job.map(|j| j.outcome) {
                Some(JobOutcome::Running) => ComponentState::Running,
                Some(JobOutcome::Succeeded) => ComponentState::Succeeded,
                Some(JobOutcome::Failed) => ComponentState::Failed,
                Some(JobOutcome::Waiting) => ComponentState::Waiting,
                None if started.is_none() => ComponentState::Waiting,
                None if first.state.exit_code == 0 => ComponentState::Succeeded,
                None => ComponentState::Failed,
            }
        };
        return obs;
    }

    obs.restarts = replicas
        .iter()
        .map(|c| u32::try_from(c.restart_count).unwrap_or(0))
        .sum();
    let all_running = obs.replicas_running >= obs.replicas_desired && obs.replicas_running > 0;
    let recently_restarted = obs.restarts > 0
        && replicas.iter().any(|c| {
            parse_time(&c.state.started_at)
                .is_some_and(|t| (now - t).to_std().unwrap_or_default() < CRASH_WINDOW)
        });
    obs.state = if stopped && obs.replicas_running == 0 {
        obs.since = last_exit.map(|(t, _)| t);
        ComponentState::Stopped
    } else if let Some(failure) = failure {
        fill_failure(&mut obs, failure);
        ComponentState::Failed
    } else if all_running && !recently_restarted {
        obs.since = started;
        ComponentState::Running
    } else if obs.restarts > 0 || obs.exit_code.is_some_and(|c| c != 0) {
        obs.since = last_exit.map(|(t, _)| t);
        obs.message = Some(format!(
            "it exited{} and was restarted {} time(s)",
            obs.exit_code
                .map(|c| format!(" with code {c}"))
                .unwrap_or_default(),
            obs.restarts
        ));
        ComponentState::CrashLooping
    } else if last_exit.is_some() && obs.replicas_running == 0 {
        obs.since = last_exit.map(|(t, _)| t);
        obs.message = Some("it was stopped outside Trellis".to_owned());
        ComponentState::Stopped
    } else {
        let error = replicas
            .iter()
            .map(|c| c.state.error.trim())
            .find(|e| !e.is_empty());
        obs.message = error.map(str::to_owned);
        ComponentState::Starting
    };
    obs
}

fn fill_failure(obs: &mut ComponentObservation, failure: &Failure) {
    obs.state = ComponentState::Failed;
    obs.message = Some(failure.message.clone());
    obs.since = Some(failure.since);
    if obs.spec_hash.is_empty() {
        obs.spec_hash = failure.spec_hash.clone();
        obs.revision = failure.revision;
        obs.release = failure.release;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::runtime::container::engine::{InspectedEndpoint, InspectedState};
    use crate::runtime::container::state::JobRecord;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn ago(secs: i64) -> String {
        (now() - chrono::Duration::seconds(secs)).to_rfc3339()
    }

    /// A replica: `started`/`finished` seconds ago (`None`: never).
    fn replica(
        replica: u32,
        running: bool,
        restarts: i64,
        exit: i64,
        started: Option<i64>,
        finished: Option<i64>,
    ) -> Inspected {
        let stage = StageKey::new("p", "s");
        let mut c = Inspected {
            id: format!("id{replica}"),
            restart_count: restarts,
            state: InspectedState {
                running,
                exit_code: exit,
                started_at: started.map(ago).unwrap_or("0001-01-01T00:00:00Z".into()),
                finished_at: finished.map(ago).unwrap_or("0001-01-01T00:00:00Z".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        c.config.labels = HashMap::from([
            (naming::REPLICA.into(), replica.to_string()),
            (naming::REPLICAS.into(), "1".into()),
            (naming::REVISION.into(), "7".into()),
            (naming::RELEASE.into(), "3".into()),
            (naming::SPEC_HASH.into(), "h1".into()),
            (naming::PORTS.into(), "8080,9090".into()),
            (naming::PUBLISHED.into(), "false".into()),
        ]);
        c.network.networks.insert(
            naming::network_name(&stage),
            InspectedEndpoint {
                ip_address: format!("10.89.0.{}", replica + 2),
                gateway: "10.89.0.1".into(),
            },
        );
        c
    }

    fn observe(
        replicas: Vec<Inspected>,
        record: Option<&ComponentRecord>,
        publish: &PublishPolicy,
    ) -> ComponentObservation {
        observe_with(replicas, record, publish, &ExitLog::default())
    }

    fn observe_with(
        replicas: Vec<Inspected>,
        record: Option<&ComponentRecord>,
        publish: &PublishPolicy,
        exits: &ExitLog,
    ) -> ComponentObservation {
        let stage = StageKey::new("p", "s");
        let seen = Seen {
            stage: &stage,
            publish,
            exits,
            now: now(),
        };
        observe_component(seen, "web", replicas, record)
    }

    #[test]
    fn all_replicas_running_is_running_with_the_network_endpoint() {
        let mut a = replica(1, true, 0, 0, Some(100), None);
        let mut b = replica(0, true, 0, 0, Some(100), None);
        for c in [&mut a, &mut b] {
            c.config.labels.insert(naming::REPLICAS.into(), "2".into());
        }
        let o = observe(vec![a, b], None, &PublishPolicy::off());
        assert_eq!(o.state, ComponentState::Running);
        assert_eq!((o.replicas_desired, o.replicas_running), (2, 2));
        assert_eq!(o.ids, ["id0", "id1"]);
        assert_eq!(o.endpoint, Some("10.89.0.2:8080".parse().unwrap()));
        assert_eq!(
            (o.revision, o.release, o.spec_hash.as_str()),
            (7, Some(3), "h1")
        );
        assert_eq!(o.since, parse_time(&ago(100)));
    }

    #[test]
    fn a_published_replica_is_reached_on_the_host() {
        let mut c = replica(0, true, 0, 0, Some(100), None);
        c.config
            .labels
            .insert(naming::PUBLISHED.into(), "true".into());
        let o = observe(vec![c], None, &PublishPolicy::on("0.0.0.0"));
        assert_eq!(o.endpoint, Some("127.0.0.1:8080".parse().unwrap()));
    }

    #[test]
    fn exits_and_restarts_are_crash_looping() {
        let o = observe(
            vec![replica(0, false, 5, 3, Some(2), Some(1))],
            None,
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::CrashLooping);
        assert_eq!((o.restarts, o.exit_code), (5, Some(3)));
        assert!(o.message.unwrap().contains("code 3"));
        assert_eq!(o.endpoint, None);
        // Caught running just after a restart: still crash-looping…
        let o = observe(
            vec![replica(0, true, 5, 3, Some(1), Some(2))],
            None,
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::CrashLooping);
        // …but one restart long ago is history.
        let o = observe(
            vec![replica(0, true, 1, 3, Some(600), Some(601))],
            None,
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::Running);
    }

    #[test]
    fn a_restarted_replica_reports_the_code_it_exited_with_not_the_engines_zero() {
        // Running again after an exit: the engine says code 0.
        let restarted = || replica(0, true, 1, 0, Some(1), Some(2));
        let o = observe(vec![restarted()], None, &PublishPolicy::off());
        assert_eq!(o.state, ComponentState::CrashLooping);
        assert_eq!(o.exit_code, None, "an unknown code is not 0");
        assert!(!o.message.unwrap().contains("code"));
        let exits = ExitLog::default();
        exits.take(br#"{"Type":"container","Action":"die","Actor":{"ID":"id0","Attributes":{"exitCode":"3"}}}"#);
        let o = observe_with(vec![restarted()], None, &PublishPolicy::off(), &exits);
        assert_eq!(o.exit_code, Some(3));
        assert!(o.message.unwrap().contains("code 3"));
    }

    #[test]
    fn stopped_failed_and_starting() {
        let stopped = ComponentRecord {
            stopped: true,
            ..Default::default()
        };
        let o = observe(
            vec![replica(0, false, 0, 137, Some(60), Some(5))],
            Some(&stopped),
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::Stopped);

        let failed = ComponentRecord {
            failure: Some(Failure {
                code: "port-taken".into(),
                message: "port 8080 is taken".into(),
                since: now(),
                spec_hash: "h2".into(),
                revision: 8,
                release: Some(4),
            }),
            ..Default::default()
        };
        let o = observe(
            vec![replica(0, false, 0, 0, None, None)],
            Some(&failed),
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::Failed);
        assert_eq!(o.message.as_deref(), Some("port 8080 is taken"));
        assert_eq!(o.spec_hash, "h1", "what runs is what is reported");
        // Nothing could be created at all.
        let o = observe(vec![], Some(&failed), &PublishPolicy::off());
        assert_eq!(
            (o.state, o.spec_hash.as_str(), o.revision),
            (ComponentState::Failed, "h2", 8)
        );

        let o = observe(
            vec![replica(0, false, 0, 0, None, None)],
            None,
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::Starting);
        let o = observe(
            vec![replica(0, false, 0, 0, Some(60), Some(5))],
            None,
            &PublishPolicy::off(),
        );
        assert_eq!(o.state, ComponentState::Stopped);
        assert!(o.message.unwrap().contains("outside"));
    }

    fn job(cron: &str) -> Inspected {
        let mut c = replica(0, false, 0, 0, None, None);
        c.config.labels.insert(naming::SCHEDULE.into(), cron.into());
        c.config
            .labels
            .insert(naming::TIMEZONE.into(), "Europe/Berlin".into());
        c
    }

    #[test]
    fn jobs_report_their_runs() {
        let o = observe(vec![job("0 3 * * *")], None, &PublishPolicy::off());
        assert_eq!(o.state, ComponentState::Waiting);
        assert_eq!(
            o.next_run,
            Some(
                DateTime::parse_from_rfc3339("2026-06-02T01:00:00Z")
                    .unwrap()
                    .with_timezone(&Utc)
            )
        );
        let record = ComponentRecord {
            job: Some(JobRecord {
                outcome: JobOutcome::Failed,
                exit_code: Some(4),
                retries: 2,
                last_run: Some(now()),
                message: Some("its run exited with code 4 after 2 retries".into()),
                ..JobRecord::new("id0")
            }),
            ..Default::default()
        };
        let o = observe(vec![job("@release")], Some(&record), &PublishPolicy::off());
        assert_eq!(o.state, ComponentState::Failed);
        assert_eq!((o.exit_code, o.restarts), (Some(4), 2));
        assert_eq!(o.next_run, None);
        // A record of another container does not count; the container's
        // own exit does.
        let mut other = record.clone();
        if let Some(j) = other.job.as_mut() {
            j.container_id = "old".into();
        }
        let mut ran = job("@release");
        ran.state.started_at = ago(20);
        ran.state.finished_at = ago(19);
        let o = observe(vec![ran], Some(&other), &PublishPolicy::off());
        assert_eq!((o.state, o.exit_code), (ComponentState::Succeeded, Some(0)));
    }
}

//! `trellis-bench`: benchmarks of the real hub, agent and CLI. Each command
//! sets up what it measures on this machine (a hub on loopback, an outpost
//! agent's fetcher, the `trellis` binary, the local container engine),
//! measures the compared things in the same run, and prints a table.
//!
//! Timing claims live here, not in tests: these machines are noisy, so
//! every timing is the median of several runs, alternating the order of
//! the compared operations.

mod agent;
mod artifacts;
mod backup;
mod baseline;
mod catchup;
mod chaos;
mod cluster;
mod console;
mod fleet;
mod ingress;
mod report;
mod rollout;
mod scale;
mod setup;
mod streams;
mod sync_writes;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The hub's allocator (see the `trellis` binary), so that the bare-TLS
/// baseline served from this binary is measured with the same allocator
/// as the hub it is compared with. The fleet's simulated agents run here
/// too; the agent binary itself is measured by `agent`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "trellis-bench",
    about = "Benchmarks of Trellis, printed as tables"
)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Bytes moved by a second push and a second delivery of an image
    /// with 1% of one layer changed, and the time of a full first delivery
    /// against a plain HTTPS download of the same artifact from the same
    /// hub. (Also `delta`.)
    #[command(alias = "delta")]
    Artifacts {
        /// Size of the generated image in MiB.
        #[arg(long, default_value_t = 200)]
        size_mib: u64,
        /// Timed runs of each delivery (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The `trellis` binary (default: next to this one).
        #[arg(long)]
        trellis: Option<PathBuf>,
        /// Where to put the hub, the project and the caches (default: the
        /// system's temporary directory). Needs about 8× the image size.
        #[arg(long)]
        work_dir: Option<PathBuf>,
    },
    /// The real agent's memory and CPU while idle and while deploying a
    /// release, and the size of the binary it ships in.
    Agent {
        /// How long to measure the idle agent, in seconds.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
        /// The `trellis` binary, for pushing the build (default: next to
        /// this one).
        #[arg(long)]
        trellis: Option<PathBuf>,
        /// The standalone `trellis-agent` binary measured (default: next to
        /// this one).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Extra environment for the agent, KEY=VALUE (repeatable).
        #[arg(long = "agent-env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Where to write the results as JSON (default:
        /// target/bench/agent.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Streams into a stage on an outpost: `trellis port-forward`
    /// throughput against one plain TLS stream on the same loopback, and
    /// the round trip of a line through `trellis exec -i`.
    Streams {
        /// Size of the file downloaded through each path, in MiB.
        #[arg(long, default_value_t = 256)]
        size_mib: u64,
        /// Downloads through each path (medians are compared).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Timed round trips through `exec`.
        #[arg(long, default_value_t = 500)]
        echoes: usize,
        /// The `trellis` binary (default: next to this one).
        #[arg(long)]
        trellis: Option<PathBuf>,
        /// The standalone `trellis-agent` binary (default: next to this one).
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Where to write the results as JSON (default:
        /// target/bench/streams.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Server time of the console's pages with many stages in the store
    /// (the hub's router and SQLite store, in process).
    Console {
        /// Stages in the one project.
        #[arg(long, default_value_t = 1000)]
        stages: usize,
        /// Outposts the stages are spread over (plus the hub's own).
        #[arg(long, default_value_t = 20)]
        outposts: usize,
        /// Timed requests of each page.
        #[arg(long, default_value_t = 30)]
        runs: usize,
    },
    /// The store's group commit of agents' acknowledgements: one batch of
    /// deliveries, one of status reports and one of both, as large as the
    /// hub's batches get, on SQLite and on PostgreSQL (started by the test
    /// kit where it can run).
    SyncWrites {
        /// Stages, and so updates per batch (the hub's batches hold at
        /// most 1,000).
        #[arg(long, default_value_t = 1000)]
        stages: usize,
        /// Timed batches of each kind (the median is reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Measure on SQLite only.
        #[arg(long)]
        sqlite_only: bool,
    },
    /// Outposts linked and idle: hub memory per outpost against a bare
    /// TLS server holding the same connections, idle bytes per outpost,
    /// hub CPU.
    Connect {
        #[arg(long, default_value_t = 15_000)]
        outposts: usize,
        /// How long to measure the idle fleet, in seconds (the heartbeat
        /// is 25 s).
        #[arg(long, default_value_t = 100)]
        idle_secs: u64,
        /// Give every outpost a link profile with this heartbeat (seconds)
        /// before it links (as `trellis update outpost --heartbeat`), then
        /// check that a pushed release still arrives at once; the profiles
        /// are cleared again at the end. Measure at least two heartbeats.
        #[arg(long)]
        heartbeat: Option<u32>,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// A release pushed to many outpost stages: time until each reports it
    /// applied, against one message sent over as many bare TLS connections.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        stages: usize,
        /// Stages per push request, one request after the other (the CLI's
        /// `push release -l SELECTOR` sends one request for all)
        #[arg(long, default_value_t = scale::PUSH_CHUNK)]
        push_chunk: usize,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// A rollout over the fleet's stages in waves, the threshold judged
    /// between waves: each wave's time against a plain fan-out push of the
    /// same stages in the same run.
    Rollout {
        #[arg(long, default_value_t = 1000)]
        stages: usize,
        /// Cumulative wave sizes, as `trellis create rollout --waves`.
        #[arg(long, default_value = "1%,10%,50%,100%")]
        waves: String,
        /// The share of a wave's online stages that must apply it.
        #[arg(long, default_value = "95%")]
        success_threshold: String,
        /// Rounds of (plain fan-outs, rollout), alternating which goes
        /// first; figures are medians over them.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// The hub killed with SIGKILL and restarted under a linked fleet:
    /// time until 99% and all are back, peak memory, handshakes in flight.
    Storm {
        #[arg(long, default_value_t = 15_000)]
        outposts: usize,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Several hub instances on one PostgreSQL behind HAProxy, outposts
    /// linked through it and idle: linked count, hub memory and idle bytes
    /// per outpost over all instances. Needs PostgreSQL and HAProxy.
    ClusterConnect {
        #[arg(long, default_value_t = 3)]
        hubs: usize,
        #[arg(long, default_value_t = 15_000)]
        outposts: usize,
        #[arg(long, default_value_t = 100)]
        idle_secs: u64,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Several hub instances behind HAProxy with the fleet linked: the one
    /// holding the most links is SIGKILLed; time until 99% and all of its
    /// outposts are back on the others, double sessions, crashes.
    Failover {
        #[arg(long, default_value_t = 3)]
        hubs: usize,
        #[arg(long, default_value_t = 15_000)]
        outposts: usize,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// A release pushed through one of several instances to stages whose
    /// outposts are linked to all of them: time until each reports it
    /// applied.
    ClusterFanout {
        #[arg(long, default_value_t = 3)]
        hubs: usize,
        #[arg(long, default_value_t = 10_000)]
        stages: usize,
        #[command(flatten)]
        fleet: FleetArgs,
    },
    /// Link cut, release pushed, link restored: time from link-up to
    /// in-sync.
    /// Bytes a second backup of a volume moves after 1% of it was
    /// rewritten in scattered 100 KiB writes, and the time of two backups
    /// and a restore, by the real agent over mutual TLS.
    Backup {
        /// Size of the volume in MiB.
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        /// Where to put the hub and the agent (default: the system's
        /// temporary directory). Needs about 4× the volume's size.
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Where to write the results as JSON (default:
        /// target/bench/backup.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    Catchup {
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Where to write the results as JSON (default:
        /// target/bench/catchup.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The fault campaign with real processes: a hub and agent processes
    /// behind fault proxies, releases pushed while links flap and agents
    /// and the hub are killed with SIGKILL; then checks that every stage
    /// converged and nothing acknowledged was lost. Exits non-zero on a
    /// violation.
    Chaos {
        #[arg(long, default_value_t = 10)]
        outposts: usize,
        #[arg(long, default_value_t = 60)]
        releases: usize,
        #[arg(long, default_value_t = 120)]
        flaps: usize,
        #[arg(long, default_value_t = 12)]
        agent_kills: usize,
        #[arg(long, default_value_t = 6)]
        hub_kills: usize,
        /// Seed of the schedule (default: from the clock, printed).
        #[arg(long)]
        seed: Option<u64>,
        /// The `trellis` binary (default: next to this one).
        #[arg(long)]
        trellis: Option<PathBuf>,
        /// Where to write the results as JSON (default:
        /// target/bench/chaos.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The outpost's HTTP entry point (trellis-ingress, 100 routes) against
    /// nginx as the same reverse proxy in front of the same backend:
    /// requests/s, p50 and p99 latency with `wrk` over HTTP and HTTPS with 1
    /// and 64 connections, and the entry point's idle memory. Needs nginx
    /// and wrk.
    Ingress {
        /// Length of each `wrk` run, in seconds.
        #[arg(long, default_value_t = 10)]
        secs: u64,
        /// Runs of each case (the median is reported).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Where to write the results as JSON (default:
        /// target/bench/ingress.json).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The ingress benchmark's backend, until stdin closes (started by it).
    #[command(hide = true)]
    IngressBackend {
        /// 0: any free port (printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
    },
    /// The ingress benchmark's Trellis entry point, until stdin closes
    /// (started by it).
    #[command(hide = true)]
    IngressServe {
        /// HTTP port; 0: any free port (printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// HTTPS port, with --tls-cert and --tls-key; 0: any free port.
        #[arg(long, default_value_t = 0)]
        tls_port: u16,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        routes: usize,
        /// Where route `app0` sends its requests.
        #[arg(long)]
        backend: std::net::SocketAddr,
    },
    /// Runs fleet outposts `from..to` until stdin closes (started by the
    /// fleet scenarios).
    #[command(hide = true)]
    FleetWorker {
        #[arg(long)]
        agents_dir: PathBuf,
        #[arg(long)]
        from: usize,
        #[arg(long)]
        to: usize,
        /// Hold bare TLS connections to the baseline server on this port
        /// instead of running agents.
        #[arg(long)]
        tls_baseline: Option<u16>,
    },
    /// The bare TLS server the fleet scenarios compare with (started by
    /// them).
    #[command(hide = true)]
    TlsBaseline {
        #[arg(long)]
        hub_data: PathBuf,
    },
}

/// Where the fleet lives and how its hub runs.
#[derive(clap::Args)]
struct FleetArgs {
    /// The `trellis` binary (default: next to this one).
    #[arg(long)]
    trellis: Option<PathBuf>,
    /// The hub's data and the fleet record; kept between runs so a fleet
    /// joined once is reused (default: $TMPDIR/trellis-bench-fleet).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The agents' data directories (default: /dev/shm/trellis-bench-fleet-agents).
    #[arg(long)]
    agents_dir: Option<PathBuf>,
    /// An extra `trellis hub` argument (repeatable), e.g.
    /// `--hub-arg=--admissions-per-sec --hub-arg=400`.
    #[arg(long = "hub-arg", allow_hyphen_values = true)]
    hub_args: Vec<String>,
    /// Where to write the results as JSON (default:
    /// target/bench/<scenario>.json).
    #[arg(long)]
    json: Option<PathBuf>,
}

impl FleetArgs {
    fn common(self) -> anyhow::Result<scale::Common> {
        Ok(scale::Common {
            trellis: setup::trellis_binary(self.trellis)?,
            dirs: fleet::FleetDirs::new(self.work_dir, self.agents_dir),
            json: self.json,
            hub_args: self.hub_args,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // The child processes build their own runtimes.
    match args.bench {
        Bench::FleetWorker {
            agents_dir,
            from,
            to,
            tls_baseline,
        } => return fleet::run_worker(&agents_dir, from, to, tls_baseline),
        Bench::TlsBaseline { hub_data } => return baseline::serve(&hub_data),
        Bench::IngressBackend { port } => return ingress::backend(port),
        Bench::IngressServe {
            port,
            tls_port,
            tls_cert,
            tls_key,
            routes,
            backend,
        } => {
            return ingress::serve_ingress(ingress::ServeSettings {
                port,
                tls_port,
                tls: tls_cert.zip(tls_key),
                routes,
                backend,
            });
        }
        _ => {}
    }
    let runtime = tokio::runtime::Runtime::new()?;
    match args.bench {
        Bench::FleetWorker { .. }
        | Bench::TlsBaseline { .. }
        | Bench::IngressBackend { .. }
        | Bench::IngressServe { .. } => unreachable!("handled above"),
        Bench::Connect {
            outposts,
            idle_secs,
            heartbeat,
            fleet,
        } => runtime.block_on(scale::connect(
            fleet.common()?,
            scale::ConnectSettings {
                outposts: outposts.max(1),
                idle: std::time::Duration::from_secs(idle_secs.max(1)),
                heartbeat,
            },
        )),
        Bench::Fanout {
            stages,
            push_chunk,
            fleet,
        } => runtime.block_on(scale::fanout(
            fleet.common()?,
            scale::FanoutSettings {
                stages: stages.max(1),
                push_chunk: push_chunk.max(1),
            },
        )),
        Bench::Rollout {
            stages,
            waves,
            success_threshold,
            rounds,
            fleet,
        } => runtime.block_on(rollout::rollout(
            fleet.common()?,
            rollout::RolloutSettings {
                stages: stages.max(1),
                waves,
                threshold: success_threshold,
                rounds: rounds.max(1),
            },
        )),
        Bench::ClusterConnect {
            hubs,
            outposts,
            idle_secs,
            fleet,
        } => runtime.block_on(cluster::connect(
            fleet.common()?,
            cluster::ClusterSettings {
                hubs: hubs.max(1),
                outposts: outposts.max(1),
                idle: std::time::Duration::from_secs(idle_secs.max(1)),
            },
        )),
        Bench::Failover {
            hubs,
            outposts,
            fleet,
        } => runtime.block_on(cluster::failover(
            fleet.common()?,
            cluster::ClusterSettings {
                hubs,
                outposts: outposts.max(1),
                idle: std::time::Duration::from_secs(1),
            },
        )),
        Bench::ClusterFanout {
            hubs,
            stages,
            fleet,
        } => runtime.block_on(cluster::fanout(
            fleet.common()?,
            cluster::ClusterSettings {
                hubs: hubs.max(1),
                outposts: stages.max(1),
                idle: std::time::Duration::from_secs(1),
            },
        )),
        Bench::Storm { outposts, fleet } => runtime.block_on(scale::storm(
            fleet.common()?,
            scale::StormSettings {
                outposts: outposts.max(1),
            },
        )),
        Bench::Chaos {
            outposts,
            releases,
            flaps,
            agent_kills,
            hub_kills,
            seed,
            trellis,
            json,
        } => runtime.block_on(chaos::run(chaos::Settings {
            outposts: outposts.max(1),
            releases,
            flaps,
            agent_kills,
            hub_kills,
            seed: seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            }),
            trellis: setup::trellis_binary(trellis)?,
            json,
        })),
        Bench::Backup {
            size_mib,
            work_dir,
            json,
        } => runtime.block_on(backup::run(backup::Settings {
            size: size_mib.max(1) << 20,
            work_dir,
            json,
        })),
        Bench::Catchup { runs, json } => runtime.block_on(catchup::run(catchup::Settings {
            runs: runs.max(1),
            json,
        })),
        Bench::Artifacts {
            size_mib,
            runs,
            trellis,
            work_dir,
        } => runtime.block_on(artifacts::run(artifacts::Settings {
            size: size_mib << 20,
            runs: runs.max(1),
            trellis: setup::trellis_binary(trellis)?,
            work_dir,
        })),
        Bench::Agent {
            idle_secs,
            trellis,
            agent,
            env,
            json,
        } => runtime.block_on(agent::run(agent::Settings {
            idle: std::time::Duration::from_secs(idle_secs.max(1)),
            trellis: setup::trellis_binary(trellis)?,
            agent: setup::sibling_binary(agent, "trellis-agent")?,
            env,
            json,
        })),
        Bench::Streams {
            size_mib,
            runs,
            echoes,
            trellis,
            agent,
            json,
        } => runtime.block_on(streams::run(streams::Settings {
            size_mib: size_mib.max(1),
            runs: runs.max(1),
            echoes: echoes.max(1),
            trellis: setup::trellis_binary(trellis)?,
            agent: setup::sibling_binary(agent, "trellis-agent")?,
            json,
        })),
        Bench::Ingress { secs, runs, json } => runtime.block_on(ingress::run(ingress::Settings {
            secs: secs.max(1),
            runs: runs.max(1),
            json,
        })),
        Bench::Console {
            stages,
            outposts,
            runs,
        } => runtime.block_on(console::run(console::Settings {
            stages,
            outposts: outposts.max(6),
            runs: runs.max(1),
        })),
        Bench::SyncWrites {
            stages,
            runs,
            sqlite_only,
        } => runtime.block_on(sync_writes::run(sync_writes::Settings {
            stages: stages.max(2),
            runs: runs.max(1),
            postgres: !sqlite_only,
        })),
    }
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

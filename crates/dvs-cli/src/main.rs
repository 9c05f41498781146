//! `dvs`: the operator's command.

mod bench;
mod bench_failover;
mod bench_ipc_lab;
mod bench_lab;
mod bench_lang;
mod bench_migration;
mod bench_serve;
mod cluster;
mod cluster_dir;
mod demo;
mod demo_lab;
mod harness;
mod helpers;
mod lab;
mod members;
mod migrate;
mod status;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use dvs_config::ClusterConfig;

/// A Distributed Virtualization System: processes talk by endpoint, whatever node they run on.
#[derive(Parser)]
#[command(name = "dvs", version, about)]
struct Cli {
    /// Folder of the local cluster (its config, sockets and logs).
    #[arg(long, global = true, env = "DVS_DIR", default_value = "/tmp/dvs")]
    dir: PathBuf,
    /// Cluster config to use instead of DIR/cluster.toml.
    #[arg(long, global = true, env = "DVS_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node kernel in the foreground (`dvs node --node N`), or make a running node
    /// leave the cluster (`dvs node leave`).
    #[command(args_conflicts_with_subcommands = true)]
    Node {
        /// This node's id or name in the config.
        #[arg(long)]
        node: Option<String>,
        #[command(subcommand)]
        action: Option<NodeCmd>,
    },
    /// Change the nodes a DC spans while the cluster runs.
    Dc {
        #[command(subcommand)]
        what: members::DcCmd,
    },
    /// Start a local cluster on this machine (writes DIR/cluster.toml, starts the nodes).
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u16,
        /// First peer port to try; the nodes take consecutive free ports from here.
        #[arg(long, default_value_t = 7400)]
        base_port: u16,
        /// Compress peer-link frames with lz4 when that makes them smaller.
        #[arg(long)]
        lz4: bool,
    },
    /// Stop the local cluster and every process it launched.
    Down,
    /// Nodes, links, DCs and every endpoint's registration on every node.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Processes launched by the nodes.
    Ps {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Launch a program on a node as endpoint EP of DC.
    Run {
        /// DC id or name.
        #[arg(long)]
        dc: String,
        /// Endpoint number.
        #[arg(long)]
        ep: i32,
        /// Node id or name.
        #[arg(long)]
        node: String,
        /// Stay attached: stream the program's output and exit with its status.
        #[arg(long)]
        wait: bool,
        /// The program's working folder (created if missing). It travels with the program
        /// when it migrates with criu: packed with the image, unpacked at the same path on a
        /// destination that does not share it. Default: the node's runtime folder.
        #[arg(long)]
        workdir: Option<std::path::PathBuf>,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// The paper's evaluation on a local 3-node cluster: its three migration scenarios and a
    /// rollback under a checking client, figures beside the paper's, status, stop.
    Demo {
        /// Runs per scenario.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Iterations of the client in each run.
        #[arg(long, default_value_t = 1000)]
        iterations: u32,
        /// Bytes the server copies into the client per iteration.
        #[arg(long, default_value = "65536")]
        block_size: String,
        /// Migration backend. Default: criu when it works, else cooperative.
        #[arg(long, value_parser = ["criu", "cooperative"])]
        backend: Option<String>,
        /// Run it on a fresh 3-host lab with etcd (`dvs lab`), taken down at the end.
        #[arg(long)]
        lab: bool,
        /// The part of `--lab` that runs inside a lab host, on the cluster of DVS_CONFIG.
        #[arg(long, hide = true, conflicts_with = "lab")]
        lab_inner: bool,
    },
    /// Migrate a running endpoint to another node while its clients keep calling it.
    Migrate {
        /// The endpoint, as DC/EP (DC by id or name), e.g. dc0/1.
        target: String,
        /// Destination node (id or name).
        #[arg(long)]
        to: String,
        /// How to move the process: criu (transparent) or cooperative (program hooks).
        /// Default: criu when it works on the source node, else cooperative.
        #[arg(long, value_parser = ["criu", "cooperative"])]
        backend: Option<String>,
        /// Make a phase fail on purpose, to show a rollback.
        #[arg(long, value_parser = ["checkpoint", "transfer", "restore"])]
        fail_at: Option<String>,
        /// Longest wait for the process to become quiescent, in milliseconds.
        #[arg(long)]
        quiesce_ms: Option<u64>,
        /// Print the final report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Which checkpoint backends work here (and on each running node), and why not.
    Doctor,
    /// Register an endpoint on nodes as running on another node (REMOTE), or as the backup of a
    /// replicated primary kept there (BACKUP): the DVK's rmtbind and bkupbind.
    Register {
        /// The endpoint, as DC/EP.
        target: String,
        /// The node it runs on (or whose backup it is).
        #[arg(long)]
        at: String,
        /// Nodes to register it on (default: every other node of the DC).
        #[arg(long)]
        on: Vec<String>,
        /// Register a backup instead of a remote endpoint.
        #[arg(long)]
        backup: bool,
    },
    /// The cluster's TLS material: CA, node certificates, revocation.
    Tls {
        #[command(subcommand)]
        what: tls::TlsCmd,
    },
    /// Simulated hosts that share nothing (network and mount namespaces) running a dvs
    /// cluster with etcd on this machine.
    Lab {
        #[command(subcommand)]
        what: lab::LabCmd,
    },
    /// Benchmarks on a temporary local cluster, with raw baselines measured in the same run.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

/// What `dvs node` does besides running a node kernel.
#[derive(Subcommand)]
enum NodeCmd {
    /// The node revokes its membership lease (the others see it leave at once) and stops.
    /// Refused while endpoints run on it, unless --force.
    Leave {
        /// The node (id or name). Default: the node of this host.
        #[arg(long)]
        node: Option<String>,
        /// Leave even though endpoints run there (they stop with the node).
        #[arg(long)]
        force: bool,
    },
}

/// What `dvs bench` measures.
#[derive(Subcommand)]
enum BenchWhat {
    /// Node failure detection on a fresh 3-host lab with etcd: a node kernel killed with
    /// SIGKILL, and a host's network cut, until every other node reports the link down.
    Failover {
        /// Failures of each kind (each repaired before the next).
        #[arg(long, default_value_t = 10)]
        trials: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Inside a lab host: report when every other node sees NODE's link down, then up.
        #[arg(long, hide = true)]
        watch: Option<String>,
    },
    /// IPC latency and throughput (sendrec, send, vcopy; local and remote) beside raw
    /// Unix-socket and TCP loopback baselines, on its own 2-node cluster.
    Ipc {
        /// Measured round trips per latency test (and sends per throughput test), after a
        /// warm-up of a tenth of that (100 to 2000).
        #[arg(long, default_value_t = 20000)]
        iterations: u32,
        /// MiB moved by each bandwidth test (raw TCP stream, local and remote vcopy).
        #[arg(long, default_value_t = 256)]
        bulk_mib: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// On a fresh 3-host lab with etcd (remote server on another host), beside a
        /// single-machine cluster with the embedded directory measured in the same run
        /// (alternating blocks), each with its raw TCP baselines.
        #[arg(long)]
        lab: bool,
        /// The part of `--lab` that runs inside a lab host, on the cluster of DVS_CONFIG.
        #[arg(long, hide = true, conflicts_with = "lab")]
        lab_inner: bool,
        /// Sendrec latency of libm3ipc from C (c), or from Python and C (python), beside the
        /// Rust library's in alternating blocks, instead of the usual figures.
        #[arg(long, value_enum, default_value = "rust", conflicts_with = "lab")]
        lang: bench_lang::Lang,
        /// The shared libm3ipc for `--lang` [default: next to this binary, or installed].
        #[arg(long)]
        clib: Option<std::path::PathBuf>,
    },
    /// The server of `bench ipc --lab`, launched with `dvs run` on the node it measures.
    #[command(hide = true)]
    IpcServe {
        /// Also serve the raw TCP baselines on this address.
        #[arg(long)]
        raw: Option<std::net::SocketAddr>,
    },
    /// Live migration under load (migration time, client stall, image transfer rate beside a
    /// raw TCP transfer of the same size), per backend, on its own 3-node cluster.
    Migration {
        /// Migrations per backend.
        #[arg(long, default_value_t = 20)]
        runs: u32,
        /// Measure only this backend. Default: criu (when it works) and cooperative.
        #[arg(long, value_parser = ["criu", "cooperative"])]
        backend: Option<String>,
        /// MiB of heap the migrating server fills (2 gives the paper's 2.5 MB image).
        #[arg(long, default_value_t = 2)]
        ballast_mb: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Also on a fresh 3-host lab with etcd, beside a single-machine cluster with the
        /// embedded directory measured in the same run (alternating blocks).
        #[arg(long)]
        lab: bool,
        /// The part of `--lab` that runs inside a lab host, on the cluster of DVS_CONFIG.
        #[arg(long, hide = true, conflicts_with = "lab")]
        lab_inner: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Node { .. }) {
        // `dvs status | head` ends quietly instead of panicking on a closed stdout. The node
        // kernel keeps SIGPIPE ignored: a peer closing its socket must not kill it.
        // SAFETY: sets the disposition of one signal before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dvs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Loads the cluster config named on the command line, or the local cluster's.
/// The config of a running cluster, with the nodes that joined it without being in the
/// config (they hold a membership lease in the directory).
fn cluster_view(
    cli_dir: &std::path::Path,
    config: &Option<PathBuf>,
) -> Result<(ClusterConfig, PathBuf)> {
    let (mut cfg, path) = load_config(cli_dir, config)?;
    helpers::add_joined_nodes(&mut cfg);
    Ok((cfg, path))
}

fn load_config(
    cli_dir: &std::path::Path,
    config: &Option<PathBuf>,
) -> Result<(ClusterConfig, PathBuf)> {
    let path = config
        .clone()
        .unwrap_or_else(|| cli_dir.join("cluster.toml"));
    if config.is_none() && !path.exists() {
        bail!(
            "no cluster running under {}: start one with `dvs up` (or pass --config FILE)",
            cli_dir.display()
        );
    }
    let cfg = ClusterConfig::load(&path)?;
    Ok((cfg, path))
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Node {
            action: Some(NodeCmd::Leave { node, force }),
            ..
        } => {
            let (cfg, _) = cluster_view(&cli.dir, &cli.config)?;
            members::leave(&cfg, node.as_deref(), force)
        }
        Cmd::Dc { what } => {
            let (cfg, _) = cluster_view(&cli.dir, &cli.config)?;
            members::dc(&cfg, what)
        }
        Cmd::Node { node, action: None } => {
            let Some(node) = node else {
                bail!("dvs node: name the node to run with --node N (or use `dvs node leave`)");
            };
            let (config, path) = load_config(&cli.dir, &cli.config)?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                // `dvs up` sends the log to a file: no colour codes there.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            dvs_node::run(dvs_node::NodeOptions {
                config,
                node,
                config_path: Some(path.clone()),
            })
            .with_context(|| format!("node kernel (config {})", path.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Up {
            nodes,
            base_port,
            lz4,
        } => {
            cluster::up(&cli.dir, nodes, base_port, lz4)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down => {
            let (cfg, _) = load_config(&cli.dir, &cli.config)?;
            cluster::down(&cfg)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { json } => {
            let (cfg, path) = cluster_view(&cli.dir, &cli.config)?;
            status::status(&cfg, &path, json)
        }
        Cmd::Ps { json } => {
            let (cfg, _) = cluster_view(&cli.dir, &cli.config)?;
            status::ps(&cfg, json)
        }
        Cmd::Run {
            dc,
            ep,
            node,
            wait,
            workdir,
            cmd,
        } => {
            let (cfg, _) = cluster_view(&cli.dir, &cli.config)?;
            cluster::run(&cfg, &dc, ep, &node, wait, workdir, cmd)
        }
        Cmd::Demo {
            runs,
            iterations,
            block_size,
            backend,
            lab,
            lab_inner,
        } => {
            let o = demo::DemoOptions {
                runs,
                iterations,
                block_size,
                backend,
            };
            if lab {
                demo::check(&o)?;
                demo_lab::demo_lab(&o)
            } else if lab_inner {
                let (cfg, path) = load_config(&cli.dir, &cli.config)?;
                demo_lab::inner(&cfg, &path, &o)
            } else {
                demo::demo(&cli.dir, &o)
            }
        }
        Cmd::Migrate {
            target,
            to,
            backend,
            fail_at,
            quiesce_ms,
            json,
        } => {
            let (cfg, _) = cluster_view(&cli.dir, &cli.config)?;
            migrate::migrate(
                &cfg,
                &migrate::MigrateOptions {
                    target: &target,
                    to: &to,
                    backend,
                    fail_at,
                    quiesce_ms,
                    json,
                },
            )
        }
        Cmd::Register {
            target,
            at,
            on,
            backup,
        } => {
            let (cfg, _) = cluster_view(&cli.dir, &cli.config)?;
            cluster::register(&cfg, &target, &at, &on, backup)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Tls { what } => {
            let (cfg, path) = load_config(&cli.dir, &cli.config)?;
            tls::run(what, &cfg, &path)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Doctor => {
            let cfg = load_config(&cli.dir, &cli.config).ok().map(|(c, _)| c);
            migrate::doctor(cfg.as_ref())
        }
        Cmd::Lab { what } => lab::run(what),
        Cmd::Bench { what } => match what {
            BenchWhat::Failover {
                watch: Some(node), ..
            } => {
                let (cfg, _) = load_config(&cli.dir, &cli.config)?;
                bench_failover::watch(&cfg, &node)
            }
            BenchWhat::Failover { trials, json, .. } => bench_failover::failover(trials, json),
            BenchWhat::Ipc {
                iterations,
                bulk_mib,
                json,
                lab,
                lab_inner,
                lang,
                clib,
            } => {
                if lang != bench_lang::Lang::Rust {
                    return bench_lang::ipc_lang(lang, iterations, clib.as_deref(), json);
                }
                let o = bench::IpcOptions {
                    iterations,
                    bulk_mib,
                    json,
                };
                if lab {
                    bench_ipc_lab::ipc_lab(&o)
                } else if lab_inner {
                    let (cfg, _) = load_config(&cli.dir, &cli.config)?;
                    bench_ipc_lab::ipc_inner(&cfg, &o)
                } else {
                    bench::ipc(&o)
                }
            }
            BenchWhat::IpcServe { raw } => bench_serve::ipc_serve(raw),
            BenchWhat::Migration {
                runs,
                backend,
                ballast_mb,
                json,
                lab,
                lab_inner,
            } => {
                let o = bench_migration::MigrationOptions {
                    runs,
                    backend,
                    ballast_mb,
                    json,
                };
                if lab {
                    bench_lab::migration_lab(&o)
                } else if lab_inner {
                    let (cfg, _) = load_config(&cli.dir, &cli.config)?;
                    bench_lab::migration_inner(&cfg, &o)
                } else {
                    bench_migration::migration(&o)
                }
            }
        },
    }
}

//! `dvs demo`: the README's main job on a local cluster.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dvs_config::ClusterConfig;

use crate::cluster;

/// Where the example programs live: next to the dvs binary (cargo puts them there).
pub fn example_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let p = exe.parent().context("dvs has no folder")?.join(name);
    if !p.exists() {
        bail!(
            "{} not found next to dvs: build it with `cargo build --release -p dvs-examples`",
            p.display()
        );
    }
    Ok(p)
}

/// Starts a 3-node cluster, runs migr-server on node0 and migr-client on node1, shows status.
pub fn demo(dir: &Path, iterations: u32, block_size: &str) -> Result<ExitCode> {
    let server = example_binary("migr-server")?;
    let client = example_binary("migr-client")?;
    let dir = dir.join("demo");
    cluster::up(&dir, 3, 7400, false)?;
    let cfg = ClusterConfig::load(&dir.join("cluster.toml"))?;
    let result = (|| -> Result<ExitCode> {
        println!("\n== migr-server as dc0/1 on node0");
        cluster::run(
            &cfg,
            "dc0",
            1,
            "node0",
            false,
            vec![server.display().to_string()],
        )?;
        println!("\n== migr-client as dc0/2 on node1: {iterations} sendrec + vcopy of {block_size} bytes each, against dc0/1 on node0");
        let code = cluster::run(
            &cfg,
            "dc0",
            2,
            "node1",
            true,
            vec![
                client.display().to_string(),
                "--server".into(),
                "1".into(),
                "--iterations".into(),
                iterations.to_string(),
                "--block-size".into(),
                block_size.into(),
            ],
        )?;
        std::thread::sleep(Duration::from_millis(50));
        println!("\n== dvs status");
        crate::status::status(&cfg, &dir.join("cluster.toml"), false)?;
        Ok(code)
    })();
    println!();
    cluster::down(&cfg)?;
    result
}

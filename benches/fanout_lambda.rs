//! What the fan-out function costs per stream batch: `scripts/bench-lambda` (it starts a moto
//! server and installs cargo-lambda; or `cargo bench --bench fanout_lambda` with
//! `AWS_ENDPOINT_URL` pointing at one and `PALAVER_CARGO_LAMBDA` at cargo-lambda).
//!
//! The built `palaver-fanout` binary runs as Lambda runs it, under cargo-lambda's Runtime API
//! emulator (`cargo lambda watch --only-lambda-apis`, `cargo lambda invoke`), with the real
//! AWS SDK against moto (DynamoDB and its stream) and a real `palaver serve` playing API Gateway's
//! `@connections` API. A room of M members, each with an open WebSocket, gets 100 messages; the
//! stream's batch of them is handed to the function once it is warm. Printed per room size:
//! posts, wall time, the process's CPU time for the batch (user + system, from /proc, 10 ms
//! resolution) and its peak resident memory.
//!
//! The local gateway speaks plain HTTP, so TLS is not in these figures (see docs/deploy.md).

#[path = "../tests/it/common/mod.rs"]
mod common;

#[path = "../tests/it/aws_support/mod.rs"]
mod aws_support;

use aws_support::{Options, World, failures};
use std::time::{Duration, Instant};

const MESSAGES: usize = 100;

/// User + system CPU time of `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').expect("comm") + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// A line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("/proc/PID/status")
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn batch_of(members: usize) {
    let mut world = World::new("cost", Options::default()).await;
    let mut fanout = world
        .function("palaver-fanout", env!("CARGO_BIN_EXE_palaver-fanout"))
        .await;
    let mut sockets = Vec::new();
    for m in 0..members {
        let socket = world.connect(&format!("member{m}")).await;
        world.join(&socket, "hall").await;
        sockets.push(socket);
    }
    // Every member but the speaker reads whatever arrives, as a client does (the speaker's few
    // hundred frames wait at the gateway).
    let speaker = sockets.remove(0);
    let readers: Vec<_> = sockets.into_iter().map(|socket| socket.listen()).collect();

    // Warm: the connects and joins, the function's first (cold) invocation. Each join changes
    // the room's audience, so this batch reads it once per join: slow against moto.
    let warmup = world.stream.next_event(2 * members).await;
    let answer = fanout.invoke_within(warmup, Duration::from_secs(300)).await;
    assert!(failures(&answer).is_empty(), "{answer}");

    for i in 0..MESSAGES {
        let text = format!("message {i} to everyone in the hall");
        world.say(&speaker, "hall", &text).await;
    }
    let batch = world.stream.next_event(MESSAGES).await;
    let records = batch["Records"].as_array().map_or(0, Vec::len);
    let pid = fanout.pid();
    let cpu = cpu_seconds(pid);
    let started = Instant::now();
    let response = fanout.invoke_within(batch, Duration::from_secs(300)).await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu;
    assert!(failures(&response).is_empty(), "{response}");
    let posts = records * members;
    println!(
        "{{\"members\":{members},\"records\":{records},\"posts\":{posts},\"wall_s\":{wall:.2},\
         \"cpu_s\":{cpu:.2},\"cpu_us_per_post\":{:.0},\"peak_rss_kib\":{},\"rss_kib\":{}}}",
        cpu * 1e6 / posts as f64,
        status_kib(pid, "VmHWM:"),
        status_kib(pid, "VmRSS:"),
    );
    for reader in readers {
        reader.abort();
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    for members in [50, 200] {
        runtime.block_on(batch_of(members));
    }
}

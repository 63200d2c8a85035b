//! `palaver-chaos`: the project's chaos run. Many clients in many rooms send messages with
//! `clientMsgId`s to real `palaver serve` processes while the server — or, on DynamoDB, a random
//! node of several sharing the store — is killed at random moments (SIGKILL, sometimes SIGTERM)
//! and started again. The clients do what the protocol asks of a client that must lose nothing
//! (see [`client`]). At the end the run checks every promise below against the log and prints
//! each one broken, with examples:
//!
//! - every acknowledged message is in the log exactly once, at its acknowledged seq;
//! - every room's log is gap-free, and no `clientMsgId` is in it twice;
//! - on no connection was a seq delivered twice;
//! - every client's final view of each room equals the log;
//! - once everyone has left, nobody is online and no connection is open.
//!
//! Seeded: a seed fixes every choice the run makes (who is in which room, who sends where, which
//! node dies when and how); the timing of processes is the machine's. `scripts/chaos` builds
//! and runs it (and starts moto for `--store dynamodb`).

mod check;
mod client;
mod cluster;

use clap::Parser;
use client::{Plan, Shared};
use cluster::Node;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// One server on a SQLite file.
    Sqlite,
    /// Several nodes on one DynamoDB store (the AWS environment's endpoint: moto).
    Dynamodb,
}

#[derive(Parser, Debug)]
#[command(about = "palaver's chaos run: servers killed under load, every promise checked")]
struct Args {
    #[arg(long, value_enum, default_value = "sqlite")]
    store: StoreKind,
    /// Nodes sharing the store (DynamoDB; SQLite has one server)
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    #[arg(long, default_value_t = 100)]
    clients: usize,
    #[arg(long, default_value_t = 20)]
    rooms: usize,
    /// Rooms each client is in
    #[arg(long, default_value_t = 3)]
    rooms_per_client: usize,
    /// Messages per second each client sends
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Stop sending once this many messages were acknowledged…
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    /// …or after this many seconds, whichever comes first
    #[arg(long, default_value_t = 600.0)]
    secs: f64,
    /// Mean seconds between kills (0: no kills)
    #[arg(long, default_value_t = 5.0)]
    kill_every: f64,
    /// Replays a run's choices
    #[arg(long)]
    seed: Option<u64>,
    /// The palaver binary to run
    #[arg(long, default_value = "target/release/palaver")]
    palaver: PathBuf,
    /// Where the servers' logs go (default: a temporary directory, kept if something failed)
    #[arg(long)]
    logs: Option<PathBuf>,
}

const SECRET: &str = "chaos-secret-0123456789abcdef0123456789abcdef";
/// A node's lease in the run: short, so that a killed node's users go offline soon, yet long
/// enough that a store slowed by the run itself (moto, every request in turn) lets nodes renew it.
const NODE_LEASE: &str = "10s";
/// How long clients may take, after the chaos, to get everything acknowledged and read.
const FINISH_WAIT: Duration = Duration::from_secs(180);
/// How long the store may take, once every client left, to show nobody online.
const QUIET_WAIT: Duration = Duration::from_secs(60);

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(why) => {
            eprintln!("palaver-chaos: {why}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile_dir(&args.logs)?;
    eprintln!(
        "palaver-chaos: seed {seed}; {:?} store; logs in {}",
        args.store,
        dir.display()
    );

    // The store and its servers.
    let (store_url, count) = match args.store {
        StoreKind::Sqlite => (format!("sqlite://{}", dir.join("palaver.db").display()), 1),
        StoreKind::Dynamodb => {
            let url = format!(
                "dynamodb://chaos-{seed}-{}",
                ulid::Ulid::new().to_string().to_lowercase()
            );
            let init = std::process::Command::new(&args.palaver)
                .args(["init", "--store", &url])
                .output()
                .map_err(|e| format!("palaver init: {e}"))?;
            if !init.status.success() {
                return Err(format!(
                    "palaver init failed: {}",
                    String::from_utf8_lossy(&init.stderr)
                ));
            }
            (url, args.nodes.max(1))
        }
    };
    let env = [
        ("PALAVER_JWT_SECRET", SECRET),
        ("PALAVER_NODE_LEASE", NODE_LEASE),
        ("PALAVER_RATE_LIMIT", "0"),
        ("PALAVER_MAX_CONNECTIONS_PER_USER", "1000"),
        ("RUST_LOG", "palaver=info"),
    ];
    let mut nodes: Vec<Node> = (1..=count)
        .map(|i| Node::new(&format!("n{i}"), &store_url, &args.palaver, &dir, &env))
        .collect();
    for node in &mut nodes {
        node.start()?;
    }
    let urls = nodes.iter().map(Node::url).collect();
    let identity = palaver::identity::Identity::new(SECRET.as_bytes());
    let shared = Shared::new(urls, identity);

    // Clients, their rooms chosen by the seed.
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.secs) + FINISH_WAIT;
    let rooms: Vec<String> = (1..=args.rooms).map(|r| format!("room-{r}")).collect();
    let mut used = BTreeSet::new();
    let mut tasks = Vec::new();
    for c in 1..=args.clients {
        let mut mine = BTreeSet::new();
        while mine.len() < args.rooms_per_client.clamp(1, args.rooms) {
            mine.insert(rooms[rng.random_range(0..rooms.len())].clone());
        }
        used.extend(mine.iter().cloned());
        let plan = Plan {
            user: format!("u{c}"),
            rooms: mine.into_iter().collect(),
            rate: args.rate,
            seed: rng.random(),
        };
        tasks.push(tokio::spawn(client::run(shared.clone(), plan, deadline)));
    }

    // The chaos, until enough is acknowledged or the time is up.
    let sending_until = started + Duration::from_secs_f64(args.secs);
    let (mut sigkills, mut sigterms) = (0u64, 0u64);
    let mut last_report = Instant::now();
    let mut next_kill = next_kill_at(&mut rng, args.kill_every);
    while Instant::now() < sending_until && shared.acked.load(Relaxed) < args.messages {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last_report.elapsed() >= Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!(
                "palaver-chaos: {:.0} s: {} acknowledged, {} kills, {} reconnects",
                started.elapsed().as_secs_f64(),
                shared.acked.load(Relaxed),
                sigkills + sigterms,
                shared.reconnects.load(Relaxed)
            );
        }
        if next_kill.is_some_and(|at| Instant::now() >= at) {
            let victim = rng.random_range(0..nodes.len());
            let hard = rng.random_bool(0.8);
            let down_for = Duration::from_millis(rng.random_range(100..2_000));
            if hard {
                sigkills += 1;
            } else {
                sigterms += 1;
            }
            let node = &mut nodes[victim];
            tokio::task::block_in_place(|| node.kill(hard));
            tokio::time::sleep(down_for).await;
            tokio::task::block_in_place(|| node.start())?;
            next_kill = next_kill_at(&mut rng, args.kill_every);
        }
    }
    shared.sending.store(false, Relaxed);
    shared.finish.store(true, Relaxed);
    let sending_s = started.elapsed().as_secs_f64();
    eprintln!("palaver-chaos: chaos over after {sending_s:.0} s; clients finishing");
    // Every message acknowledged (or the clients' time up): no room moves any more, and each
    // client reads its rooms to their heads and leaves.
    while shared.drained.load(Relaxed) < args.clients as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shared.complete.store(true, Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let outcomes = std::mem::take(&mut *shared.results.lock());

    // Everyone has left: the store must say so, soon.
    let store = palaver::store::open(&store_url.parse().map_err(|e| format!("{e}"))?, None)
        .await
        .map_err(|e| e.to_string())?;
    let quiet_deadline = Instant::now() + QUIET_WAIT;
    let still = loop {
        let still = check::quiet(&store).await?;
        if still.is_empty() || Instant::now() > quiet_deadline {
            break still;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut violations = check::check(&store, &used, &outcomes).await?;
    for what in still {
        violations.add(
            "someone still online, or a connection open, after everyone left",
            what,
        );
    }
    for node in &mut nodes {
        node.kill(false);
    }

    let acked: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    let summary = json!({
        "seed": seed,
        "store": format!("{:?}", args.store).to_lowercase(),
        "nodes": count,
        "clients": args.clients,
        "rooms": used.len(),
        "acknowledged": acked,
        "sent": shared.sent.load(Relaxed),
        "resent": shared.resent.load(Relaxed),
        "sigkills": sigkills,
        "sigterms": sigterms,
        "reconnects": shared.reconnects.load(Relaxed),
        "sending_s": (sending_s * 10.0).round() / 10.0,
        "elapsed_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "error_frames": *shared.errors.lock(),
        "violations": violations.found.iter().map(|(k, (n, _))| (k.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
    });
    println!("{summary}");
    for (promise, (count, examples)) in &violations.found {
        eprintln!("VIOLATED ({count}×): {promise}");
        for example in examples {
            eprintln!("    {example}");
        }
    }
    if violations.is_empty() {
        if args.logs.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        eprintln!("palaver-chaos: every promise held (seed {seed})");
        Ok(true)
    } else {
        eprintln!(
            "palaver-chaos: promises broken; replay with --seed {seed}; servers' logs in {}",
            dir.display()
        );
        Ok(false)
    }
}

/// When the next kill comes: exponentially distributed around `mean` seconds (`None`: never).
fn next_kill_at(rng: &mut StdRng, mean: f64) -> Option<Instant> {
    if mean <= 0.0 {
        return None;
    }
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    Some(Instant::now() + Duration::from_secs_f64(-mean * u.ln()))
}

fn tempfile_dir(logs: &Option<PathBuf>) -> Result<PathBuf, String> {
    let dir = match logs {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("palaver-chaos-{}", ulid::Ulid::new())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

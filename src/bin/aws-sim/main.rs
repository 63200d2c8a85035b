//! `palaver-aws-sim`: the deployed AWS stack, simulated on this machine, that real WebSocket
//! clients connect to. `scripts/aws-sim [SCENARIO…]` builds it and starts moto; see there.
//!
//! For each scenario it creates the stack in moto ([`stack`]), starts the Lambda service
//! ([`lambda`]: the Runtime API, and the real function binaries as execution environments), API
//! Gateway ([`gateway`]), the two event source mappings ([`stream_source`], [`queue_source`])
//! and the counting proxy in front of moto ([`proxy`]); then drives it with WebSocket clients
//! ([`clients`]) in the scenario's shape ([`scenario`]) and prints one JSON line ([`report`]).
//! Every modelled number is in [`settings`], every price in [`prices`].

#![recursion_limit = "256"]

mod bucket;
mod clients;
mod gateway;
mod lambda;
mod latency;
mod metrics;
mod prices;
mod proxy;
mod queue_source;
mod report;
mod scenario;
mod settings;
mod stack;
mod stream_source;

use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "palaver's AWS stack simulated on this machine")]
struct Args {
    /// Scenarios to run (default: smoke). `all` runs every one.
    scenarios: Vec<String>,
    /// moto's endpoint (scripts/aws-sim starts one).
    #[arg(long, env = "PALAVER_SIM_MOTO")]
    moto: String,
    /// Where the function binaries are (target/release).
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Scale to run at, instead of each scenario's default (1 = full size).
    #[arg(long)]
    scale: Option<f64>,
    /// Seconds of sending, instead of each scenario's.
    #[arg(long)]
    secs: Option<f64>,
    /// Longest wait, after every client joined, for the join storm's frames to be out before
    /// the measured phase starts.
    #[arg(long, default_value_t = 300.0)]
    settle_secs: f64,
    /// Where the functions' logs go.
    #[arg(long, default_value = "target/aws-sim")]
    logs: PathBuf,
    /// Exit with an error unless every scenario deployed and every acknowledged message reached
    /// every member once, in order (what scripts/test asks of the smoke run).
    #[arg(long)]
    check: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SIM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let shapes = scenario::all();
    let names: Vec<String> = match args.scenarios.as_slice() {
        [] => vec!["smoke".to_owned()],
        [all] if all == "all" => shapes.iter().map(|s| s.name.to_owned()).collect(),
        names => names.to_vec(),
    };
    for name in &names {
        if !shapes.iter().any(|s| s.name == name) {
            return Err(format!(
                "no scenario {name:?}; there are: {}",
                shapes.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
            )
            .into());
        }
    }
    let moto_rps = report::measure_moto(&args.moto).await?;
    eprintln!("aws-sim: moto carries {moto_rps:.0} PutItem/s (8 at a time, no added latency)");
    for name in names {
        let mut shape = shapes.iter().find(|s| s.name == name).unwrap().clone();
        if let Some(secs) = args.secs {
            shape.secs = secs;
        }
        let scaled = shape.at(args.scale.unwrap_or(shape.default_scale));
        let line = run(&args, scaled, moto_rps).await?;
        println!("{line}");
        if args.check {
            report::check(&line).map_err(|why| format!("{name}: {why}"))?;
        }
    }
    Ok(())
}

/// Clients connecting and joining at once during set-up. A room's appends take turns (each is a
/// conditional write at head + 1), so joins into one room at once mostly retry: 8 keeps a big
/// room's set-up at the rate one room's log takes on DynamoDB (≈ 25–40 appends/s at its
/// measured latencies) instead of multiplying moto's load by the number of racing joins.
const SETUP_CONCURRENCY: usize = 8;

/// The longest the end's catch-up may take: every client's `getHistory` pages, through the
/// scaled account's bucket.
const CATCH_UP_WAIT: Duration = Duration::from_secs(120);
const SECRET: &str = "aws-sim-secret-0123456789abcdef0123456789";

/// The environment template.yaml gives a function, and the AWS settings that point its SDK
/// clients at the counting proxy.
fn function_env(
    endpoint: &str,
    stack: &stack::Stack,
    management: &str,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = [
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_SESSION_TOKEN", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_owned()),
        (
            "PALAVER_STORE",
            format!("dynamodb://{}", stack.table_prefix),
        ),
        ("PALAVER_MANAGEMENT_ENDPOINT", management.to_owned()),
        ("PALAVER_CONNECTION_RETENTION", "7d".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    env
}

async fn run(
    args: &Args,
    scaled: scenario::Scaled,
    moto_rps: f64,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let shape = scaled.shape.clone();
    eprintln!(
        "aws-sim: {} at scale {} ({} rooms × {} connections, {} msg/s per room, {} s)",
        shape.name, scaled.scale, scaled.rooms, scaled.members, shape.rate_per_room, shape.secs
    );
    report::reset_moto(&args.moto).await?;
    let metrics = Arc::new(metrics::Metrics::default());
    let upstream = proxy::Upstream::new(&args.moto, metrics.clone());
    let deploy_endpoint = upstream.listen("deploy").await?;
    let esm_endpoint = upstream.listen("esm").await?;
    let sdk = |endpoint: String| async move {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "sim",
            ))
            .load()
            .await
    };
    let stack_name = format!("sim{}", ulid::Ulid::new().to_string().to_lowercase());
    let stack = stack::create(&sdk(deploy_endpoint).await, &stack_name, SECRET).await?;

    // The gateway's address is in the functions' environment: bind it first.
    let gateway_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let management = format!("http://{}/prod", gateway_listener.local_addr()?);
    let bin = |name: &str| args.bin_dir.join(name);
    let mut parameters = scaled.parameters.clone();
    let specs =
        |parameters: &settings::Parameters, route: String, fanout: String, deliver: String| {
            let reserve = |n: usize| (n > 0).then_some(n);
            vec![
                lambda::FunctionSpec {
                    name: "palaver-route",
                    binary: bin("palaver-route"),
                    memory_mb: settings::ROUTE_MEMORY_MB,
                    timeout: settings::ROUTE_TIMEOUT,
                    reserved: reserve(parameters.route_concurrency),
                    env: function_env(
                        &route,
                        &stack,
                        &management,
                        &[("PALAVER_JWT_SECRET_ID", stack.secret_id.clone())],
                    ),
                },
                lambda::FunctionSpec {
                    name: "palaver-fanout",
                    binary: bin("palaver-fanout"),
                    memory_mb: settings::FANOUT_MEMORY_MB,
                    timeout: settings::FANOUT_TIMEOUT,
                    reserved: None,
                    env: function_env(
                        &fanout,
                        &stack,
                        &management,
                        &[
                            (
                                "PALAVER_DELIVERY_QUEUE_URL",
                                stack.delivery_queue_url.clone(),
                            ),
                            (
                                "PALAVER_FANOUT_SHARD_THRESHOLD",
                                parameters.shard_threshold.to_string(),
                            ),
                            (
                                "PALAVER_FANOUT_SHARD_SIZE",
                                parameters.shard_size.to_string(),
                            ),
                        ],
                    ),
                },
                lambda::FunctionSpec {
                    name: "palaver-deliver",
                    binary: bin("palaver-deliver"),
                    memory_mb: settings::DELIVER_MEMORY_MB,
                    timeout: settings::DELIVER_TIMEOUT,
                    // Limited by its trigger's MaximumConcurrency, not a reservation.
                    reserved: None,
                    env: function_env(&deliver, &stack, &management, &[]),
                },
            ]
        };
    let route_endpoint = upstream.listen("route").await?;
    let fanout_endpoint = upstream.listen("fanout").await?;
    let deliver_endpoint = upstream.listen("deliver").await?;
    let mut functions = specs(
        &parameters,
        route_endpoint.clone(),
        fanout_endpoint.clone(),
        deliver_endpoint.clone(),
    );
    // CloudFormation refuses reservations the account cannot give; the operator then deploys
    // with RouteConcurrency=0, which is what runs.
    let deploy_error = lambda::check_reservations(&scaled.account, &functions).err();
    if deploy_error.is_some() {
        parameters.route_concurrency = 0;
        functions = specs(
            &parameters,
            route_endpoint,
            fanout_endpoint,
            deliver_endpoint,
        );
    }
    // The trigger runs at most MaximumConcurrency invocations at once (and no more than the
    // account gives).
    let deliver_pollers = parameters
        .deliver_max_concurrency
        .min(scaled.account.lambda_concurrency);
    let logs = args.logs.join(shape.name);
    let _ = std::fs::remove_dir_all(&logs);
    let lambda = lambda::LambdaService::start(scaled.account.clone(), functions, logs).await?;
    let gateway = gateway::Gateway::start(
        gateway_listener,
        &scaled.account,
        lambda.clone(),
        metrics.clone(),
        shape.disconnect_loss,
    )?;
    let esm_sdk = sdk(esm_endpoint).await;
    let stream = Arc::new(stream_source::StreamSource {
        streams: aws_sdk_dynamodbstreams::Client::new(&esm_sdk),
        sqs: aws_sdk_sqs::Client::new(&esm_sdk),
        stream_arn: stack.stream_arn.clone(),
        dead_letter_url: stack.stream_dead_letter_url.clone(),
        lambda: lambda.clone(),
        metrics: metrics.clone(),
    });
    let queue = Arc::new(queue_source::QueueSource {
        sqs: aws_sdk_sqs::Client::new(&esm_sdk),
        queue_url: stack.delivery_queue_url.clone(),
        queue_arn: stack.delivery_queue_arn.clone(),
        lambda: lambda.clone(),
        metrics: metrics.clone(),
        sent: upstream.sqs_sent.clone(),
        pollers: deliver_pollers,
    });
    let sources = [tokio::spawn(stream.run()), tokio::spawn(queue.run())];

    // Clients connect and join; then the run waits for the join storm's frames to settle.
    let started = Instant::now();
    let shared = clients::Shared::new(gateway.ws_url.clone(), SECRET.to_owned());
    let plans = scenario::plans(&scaled);
    let connections = plans.len();
    let ready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gave_up = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Clients set up a few at a time, as a load generator opens connections (and as users
    // arrive): everyone at once would make the room's first appends contend all together.
    let setting_up = Arc::new(tokio::sync::Semaphore::new(SETUP_CONCURRENCY));
    let mut tasks = Vec::new();
    for plan in plans {
        let (ready, gave_up) = (ready.clone(), gave_up.clone());
        let permit = setting_up.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(clients::run(
            shared.clone(),
            plan,
            move |joined| {
                if joined {
                    ready.fetch_add(1, Relaxed);
                } else {
                    gave_up.fetch_add(1, Relaxed);
                }
                drop(permit);
            },
        )));
    }
    let setup_deadline = Instant::now() + Duration::from_secs(600);
    report::wait_until(setup_deadline, || {
        ready.load(Relaxed) + gave_up.load(Relaxed) >= connections
    })
    .await;
    let joined = ready.load(Relaxed);
    // The measured phase starts when the join storm's frames are out, or after --settle-secs
    // (`"settled": false`: its backlog is then still being delivered).
    let settled = report::settle(
        &metrics,
        &lambda,
        Instant::now() + Duration::from_secs_f64(args.settle_secs),
    )
    .await;
    let setup_s = started.elapsed().as_secs_f64();
    eprintln!("aws-sim: {joined}/{connections} joined, settled in {setup_s:.1} s");

    // The measured phase.
    let before = report::Snapshot::take(&metrics, &lambda);
    let measured = Instant::now();
    let measured_us = shared.now_us();
    shared.set(&shared.sending, true);
    if shape.storm {
        tokio::time::sleep(Duration::from_secs_f64(shape.secs / 3.0)).await;
        shared.set(&shared.storm, true);
        // Every storming client has dropped once no more of them are open.
        report::wait_until(Instant::now() + Duration::from_secs(30), || {
            gateway.open_connections() <= scaled.rooms
        })
        .await;
        shared.set(&shared.storm, false);
        tokio::time::sleep(Duration::from_secs_f64(shape.secs * 2.0 / 3.0)).await;
    } else {
        tokio::time::sleep(Duration::from_secs_f64(shape.secs)).await;
    }
    shared.set(&shared.sending, false);
    let sending_s = measured.elapsed().as_secs_f64();
    // Drain: until every acknowledged message reached every member, nothing moves for a
    // while, or as long again as the sending took (at least a minute).
    let drain_deadline = Instant::now() + Duration::from_secs_f64(shape.secs.max(60.0));
    report::drain(&shared, &scaled, Duration::from_secs(30), drain_deadline).await;
    let elapsed_s = measured.elapsed().as_secs_f64();
    // From the measured phase's start to the last message heard: what deliveries per second
    // are counted over (the drain may wait on past it for a message that was never acked).
    let delivering_s = shared
        .last_heard_us
        .load(Relaxed)
        .saturating_sub(measured_us) as f64
        / 1e6;
    // Catch-up: each client fetches from history what it still misses of its rooms, as one
    // coming back to a room does; its requests and their cost count with the run's.
    shared.set(&shared.catch_up, true);
    let catching_up = Instant::now();
    report::wait_until(Instant::now() + CATCH_UP_WAIT, || {
        shared.caught_up.load(Relaxed) as usize + shared.left.lock().len() + gave_up.load(Relaxed)
            >= connections
    })
    .await;
    let catch_up_s = catching_up.elapsed().as_secs_f64();
    let after = report::Snapshot::take(&metrics, &lambda);
    shared.set(&shared.stop, true);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    gateway.close_all();
    for source in sources {
        source.abort();
    }
    lambda.shutdown();
    let line = report::line(report::Run {
        scaled: &scaled,
        connections,
        joined,
        setup_s,
        settled,
        sending_s,
        elapsed_s,
        delivering_s,
        catch_up_s,
        shared: &shared,
        metrics: &metrics,
        before: &before,
        after: &after,
        lambda: &lambda,
        deploy_error,
        parameters: &parameters,
        moto_rps,
    });
    Ok(line)
}

//! How fast each Lambda function starts: `scripts/bench-lambda` (or `cargo bench --bench
//! lambda_cold_start` with `AWS_ENDPOINT_URL` pointing at a moto server and
//! `PALAVER_CARGO_LAMBDA` at cargo-lambda).
//!
//! Each binary is started fresh under cargo-lambda's Runtime API emulator (already running) and
//! at once sent a real event — `$connect` to `palaver-route`, a DynamoDB stream batch to
//! `palaver-fanout`, an SQS delivery job to `palaver-deliver` — against moto and a real
//! `palaver serve` playing API Gateway. "init" is the time from starting the process to its
//! first call to the Runtime API (through a forwarding port that notes it): loading the binary,
//! the runtime, the configuration, the SDK clients — Lambda's "Init Duration". "cold" is the
//! time from starting the process to the first event's answer, its first connections to
//! DynamoDB and the rest included; "warm" the next event of the same kind on the same process.
//! Both include the `cargo lambda invoke` process that carries the event (it starts while the
//! function initialises). Medians of five starts.
//!
//! The binaries are the ones `cargo bench` builds, or those in `PALAVER_LAMBDA_BINARIES` (a
//! `cargo lambda build` output directory, `NAME/bootstrap`): `scripts/bench-lambda` builds them
//! as `sam build` does, with the settings in Cargo.toml's `[package.metadata.lambda.build]`.

#[path = "../tests/it/common/mod.rs"]
mod common;

#[path = "../tests/it/aws_support/mod.rs"]
mod aws_support;

use aws_support::{Options, Socket, World, failures};
use palaver::ports::DeliveryJob;
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

const STARTS: usize = 5;

/// Where the function binary `name` is.
fn binary(name: &str, built: &str) -> String {
    match std::env::var("PALAVER_LAMBDA_BINARIES") {
        Ok(dir) => format!("{dir}/{name}/bootstrap"),
        Err(_) => built.to_owned(),
    }
}

/// One event of the kind `function` handles, ready to send, and the socket it is about (kept
/// open until the end: the connection must be a live one).
async fn event_for(world: &mut World, function: &str, n: usize) -> (Value, Socket) {
    match function {
        "palaver-route" => {
            let socket = world.gateway.open(&format!("route{n}")).await;
            (world.connect_event(&socket), socket)
        }
        "palaver-fanout" => {
            let socket = world.connect(&format!("fanout{n}")).await;
            world.join(&socket, "hall").await;
            (world.stream.next_event(2).await, socket)
        }
        _ => {
            let socket = world.connect(&format!("deliver{n}")).await;
            let job = DeliveryJob {
                frames: vec![
                    json!({"type": "presence", "room": "hall", "user": "zoe", "online": true})
                        .to_string(),
                ],
                connections: vec![socket.id.clone()],
                group: "hall#0".to_owned(),
                id: format!("c:zoe:{n}:hall#0#0"),
            };
            let event = json!({"Records": [{
                "messageId": format!("m{n}"), "receiptHandle": "r",
                "body": serde_json::to_string(&job).unwrap(),
                "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q", "awsRegion": "us-east-1"
            }]});
            (event, socket)
        }
    }
}

fn answered(function: &str, answer: &Value) {
    if function == "palaver-route" {
        assert_eq!(answer["statusCode"], 200, "{answer}");
    } else {
        assert!(failures(answer).is_empty(), "{answer}");
    }
}

fn median(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

async fn starts_of(function: &str, built: &str) {
    let path = binary(function, built);
    let bytes = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .len();
    let mut world = World::new("coldstart", Options::default()).await;
    let emulator = world.emulator().await;
    let (mut init, mut cold, mut warm, mut sockets) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..STARTS {
        let (first, socket) = event_for(&mut world, function, 2 * n).await;
        sockets.push(socket);
        let (second, socket) = event_for(&mut world, function, 2 * n + 1).await;
        sockets.push(socket);
        let (proxy, first_call) = first_call_through(emulator.port()).await;
        let api = format!("http://127.0.0.1:{proxy}/.rt/{function}");
        let started = Instant::now();
        let mut running = world
            .function_with(function, &path, &[("AWS_LAMBDA_RUNTIME_API", api)])
            .await;
        answered(function, &running.invoke(first).await);
        cold.push(started.elapsed());
        let called = first_call
            .lock()
            .unwrap()
            .expect("the function called its Runtime API");
        init.push(called - started);
        let started = Instant::now();
        answered(function, &running.invoke(second).await);
        warm.push(started.elapsed());
    }
    let (init, cold, warm) = (median(init), median(cold), median(warm));
    println!(
        "{{\"function\":\"{function}\",\"binary_bytes\":{bytes},\"init_ms\":{init:.1},\
         \"cold_ms\":{cold:.1},\"warm_ms\":{warm:.1}}}"
    );
}

/// A loopback port that forwards to the emulator's, and when the first connection came: a
/// function's first call to its Runtime API (`GET …/invocation/next`) is the end of its init.
async fn first_call_through(emulator: u16) -> (u16, Arc<Mutex<Option<Instant>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
    let port = listener.local_addr().unwrap().port();
    let first = Arc::new(Mutex::new(None));
    let noted = first.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            noted.lock().unwrap().get_or_insert_with(Instant::now);
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", emulator)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (port, first)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        starts_of("palaver-route", env!("CARGO_BIN_EXE_palaver-route")).await;
        starts_of("palaver-fanout", env!("CARGO_BIN_EXE_palaver-fanout")).await;
        starts_of("palaver-deliver", env!("CARGO_BIN_EXE_palaver-deliver")).await;
    });
}

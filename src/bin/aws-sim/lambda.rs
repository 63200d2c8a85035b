//! The Lambda service: the Runtime API, execution environments (one function process each, the
//! real `palaver-route`, `palaver-fanout` or `palaver-deliver` binary), and the account's
//! concurrency.
//!
//! - An invocation takes a **concurrency slot** first ([`LambdaService::try_acquire`]): a
//!   function with reserved concurrency has that many; the others share what the account has
//!   left. No slot is a throttle (Lambda's 429 `TooManyRequestsException`), which API Gateway
//!   and the event source mappings each handle their own way.
//! - It then runs in an **idle environment** of the function, or a new one: a new process whose
//!   `AWS_LAMBDA_RUNTIME_API` points here. New environments are limited to 1,000 per 10 s per
//!   function; past that the invocation is throttled too. The time from starting the process
//!   to its first `GET …/invocation/next` is its **cold start** (the function's `main`: reading
//!   its configuration, building the SDK clients, for the route function reading its secret).
//! - A function that does not answer within its timeout has its environment killed, as Lambda
//!   does; an environment whose process exits fails the invocation it held.
//!
//! Each environment polls its own path of the Runtime API (`/env/{id}/2018-06-01/…`): the
//! runtime client in `lambda_runtime` keeps a base path, so nothing in the function knows.

use crate::bucket::Bucket;
use crate::settings::{Account, INIT_TIMEOUT};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

/// How long an event source mapping waits before asking again for a concurrency slot Lambda
/// refused it. AWS documents no figure.
pub const THROTTLE_PAUSE: Duration = Duration::from_millis(100);

/// A function as template.yaml deploys it.
#[derive(Clone, Debug)]
pub struct FunctionSpec {
    pub name: &'static str,
    pub binary: PathBuf,
    pub memory_mb: u32,
    pub timeout: Duration,
    /// Reserved concurrency; `None` shares the account's unreserved pool.
    pub reserved: Option<usize>,
    /// Its environment variables (template.yaml's, and the AWS settings pointing at the proxy).
    pub env: Vec<(String, String)>,
}

/// Why an invocation did not answer.
#[derive(Debug)]
pub enum InvokeError {
    /// No concurrency, or no new environment allowed now (Lambda's 429).
    Throttled,
    /// The function answered `…/error`, or its process exited (`Runtime.ExitError`).
    Function(String),
    /// It ran past its timeout; its environment was killed.
    Timeout,
}

impl std::fmt::Display for InvokeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvokeError::Throttled => f.write_str("TooManyRequestsException"),
            InvokeError::Function(error) => write!(f, "function error: {error}"),
            InvokeError::Timeout => f.write_str("Task timed out"),
        }
    }
}

/// What one function did, for the report.
#[derive(Clone, Debug, Default)]
pub struct FunctionStats {
    pub invocations: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub throttles: u64,
    /// Slots held now (an event source's poller holds one while it receives).
    pub busy: usize,
    /// Invocations running now, and the most at once: the function's concurrency.
    pub running: usize,
    pub peak_concurrency: usize,
    pub environments: u64,
    pub cold_starts: Vec<Duration>,
    /// Billed duration (each invocation rounded up to the millisecond), milliseconds.
    pub billed_ms: u64,
}

struct Function {
    spec: FunctionSpec,
    idle: Mutex<Vec<Arc<Env>>>,
    /// New environments: 1,000 per 10 s (settings::LAMBDA_SCALING_*).
    scaling: Bucket,
    stats: Mutex<FunctionStats>,
}

/// Where an invocation's answer goes: the function's response body, or its error.
type Reply = oneshot::Sender<Result<Bytes, String>>;

/// One invocation handed to an environment.
struct Invocation {
    request_id: String,
    payload: Bytes,
    deadline: chrono::DateTime<chrono::Utc>,
    reply: Reply,
}

/// One execution environment: one process of the function.
struct Env {
    id: u64,
    function: &'static str,
    started: Instant,
    initialised: Mutex<bool>,
    inbox_tx: mpsc::Sender<Invocation>,
    inbox: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    /// The invocation the process is working on: its request id and where its answer goes.
    current: Mutex<Option<(String, Reply)>>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
}

impl Env {
    fn kill(&self) {
        if let Some(kill) = self.kill.lock().take() {
            let _ = kill.send(());
        }
    }
}

pub struct LambdaService {
    api: String,
    unreserved_limit: usize,
    functions: HashMap<&'static str, Arc<Function>>,
    /// Busy environments in the unreserved pool.
    unreserved_busy: Mutex<usize>,
    envs: Mutex<HashMap<u64, Arc<Env>>>,
    next_env: AtomicU64,
    next_request: AtomicU64,
    logs: PathBuf,
}

/// A concurrency slot, given back when dropped.
pub struct Slot {
    service: Arc<LambdaService>,
    function: &'static str,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let function = &self.service.functions[self.function];
        let mut unreserved = self.service.unreserved_busy.lock();
        if function.spec.reserved.is_none() {
            *unreserved -= 1;
        }
        function.stats.lock().busy -= 1;
    }
}

/// Deploying reservations that leave less than the floor unreserved fails, with Lambda's words.
pub fn check_reservations(account: &Account, specs: &[FunctionSpec]) -> Result<(), String> {
    let reserved: usize = specs.iter().filter_map(|s| s.reserved).sum();
    if reserved + account.lambda_unreserved_floor > account.lambda_concurrency {
        return Err(format!(
            "Specified ReservedConcurrentExecutions for function decreases account's \
             UnreservedConcurrentExecution below its minimum value of [{}] (account \
             concurrency {}, reserved {reserved})",
            account.lambda_unreserved_floor, account.lambda_concurrency
        ));
    }
    Ok(())
}

impl LambdaService {
    /// Serves the Runtime API on a loopback port; the functions' environments start on demand.
    pub async fn start(
        account: Account,
        specs: Vec<FunctionSpec>,
        logs: PathBuf,
    ) -> std::io::Result<Arc<LambdaService>> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let api = format!("http://{}", listener.local_addr()?);
        let reserved: usize = specs.iter().filter_map(|s| s.reserved).sum();
        let functions = specs
            .into_iter()
            .map(|spec| {
                let function = Function {
                    scaling: Bucket::new(account.lambda_scaling_rate, account.lambda_scaling_burst),
                    spec,
                    idle: Mutex::default(),
                    stats: Mutex::default(),
                };
                (function.spec.name, Arc::new(function))
            })
            .collect();
        std::fs::create_dir_all(&logs)?;
        let service = Arc::new(LambdaService {
            api,
            unreserved_limit: account.lambda_concurrency.saturating_sub(reserved),
            functions,
            unreserved_busy: Mutex::new(0),
            envs: Mutex::default(),
            next_env: AtomicU64::new(1),
            next_request: AtomicU64::new(1),
            logs,
        });
        let app = Router::new()
            .route(
                "/env/{env}/2018-06-01/runtime/invocation/next",
                get(next_invocation),
            )
            .route(
                "/env/{env}/2018-06-01/runtime/invocation/{request}/response",
                post(invocation_response),
            )
            .route(
                "/env/{env}/2018-06-01/runtime/invocation/{request}/error",
                post(invocation_error),
            )
            .route("/env/{env}/2018-06-01/runtime/init/error", post(init_error))
            .with_state(service.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(service)
    }

    /// A concurrency slot for `function`, waiting for one as an event source mapping does:
    /// every refusal counted as the mapping's throttle, then tried again after
    /// [`THROTTLE_PAUSE`].
    pub async fn acquire(
        self: &Arc<Self>,
        function: &'static str,
        metrics: &crate::metrics::Metrics,
    ) -> Slot {
        loop {
            if let Some(slot) = self.try_acquire(function) {
                return slot;
            }
            metrics.esm_throttled.add(1);
            tokio::time::sleep(THROTTLE_PAUSE).await;
        }
    }

    /// A concurrency slot for `function`, if the account and the function have one free.
    pub fn try_acquire(self: &Arc<Self>, function: &'static str) -> Option<Slot> {
        let f = &self.functions[function];
        let mut unreserved = self.unreserved_busy.lock();
        let mut stats = f.stats.lock();
        let free = match f.spec.reserved {
            Some(reserved) => stats.busy < reserved,
            None => *unreserved < self.unreserved_limit,
        };
        if !free {
            stats.throttles += 1;
            return None;
        }
        if f.spec.reserved.is_none() {
            *unreserved += 1;
        }
        stats.busy += 1;
        Some(Slot {
            service: self.clone(),
            function,
        })
    }

    /// Runs one invocation of the slot's function with `payload` (the event's JSON).
    pub async fn invoke(&self, slot: &Slot, payload: Bytes) -> Result<Bytes, InvokeError> {
        let function = self.functions[slot.function].clone();
        let idle = function.idle.lock().pop();
        let (env, cold) = match idle {
            Some(env) => (env, false),
            None => {
                if !function.scaling.try_take() {
                    function.stats.lock().throttles += 1;
                    return Err(InvokeError::Throttled);
                }
                match self.spawn(&function) {
                    Ok(env) => (env, true),
                    Err(error) => return Err(InvokeError::Function(error)),
                }
            }
        };
        {
            let mut stats = function.stats.lock();
            stats.invocations += 1;
            stats.running += 1;
            stats.peak_concurrency = stats.peak_concurrency.max(stats.running);
        }
        let request_id = format!(
            "{:08x}-sim-{}",
            self.next_request.fetch_add(1, Relaxed),
            ulid::Ulid::new()
        );
        let (reply, answer) = oneshot::channel();
        let timeout = function.spec.timeout + if cold { INIT_TIMEOUT } else { Duration::ZERO };
        let started = Instant::now();
        let invocation = Invocation {
            request_id,
            payload,
            deadline: chrono::Utc::now()
                + chrono::Duration::from_std(function.spec.timeout).unwrap_or_default(),
            reply,
        };
        if env.inbox_tx.send(invocation).await.is_err() {
            return Err(InvokeError::Function("Runtime.ExitError".into()));
        }
        let outcome = tokio::time::timeout(timeout, answer).await;
        let billed = started.elapsed().as_micros().div_ceil(1000) as u64;
        {
            let mut stats = function.stats.lock();
            stats.billed_ms += billed;
            stats.running -= 1;
        }
        match outcome {
            Ok(Ok(Ok(body))) => {
                function.idle.lock().push(env);
                Ok(body)
            }
            Ok(Ok(Err(error))) => {
                function.stats.lock().errors += 1;
                function.idle.lock().push(env);
                Err(InvokeError::Function(error))
            }
            Ok(Err(_)) => {
                function.stats.lock().errors += 1;
                Err(InvokeError::Function("Runtime.ExitError".into()))
            }
            Err(_) => {
                function.stats.lock().timeouts += 1;
                env.kill();
                Err(InvokeError::Timeout)
            }
        }
    }

    /// Starts a new environment of `function`: its process, and a task that notices its end.
    fn spawn(&self, function: &Arc<Function>) -> Result<Arc<Env>, String> {
        let id = self.next_env.fetch_add(1, Relaxed);
        let spec = &function.spec;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", spec.name)))
            .map_err(|e| format!("log file: {e}"))?;
        let stderr = log.try_clone().map_err(|e| format!("log file: {e}"))?;
        let mut command = tokio::process::Command::new(&spec.binary);
        command
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            // With its scheme: the runtime client takes a base path only from a full URL.
            .env("AWS_LAMBDA_RUNTIME_API", format!("{}/env/{id}", self.api))
            .env("AWS_LAMBDA_FUNCTION_NAME", spec.name)
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                spec.memory_mb.to_string(),
            )
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/palaver/sim/{}", spec.name),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", format!("env-{id}"))
            .env("AWS_EXECUTION_ENV", "AWS_Lambda_provided.al2023")
            .env("_HANDLER", "bootstrap")
            .env("TZ", ":UTC")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(stderr))
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|e| format!("{}: {e}", spec.binary.display()))?;
        let (inbox_tx, inbox) = mpsc::channel(1);
        let (kill, killed) = oneshot::channel();
        let env = Arc::new(Env {
            id,
            function: spec.name,
            started: Instant::now(),
            initialised: Mutex::new(false),
            inbox_tx,
            inbox: tokio::sync::Mutex::new(inbox),
            current: Mutex::new(None),
            kill: Mutex::new(Some(kill)),
        });
        function.stats.lock().environments += 1;
        self.envs.lock().insert(id, env.clone());
        let watched = env.clone();
        let function = function.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = child.wait() => {}
                _ = killed => {
                    let _ = child.kill().await;
                }
            }
            // Gone: nothing may be handed to it any more, and what it held has failed.
            function.idle.lock().retain(|e| e.id != watched.id);
            watched.current.lock().take();
            let mut inbox = watched.inbox.lock().await;
            inbox.close();
            while inbox.try_recv().is_ok() {}
        });
        Ok(env)
    }

    fn env(&self, id: u64) -> Option<Arc<Env>> {
        self.envs.lock().get(&id).cloned()
    }

    /// Each function's figures so far.
    pub fn stats(&self) -> Vec<(&'static str, FunctionSpec, FunctionStats)> {
        let mut all: Vec<_> = self
            .functions
            .values()
            .map(|f| (f.spec.name, f.spec.clone(), f.stats.lock().clone()))
            .collect();
        all.sort_by_key(|(name, _, _)| *name);
        all
    }

    /// Stops every environment.
    pub fn shutdown(&self) {
        for env in self.envs.lock().values() {
            env.kill();
        }
    }
}

/// `GET …/invocation/next`: the environment waits here for its next event.
async fn next_invocation(
    State(service): State<Arc<LambdaService>>,
    Path(env): Path<u64>,
) -> Response {
    let Some(env) = service.env(env) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    {
        let mut initialised = env.initialised.lock();
        if !*initialised {
            *initialised = true;
            let cold = env.started.elapsed();
            service.functions[env.function]
                .stats
                .lock()
                .cold_starts
                .push(cold);
        }
    }
    let Some(invocation) = env.inbox.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let spec_name = env.function;
    *env.current.lock() = Some((invocation.request_id.clone(), invocation.reply));
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("lambda-runtime-aws-request-id", invocation.request_id);
    set(
        "lambda-runtime-deadline-ms",
        invocation.deadline.timestamp_millis().to_string(),
    );
    set(
        "lambda-runtime-invoked-function-arn",
        format!("arn:aws:lambda:us-east-1:123456789012:function:{spec_name}"),
    );
    set(
        "lambda-runtime-trace-id",
        "Root=1-00000000-000000000000000000000000;Sampled=0".to_owned(),
    );
    set("content-type", "application/json".to_owned());
    (StatusCode::OK, headers, invocation.payload).into_response()
}

fn complete(service: &LambdaService, env: u64, request: &str, outcome: Result<Bytes, String>) {
    let Some(env) = service.env(env) else { return };
    let mut current = env.current.lock();
    if current.as_ref().is_some_and(|(id, _)| id == request)
        && let Some((_, reply)) = current.take()
    {
        let _ = reply.send(outcome);
    }
}

async fn invocation_response(
    State(service): State<Arc<LambdaService>>,
    Path((env, request)): Path<(u64, String)>,
    body: Bytes,
) -> StatusCode {
    complete(&service, env, &request, Ok(body));
    StatusCode::ACCEPTED
}

async fn invocation_error(
    State(service): State<Arc<LambdaService>>,
    Path((env, request)): Path<(u64, String)>,
    body: Bytes,
) -> StatusCode {
    let error = String::from_utf8_lossy(&body).into_owned();
    complete(&service, env, &request, Err(error));
    StatusCode::ACCEPTED
}

/// `POST …/init/error`: the function could not start; Lambda ends the environment.
async fn init_error(
    State(service): State<Arc<LambdaService>>,
    Path(env): Path<u64>,
    body: Bytes,
) -> StatusCode {
    if let Some(env) = service.env(env) {
        tracing::error!(function = env.function, error = %String::from_utf8_lossy(&body), "init failed");
        env.kill();
    }
    StatusCode::ACCEPTED
}

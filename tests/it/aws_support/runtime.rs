//! Just enough of the Lambda Runtime API to run the real function binaries here: each one
//! long-polls `GET …/invocation/next` for an event and `POST`s its answer to
//! `…/invocation/{id}/response` (or `/error`), exactly as inside Lambda.
//! See <https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html>.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::Value;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// What a function answered to one invocation.
type Answer = Result<Value, String>;

struct Api {
    events: tokio::sync::Mutex<mpsc::UnboundedReceiver<(String, Value)>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Answer>>>,
    init_error: Mutex<Option<String>>,
}

/// One function binary, running against its own Runtime API.
pub struct Function {
    name: String,
    child: Child,
    api: Arc<Api>,
    events: mpsc::UnboundedSender<(String, Value)>,
    invocations: u64,
    /// What the function wrote to stdout (its log on Lambda), line by line.
    stdout: Arc<Mutex<Vec<String>>>,
}

impl Function {
    /// Starts `binary` with `env` (on top of this process's, so the AWS settings pointing at
    /// moto carry over) and the variables Lambda itself sets.
    pub async fn start(name: &str, binary: &str, env: &[(&str, String)]) -> Function {
        let (events, receiver) = mpsc::unbounded_channel();
        let api = Arc::new(Api {
            events: tokio::sync::Mutex::new(receiver),
            waiting: Mutex::default(),
            init_error: Mutex::default(),
        });
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(respond),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(fail))
            .route("/2018-06-01/runtime/init/error", post(init_failed))
            .with_state(api.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let mut command = Command::new(binary);
        command
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "test")
            .env("RUST_LOG", "palaver=debug,info")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the function binary starts");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = stdout.clone();
        let pipe = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        Function {
            name: name.to_owned(),
            child,
            api,
            events,
            invocations: 0,
            stdout,
        }
    }

    /// The Embedded Metric Format lines the function has written so far, parsed.
    pub fn metric_lines(&self) -> Vec<Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["_aws"]["CloudWatchMetrics"].is_array())
            .collect()
    }

    /// The function's process, for measuring what it uses.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Invokes the function with `event` and returns its response.
    pub async fn invoke(&mut self, event: Value) -> Value {
        self.invoke_within(event, super::WAIT).await
    }

    /// [`Function::invoke`], for an event that may take longer than the tests' usual wait.
    pub async fn invoke_within(&mut self, event: Value, wait: std::time::Duration) -> Value {
        self.invocations += 1;
        let id = format!("{}-{}", self.name, self.invocations);
        let (tx, rx) = oneshot::channel();
        self.api.waiting.lock().unwrap().insert(id.clone(), tx);
        self.events
            .send((id, event))
            .expect("the runtime API is up");
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(response))) => response,
            Ok(Ok(Err(error))) => panic!("{} failed: {error}", self.name),
            _ => panic!(
                "{} did not answer (init error: {:?}; exited: {:?})",
                self.name,
                self.api.init_error.lock().unwrap(),
                self.child.try_wait()
            ),
        }
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn next(State(api): State<Arc<Api>>) -> Response {
    let Some((id, event)) = api.events.lock().await.recv().await else {
        return StatusCode::GONE.into_response();
    };
    let deadline = chrono::Utc::now().timestamp_millis() + 60_000;
    let mut headers = HeaderMap::new();
    headers.insert(
        "lambda-runtime-aws-request-id",
        HeaderValue::from_str(&id).unwrap(),
    );
    headers.insert("lambda-runtime-deadline-ms", HeaderValue::from(deadline));
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        HeaderValue::from_static("arn:aws:lambda:us-east-1:123456789012:function:palaver"),
    );
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    (headers, event.to_string()).into_response()
}

async fn respond(State(api): State<Arc<Api>>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let answer = serde_json::from_slice(&body).map_err(|e| format!("not JSON: {e}"));
    finish(&api, &id, answer)
}

async fn fail(State(api): State<Arc<Api>>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    finish(&api, &id, Err(String::from_utf8_lossy(&body).into_owned()))
}

async fn init_failed(State(api): State<Arc<Api>>, body: Bytes) -> StatusCode {
    *api.init_error.lock().unwrap() = Some(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}

fn finish(api: &Api, id: &str, answer: Answer) -> StatusCode {
    match api.waiting.lock().unwrap().remove(id) {
        Some(waiter) => {
            let _ = waiter.send(answer);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

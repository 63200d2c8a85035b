//! The function binaries under cargo-lambda's Lambda emulator, as `cargo lambda watch` runs
//! them: one `cargo lambda watch --only-lambda-apis` serves the Runtime API and the invoke
//! endpoint; each binary is started with the variables the emulator names (its runtime API at
//! `…/.rt/{function}`, as the emulator gives the functions it starts itself), polls it for
//! events and posts back its answers; `cargo lambda invoke {function}` sends each event and
//! prints the answer.
//!
//! cargo-lambda comes from PyPI, pinned, into the project's virtualenv (`scripts/cargo-lambda
//! --install`); `scripts/test` points `PALAVER_CARGO_LAMBDA` at it. Without it these tests fail:
//! they are never skipped.

use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The version `scripts/cargo-lambda` installs.
const VERSION: &str = "1.9.2";

/// The cargo-lambda binary: `PALAVER_CARGO_LAMBDA`, else `cargo-lambda` on `PATH`.
fn cargo_lambda() -> PathBuf {
    let how = format!(
        "the Lambda function tests run the binaries under cargo-lambda's Runtime API emulator. \
         Run them with scripts/test (which installs it into the project's virtualenv), or \
         `scripts/cargo-lambda --install` (or `pip install cargo-lambda=={VERSION}`) and export \
         PALAVER_CARGO_LAMBDA=/path/to/bin/cargo-lambda"
    );
    if let Some(path) = std::env::var_os("PALAVER_CARGO_LAMBDA").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "PALAVER_CARGO_LAMBDA={} is not a file: {how}",
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("cargo-lambda"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("cargo-lambda not found (PALAVER_CARGO_LAMBDA, PATH): {how}"))
}

/// Everything a child process writes to a pipe, line by line, collected by a thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(&self, pipe: impl Read + Send + 'static) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    fn text(&self) -> String {
        self.all().join("\n")
    }
}

/// A running `cargo lambda watch --only-lambda-apis`: the Runtime API and the invoke endpoint,
/// on a loopback port of its own, and no function of its own.
pub struct Emulator {
    program: PathBuf,
    port: u16,
    /// The variables it says a function needs (`AWS_LAMBDA_RUNTIME_API`, …).
    variables: HashMap<String, String>,
    child: Child,
    output: Lines,
}

impl Emulator {
    pub async fn start() -> Emulator {
        let program = cargo_lambda();
        let mut failures = Vec::new();
        // The port is free when chosen; another process may take it before the emulator binds
        // it, so a start that fails is tried again on another.
        for _ in 0..3 {
            match Emulator::start_on(&program, free_port()).await {
                Ok(emulator) => return emulator,
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "`cargo lambda watch` did not start:\n{}",
            failures.join("\n---\n")
        );
    }

    async fn start_on(program: &Path, port: u16) -> Result<Emulator, String> {
        // It reads the project's metadata (the functions it accepts invocations for are the
        // package's binaries), so it runs in the repository.
        let root = env!("CARGO_MANIFEST_DIR");
        let mut child = Command::new(program)
            .args(["lambda", "watch", "--only-lambda-apis", "--ignore-changes"])
            .args(["--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &port.to_string()])
            .arg("--manifest-path")
            .arg(Path::new(root).join("Cargo.toml"))
            .current_dir(root)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{} could not be run: {e}", program.display()))?;
        let output = Lines::default();
        output.collect(child.stdout.take().expect("piped stdout"));
        output.collect(child.stderr.take().expect("piped stderr"));
        let mut emulator = Emulator {
            program: program.to_owned(),
            port,
            variables: HashMap::new(),
            child,
            output,
        };
        let up = crate::common::eventually("`cargo lambda watch` to listen", || {
            let exited = emulator.child.try_wait().expect("try_wait");
            let listening = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok();
            let said = emulator.output.text();
            async move {
                match exited {
                    Some(status) => Some(Err(format!("it exited ({status}):\n{said}"))),
                    None if listening && said.contains("AWS_LAMBDA_RUNTIME_API=") => Some(Ok(said)),
                    None => None,
                }
            }
        })
        .await?;
        // "INFO AWS_LAMBDA_RUNTIME_API=http://127.0.0.1:PORT/.rt", and so on.
        emulator.variables = up
            .lines()
            .filter_map(|line| line.find("AWS_LAMBDA_").map(|at| &line[at..]))
            .filter_map(|setting| setting.trim().split_once('='))
            .map(|(name, value)| (name.to_owned(), value.to_owned()))
            .collect();
        for name in [
            "AWS_LAMBDA_RUNTIME_API",
            "AWS_LAMBDA_FUNCTION_NAME",
            "AWS_LAMBDA_FUNCTION_VERSION",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
        ] {
            if !emulator.variables.contains_key(name) {
                return Err(format!(
                    "it did not name {name} (cargo-lambda {VERSION}?):\n{up}"
                ));
            }
        }
        Ok(emulator)
    }

    /// The loopback port of its Runtime API and invoke endpoint.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The environment of the function `name`: the emulator's variables, with its runtime API
    /// at `…/.rt/{name}` (where the emulator queues `cargo lambda invoke {name}`'s events).
    fn function_env(&self, name: &str) -> HashMap<String, String> {
        let mut env = self.variables.clone();
        let api = format!("{}/{name}", env["AWS_LAMBDA_RUNTIME_API"]);
        env.insert("AWS_LAMBDA_RUNTIME_API".to_owned(), api);
        env.insert("AWS_LAMBDA_FUNCTION_NAME".to_owned(), name.to_owned());
        env
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free port");
    listener.local_addr().unwrap().port()
}

/// One function binary, running against the emulator.
pub struct Function {
    name: String,
    child: Child,
    emulator: Arc<Emulator>,
    /// What the function wrote to stdout (its log on Lambda), line by line.
    stdout: Lines,
}

impl Function {
    /// Starts `binary` with `env` (on top of this process's, so the AWS settings pointing at
    /// moto carry over) and the variables the emulator names.
    pub async fn start(
        emulator: Arc<Emulator>,
        name: &str,
        binary: &str,
        env: &[(&str, String)],
    ) -> Function {
        let mut command = Command::new(binary);
        command
            .envs(emulator.function_env(name))
            .env("RUST_LOG", "palaver=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the function binary starts");
        let stdout = Lines::default();
        stdout.collect(child.stdout.take().expect("piped stdout"));
        Function {
            name: name.to_owned(),
            child,
            emulator,
            stdout,
        }
    }

    /// The Embedded Metric Format lines the function has written so far, parsed.
    pub fn metric_lines(&self) -> Vec<Value> {
        self.stdout
            .all()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|line| line["_aws"]["CloudWatchMetrics"].is_array())
            .collect()
    }

    /// The function's process, for measuring what it uses.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Invokes the function with `event` (`cargo lambda invoke`) and returns its response.
    pub async fn invoke(&mut self, event: Value) -> Value {
        self.invoke_within(event, super::WAIT).await
    }

    /// [`Function::invoke`], for an event that may take longer than the tests' usual wait.
    pub async fn invoke_within(&mut self, event: Value, wait: Duration) -> Value {
        // A file, not an argument: a stream batch can be longer than one argument may be.
        let data = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(data.path(), event.to_string()).expect("the event written");
        let invoke = tokio::process::Command::new(&self.emulator.program)
            .args(["lambda", "invoke", &self.name, "--color", "never"])
            .args(["--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &self.emulator.port.to_string()])
            .args(["--output-format", "json"])
            .arg("--data-file")
            .arg(data.path())
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let output = match tokio::time::timeout(wait, invoke).await {
            Ok(output) => output.expect("`cargo lambda invoke` runs"),
            Err(_) => panic!(
                "{} did not answer within {wait:?} (exited: {:?}); the emulator said:\n{}",
                self.name,
                self.child.try_wait(),
                self.emulator.output.text()
            ),
        };
        assert!(
            output.status.success(),
            "{} failed ({}): {}{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "{}'s answer is not JSON ({e}): {}",
                self.name,
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

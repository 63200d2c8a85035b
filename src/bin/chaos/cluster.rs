//! The servers under fire: `palaver serve` processes on one store, each on a port of its own
//! that it keeps across restarts (clients reconnect to the addresses they know), killed and
//! started again.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a node may take to print its address.
const START_WAIT: Duration = Duration::from_secs(60);

/// One `palaver serve` process, running or not.
pub struct Node {
    pub name: String,
    pub port: u16,
    store: String,
    palaver: PathBuf,
    env: Vec<(String, String)>,
    /// Where its stderr goes, run after run.
    pub log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn new(name: &str, store: &str, palaver: &Path, dir: &Path, env: &[(&str, &str)]) -> Node {
        Node {
            name: name.to_owned(),
            port: free_port(),
            store: store.to_owned(),
            palaver: palaver.to_owned(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: dir.join(format!("{name}.log")),
            child: None,
        }
    }

    /// The WebSocket URL clients connect to.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// Starts the process and waits until it listens. A port still held by the run that was
    /// just killed is tried again for a while.
    pub fn start(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..50 {
            match self.try_start() {
                Ok(()) => return Ok(()),
                Err(why) => {
                    last = why;
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Err(format!("{} did not start: {last}", self.name))
    }

    fn try_start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let mut command = Command::new(&self.palaver);
        command
            .args(["serve", "--listen"])
            .arg(format!("127.0.0.1:{}", self.port))
            .args(["--store", &self.store, "--node-id", &self.name])
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let mut child = command.spawn().map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("palaver is listening") {
                    let _ = tx.send(());
                }
            }
        });
        match rx.recv_timeout(START_WAIT) {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(format!(
                    "it exited ({status}) before listening; see {}",
                    self.log.display()
                ))
            }
        }
    }

    /// Stops it: SIGKILL when `hard`, else SIGTERM (and SIGKILL if it has not exited after
    /// 10 s).
    pub fn kill(&mut self, hard: bool) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if hard {
            let _ = child.kill();
        } else {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill(true);
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

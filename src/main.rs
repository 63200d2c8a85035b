//! The `palaver` command: run the server, make tokens, and answer operators' questions.

use clap::{Parser, Subcommand};
use palaver::domain::{RoomName, UserId};
use palaver::fanout::change_stream::ChangeSource;
use palaver::gateway::admission::Admission;
use palaver::gateway::lifetime::Lifetime;
use palaver::gateway::sigv4::ManagementKeys;
use palaver::identity::{Identity, kept_secret, kept_secret_path, parse_ttl, random_secret};
use palaver::operator::{self, table};
use palaver::ports::Store;
use palaver::server::{ServeConfig, ServeSettings, serve};
use palaver::store::{self, DEFAULT_STORE, StoreUrl};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "palaver",
    version,
    about = "Event-sourced WebSocket chat: API Gateway on AWS, or one local binary"
)]
struct Cli {
    /// Where the log lives: sqlite://PATH, memory://, dynamodb://TABLE_PREFIX
    #[arg(long, global = true, env = "PALAVER_STORE", default_value = DEFAULT_STORE)]
    store: StoreUrl,
    /// How log lines are written to stderr: text, or json (one object per line)
    #[arg(
        long,
        global = true,
        env = "PALAVER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway, the route handlers, the fan-out and the chat page
    Serve {
        /// Address to listen on, HOST:PORT (0.0.0.0:PORT for every interface)
        #[arg(long, default_value = "127.0.0.1:8080", value_parser = parse_listen)]
        listen: String,
        /// Frames per second each connection may send, with bursts of twice that; 0 turns the
        /// limit off (for load tests: people never type this fast)
        #[arg(long, env = "PALAVER_RATE_LIMIT", default_value_t = palaver::gateway::rate::DEFAULT_PER_SECOND)]
        rate_limit: u32,
        /// Close a connection after this long without a frame from the client (90s, 10m, 1h), as
        /// API Gateway does
        #[arg(long, env = "PALAVER_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_ttl)]
        idle_timeout: Duration,
        /// Close any connection after this long (API Gateway: 2h); clients reconnect and replay
        #[arg(long, env = "PALAVER_MAX_CONNECTION_AGE", default_value = "2h", value_parser = parse_ttl)]
        max_connection_age: Duration,
        /// Open connections the server takes at most; more handshakes are answered 429
        #[arg(long, env = "PALAVER_MAX_CONNECTIONS", default_value_t = palaver::gateway::admission::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// New connections per second one source address may open (bursts of twice that;
        /// loopback is exempt; 0 = off); more are answered 429
        #[arg(long, env = "PALAVER_CONNECT_RATE", default_value_t = palaver::gateway::admission::DEFAULT_CONNECT_RATE)]
        connect_rate: u32,
        /// Connections one user may have open at once; more handshakes are answered 429
        #[arg(long, env = "PALAVER_MAX_CONNECTIONS_PER_USER", default_value_t = palaver::domain::limits::DEFAULT_MAX_CONNECTIONS_PER_USER)]
        max_connections_per_user: usize,
        /// Rooms one user may be a member of at once; joinRoom past it answers `limit`
        #[arg(long, env = "PALAVER_MAX_ROOMS_PER_USER", default_value_t = palaver::domain::limits::DEFAULT_MAX_ROOMS_PER_USER)]
        max_rooms_per_user: usize,
        /// Drop a connection whose HTTP request head has not fully arrived after this long; a
        /// request body (the management API's) has as long again
        #[arg(long, env = "PALAVER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_ttl)]
        header_timeout: Duration,
        /// Close a connection (1008) whose client takes nothing the server writes for this long,
        /// and free what was queued for it
        #[arg(long, env = "PALAVER_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_ttl)]
        write_timeout: Duration,
        /// Deliver each event this long after it was logged, at the earliest (1s, 2s): the lag
        /// of DynamoDB's stream on AWS, to try a client's reconnect and replay against
        #[arg(long, env = "PALAVER_FANOUT_DELAY", default_value = "0s", value_parser = parse_ttl)]
        fanout_delay: Duration,
        /// How long a closed connection's events and registry row are kept (1h, 7d), or
        /// `forever`; room streams are always kept
        #[arg(long, env = "PALAVER_CONNECTION_RETENTION", default_value = "7d", value_parser = parse_retention)]
        connection_retention: Retention,
        /// This server's name among the nodes sharing a DynamoDB store, recorded with each
        /// connection it opens: it delivers to those, and started again, it closes the
        /// connections it held and no one else's. Default: HOSTNAME:PORT (set it when the port
        /// is not fixed)
        #[arg(long, env = "PALAVER_NODE_ID")]
        node_id: Option<String>,
        /// On a DynamoDB store shared with other nodes: how long this node's lease lasts. If it
        /// dies and does not come back within it, another node closes its connections (its
        /// users show offline)
        #[arg(long, env = "PALAVER_NODE_LEASE", default_value = "30s", value_parser = parse_lease)]
        node_lease: Duration,
        /// `/readyz` answers 503 while the fan-out is further behind the log than this
        #[arg(long, env = "PALAVER_READY_MAX_LAG", default_value = "30s", value_parser = parse_ttl)]
        ready_max_lag: Duration,
    },
    /// Create the store's tables (DynamoDB; SQLite and memory need nothing)
    Init,
    /// Print a token for USER, signed with PALAVER_JWT_SECRET
    Token {
        user: String,
        /// How long the token is valid: 90s, 30m, 1h, 7d
        #[arg(long, default_value = "1h", value_parser = parse_token_ttl)]
        ttl: Duration,
    },
    /// Every room: members, online members, last seq
    Rooms {
        #[arg(long)]
        json: bool,
    },
    /// Members of ROOM: joined at, online, open connections
    Members {
        room: String,
        #[arg(long)]
        json: bool,
    },
    /// Events of ROOM after a seq
    History {
        room: String,
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Open connections
    Connections {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "palaver=info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line, for log shippers.
        LogFormat::Json => logs.json().init(),
        // Colour for a person at a terminal; plain text for a file.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    let store = cli.store.clone();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("palaver: {error}");
            if let StoreUrl::DynamoDb(_) = store
                && error.to_string().contains("DynamoDB")
            {
                eprintln!("palaver: the DynamoDB used: {}", dynamodb_endpoint());
            }
            ExitCode::FAILURE
        }
    }
}

/// Which DynamoDB the AWS configuration points at, for an error about it.
fn dynamodb_endpoint() -> String {
    let region = std::env::var("AWS_REGION")
        .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
        .unwrap_or_else(|_| "the profile's region".to_owned());
    match std::env::var("AWS_ENDPOINT_URL_DYNAMODB").or_else(|_| std::env::var("AWS_ENDPOINT_URL"))
    {
        Ok(endpoint) => format!("{endpoint} (AWS_ENDPOINT_URL), region {region}"),
        Err(_) => format!("AWS's own, region {region} (set AWS_ENDPOINT_URL for a local one)"),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve {
            listen,
            rate_limit,
            idle_timeout,
            max_connection_age,
            header_timeout,
            write_timeout,
            fanout_delay,
            max_connections,
            connect_rate,
            max_rooms_per_user,
            max_connections_per_user,
            connection_retention,
            node_id,
            node_lease,
            ready_max_lag,
        } => {
            let lifetime = Lifetime {
                idle: idle_timeout,
                max_age: max_connection_age,
                header_read: header_timeout,
                write: write_timeout,
            };
            let settings = ServeSettings {
                rate_limit,
                lifetime,
                fanout_delay,
                admission: Admission::new(max_connections, connect_rate),
                max_rooms_per_user,
                max_connections_per_user,
                connection_retention: connection_retention.0,
                ready_max_lag,
                node_lease,
            };
            run_serve(&cli.store, &listen, node_id, settings).await
        }
        Command::Init => match &cli.store {
            StoreUrl::DynamoDb(prefix) => {
                let tables = store::dynamodb::Tables::new(prefix);
                let created = store::dynamodb::init(&store::aws_client().await, &tables).await?;
                for table in [&tables.events, &tables.state] {
                    let state = if created.contains(table) {
                        "created"
                    } else {
                        "exists"
                    };
                    println!("{table}: {state}");
                }
                Ok(())
            }
            other => {
                // Opening creates and migrates the file.
                store::open(other, None).await?;
                println!("{}: ready", describe(other));
                Ok(())
            }
        },
        Command::Token { user, ttl } => {
            let secret = std::env::var("PALAVER_JWT_SECRET")
                .map_err(|_| "set PALAVER_JWT_SECRET to the secret the server uses")?;
            strong_enough(&secret)?;
            let user = UserId::parse(&user)?;
            println!("{}", Identity::new(secret.as_bytes()).issue(&user, ttl));
            Ok(())
        }
        Command::Rooms { json } => {
            let rows = operator::rooms(&open(&cli.store).await?).await?;
            print(json, &rows, &["ROOM", "MEMBERS", "ONLINE", "HEAD"], |r| {
                vec![
                    r.room.clone(),
                    r.members.to_string(),
                    r.online.to_string(),
                    r.head.to_string(),
                ]
            })
        }
        Command::Members { room, json } => {
            let room = RoomName::parse(&room)?;
            let rows = operator::members(&open(&cli.store).await?, &room).await?;
            print(
                json,
                &rows,
                &["USER", "JOINED", "ONLINE", "CONNECTIONS"],
                |m| {
                    vec![
                        m.user.clone(),
                        m.joined_at.clone(),
                        if m.online { "yes" } else { "no" }.to_owned(),
                        m.connections.to_string(),
                    ]
                },
            )
        }
        Command::History {
            room,
            after,
            limit,
            json,
        } => {
            let room = RoomName::parse(&room)?;
            let frames = operator::history(&open(&cli.store).await?, &room, after, limit).await?;
            let rows: Vec<serde_json::Value> = frames
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            print(json, &rows, &["SEQ", "AT", "USER", "EVENT"], |f| {
                let text = match f["type"].as_str() {
                    Some("message") => f["text"].as_str().unwrap_or_default().to_owned(),
                    _ => format!("({})", f["change"].as_str().unwrap_or_default()),
                };
                vec![
                    f["seq"].to_string(),
                    f["at"].as_str().unwrap_or_default().to_owned(),
                    f["user"].as_str().unwrap_or_default().to_owned(),
                    text,
                ]
            })
        }
        Command::Connections { user, json } => {
            let user = user.as_deref().map(UserId::parse).transpose()?;
            let rows = operator::connections(&open(&cli.store).await?, user.as_ref()).await?;
            print(json, &rows, &["ID", "USER", "CONNECTED"], |c| {
                vec![c.id.clone(), c.user.clone(), c.connected_at.clone()]
            })
        }
    }
}

/// Opens the store for an operator command, which writes nothing.
async fn open(url: &StoreUrl) -> Result<Store, Failure> {
    store::open_existing(
        url,
        Some(palaver::domain::limits::DEFAULT_CONNECTION_RETENTION),
    )
    .await
}

/// `--listen`: HOST:PORT. A bare port (`8081`) is the common slip: say what to write instead.
fn parse_listen(s: &str) -> Result<String, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Err(format!(
            "--listen takes HOST:PORT, not a port alone: 127.0.0.1:{port} (this machine only) or \
             0.0.0.0:{port} (every interface)"
        ));
    }
    if !s.contains(':') {
        return Err(format!(
            "--listen takes HOST:PORT (127.0.0.1:8080, 0.0.0.0:8080, [::1]:8080), not {s:?}"
        ));
    }
    Ok(s.to_owned())
}

/// `token --ttl`: a duration of more than nothing; a token valid for 0s has expired already.
fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_ttl(s)?;
    if ttl.is_zero() {
        return Err(
            "a token valid for 0s has expired already: give --ttl more (90s, 1h, 7d)".into(),
        );
    }
    Ok(ttl)
}

/// `--node-lease`: a duration of at least a second.
fn parse_lease(s: &str) -> Result<Duration, String> {
    let lease = parse_ttl(s)?;
    if lease < palaver::node_lease::MIN_LEASE {
        return Err(format!(
            "a node's lease must last at least {}s",
            palaver::node_lease::MIN_LEASE.as_secs()
        ));
    }
    Ok(lease)
}

/// `--connection-retention`: a duration, or `forever`.
#[derive(Clone, Copy, Debug)]
struct Retention(Option<Duration>);

fn parse_retention(s: &str) -> Result<Retention, String> {
    palaver::connections::parse_retention(s).map(Retention)
}

fn print<T: serde::Serialize>(
    json: bool,
    rows: &[T],
    header: &[&str],
    cells: impl Fn(&T) -> Vec<String>,
) -> Result<(), Failure> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
    } else {
        let rows: Vec<Vec<String>> = rows.iter().map(cells).collect();
        print!("{}", table(header, &rows));
    }
    Ok(())
}

async fn run_serve(
    url: &StoreUrl,
    listen: &str,
    node_id: Option<String>,
    settings: ServeSettings,
) -> Result<(), Failure> {
    // One server per SQLite file, held until this returns (or the process dies).
    let _serving = match url {
        StoreUrl::Sqlite(path) => Some(store::sqlite::lock_for_serving(path)?),
        _ => None,
    };
    let store = store::open(url, settings.connection_retention).await?;
    if let StoreUrl::DynamoDb(_) = url {
        // Asked once before anything says "listening": a store that cannot be reached, or has
        // no tables, fails the start here, with the reason.
        store.answers().await?;
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AddrInUse => format!(
                "cannot listen on {listen}: another process already listens there; stop it, or \
                 pick another port with --listen HOST:PORT"
            ),
            _ => format!("cannot listen on {listen}: {e}"),
        })?;
    let addr = listener.local_addr()?;
    let host = if addr.ip().is_unspecified() {
        format!("127.0.0.1:{}", addr.port())
    } else {
        addr.to_string()
    };

    // Without PALAVER_JWT_SECRET: beside a SQLite file, the secret made on its first start
    // (so a restart keeps everyone signed in); in memory, one for this run only.
    let (secret, generated) = match std::env::var("PALAVER_JWT_SECRET") {
        Ok(secret) if !secret.is_empty() => {
            strong_enough(&secret)?;
            (secret, None)
        }
        _ => match url {
            StoreUrl::Sqlite(path) => {
                let kept = kept_secret_path(path);
                let (secret, made) = kept_secret(&kept)
                    .map_err(|e| format!("cannot keep a secret in {}: {e}", kept.display()))?;
                (secret, Some(Generated::Kept { path: kept, made }))
            }
            _ => (random_secret(), Some(Generated::ForThisRun)),
        },
    };
    let identity = Identity::new(secret.as_bytes());
    let admin_token = std::env::var("PALAVER_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    let management_keys = management_keys()?;

    println!(
        "palaver is listening on http://{addr}  (store: {})",
        describe(url)
    );
    if addr.ip().is_unspecified() {
        println!("On this machine: http://{host}/");
    }
    if !addr.ip().is_loopback() {
        println!();
        match &management_keys {
            Some(_) => println!(
                "{addr} can be reached from other machines. The management API \
                 (/@connections/ID) takes requests signed (SigV4) with \
                 PALAVER_MANAGEMENT_ACCESS_KEY_ID.{}",
                if admin_token.is_none() {
                    ""
                } else {
                    " The admin endpoints are behind PALAVER_ADMIN_TOKEN."
                }
            ),
            None => println!(
                "WARNING: {addr} can be reached from other machines. The management API \
                 (/@connections/ID) answers only this machine, since \
                 PALAVER_MANAGEMENT_ACCESS_KEY_ID and PALAVER_MANAGEMENT_SECRET_ACCESS_KEY are \
                 not set: anything on this machine can post frames to any connection, read its \
                 IP address and close it.{}",
                if admin_token.is_none() {
                    ""
                } else {
                    " The admin endpoints are behind PALAVER_ADMIN_TOKEN."
                }
            ),
        }
    }
    if let Some(generated) = generated {
        let user = std::env::var("USER")
            .ok()
            .and_then(|u| UserId::parse(&u).ok())
            .unwrap_or_else(|| UserId::parse("guest").expect("a valid name"));
        let token = identity.issue(&user, Duration::from_secs(12 * 3600));
        println!();
        match &generated {
            Generated::Kept { path, made: true } => println!(
                "No PALAVER_JWT_SECRET was set, so this server made one and keeps it in {} \
                 (readable by you only): restarts keep everyone signed in. Delete it to sign \
                 everyone out.",
                path.display()
            ),
            Generated::Kept { path, made: false } => println!(
                "No PALAVER_JWT_SECRET was set: using the secret kept in {} (delete it to sign \
                 everyone out).",
                path.display()
            ),
            Generated::ForThisRun => println!(
                "No PALAVER_JWT_SECRET was set, so this server made one up for this run: \
                 tokens stop working when it stops."
            ),
        }
        println!("Open the chat as {user}:");
        println!();
        println!("    http://{host}/?token={token}");
        println!();
        println!("Tokens for other users:");
        println!("    PALAVER_JWT_SECRET={secret} palaver token NAME");
    }
    if admin_token.is_none() {
        println!("Admin endpoints are off: set PALAVER_ADMIN_TOKEN to turn them on.");
    }
    println!();
    let changes = match url {
        StoreUrl::DynamoDb(prefix) => Some(ChangeSource::from_env(prefix).await),
        _ => None,
    };
    serve(ServeConfig {
        listener,
        store,
        identity,
        admin_token,
        changes,
        management_keys,
        node: node_id.unwrap_or_else(|| format!("{}:{}", hostname(), addr.port())),
        metrics: Some(prometheus()?),
        settings,
    })
    .await?;
    Ok(())
}

/// Where a secret made up by `serve` lives.
enum Generated {
    /// Beside the SQLite file (`made`: on this start).
    Kept {
        path: std::path::PathBuf,
        made: bool,
    },
    /// In memory: for this run only.
    ForThisRun,
}

/// Installs the Prometheus recorder that `/metrics` renders.
fn prometheus() -> Result<metrics_exporter_prometheus::PrometheusHandle, Failure> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    palaver::metrics::describe();
    Ok(handle)
}

/// The machine's name, for the default node id.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "palaver".to_owned())
}

/// HS256 keys shorter than its 32-byte hash are easier to guess than the hash is to break: a
/// token secret must have at least that many bytes.
fn strong_enough(secret: &str) -> Result<(), Failure> {
    const MIN: usize = 32;
    if secret.len() < MIN {
        return Err(format!(
            "PALAVER_JWT_SECRET has {} bytes; it needs at least {MIN} (e.g. `openssl rand -hex 32`)",
            secret.len()
        )
        .into());
    }
    Ok(())
}

/// The management API's key pair, from the environment: both or neither.
fn management_keys() -> Result<Option<ManagementKeys>, Failure> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        var("PALAVER_MANAGEMENT_ACCESS_KEY_ID"),
        var("PALAVER_MANAGEMENT_SECRET_ACCESS_KEY"),
    ) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(ManagementKeys {
            access_key_id,
            secret_access_key,
            region: var("PALAVER_MANAGEMENT_REGION"),
        })),
        (None, None) => Ok(None),
        _ => Err("set both PALAVER_MANAGEMENT_ACCESS_KEY_ID and \
                  PALAVER_MANAGEMENT_SECRET_ACCESS_KEY, or neither"
            .into()),
    }
}

fn describe(url: &StoreUrl) -> String {
    match url {
        StoreUrl::Sqlite(path) => format!("sqlite://{path}"),
        StoreUrl::Memory => "memory://".to_owned(),
        StoreUrl::DynamoDb(prefix) => format!("dynamodb://{prefix}"),
    }
}

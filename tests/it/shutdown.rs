//! What clients see when a server stops on purpose: SIGTERM (a service manager, a container
//! runtime) or ctrl-c (SIGINT, someone at the terminal). Every open connection is closed with
//! 1001 "server shutting down" — a close frame a client reads, so that it reconnects at once
//! instead of waiting out a dead TCP connection — and its `$disconnect` is logged before the
//! process exits, so nobody is left "online".

use crate::common::Server;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_ctrl_c_close_every_connection_with_1001_before_exiting() {
    for store in ["sqlite", "memory"] {
        for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
            let mut server = match store {
                "sqlite" => Server::start_sqlite(),
                _ => Server::start_on(tempfile::tempdir().unwrap(), "memory://"),
            };
            let mut ana = server.connect("ana").await;
            let mut bob = server.connect("bob").await;
            ana.join("r").await;
            bob.join("r").await;

            let status = server.stop_with(signal);
            assert!(status.success(), "{store}, {name}: exit status {status}");
            for client in [&mut ana, &mut bob] {
                let closed = tokio::time::timeout(Duration::from_secs(5), client.closed())
                    .await
                    .unwrap_or_else(|_| panic!("{store}, {name}: the socket outlived the server"));
                assert_eq!(closed, Some(1001), "{store}, {name}: a close frame, 1001");
            }
            if store == "sqlite" {
                // Both `$disconnect`s were logged before the exit: nobody is online.
                let open = server.cli(&["connections", "--json"]);
                assert!(open.status.success(), "{open:?}");
                let open: Vec<Value> = serde_json::from_slice(&open.stdout).unwrap();
                assert!(open.is_empty(), "{name}: still open: {open:?}");
            }
        }
    }
}

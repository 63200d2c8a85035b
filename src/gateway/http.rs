//! Accepting TCP connections and serving HTTP/1.1 on them — the page, the management and admin
//! APIs, and the handshakes that become WebSocket connections.
//!
//! hyper is driven directly rather than through `axum::serve` for one setting that offers no
//! hook: a deadline for the request head. Without it a client that opens a TCP connection and
//! sends nothing, or sends its upgrade request a byte at a time, holds a socket (and a file
//! descriptor) for as long as it likes; a few hundred such clients exhaust the process.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tower_service::Service;

/// Serves `app` on `listener` until `shutdown` resolves, then waits for the HTTP requests in
/// flight (upgraded WebSocket connections are closed by the hub, not here).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // Shutdown is announced on `stopping`; every connection task holds a clone of `running`,
    // so once they have all finished, `finished` yields `None`.
    let (stopping, _) = tokio::sync::watch::channel(false);
    let (running, mut finished) = tokio::sync::mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    if let Ok(address) = listener.local_addr() {
        tracing::info!(%address, "accepting connections");
    }
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: wait for some to be freed.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // The writers batch frames themselves (one flush per drained outbox); Nagle's algorithm
        // would only hold the last partial segment of each flush back for an ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY");
        }
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request| {
            request
                .extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(peer));
            app.clone().call(request)
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_timeout);
        let mut connection = http
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stop = stopping.subscribe();
        let running = running.clone();
        tokio::spawn(async move {
            let ended = tokio::select! {
                ended = &mut connection => ended,
                () = async { let _ = stop.wait_for(|stopping| *stopping).await; } => {
                    // Finish the request in flight, take no other.
                    std::pin::Pin::new(&mut connection).graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%peer, %error, "HTTP connection ended");
            }
            drop(running);
        });
    }
    drop(listener);
    stopping.send_replace(true);
    drop(running);
    let _ = finished.recv().await;
    Ok(())
}

//! The local management API through the real `aws-sdk-apigatewaymanagement` client, as the
//! fan-out Lambda uses it against API Gateway.

mod common;

use aws_sdk_apigatewaymanagement::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_apigatewaymanagement::primitives::Blob;
use common::Server;
use serde_json::{Value, json};

fn client(endpoint: String) -> aws_sdk_apigatewaymanagement::Client {
    let config = aws_sdk_apigatewaymanagement::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("eu-west-1"))
        .credentials_provider(Credentials::new("local", "local", None, None, "test"))
        .build();
    aws_sdk_apigatewaymanagement::Client::from_conf(config)
}

fn connection_of(server: &Server, user: &str) -> String {
    let out = server.cli(&["connections", "--user", user, "--json"]);
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("JSON rows");
    assert_eq!(rows.len(), 1, "{user} has one connection: {rows:?}");
    rows[0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn the_sdk_posts_describes_and_deletes_connections() {
    let server = Server::start_readable();
    let mut ana = server.connect("ana").await;
    let id = connection_of(&server, "ana");

    for endpoint in [server.url(), format!("{}/production", server.url())] {
        let sdk = client(endpoint.clone());
        let payload = json!({"type": "notice", "via": endpoint}).to_string();
        sdk.post_to_connection()
            .connection_id(&id)
            .data(Blob::new(payload.clone()))
            .send()
            .await
            .expect("post accepted");
        assert_eq!(
            ana.recv().await,
            serde_json::from_str::<Value>(&payload).unwrap()
        );

        let described = sdk
            .get_connection()
            .connection_id(&id)
            .send()
            .await
            .expect("connection described");
        let connected_at = described.connected_at().expect("connectedAt");
        let age = chrono::Utc::now().timestamp() - connected_at.secs();
        assert!((0..60).contains(&age), "connected {age}s ago");
        assert!(described.last_active_at().is_some());
        assert_eq!(
            described.identity().and_then(|i| i.source_ip()),
            Some("127.0.0.1")
        );
    }

    let sdk = client(server.url());
    sdk.delete_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("connection deleted");
    // The socket is closed by the server, and the connection leaves the registry.
    let mut gone_from_registry = false;
    for _ in 0..50 {
        let out = server.cli(&["connections", "--json"]);
        if String::from_utf8_lossy(&out.stdout).trim() == "[]" {
            gone_from_registry = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        gone_from_registry,
        "$disconnect ran for the deleted connection"
    );

    // Now it is gone: every call answers 410, which the SDK reads as GoneException.
    let post = sdk
        .post_to_connection()
        .connection_id(&id)
        .data(Blob::new("late"))
        .send()
        .await
        .expect_err("posting to a closed connection fails");
    let raw_status = post.raw_response().map(|r| r.status().as_u16());
    assert_eq!(raw_status, Some(410));
    assert!(post.into_service_error().is_gone_exception());
    let get = sdk
        .get_connection()
        .connection_id("never-existed=")
        .send()
        .await
        .expect_err("unknown connection");
    assert!(get.into_service_error().is_gone_exception());
    let delete = sdk
        .delete_connection()
        .connection_id("never-existed=")
        .send()
        .await
        .expect_err("unknown connection");
    assert!(delete.into_service_error().is_gone_exception());
}

#[tokio::test]
async fn oversized_posts_are_refused_and_the_connection_stays() {
    let server = Server::start_readable();
    let mut ana = server.connect("ana").await;
    let id = connection_of(&server, "ana");
    let sdk = client(server.url());
    let error = sdk
        .post_to_connection()
        .connection_id(&id)
        .data(Blob::new(vec![b'x'; 129 * 1024]))
        .send()
        .await
        .expect_err("too large");
    assert!(error.into_service_error().is_payload_too_large_exception());
    sdk.post_to_connection()
        .connection_id(&id)
        .data(Blob::new(r#"{"ok":true}"#))
        .send()
        .await
        .expect("a normal post still works");
    assert_eq!(ana.recv().await, json!({"ok": true}));
}

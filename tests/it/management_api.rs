//! The local management API through the real `aws-sdk-apigatewaymanagement` client, as the
//! fan-out Lambda uses it against API Gateway.

use crate::common;

use aws_sdk_apigatewaymanagement::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_apigatewaymanagement::primitives::Blob;
use common::Server;
use serde_json::{Value, json};

fn client(endpoint: String) -> aws_sdk_apigatewaymanagement::Client {
    client_with_keys(endpoint, "local", "local")
}

fn client_with_keys(
    endpoint: String,
    access_key_id: &str,
    secret: &str,
) -> aws_sdk_apigatewaymanagement::Client {
    let config = aws_sdk_apigatewaymanagement::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(Region::new("eu-west-1"))
        .credentials_provider(Credentials::new(access_key_id, secret, None, None, "test"))
        .build();
    aws_sdk_apigatewaymanagement::Client::from_conf(config)
}

/// With a key pair set, the management API takes SigV4-signed requests made with it — as the
/// SDK makes them — and nothing else: wrong keys and unsigned requests are 403 in API Gateway's
/// shape, and nothing reaches the connection.
#[tokio::test]
async fn with_keys_set_only_requests_signed_with_them_are_served() {
    const KEY: &str = "AKIDPALAVERLOCAL";
    const SECRET: &str = "management-secret-0123456789abcdef";
    let server = Server::start_readable_with(&[
        ("PALAVER_MANAGEMENT_ACCESS_KEY_ID", KEY),
        ("PALAVER_MANAGEMENT_SECRET_ACCESS_KEY", SECRET),
    ]);
    let mut ana = server.connect("ana").await;
    ana.join("r").await;
    let id = connection_of(&server, "ana");

    let forged = json!({"type": "message", "room": "r", "seq": 99, "text": "forged"}).to_string();
    for (key, secret) in [(KEY, "not the secret"), ("AKIDSOMEONEELSE", SECRET)] {
        let error = client_with_keys(server.url(), key, secret)
            .post_to_connection()
            .connection_id(&id)
            .data(Blob::new(forged.clone()))
            .send()
            .await
            .expect_err("refused");
        let response = error.raw_response().expect("an HTTP answer");
        assert_eq!(response.status().as_u16(), 403, "{key}");
        assert!(
            response.headers().get("x-amzn-errortype").is_some(),
            "{key}"
        );
    }
    let unsigned = reqwest::Client::new()
        .post(format!("{}/@connections/{id}", server.url()))
        .body(forged.clone())
        .send()
        .await
        .expect("an answer");
    assert_eq!(unsigned.status(), 403);
    assert_eq!(
        unsigned.headers()["x-amzn-errortype"],
        "MissingAuthenticationTokenException"
    );
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let answer = reqwest::Client::new()
            .request(
                method.clone(),
                format!("{}/@connections/{id}", server.url()),
            )
            .send()
            .await
            .expect("an answer");
        assert_eq!(answer.status(), 403, "{method}");
    }

    let signed = client_with_keys(server.url(), KEY, SECRET);
    let notice = json!({"type": "notice", "text": "signed"}).to_string();
    signed
        .post_to_connection()
        .connection_id(&id)
        .data(Blob::new(notice.clone()))
        .send()
        .await
        .expect("a signed post is delivered");
    // Nothing forged reached ana before the signed notice.
    let before = ana.pushed_until(|f| f["type"] == "notice").await;
    assert!(before.iter().all(|f| f["text"] != "forged"), "{before:?}");
    let described = signed
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("a signed get is answered");
    assert!(described.connected_at().is_some());
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
    // An empty post is refused too, as API Gateway refuses it: no empty frame reaches ana.
    let error = sdk
        .post_to_connection()
        .connection_id(&id)
        .data(Blob::new(Vec::<u8>::new()))
        .send()
        .await
        .expect_err("empty");
    let response = error.raw_response().expect("an HTTP answer");
    assert_eq!(response.status().as_u16(), 400);
    assert_eq!(
        response.headers().get("x-amzn-errortype"),
        Some("BadRequestException")
    );
    sdk.post_to_connection()
        .connection_id(&id)
        .data(Blob::new(r#"{"ok":true}"#))
        .send()
        .await
        .expect("a normal post still works");
    assert_eq!(ana.recv().await, json!({"ok": true}));
}

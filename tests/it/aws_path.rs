//! The whole AWS data path, end to end, on this machine.
//!
//! Route handlers get API Gateway's WebSocket events as JSON and write to DynamoDB (moto); the
//! events table's stream is read with aws-sdk-dynamodbstreams and turned into the exact event
//! Lambda would hand the fan-out function; the fan-out posts with aws-sdk-apigatewaymanagement
//! to a running `palaver serve`, which plays API Gateway and holds real WebSocket clients; big
//! rooms go through SQS (moto) to the deliver function. What is asserted is what users notice:
//! the frames their sockets receive, each once, in order.
//!
//! Needs a moto server, and cargo-lambda for the function binaries' test: run `scripts/test` (a
//! missing `AWS_ENDPOINT_URL` fails every test, a missing cargo-lambda that one).

use crate::aws_support;
use crate::common;

use aws_support::{Options, World, answer_of, failures, room_frames};
use palaver::domain::{ConnectionId, RoomName, Stream, UserId};
use palaver::ports::DeliveryJob;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};

/// Ana's and Ben's joins (seq 1, 2), then a message (seq 3): each once, in order — from where
/// the user's connection started listening. Ana's heard the room from her join; Ben's from his,
/// so Ana's join is history to him (`getHistory`), never pushed live.
fn assert_two_joins_then_a_message(frames: &[Value], user: &str) {
    let heard: &[(u64, String)] = &[
        (1, "member".into()),
        (2, "member".into()),
        (3, "message".into()),
    ];
    let from = if user == "ana" { 0 } else { 1 };
    assert_eq!(room_frames(frames), heard[from..], "{user}: {frames:?}");
}

fn member(frames: &[Value], seq: u64, user: &str) -> bool {
    frames
        .iter()
        .any(|f| f["type"] == "member" && f["seq"] == seq && f["user"] == user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_reach_every_member_once_in_seq_order() {
    let mut world = World::new("order", Options::default()).await;
    let mut ana = world.connect("ana").await;
    let mut ben = world.connect("ben").await;
    assert_eq!(world.join(&ana, "general").await["head"], 1);
    assert_eq!(world.join(&ben, "general").await["head"], 2);
    assert_eq!(world.say(&ana, "general", "hello").await, 3);

    // Two connects, two joins, one message.
    let batch = world.stream.next_event(5).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());

    for socket in [&mut ana, &mut ben] {
        let frames = socket.until_message(3).await;
        assert_two_joins_then_a_message(&frames, &socket.user);
        assert!(member(&frames, 2, "ben"));
        assert_eq!(frames.last().unwrap()["text"], "hello");
        assert_eq!(frames.last().unwrap()["user"], "ana");
    }

    // Lambda hands the same batch over again (a retry, a redelivery): nothing changes and
    // nothing is sent twice.
    let general = RoomName::parse("general").unwrap();
    let members_before = world.store.directory.members(&general).await.unwrap();
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    assert_eq!(
        world.store.directory.members(&general).await.unwrap(),
        members_before
    );
    // The next message is the first thing either socket receives: nothing was repeated
    // before it (the gateway delivers each socket's frames in the order they were posted).
    assert_eq!(world.say(&ben, "general", "still one copy?").await, 4);
    let batch = world.stream.next_event(1).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    for socket in [&mut ana, &mut ben] {
        let frames = socket.until_message(4).await;
        assert_eq!(
            frames.len(),
            1,
            "{}: repeated frames {frames:?}",
            socket.user
        );
    }

    // A late joiner catching up with joinRoom{after}: the route function replays the room to
    // its socket through the management API before answering.
    let mut cy = world.connect("cy").await;
    let joined = world
        .send(
            &cy,
            json!({"action": "joinRoom", "room": "general", "after": 0}),
        )
        .await;
    assert_eq!(joined["head"], 5);
    let frames = cy.until(|f| f["type"] == "message" && f["seq"] == 4).await;
    assert_eq!(
        room_frames(&frames),
        [
            (1, "member".into()),
            (2, "member".into()),
            (3, "message".into()),
            (4, "message".into()),
        ],
        "{frames:?}"
    );
    // Cy's own join (seq 5) is where cy's connection started listening: it comes live, with
    // the stream (after cy's connect), and is not replayed as well.
    let batch = world.stream.next_event(2).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    let frames = cy.until(|f| f["type"] == "member" && f["seq"] == 5).await;
    assert_eq!(room_frames(&frames), [(5, "member".into())], "{frames:?}");
}

/// Ana and Ben connected and in "general", their joins delivered (ana has seen ben's).
async fn ana_and_ben_in_general(world: &mut World) -> (aws_support::Socket, aws_support::Socket) {
    let mut ana = world.connect("ana").await;
    let ben = world.connect("ben").await;
    world.join(&ana, "general").await;
    world.join(&ben, "general").await;
    let batch = world.stream.next_event(4).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    ana.until(|f| member(std::slice::from_ref(f), 2, "ben"))
        .await;
    (ana, ben)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_behind_the_gateways_back_is_removed_on_410() {
    let mut world = World::new("gone", Options::default()).await;
    let (mut ana, ben) = ana_and_ben_in_general(&mut world).await;

    // Ben's socket goes away, and no $disconnect reaches the chat.
    let ben_id = ben.id.clone();
    ben.close().await;
    world.gateway.wait_gone(&ben_id).await;
    let directory = world.store.directory.clone();
    assert!(directory.connection(&ben_id).await.unwrap().unwrap().open);

    let seq = world.say(&ana, "general", "anyone there?").await;
    let batch = world.stream.next_event(1).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    assert_eq!(ana.until_message(seq).await.len(), 1);

    // The 410 closed ben's connection in the log and in the directory…
    let record = directory.connection(&ben_id).await.unwrap().unwrap();
    assert!(!record.open, "{record:?}");
    let ben_user = UserId::parse("ben").unwrap();
    assert!(
        directory
            .open_connections(Some(&ben_user))
            .await
            .unwrap()
            .is_empty()
    );
    let stream = Stream::Connection(ben_id.clone());
    assert_eq!(world.store.log.head(&stream).await.unwrap(), 2);
    let members = directory
        .members(&RoomName::parse("general").unwrap())
        .await
        .unwrap();
    let ben_member = members.iter().find(|m| m.user == ben_user).unwrap();
    assert_eq!(ben_member.connections, 0, "ben stays a member, offline");

    // …and that disconnect, coming back through the stream, tells the room ben went offline.
    let batch = world.stream.next_event(1).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    let presence = ana.next().await;
    assert_eq!(
        presence,
        json!({"type": "presence", "room": "general", "user": "ben", "online": false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_record_is_reported_and_the_rest_of_the_batch_delivered() {
    let mut world = World::new("poison", Options::default()).await;
    let mut ana = world.connect("ana").await;
    let mut ben = world.connect("ben").await;
    world.join(&ana, "general").await;
    world.join(&ben, "general").await;
    let seq = world.say(&ben, "general", "through the poison").await;

    let mut batch = world.stream.next_event(5).await;
    let records = batch["Records"].as_array_mut().unwrap();
    // A record whose keys are not a log key, and one announcing an event the log does not
    // have, among the real ones.
    let mut not_a_key = records[1].clone();
    not_a_key["dynamodb"]["Keys"] = json!({"stream": {"S": "x:junk"}, "seq": {"N": "1"}});
    not_a_key["dynamodb"]["SequenceNumber"] = json!("900000000000000000001");
    let mut phantom = records[2].clone();
    phantom["dynamodb"]["Keys"] = json!({"stream": {"S": "r:nowhere"}, "seq": {"N": "3"}});
    phantom["dynamodb"]["SequenceNumber"] = json!("900000000000000000002");
    records.insert(2, not_a_key);
    records.insert(4, phantom);

    let mut reported = failures(&world.fan_out(&batch).await);
    reported.sort();
    assert_eq!(reported, ["900000000000000000001", "900000000000000000002"]);
    for socket in [&mut ana, &mut ben] {
        let frames = socket.until_message(seq).await;
        assert_two_joins_then_a_message(&frames, &socket.user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_is_delivered_through_the_queue() {
    let mut world = World::new(
        "relay",
        Options {
            relay: Some((1, 2)),
            ..Options::default()
        },
    )
    .await;
    let mut sockets = Vec::new();
    for user in ["ana", "ben", "cy"] {
        let socket = world.connect(user).await;
        world.join(&socket, "general").await;
        sockets.push(socket);
    }
    let seq = world.say(&sockets[0], "general", "hello, everyone").await;
    assert_eq!(seq, 4);

    let batch = world.stream.next_event(7).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());

    // The fan-out posted nothing itself: the message went to the queue, two recipients a job.
    let queue = world.queue.as_ref().unwrap();
    let mut records = queue.receive_all().await;
    let jobs: Vec<DeliveryJob> = records
        .iter()
        .map(|r| serde_json::from_str(r["body"].as_str().unwrap()).unwrap())
        .collect();
    let message_jobs: Vec<&DeliveryJob> = jobs
        .iter()
        .filter(|j| j.frames.iter().any(|f| f.contains("hello, everyone")))
        .collect();
    assert!(message_jobs.iter().all(|j| j.connections.len() <= 2));
    let mut recipients: Vec<&ConnectionId> =
        message_jobs.iter().flat_map(|j| &j.connections).collect();
    recipients.sort();
    let mut everyone: Vec<&ConnectionId> = sockets.iter().map(|s| &s.id).collect();
    everyone.sort();
    assert_eq!(recipients, everyone, "every member in exactly one job");
    // A connection is in the same FIFO group for every frame of the room: its frames stay in
    // order whichever worker posts them.
    for socket in &sockets {
        let groups: BTreeSet<&str> = jobs
            .iter()
            .filter(|j| j.connections.contains(&socket.id))
            .map(|j| j.group.as_str())
            .collect();
        assert_eq!(groups.len(), 1, "{}: {groups:?}", socket.user);
    }

    // The deliver function gets them as Lambda's SQS event, with a message that is not a job
    // at the end (on a FIFO queue, what follows a failed message is handed back unposted).
    let mut poisoned = records[0].clone();
    poisoned["messageId"] = json!("not-a-job");
    poisoned["body"] = json!("{\"frame\": 42}");
    records.push(poisoned);
    let response = world.deliver(&json!({ "Records": records })).await;
    assert_eq!(failures(&response), ["not-a-job"]);

    // Every member gets every room event from their own join on, once, in seq order.
    for (joined, socket) in (1..).zip(&mut sockets) {
        let mut frames = Vec::new();
        let mut seqs = Vec::new();
        while seqs.last() != Some(&seq) {
            let frame = socket.next().await;
            if let Some(seq) = frame["seq"].as_u64() {
                seqs.push(seq);
            }
            frames.push(frame);
        }
        let expected: Vec<u64> = (joined..=seq).collect();
        assert_eq!(seqs, expected, "{}: {frames:?}", socket.user);
        assert_eq!(
            room_frames(&frames).len(),
            expected.len(),
            "{}: repeated {frames:?}",
            socket.user
        );
    }
}

/// The three binaries themselves, each run as Lambda runs it — polling a Runtime API for
/// events and posting back answers — on the same path: what `cargo lambda build` packages is
/// what is tested here, under cargo-lambda's own emulator (`cargo lambda watch
/// --only-lambda-apis`, events sent with `cargo lambda invoke`). API Gateway's WebSocket events
/// ($connect, joinRoom, sendMessage, $disconnect) through palaver-route, a DynamoDB stream event
/// through palaver-fanout, an SQS event through palaver-deliver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_function_binaries_run_the_path_through_the_runtime_api() {
    let mut world = World::new("binaries", Options::default()).await;
    let mut route = world
        .function("palaver-route", env!("CARGO_BIN_EXE_palaver-route"))
        .await;
    let mut fanout = world
        .function("palaver-fanout", env!("CARGO_BIN_EXE_palaver-fanout"))
        .await;
    let mut deliver = world
        .function("palaver-deliver", env!("CARGO_BIN_EXE_palaver-deliver"))
        .await;

    let mut ana = world.gateway.open("ana").await;
    let mut ben = world.gateway.open("ben").await;
    for socket in [&ana, &ben] {
        let response = route.invoke(world.connect_event(socket)).await;
        assert_eq!(response["statusCode"], 200, "{response}");
        let join = json!({"action": "joinRoom", "room": "general"});
        let answer = answer_of(&route.invoke(world.message_event(socket, &join)).await);
        assert_eq!(answer["type"], "joined", "{answer}");
    }
    let say =
        json!({"action": "sendMessage", "room": "general", "text": "hi", "clientMsgId": "m1"});
    let sent = answer_of(&route.invoke(world.message_event(&ana, &say)).await);
    assert_eq!(
        (sent["type"].as_str(), sent["seq"].as_u64()),
        (Some("sent"), Some(3))
    );
    // What the route function appended, as the log holds it.
    let general = Stream::Room(RoomName::parse("general").unwrap());
    assert_eq!(
        kinds(&world, &general).await,
        ["joined", "joined", "messagePosted"]
    );
    for socket in [&ana, &ben] {
        let connection = Stream::Connection(socket.id.clone());
        assert_eq!(kinds(&world, &connection).await, ["connected"]);
    }
    // The invocation's metrics, as a CloudWatch Embedded Metric Format line in its log: the
    // same names as `palaver serve`'s /metrics, in namespace `palaver` by function.
    let emf = common::eventually("the route function's metrics line", || async {
        let lines = route.metric_lines();
        lines
            .into_iter()
            .find(|l| l["palaver_appends_total"].is_number())
    })
    .await;
    let declared = &emf["_aws"]["CloudWatchMetrics"][0];
    assert_eq!(declared["Namespace"], "palaver", "{emf}");
    assert_eq!(declared["Dimensions"], json!([["function"]]), "{emf}");
    assert_eq!(emf["function"], "palaver-route", "{emf}");
    assert_eq!(emf["palaver_appends_total"], 1, "the connect's line: {emf}");
    let refused = json!({"action": "getHistory", "room": "elsewhere"});
    let answer = answer_of(&route.invoke(world.message_event(&ana, &refused)).await);
    assert_eq!(answer["code"], "not_member", "{answer}");

    let batch = world.stream.next_event(5).await;
    let response = fanout.invoke(batch).await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    let mut received = 0;
    for socket in [&mut ana, &mut ben] {
        let frames = socket.until_message(3).await;
        assert_two_joins_then_a_message(&frames, &socket.user);
        received += frames.len() as u64;
    }
    // Every frame the batch put on a socket, each counted once.
    let delivered = || -> u64 {
        let lines = fanout.metric_lines();
        lines
            .iter()
            .filter_map(|l| l["palaver_deliveries_total"].as_u64())
            .sum()
    };
    common::eventually("the fan-out's metrics lines", || async {
        (delivered() >= received).then_some(())
    })
    .await;
    assert_eq!(delivered(), received, "{:?}", fanout.metric_lines());

    let job = DeliveryJob {
        frames: vec![
            json!({"type": "presence", "room": "general", "user": "zoe", "online": true})
                .to_string(),
        ],
        connections: vec![ana.id.clone(), ben.id.clone()],
        group: "general#0".to_owned(),
        id: "c:zoe:1:general#0#0".to_owned(),
    };
    let event = json!({"Records": [
        {"messageId": "good", "receiptHandle": "r1", "body": serde_json::to_string(&job).unwrap(),
         "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
         "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
         "awsRegion": "us-east-1"},
        {"messageId": "bad", "receiptHandle": "r2", "body": "[]",
         "attributes": {"ApproximateReceiveCount": "1"}, "messageAttributes": {},
         "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
         "awsRegion": "us-east-1"}
    ]});
    let response = deliver.invoke(event).await;
    assert_eq!(
        response,
        json!({"batchItemFailures": [{"itemIdentifier": "bad"}]})
    );
    for socket in [&mut ana, &mut ben] {
        // (Presence from the stream batch may still be ahead of it.)
        let frames = socket.until(|f| f["user"] == "zoe").await;
        assert_eq!(frames.last().unwrap()["type"], "presence");
    }

    // Ben closes his socket; API Gateway tells the route function.
    let ben_id = ben.id.clone();
    let event = world.disconnect_event(&ben);
    ben.close().await;
    world.gateway.wait_gone(&ben_id).await;
    let response = route.invoke(event).await;
    assert_eq!(response["statusCode"], 200, "{response}");
    let ben_stream = Stream::Connection(ben_id.clone());
    assert_eq!(
        kinds(&world, &ben_stream).await,
        ["connected", "disconnected"]
    );
    let record = world.store.directory.connection(&ben_id).await.unwrap();
    assert!(!record.expect("ben's connection").open);
    // …and the disconnect, through the stream and the fan-out, tells ana that ben went offline.
    let batch = world.stream.next_event(1).await;
    let response = fanout.invoke(batch).await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    let frames = ana
        .until(|f| f["type"] == "presence" && f["user"] == "ben")
        .await;
    assert_eq!(
        frames.last().unwrap(),
        &json!({"type": "presence", "room": "general", "user": "ben", "online": false})
    );
}

/// The kinds of the events in `stream`, in order.
async fn kinds(world: &World, stream: &Stream) -> Vec<&'static str> {
    let events = world.store.log.read(stream, 0, 100).await.unwrap();
    events.iter().map(|e| e.body.kind()).collect()
}

/// API Gateway keeps a socket open that the store has closed (a 410 seen while the handshake was
/// still finishing, a lost record). A request on it answers `gone` — never `internal` — and the
/// socket is closed so that the client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_on_a_connection_the_store_closed_answers_gone_and_closes_it() {
    use futures_util::StreamExt;
    let world = World::new("forgotten", Options::default()).await;
    let mut ana = world.connect("ana").await;
    world.join(&ana, "general").await;
    palaver::connections::close(
        world.store.log.as_ref(),
        world.store.directory.as_ref(),
        &ana.id,
        palaver::domain::DisconnectReason::Gone,
    )
    .await
    .unwrap();

    let response = world
        .route(world.message_event(
            &ana,
            &json!({"action": "sendMessage", "room": "general", "text": "hello?"}),
        ))
        .await;
    assert_eq!(response["statusCode"], 200, "{response}");
    assert!(response["body"].is_null(), "no answer body: {response}");

    let told = ana.next().await;
    assert_eq!(told["type"], "error", "{told}");
    assert_eq!(told["code"], "gone", "{told}");
    assert_eq!(told["action"], "sendMessage", "{told}");
    // Then the gateway closes the socket.
    world.gateway.wait_gone(&ana.id).await;
    let rest = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        let mut frames = Vec::new();
        while let Some(Ok(frame)) = ana.raw().next().await {
            frames.push(frame);
        }
        frames
    })
    .await
    .expect("the socket closes");
    assert!(
        rest.iter().all(|f| f.is_close()),
        "nothing but the close after gone: {rest:?}"
    );
}

/// API Gateway answers 410 to a post made while the handshake that ran `$connect` is still
/// finishing, just as it does for a connection that is gone. With the deployed setting (10 s), a
/// 410 for a connection that connected moments ago does not close it in the log: in a busy room
/// that would cut off most new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_moments_after_connect_does_not_close_the_connection() {
    let options = Options {
        handshake_grace_secs: Some(10),
        ..Options::default()
    };
    let mut world = World::new("handshake", options).await;
    let (mut ana, ben) = ana_and_ben_in_general(&mut world).await;

    // Ben's socket is not there (as during a handshake), and the posts to it answer 410.
    let ben_id = ben.id.clone();
    ben.close().await;
    world.gateway.wait_gone(&ben_id).await;
    let seq = world.say(&ana, "general", "hello").await;
    let batch = world.stream.next_event(1).await;
    assert_eq!(failures(&world.fan_out(&batch).await), Vec::<String>::new());
    assert_eq!(ana.until_message(seq).await.len(), 1);

    let record = world
        .store
        .directory
        .connection(&ben_id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        record.open,
        "a young connection is not closed by a 410: {record:?}"
    );
    assert_eq!(
        world
            .store
            .log
            .head(&Stream::Connection(ben_id))
            .await
            .unwrap(),
        1
    );
}

/// The route function reads its token secret from Secrets Manager when it starts (as deployed:
/// only the secret's name is in its configuration), and checks `$connect` tokens with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_function_reads_its_token_secret_from_secrets_manager() {
    use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
    use palaver::identity::Identity;
    use palaver::lambda::{Aws, LambdaConfig};
    use palaver::store::dynamodb::{Tables, init};

    let sdk = aws_support::moto().await;
    let prefix = aws_support::fresh_prefix("secret");
    init(&aws_sdk_dynamodb::Client::new(&sdk), &Tables::new(&prefix))
        .await
        .expect("tables created in moto");
    let name = format!("{prefix}/jwt");
    aws_sdk_secretsmanager::Client::new(&sdk)
        .create_secret()
        .name(&name)
        .secret_string("kept-in-secrets-manager")
        .send()
        .await
        .expect("secret created in moto");
    let vars = |secret_id: String| {
        [
            ("PALAVER_STORE", format!("dynamodb://{prefix}")),
            (
                "PALAVER_MANAGEMENT_ENDPOINT",
                "http://127.0.0.1:9".to_owned(),
            ),
            ("PALAVER_JWT_SECRET_ID", secret_id),
        ]
    };
    let config = LambdaConfig::from_vars(vars(name.clone())).unwrap();
    let routes = Aws::with_sdk(&config, sdk.clone())
        .routes()
        .await
        .expect("the secret is read");

    let connect = |id: &str, token: String| {
        let mut request = ApiGatewayWebsocketProxyRequest::default();
        request.request_context.route_key = Some("$connect".to_owned());
        request.request_context.connection_id = Some(id.to_owned());
        request.query_string_parameters = HashMap::from([("token".to_owned(), token)]).into();
        request
    };
    let ana = UserId::parse("ana").unwrap();
    let ttl = std::time::Duration::from_secs(60);
    let signed = Identity::new(b"kept-in-secrets-manager").issue(&ana, ttl);
    let forged = Identity::new(b"something-else").issue(&ana, ttl);
    assert_eq!(
        routes.handle(connect("c-good", signed)).await.status_code,
        200
    );
    assert_eq!(
        routes.handle(connect("c-forged", forged)).await.status_code,
        401
    );

    // A secret that is not there stops the function at start, saying which.
    let missing = LambdaConfig::from_vars(vars(format!("{prefix}/nothing"))).unwrap();
    let error = Aws::with_sdk(&missing, sdk)
        .routes()
        .await
        .err()
        .expect("no such secret");
    assert_eq!(error.name, "PALAVER_JWT_SECRET_ID");
}

/// A busy room's stream batch queues many jobs for one lane (more than one `SendMessageBatch`
/// holds, and big enough that the 256 KiB cap splits them too), beside other lanes: through real
/// SQS calls, every job arrives once, and each lane's in the order it was queued — what keeps a
/// connection's frames in seq order across delivery workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_jobs_of_one_lane_are_queued_and_received_in_order() {
    use palaver::ports::DeliveryQueue;
    let sdk = aws_support::moto().await;
    let queue = aws_support::Queue::create(&sdk, &aws_support::fresh_prefix("lanes")).await;
    let sqs = palaver::aws::SqsDeliveryQueue::new(aws_sdk_sqs::Client::new(&sdk), &queue.url);
    let job = |lane: &str, n: usize| DeliveryJob {
        // Every third job is 40 KiB: ten of them would not fit one call.
        frames: vec![format!(
            "{lane}/{n}/{}",
            "x".repeat(if n.is_multiple_of(3) { 40_000 } else { 10 })
        )],
        connections: vec![ConnectionId::new(format!("c-{lane}"))],
        group: format!("hall#{lane}"),
        id: format!("hall:{lane}:{n}"),
    };
    // Interleaved as a batch's frames come out: lane 0 has 25 jobs, lane 1 has 12, lane 2 has 3.
    let mut jobs = Vec::new();
    for n in 0..25 {
        jobs.push(job("0", n));
        if n < 12 {
            jobs.push(job("1", n));
        }
        if n < 3 {
            jobs.push(job("2", n));
        }
    }
    sqs.enqueue(jobs.clone()).await.expect("enqueue");

    let records = queue.receive_all().await;
    let mut lanes: HashMap<String, Vec<String>> = HashMap::new();
    for record in &records {
        let job: DeliveryJob = serde_json::from_str(record["body"].as_str().unwrap()).unwrap();
        assert_eq!(
            record["attributes"]["MessageGroupId"], job.group,
            "queued in its lane's message group"
        );
        lanes.entry(job.group).or_default().push(job.id);
    }
    assert_eq!(records.len(), jobs.len(), "every job once");
    for (lane, count) in [("0", 25), ("1", 12), ("2", 3)] {
        let expected: Vec<String> = (0..count).map(|n| format!("hall:{lane}:{n}")).collect();
        assert_eq!(
            lanes[&format!("hall#{lane}")],
            expected,
            "lane {lane} in order"
        );
    }
}

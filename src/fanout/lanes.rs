//! A big room's recipients spread over the delivery queue's lanes (FIFO message groups), and
//! the jobs that carry its frames to delivery workers.
//!
//! Each lane is one message group: SQS hands a group's messages to one worker at a time, in
//! order, so a connection — always in the same lane while its room relays — gets the room's
//! frames in seq order, while the lanes post in parallel.

use crate::domain::{ConnectionId, RoomName};
use crate::ports::DeliveryJob;
use std::collections::HashMap;

/// The most lanes (delivery queue message groups) one room's recipients are spread over: this
/// many workers can post one room's frames at once, each lane in order.
pub const MAX_RELAY_LANES: u32 = 256;
/// The fewest lanes a relayed room gets, however small it is when it starts relaying. A room's
/// lanes are fixed while it relays (see [`RelayLease`]), so a room that starts at the threshold
/// and grows keeps them. A lane posts one job after another, a job of 100 in about 0.1 s (two
/// rounds of 64 posts in flight at API Gateway's ~50 ms p99): about 1,000 posts a second. With
/// 16, a room of 10,000 that started small still posts 16,000 a second — more than an account's
/// 10,000 — while a room just over the threshold is 16 jobs an event, not one per connection.
///
/// [`RelayLease`]: crate::ports::RelayLease
pub const MIN_RELAY_LANES: u32 = 16;

/// The lanes for a room that starts relaying with `recipients`: one per `job_size` of them, so
/// that each lane's job is about `job_size` connections, within [`MIN_RELAY_LANES`] and
/// [`MAX_RELAY_LANES`].
pub fn relay_lanes_for(recipients: usize, job_size: usize) -> u32 {
    let lanes = recipients.div_ceil(job_size.max(1));
    u32::try_from(lanes)
        .unwrap_or(u32::MAX)
        .clamp(MIN_RELAY_LANES, MAX_RELAY_LANES)
}

/// The jobs for one frame: recipients spread over `lanes` lanes by a stable hash of their
/// connection id — so a connection is in the same lane for every frame of the room while its
/// lanes are kept, and sees them in order — and each lane cut into jobs of at most `job_size`
/// connections.
pub fn relay_jobs(
    recipients: &[ConnectionId],
    frame: &str,
    room: &RoomName,
    key: &str,
    job_size: usize,
    lanes: u32,
) -> Vec<DeliveryJob> {
    let lanes = u64::from(lanes.max(1));
    let mut groups: Vec<Vec<ConnectionId>> = vec![Vec::new(); lanes as usize];
    for connection in recipients {
        let group = fnv1a(connection.as_str().as_bytes()) % lanes;
        groups[group as usize].push(connection.clone());
    }
    let mut jobs = Vec::new();
    for (group, connections) in groups.into_iter().enumerate() {
        for (part, chunk) in connections.chunks(job_size).enumerate() {
            jobs.push(DeliveryJob {
                frames: vec![frame.to_owned()],
                connections: chunk.to_vec(),
                group: format!("{room}#{group}"),
                id: format!("{key}#{group}#{part}"),
            });
        }
    }
    jobs
}

/// How large a job grows by taking later frames: SQS bills each 64 KiB of a message as one
/// request, and a message may be 256 KiB at most (a frame alone is at most 32 KiB).
const JOB_BYTES: usize = 64 * 1024;
/// The most frames a job takes: a worker posts them one after another, and must finish a job it
/// started (handing it back would post its first frames twice) within its invocation's
/// timeout even when every post waits out throttling.
const JOB_FRAMES: usize = 5;

/// The jobs of several frames of one room, in seq order (each frame's from [`relay_jobs`]),
/// merged, each lane's in the order they must be queued.
///
/// A job takes the frames after its own for as long as its lane's part holds the same
/// connections (up to [`JOB_FRAMES`] and [`JOB_BYTES`]): a run of messages into a big room — what a busy room's
/// stream batch holds, more of them the further the fan-out is behind — costs one message per
/// lane, not one per lane per event, and one delivery worker posts them all in order. A join
/// or a leave changes one lane; the others go on merging.
///
/// The result is each lane's jobs, in the order they must be queued.
pub fn merged(per_frame: Vec<Vec<DeliveryJob>>) -> Vec<Vec<DeliveryJob>> {
    // Each lane's jobs, in order; and the job a lane's part is growing (its index there).
    let mut lanes: Vec<Vec<DeliveryJob>> = Vec::new();
    let mut lane_of: HashMap<String, usize> = HashMap::new();
    // A job grows only while its part had the same connections in every frame since it was
    // made: a part that is missing from one frame (its lane lost connections) may come back
    // holding a connection that got the missing frame in a later job, and taking a later frame
    // into the older job would post it to them first.
    let mut growing: HashMap<(usize, usize), usize> = HashMap::new();
    for jobs in per_frame {
        let mut grown: HashMap<(usize, usize), usize> = HashMap::new();
        let mut parts: HashMap<usize, usize> = HashMap::new();
        for job in jobs {
            let lane = *lane_of.entry(job.group.clone()).or_insert_with(|| {
                lanes.push(Vec::new());
                lanes.len() - 1
            });
            let part = parts.entry(lane).or_default();
            let key = (lane, *part);
            *part += 1;
            let frame_len = job.frames.iter().map(String::len).sum::<usize>();
            if let Some(&at) = growing.get(&key) {
                let open = &mut lanes[lane][at];
                if open.connections == job.connections
                    && open.frames.len() < JOB_FRAMES
                    && size(open) + frame_len <= JOB_BYTES
                {
                    open.frames.extend(job.frames);
                    grown.insert(key, at);
                    continue;
                }
            }
            grown.insert(key, lanes[lane].len());
            lanes[lane].push(job);
        }
        growing = grown;
    }
    for jobs in &mut lanes {
        for job in jobs.iter_mut().filter(|job| job.frames.len() > 1) {
            // Its own deduplication id: a retried batch that merges the same frames the same
            // way is dropped by the queue; one cut differently is not a repeat.
            job.id = format!("{}+{}", job.id, job.frames.len());
        }
    }
    lanes
}

/// About how large a job is on the queue.
fn size(job: &DeliveryJob) -> usize {
    job.frames.iter().map(String::len).sum::<usize>()
        + job
            .connections
            .iter()
            .map(|c| c.as_str().len() + 3)
            .sum::<usize>()
}

/// FNV-1a: a hash that is the same in every process and every Rust release (std's is not
/// promised to be), so every fan-out puts a connection in the same group.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_hold_about_job_size_connections_whatever_the_room() {
        let room = RoomName::parse("hall").unwrap();
        let connections = |n: usize| -> Vec<ConnectionId> {
            (0..n)
                .map(|n| ConnectionId::new(format!("conn{n:05}")))
                .collect()
        };
        // Just over the threshold: a handful of jobs, not one per connection.
        let small = connections(201);
        let lanes = relay_lanes_for(small.len(), 100);
        assert_eq!(lanes, MIN_RELAY_LANES);
        let jobs = relay_jobs(&small, "{}", &room, "r:hall:1", 100, lanes);
        assert!(jobs.len() <= lanes as usize, "{} jobs", jobs.len());
        assert_eq!(jobs.iter().map(|j| j.connections.len()).sum::<usize>(), 201);
        // 10,000 that started relaying at 10,000: 100 lanes of about 100, capped at job_size.
        let big = connections(10_000);
        let lanes = relay_lanes_for(big.len(), 100);
        assert_eq!(lanes, 100);
        let jobs = relay_jobs(&big, "{}", &room, "r:hall:1", 100, lanes);
        assert!(jobs.iter().all(|j| j.connections.len() <= 100));
        assert!(jobs.len() < 200, "{} jobs", jobs.len());
        // The same room under a small lease: few lanes, each cut into jobs of at most 100.
        let jobs = relay_jobs(&big, "{}", &room, "r:hall:1", 100, MIN_RELAY_LANES);
        assert!(jobs.iter().all(|j| j.connections.len() <= 100));
        assert!(jobs.len() <= 100 + MIN_RELAY_LANES as usize);
        assert_eq!(relay_lanes_for(1_000_000, 100), MAX_RELAY_LANES);
    }

    #[test]
    fn a_connection_keeps_its_lane_for_every_event() {
        let recipients: Vec<ConnectionId> = (0..10_000)
            .map(|n| ConnectionId::new(format!("conn{n:05}")))
            .collect();
        let room = RoomName::parse("hall").unwrap();
        let jobs = relay_jobs(&recipients, "{}", &room, "r:hall:1", 100, 256);
        let mut per_group: HashMap<&str, usize> = HashMap::new();
        for job in &jobs {
            *per_group.entry(job.group.as_str()).or_default() += 1;
        }
        assert_eq!(per_group.values().max(), Some(&1), "{} jobs", jobs.len());
        // The same connection lands in the same group for every event.
        let again = relay_jobs(&recipients, "{}", &room, "r:hall:2", 100, 256);
        let group_of = |jobs: &[DeliveryJob], c: &ConnectionId| {
            jobs.iter()
                .find(|j| j.connections.contains(c))
                .map(|j| j.group.clone())
        };
        for c in recipients.iter().step_by(97) {
            assert_eq!(group_of(&jobs, c), group_of(&again, c));
        }
    }

    fn connections(names: &[&str]) -> Vec<ConnectionId> {
        names.iter().map(|n| ConnectionId::new(*n)).collect()
    }

    /// Each frame of `frames` (a frame, and who is in the room then) as `relay_jobs` cuts it.
    fn per_frame(frames: &[(&str, &[&str])], job_size: usize) -> Vec<Vec<DeliveryJob>> {
        let room = RoomName::parse("hall").unwrap();
        frames
            .iter()
            .enumerate()
            .map(|(n, (frame, members))| {
                relay_jobs(
                    &connections(members),
                    frame,
                    &room,
                    &format!("r:hall:{n}"),
                    job_size,
                    4,
                )
            })
            .collect()
    }

    /// What each connection gets when each lane's jobs are posted in order.
    fn posted(lanes: &[Vec<DeliveryJob>]) -> HashMap<String, Vec<String>> {
        let mut got: HashMap<String, Vec<String>> = HashMap::new();
        for lane in lanes {
            for job in lane {
                for c in &job.connections {
                    got.entry(c.to_string())
                        .or_default()
                        .extend(job.frames.clone());
                }
            }
        }
        got
    }

    #[test]
    fn a_run_of_frames_to_the_same_audience_is_one_job_per_lane() {
        let everyone: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h"];
        let frames = [("m1", everyone), ("m2", everyone), ("m3", everyone)];
        let single = per_frame(&frames[..1], 100).remove(0);
        let lanes = merged(per_frame(&frames, 100));
        let jobs: Vec<&DeliveryJob> = lanes.iter().flatten().collect();
        assert_eq!(jobs.len(), single.len(), "as many jobs as one frame has");
        for job in jobs {
            assert_eq!(job.frames, ["m1", "m2", "m3"]);
            assert!(job.id.ends_with("+3"), "{}", job.id);
        }
        let got = posted(&lanes);
        assert_eq!(got.len(), everyone.len());
        assert!(got.values().all(|frames| frames == &["m1", "m2", "m3"]));
    }

    #[test]
    fn a_join_starts_a_new_job_in_its_lane_only_and_every_connection_keeps_the_order() {
        let before: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h"];
        let after: &[&str] = &["a", "b", "c", "d", "e", "f", "g", "h", "newcomer"];
        let frames = [
            ("m1", before),
            ("m2", before),
            ("joined", after),
            ("m3", after),
        ];
        let lanes = merged(per_frame(&frames, 100));
        let jobs: Vec<&DeliveryJob> = lanes.iter().flatten().collect();
        assert_eq!(jobs.len(), lanes.len() + 1, "one lane changed: {jobs:?}");
        assert!(
            lanes
                .iter()
                .all(|lane| lane.iter().all(|j| j.group == lane[0].group))
        );
        let got = posted(&lanes);
        for c in before {
            assert_eq!(got[*c], ["m1", "m2", "joined", "m3"], "{c}");
        }
        assert_eq!(got["newcomer"], ["joined", "m3"]);
    }

    #[test]
    fn lanes_cut_in_parts_merge_part_by_part_and_a_job_stops_growing_at_its_size() {
        // One lane (4 lanes, but parts of 1): every connection its own job.
        let members: &[&str] = &["a", "b", "c", "d", "e", "f"];
        let frames = [("m1", members), ("m2", members)];
        let lanes = merged(per_frame(&frames, 1));
        let got = posted(&lanes);
        assert!(
            got.values().all(|frames| frames == &["m1", "m2"]),
            "{got:?}"
        );
        assert!(lanes.iter().flatten().all(|j| j.frames.len() == 2));

        let big = "x".repeat(20 * 1024);
        let frames: Vec<(&str, &[&str])> = (0..5).map(|_| (big.as_str(), members)).collect();
        let cut = merged(per_frame(&frames, 100));
        assert!(cut.iter().flatten().all(|j| size(j) <= JOB_BYTES));
        assert!(
            cut.iter().all(|lane| lane.len() > 1),
            "five 20 KiB frames do not fit one job"
        );
        assert!(posted(&cut).values().all(|frames| frames.len() == 5));
    }

    #[test]
    fn a_part_that_skips_a_frame_starts_a_new_job() {
        let job = |frame: &str, part: usize, members: &[&str]| DeliveryJob {
            frames: vec![frame.to_owned()],
            connections: connections(members),
            group: "hall#0".to_owned(),
            id: format!("{frame}#0#{part}"),
        };
        // One lane, jobs of one connection: a leaves, so b moves up a part and the lane has
        // one part; then a newcomer arrives ahead of b, and b is back in its old part.
        let lanes = merged(vec![
            vec![job("m1", 0, &["a"]), job("m1", 1, &["b"])],
            vec![job("m2", 0, &["b"])],
            vec![job("m3", 0, &["n"]), job("m3", 1, &["b"])],
        ]);
        assert_eq!(posted(&lanes)["b"], ["m1", "m2", "m3"], "{lanes:?}");
    }
}

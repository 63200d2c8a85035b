//! Every integration test, as one test binary.
//!
//! Each file of `tests/` used to be a binary of its own, and each linked the whole crate with
//! the AWS SDK: on two cores, linking a dozen of them took longer than running every test. One
//! binary links once. The suites are its modules; pick one with a filter, as `scripts/test`
//! does: `cargo test --test it websocket::`.

mod aws_support;
mod common;

mod aws_path;
mod browser;
mod change_stream;
mod durability;
mod fanout_requests;
mod faults;
mod hostile;
mod load;
mod management_api;
mod nodes;
mod operator;
mod properties;
mod shutdown;
mod store_contract;
mod stream_fanout;
mod websocket;

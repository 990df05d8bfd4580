//! All integration tests in one binary (one link, shared support code).

mod support;
mod forwarding;
mod routing;
mod streaming;

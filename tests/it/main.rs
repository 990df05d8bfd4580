//! All integration tests in one binary (one link, shared support code).

mod support;

//! An OTLP/HTTP trace receiver on 127.0.0.1:0: a real hyper server that
//! decodes each `POST /v1/traces` with `opentelemetry-proto` and keeps the
//! spans. It stops when dropped.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
pub use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use super::mock::{full, read_body};
use super::{Mock, MockBody};

pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// A receiver and every export it decoded.
pub struct Collector {
    pub mock: Mock,
    exports: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

impl Collector {
    /// Answers every export with 200 and an empty response.
    pub async fn start() -> Collector {
        Self::answering_after(Duration::ZERO).await
    }

    /// Decodes each export, then holds its answer for `delay` (a slow or
    /// hung collector).
    pub async fn answering_after(delay: Duration) -> Collector {
        let exports = Arc::new(Mutex::new(Vec::new()));
        let kept = exports.clone();
        let mock = Mock::start(move |req: Request<Incoming>| {
            let kept = kept.clone();
            async move {
                let path = req.uri().path().to_owned();
                let body = read_body(req.into_body()).await.unwrap_or_default();
                if path != "/v1/traces" {
                    return answer(404);
                }
                match ExportTraceServiceRequest::decode(body) {
                    Ok(export) => kept.lock().unwrap().push(export),
                    Err(_) => return answer(400),
                }
                tokio::time::sleep(delay).await;
                answer(200)
            }
        })
        .await;
        Collector { mock, exports }
    }

    /// The base URL, as `[telemetry.otlp] endpoint` takes it.
    pub fn url(&self) -> String {
        self.mock.url()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        let exports = self.exports.lock().unwrap();
        exports
            .iter()
            .flat_map(|e| &e.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.iter().cloned())
            .collect()
    }

    /// Waits until `n` spans have arrived (a panic after 20 s), then a
    /// moment more for any that should not have come.
    pub async fn wait_for_spans(&self, n: usize) -> Vec<Span> {
        let arrived = async {
            while self.spans().len() < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(20), arrived)
            .await
            .is_err()
        {
            panic!("{n} spans did not arrive; got {:#?}", self.spans());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.spans()
    }

    /// Everything received, every attribute and resource included, as
    /// text: what a secret must never be found in.
    pub fn everything(&self) -> String {
        format!("{:?}", self.exports.lock().unwrap())
    }

    /// The resource attribute `key` of the first export.
    pub fn resource_attr(&self, key: &str) -> Option<Value> {
        let exports = self.exports.lock().unwrap();
        let resource = exports.first()?.resource_spans.first()?.resource.as_ref()?;
        find(&resource.attributes, key)
    }
}

fn answer(status: u16) -> Response<MockBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/x-protobuf")
        .body(full(""))
        .unwrap()
}

fn find(attrs: &[KeyValue], key: &str) -> Option<Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

/// A span's attribute `key`.
pub fn attr(span: &Span, key: &str) -> Option<Value> {
    find(&span.attributes, key)
}

/// A span's string attribute `key` (a panic when it is another type).
pub fn text(span: &Span, key: &str) -> Option<String> {
    attr(span, key).map(|v| match v {
        Value::StringValue(s) => s,
        other => panic!("{key} is not a string: {other:?}"),
    })
}

/// A span's integer attribute `key`.
pub fn int(span: &Span, key: &str) -> Option<i64> {
    attr(span, key).map(|v| match v {
        Value::IntValue(i) => i,
        other => panic!("{key} is not an integer: {other:?}"),
    })
}

/// A span's float attribute `key`.
pub fn float(span: &Span, key: &str) -> Option<f64> {
    attr(span, key).map(|v| match v {
        Value::DoubleValue(f) => f,
        other => panic!("{key} is not a float: {other:?}"),
    })
}

/// Lower-case hex, as `traceparent` writes ids.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// How long a span lasted.
pub fn duration(span: &Span) -> Duration {
    Duration::from_nanos(span.end_time_unix_nano - span.start_time_unix_nano)
}

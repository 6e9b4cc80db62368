//! Body wrappers: the request body streamed upstream under the route's size limit, the
//! upstream's response body cut off when it stalls, and the response body that counts bytes and
//! writes the access-log line when it is done.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::{BoxError, ResponseBody, access_log::AccessRecord, upstream::InFlight};

#[derive(Debug, thiserror::Error)]
#[error("the request body exceeds {limit} bytes")]
pub(crate) struct BodyTooLarge {
    pub(crate) limit: u64,
}

/// Why a request body stopped before its end, as the pipeline needs to know it: a failed
/// upstream exchange caused by the client's side is the client's error, not the upstream's.
#[derive(Default)]
pub(crate) struct BodyOutcome {
    too_large: AtomicBool,
    client_failed: AtomicBool,
}

impl BodyOutcome {
    pub(crate) fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Relaxed)
    }

    pub(crate) fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Relaxed)
    }
}

/// The client's request body on its way upstream, never buffered. Past `limit` bytes it fails
/// (which aborts the upstream request, so the upstream never receives the whole body) and
/// records why in its [`BodyOutcome`], which the pipeline turns into 413.
/// A request body on its way upstream: streamed from the client, or already read (capped)
/// because a validation phase needed all of it.
pub(crate) enum RequestBody {
    Streamed(Incoming),
    Buffered(Option<Bytes>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Streamed(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Buffered(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Streamed(body) => body.is_end_stream(),
            RequestBody::Buffered(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Streamed(body) => body.size_hint(),
            RequestBody::Buffered(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

pub(crate) struct LimitedBody {
    inner: RequestBody,
    limit: u64,
    seen: u64,
    outcome: Arc<BodyOutcome>,
    counted: Arc<AtomicU64>,
}

impl LimitedBody {
    pub(crate) fn new(
        inner: RequestBody,
        limit: u64,
        outcome: Arc<BodyOutcome>,
        counted: Arc<AtomicU64>,
    ) -> Self {
        LimitedBody {
            inner,
            limit,
            seen: 0,
            outcome,
            counted,
        }
    }
}

impl Body for LimitedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.len() as u64;
                    this.seen += len;
                    this.counted.fetch_add(len, Ordering::Relaxed);
                    if this.seen > this.limit {
                        this.outcome.too_large.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                            limit: this.limit,
                        }))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                this.outcome.client_failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(Box::new(error))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What must live exactly as long as a response is being sent.
pub(crate) struct Finish {
    pub(crate) record: AccessRecord,
    /// Counts the request against its endpoint (least-outstanding balancing) until the
    /// response is fully sent.
    pub(crate) in_flight: Option<InFlight>,
    /// Keeps the connection from being closed as idle while the response streams.
    pub(crate) connection_busy: super::server::Busy,
}

/// An upstream response body that fails when the upstream sends nothing for `idle` (the
/// route's timeout, restarted by every frame, like NGINX's `proxy_read_timeout`): a stalled
/// upstream cannot hold a client connection and an endpoint forever, while a long stream that
/// keeps sending (gRPC, server-sent events) is never cut off for its length.
pub(crate) struct StallGuard {
    inner: ResponseBody,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream sent no response data for {0:?} (the route's timeout)")]
pub(crate) struct UpstreamStalled(Duration);

impl StallGuard {
    pub(crate) fn new(inner: ResponseBody, idle: Duration) -> StallGuard {
        StallGuard {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl Body for StallGuard {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.timer.as_mut().reset(deadline);
                Poll::Ready(frame)
            }
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(UpstreamStalled(this.idle).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body as sent to the client: counts bytes, and writes the access-log line when
/// the body ends, fails, or is dropped because the client went away.
pub(crate) struct LoggedBody {
    inner: ResponseBody,
    finish: Option<Finish>,
}

impl LoggedBody {
    pub(crate) fn new(inner: ResponseBody, finish: Finish) -> Self {
        LoggedBody {
            inner,
            finish: Some(finish),
        }
    }

    fn done(&mut self) {
        if let Some(Finish {
            record,
            in_flight,
            connection_busy,
        }) = self.finish.take()
        {
            record.emit();
            // The endpoint and the connection are free once the line is written.
            drop((in_flight, connection_busy));
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(finish)) = (frame.data_ref(), this.finish.as_mut()) {
                    finish.record.bytes_out += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_)) | None) => this.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.done();
    }
}

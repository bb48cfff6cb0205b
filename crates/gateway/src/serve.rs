//! The gateway's accept loop: hyper connections served with a bound on how many are open at
//! once and a deadline on each request's headers. `axum::serve` has neither: a client that
//! opens connections and never finishes a request holds each one, and a file descriptor of
//! the node's (which its segments, logs and cluster links need too), for ever.
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tracing::{debug, warn};

/// What the loop bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Connections open at once; past it the next one waits in the listen backlog (not
    /// accepted) until one closes.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from the moment the connection is
    /// ready for one (a new connection, or an idle kept-alive one): past it the connection is
    /// closed.
    pub header_timeout: Duration,
}

/// Serves `app` on `listener` within `limits` until `stop` fires; then stops accepting, asks
/// every open connection to finish its request in progress and close, and returns once they
/// have (the caller bounds that wait).
pub(crate) async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut stop: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, closing_rx) = watch::channel(false);
    loop {
        let slot = tokio::select! {
            _ = &mut stop => break,
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // out of descriptors (or a connection reset before it was taken): waiting
                    // lets connections close rather than spinning on the error
                    warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let mut asked_to_close = false;
            loop {
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(%peer, error = %e, "HTTP connection ended with an error");
                        }
                        break;
                    }
                    _ = closing.wait_for(|c| *c), if !asked_to_close => {
                        asked_to_close = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            }
        });
    }
    let _ = closing.send(true);
    // every slot back: every connection has closed
    let _ = slots.acquire_many(limits.max_connections as u32).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    async fn start(limits: Limits) -> (std::net::SocketAddr, oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "hello" }));
        let (tx, rx) = oneshot::channel();
        tokio::spawn(accept_loop(listener, app, limits, rx));
        (addr, tx)
    }

    /// Reads what `s` sends until it closes or `within` passes; whether it closed.
    async fn read_until_closed(s: &mut TcpStream, within: Duration, got: &mut Vec<u8>) -> bool {
        let end = Instant::now() + within;
        let mut buf = [0u8; 1024];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Err(_) => return false,
            }
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

    #[tokio::test]
    async fn a_request_whose_headers_never_end_is_closed_at_the_header_deadline() {
        let limits = Limits {
            max_connections: 8,
            header_timeout: Duration::from_millis(300),
        };
        let (addr, _stop) = start(limits).await;
        let t = Instant::now();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        assert!(
            read_until_closed(&mut slow, Duration::from_secs(10), &mut got).await,
            "a connection with unfinished headers was kept open"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(250),
            "{:?}",
            t.elapsed()
        );
        // a whole request is answered as before
        let mut ok = TcpStream::connect(addr).await.unwrap();
        ok.write_all(GET).await.unwrap();
        let mut got = Vec::new();
        assert!(read_until_closed(&mut ok, Duration::from_secs(10), &mut got).await);
        let text = String::from_utf8_lossy(&got);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("hello"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn past_the_connection_bound_a_client_waits_until_one_closes() {
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_secs(60),
        };
        let (addr, _stop) = start(limits).await;
        // two connections hold both slots (their headers unfinished)
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            held.push(s);
        }
        // the third is not accepted (the kernel's backlog holds it): no answer while they stay
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        let mut got = Vec::new();
        assert!(
            !read_until_closed(&mut third, Duration::from_millis(300), &mut got).await
                && got.is_empty(),
            "served past the bound: {}",
            String::from_utf8_lossy(&got)
        );
        // one of them goes: the third is served
        drop(held.pop());
        assert!(read_until_closed(&mut third, Duration::from_secs(10), &mut got).await);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    }
}

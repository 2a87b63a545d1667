//! `tiercache serve`: the cache as an HTTP service ([`tiercache::serve::router`]) until Ctrl-C
//! (or SIGTERM), then a close that flushes the write-behind outbox.

use std::io::Write as _;
use std::net::SocketAddr;

use crate::config::Settings;
use crate::{open, Failure};

pub(crate) async fn serve(s: &Settings, listen: SocketAddr) -> Result<u8, Failure> {
    let cache = open(s, s.strategy).await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::runtime(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::runtime(format!("cannot read the listening address: {e}")))?;
    // The first line says where it listens (with `--listen 127.0.0.1:0`, the port it got).
    let mut out = std::io::stdout();
    let _ = writeln!(out, "tiercache: serving http://{addr} (Ctrl-C stops)");
    let _ = out.flush();
    axum::serve(listener, tiercache::serve::router(cache.clone()))
        .with_graceful_shutdown(stopped())
        .await
        .map_err(|e| Failure::runtime(format!("the HTTP service failed: {e}")))?;
    let report = cache.close().await.map_err(|e| Failure::from_error(&e))?;
    if report.pending > 0 {
        eprintln!(
            "tiercache: {} write(s) still pending; run `tiercache flush` when GitHub is back",
            report.pending
        );
    }
    Ok(0)
}

/// Ctrl-C, or SIGTERM on Unix (what a service manager sends).
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

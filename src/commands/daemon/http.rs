//! A minimal HTTP/1.1 listener for `/metrics` (Prometheus text) and `/healthz`
//! (200 or 503 with the reasons as JSON). Requests are tiny and the answers
//! come from memory, so a hand-written loop is enough.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::DaemonState;

pub async fn serve(listener: TcpListener, state: Arc<Mutex<DaemonState>>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::util::until_true(&mut shutdown) => return,
        };
        let Ok((mut sock, _)) = accepted else { continue };
        let state = state.clone();
        tokio::spawn(async move {
            // The request line may arrive in several reads; the headers are ignored.
            let mut buf = Vec::with_capacity(1024);
            let read_line = async {
                let mut chunk = [0u8; 1024];
                while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 8192 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            };
            if !matches!(tokio::time::timeout(Duration::from_secs(5), read_line).await, Ok(true)) {
                return;
            }
            let request = String::from_utf8_lossy(&buf);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = respond(path, &state);
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

fn respond(path: &str, state: &Arc<Mutex<DaemonState>>) -> (&'static str, &'static str, String) {
    let st = state.lock().unwrap();
    let now = chrono::Utc::now();
    match path.split('?').next().unwrap_or("") {
        "/metrics" => ("200 OK", "text/plain; version=0.0.4", st.metrics(now)),
        "/healthz" => {
            let problems = st.health_problems(now);
            let body = serde_json::json!({"healthy": problems.is_empty(), "problems": problems}).to_string();
            if problems.is_empty() { ("200 OK", "application/json", body) } else { ("503 Service Unavailable", "application/json", body) }
        }
        _ => ("404 Not Found", "text/plain", "walvault daemon: see /metrics and /healthz\n".into()),
    }
}

//! HTTP on `admin_listen`: `GET /status` (JSON), `GET /metrics` (Prometheus text) and
//! `GET /health` (200 while every project has a reachable primary, else 503).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use super::status::Status;
use crate::state::Shared;

/// Binds `addr` and serves until the proxy shuts down. Returns the bound address.
pub async fn start(shared: Arc<Shared>, addr: &str) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} (proxy.admin_listen): {e}"))?;
    let bound = listener.local_addr()?;
    let mut stop = shared.shutdown.subscribe();
    tokio::spawn(async move {
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!("admin accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(route(&shared, req).await) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    debug!(%peer, "admin HTTP connection ended: {e}");
                }
            });
        }
    });
    info!(addr = %bound, "admin HTTP listening (/status, /metrics, /health)");
    Ok(bound)
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() == Method::POST {
        let path = req.uri().path().to_string();
        let body = match http_body_util::BodyExt::collect(req.into_body()).await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
            Err(e) => return text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        };
        return post(shared, &path, &body).await;
    }
    if req.method() == Method::DELETE {
        return delete(shared, req.uri().path()).await;
    }
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only\n");
    }
    match req.uri().path() {
        "/status" => {
            let status = Status::collect(shared);
            match serde_json::to_string_pretty(&status) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            }
        }
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            super::metrics::render(shared),
        ),
        "/health" => health(shared),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /status, /metrics or /health\n",
        ),
    }
}

fn outcome(result: Result<String, super::commands::CommandError>) -> Response<Full<Bytes>> {
    match result {
        Ok(message) => text(StatusCode::OK, &format!("{message}\n")),
        Err(e) => text(StatusCode::CONFLICT, &format!("{}\n", e.message)),
    }
}

/// `DELETE /replicas/<project>/<name>`.
async fn delete(shared: &Arc<Shared>, path: &str) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["replicas", project, name] => {
            let change = super::commands::Change::RemoveReplica { project, name };
            outcome(super::commands::persist_and_reload(shared, &change, "DELETE /replicas").await)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; DELETE /replicas/<project>/<name>\n",
        ),
    }
}

/// Changes: `POST /promote/<project>/<replica>`, `POST /read_routing/<project>/<strategy>`,
/// `POST /replicas/<project>/<name>/<role>` with the node's URI as the body,
/// `POST /sync/<rule>` (answers with the run's report as JSON).
async fn post(shared: &Arc<Shared>, path: &str, body: &str) -> Response<Full<Bytes>> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match parts.as_slice() {
        ["read_routing", project, strategy] => outcome(
            super::commands::set_read_routing(shared, project, strategy)
                .await
                .map(|()| format!("{project}: read_routing = {strategy}")),
        ),
        ["replicas", project, name, role] => {
            let change = super::commands::Change::AddReplica {
                project,
                name,
                role,
                uri: body,
            };
            outcome(super::commands::persist_and_reload(shared, &change, "POST /replicas").await)
        }
        ["sync", rule] => match shared.cdc.sync(rule).await {
            Ok(report) => match serde_json::to_string_pretty(&report) {
                Ok(json) => respond(StatusCode::OK, "application/json", json),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
            },
            Err(e) => text(StatusCode::CONFLICT, &format!("{e}\n")),
        },
        ["promote", project, replica] => {
            match super::commands::promote(shared, project, replica).await {
                Ok(message) => text(StatusCode::OK, &format!("{message}\n")),
                Err(e) => text(StatusCode::CONFLICT, &format!("{}\n", e.message)),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; POST /promote/<project>/<replica>, /read_routing/<project>/<strategy>, /replicas/<project>/<name>/<role>, /sync/<rule>\n",
        ),
    }
}

/// Healthy while the proxy accepts clients and every project's primary answers.
fn health(shared: &Shared) -> Response<Full<Bytes>> {
    if *shared.shutdown.borrow() {
        return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n");
    }
    let status = Status::collect(shared);
    let unhealthy: Vec<String> = status
        .projects
        .iter()
        .filter(|p| {
            !p.nodes
                .iter()
                .any(|n| n.role == "primary" && n.state != "down")
        })
        .map(|p| p.name.clone())
        .collect();
    if unhealthy.is_empty() {
        text(StatusCode::OK, "ok\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no reachable primary for: {}\n", unhealthy.join(", ")),
        )
    }
}

fn text(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    respond(code, "text/plain; charset=utf-8", body.to_string())
}

fn respond(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = code;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// `GET path` against a running proxy's admin address (the CLI's `status`).
pub async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    request(addr, Method::GET, path, String::new()).await
}

/// `POST path` (the CLI's `promote`).
pub async fn post_to(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    request(addr, Method::POST, path, String::new()).await
}

/// Any request with a text body (status code and body of the answer).
pub async fn request(
    addr: &str,
    method: Method,
    path: &str,
    body: String,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the proxy's admin address {addr}: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr)
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let code = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

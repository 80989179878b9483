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

use super::access;
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
                // With a certificate configured, a connection that starts a TLS
                // handshake gets HTTPS; one in clear text is served only what needs no
                // token (see `route`).
                let tls = shared.tls.load_full();
                let mut first = [0u8; 1];
                let starts_tls = matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
                let result = match tls {
                    Some(tls) if starts_tls => match tls.acceptor.accept(stream).await {
                        Ok(stream) => serve(shared, TokioIo::new(stream), true).await,
                        Err(e) => {
                            debug!(%peer, "admin TLS handshake failed: {e}");
                            return;
                        }
                    },
                    _ => serve(shared, TokioIo::new(stream), false).await,
                };
                if let Err(e) = result {
                    debug!(%peer, "admin HTTP connection ended: {e}");
                }
            });
        }
    });
    info!(addr = %bound, "admin HTTP listening (/status, /metrics, /health)");
    Ok(bound)
}

/// Serves one admin connection; `encrypted` when it came over TLS.
async fn serve<I>(shared: Arc<Shared>, io: I, encrypted: bool) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(&shared, req, encrypted).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await
}

async fn route(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    encrypted: bool,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let need = match (&method, path.as_str()) {
        (&Method::GET, "/health") => access::Need::Nothing,
        (&Method::GET, "/metrics") if !shared.config.load().proxy.metrics_auth => {
            access::Need::Nothing
        }
        _ => access::Need::Token,
    };
    if need == access::Need::Token && !encrypted && shared.tls.load().is_some() {
        // The token would cross the network in clear text.
        return text(
            StatusCode::FORBIDDEN,
            "this proxy has a certificate: use https for endpoints that need the admin token\n",
        );
    }
    let configured = access::configured_token(&shared.config.load().proxy);
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(refusal) = access::check(need, configured.as_deref(), presented) {
        warn!(%method, %path, "admin HTTP request refused: {}", refusal.message());
        let code = match refusal {
            access::Refusal::NotConfigured => StatusCode::FORBIDDEN,
            access::Refusal::BadToken => StatusCode::UNAUTHORIZED,
        };
        let mut response = text(code, &format!("{}\n", refusal.message()));
        if code == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static("Bearer realm=\"replicator\""),
            );
        }
        return response;
    }
    if method == Method::POST {
        let body = match read_body(req).await {
            Ok(body) => body,
            Err(response) => return response,
        };
        return post(shared, &path, &body).await;
    }
    if method == Method::DELETE {
        return delete(shared, &path).await;
    }
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET, POST or DELETE only\n");
    }
    match path.as_str() {
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

/// A POST's body as text, refused (413) past [`access::MAX_BODY_BYTES`] without
/// reading more than that.
async fn read_body(req: Request<Incoming>) -> Result<String, Response<Full<Bytes>>> {
    use http_body_util::BodyExt;
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request body over {} bytes\n", access::MAX_BODY_BYTES),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > access::MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    match http_body_util::Limited::new(req.into_body(), access::MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => Ok(String::from_utf8_lossy(&b.to_bytes()).trim().to_string()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(text(StatusCode::BAD_REQUEST, &format!("{e}\n"))),
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

/// A running proxy's admin HTTP address and the token to present there (the CLI's
/// `status`, `promote`, `sync`).
#[derive(Debug, Clone)]
pub struct AdminClient {
    pub addr: String,
    pub token: Option<String>,
    /// HTTPS with this config (the proxy has a certificate).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl AdminClient {
    pub fn new(addr: impl Into<String>, token: Option<&str>) -> AdminClient {
        AdminClient {
            addr: addr.into(),
            token: token.map(str::to_string),
            tls: None,
        }
    }

    /// Speaks HTTPS, trusting what `config` trusts.
    pub fn with_tls(mut self, config: Arc<rustls::ClientConfig>) -> AdminClient {
        self.tls = Some(config);
        self
    }

    /// `GET path`: status code and body of the answer.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.request(Method::GET, path, String::new()).await
    }

    /// `POST path` with no body.
    pub async fn post(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.request(Method::POST, path, String::new()).await
    }

    /// Any request with a text body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> anyhow::Result<(u16, String)> {
        use http_body_util::BodyExt;
        let addr = &self.addr;
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the proxy's admin address {addr}: {e}"))?;
        let mut sender = match &self.tls {
            None => {
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                sender
            }
            Some(config) => {
                let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                let name = crate::tls::connect::server_name(host.trim_matches(['[', ']']))
                    .map_err(|e| anyhow::anyhow!(e))?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await
                    .map_err(|e| anyhow::anyhow!("TLS with the admin address {addr}: {e}"))?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                sender
            }
        };
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr.as_str());
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = sender
            .send_request(request.body(Full::new(Bytes::from(body)))?)
            .await?;
        let code = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }
}

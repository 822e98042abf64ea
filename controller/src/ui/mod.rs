//! `convoy ui`: the dashboard, served on loopback to the operator who runs
//! it. Every page is a call to the controller's operator API made with the
//! operator's own certificate, so the controller grows no login of its
//! own and the dashboard can do exactly what the certificate's role may.
//!
//! - this file: the listener, the one-time token and the session cookie,
//!   the routes;
//! - `pages`: the HTML of each page (maud), read top-down;
//! - `chart`: small SVG charts drawn on the server;
//! - `assets/`: the stylesheet and the script that applies a rollout's
//!   live events, embedded in the binary.

mod chart;
mod pages;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use convoy_common::identity::Role;
use convoy_proto::operator_service_client::OperatorServiceClient;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tonic::transport::Channel;

use crate::cli::{exit, Conn, Failure};

/// The name of the session cookie the one-time token is traded for.
const COOKIE: &str = "convoy_ui";
/// Hosts on one page of the hosts list.
pub const HOSTS_PER_PAGE: u32 = 100;

/// What every request handler shares.
pub struct Ui {
    client: OperatorServiceClient<Channel>,
    /// Whose certificate the dashboard speaks with.
    pub operator: String,
    pub role: Role,
    /// Taken by the first request that shows it.
    token: Mutex<Option<String>>,
    /// The session cookie's value.
    session: String,
    /// Sent back with every action form; a request from another site
    /// cannot know it.
    pub csrf: String,
    /// `127.0.0.1:PORT`: the only Host header answered (DNS rebinding).
    authority: String,
}

type Shared = Arc<Ui>;

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    getrandom::getrandom(&mut b).expect("the OS has randomness");
    hex::encode(b)
}

/// Constant-time comparison of two secrets.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `convoy ui`: serves the dashboard until interrupted.
pub async fn serve(conn: &Conn, listen: SocketAddr) -> Result<(), Failure> {
    if !listen.ip().is_loopback() {
        return Err(Failure::new(
            exit::USAGE,
            format!("--listen {listen}: the dashboard listens on loopback only (127.0.0.0/8 or ::1)"),
        ));
    }
    let cert = conn
        .cert
        .as_ref()
        .ok_or_else(|| Failure::new(exit::USAGE, "--cert (or CONVOY_CERT) is required"))?;
    let identity = operator_identity(cert)?;
    let client = conn.connect().await?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Failure::new(exit::FAILED, format!("--listen {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Failure::new(exit::FAILED, format!("--listen {listen}: {e}")))?;
    let token = random_hex(16);
    let ui = Arc::new(Ui {
        client,
        operator: identity.name.to_string(),
        role: identity.role.unwrap_or(Role::Viewer),
        token: Mutex::new(Some(token.clone())),
        session: random_hex(32),
        csrf: random_hex(16),
        authority: addr.to_string(),
    });
    println!(
        "convoy ui: http://{addr}/?token={token}\n\
         (as {} {}; the link works once, in one browser; Ctrl-C stops the dashboard)",
        ui.role.as_str(),
        ui.operator
    );
    // Ctrl-C ends it at once: a page following a rollout holds its
    // event stream open, which a graceful stop would wait for.
    tokio::select! {
        r = axum::serve(listener, router(ui)) => r.map_err(|e| Failure::new(exit::FAILED, format!("dashboard: {e}"))),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

fn operator_identity(cert: &std::path::Path) -> Result<convoy_common::identity::PeerIdentity, Failure> {
    let usage = |m: String| Failure::new(exit::USAGE, m);
    let pem = convoy_common::identity::read_cert_pem(cert).map_err(|e| usage(e.to_string()))?;
    let der = convoy_common::identity::certs_der(&pem);
    let first = der
        .first()
        .ok_or_else(|| usage(format!("{}: no certificate in it", cert.display())))?;
    convoy_common::identity::identity_from_der(first).map_err(|e| usage(format!("{}: {e}", cert.display())))
}

fn router(ui: Shared) -> Router {
    Router::new()
        .route("/", get(fleet))
        .route("/fleet/matrix", get(fleet_matrix))
        .route("/hosts", get(hosts))
        .route("/history", get(history))
        .route("/report", get(report))
        .route("/rollouts/{id}", get(rollout))
        .route("/rollouts/{id}/hosts", get(rollout_hosts))
        .route("/rollouts/{id}/gates", get(rollout_gates))
        .route("/rollouts/{id}/events", get(rollout_events))
        .route("/rollouts/{id}/confirm/{action}", get(confirm))
        .route("/rollouts/{id}/control", post(control))
        .route("/assets/style.css", get(style))
        .route("/assets/live.js", get(script))
        .layer(middleware::from_fn_with_state(ui.clone(), guard))
        .with_state(ui)
}

/// Lets a request through if it carries the session cookie, or trades the
/// one-time token for the cookie; refuses everything else.
async fn guard(State(ui): State<Shared>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if host != ui.authority && host != ui.authority.replacen("127.0.0.1", "localhost", 1) {
        return refuse(
            StatusCode::MISDIRECTED_REQUEST,
            "this dashboard answers only to its own address",
        )
        .into_response();
    }
    if cookie(req.headers()).is_some_and(|c| same(c, &ui.session)) {
        let mut res = next.run(req).await;
        let h = res.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert("x-frame-options", HeaderValue::from_static("DENY"));
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
        );
        return res;
    }
    let shown = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
        .map(str::to_owned);
    if let Some(shown) = shown {
        let mut token = ui.token.lock().unwrap();
        if token.as_deref().is_some_and(|t| same(t, &shown)) {
            *token = None;
            let mut res = Redirect::to(req.uri().path()).into_response();
            let c = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", ui.session);
            res.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&c).expect("hex is a header value"),
            );
            return res;
        }
    }
    refuse(
        StatusCode::UNAUTHORIZED,
        "open the link `convoy ui` printed; it works once, in one browser (run `convoy ui` again for a new one)",
    )
    .into_response()
}

fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

/// A request the dashboard will not serve, or a call to the controller
/// that failed, as the page that says why.
pub struct Refusal {
    code: StatusCode,
    why: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.code, pages::message(self.code, &self.why)).into_response()
    }
}

fn refuse(code: StatusCode, why: &str) -> Refusal {
    Refusal {
        code,
        why: why.to_owned(),
    }
}

/// A call to the controller that failed, as the page says it.
fn failed(s: tonic::Status) -> Refusal {
    use tonic::Code;
    let code = match s.code() {
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        Code::InvalidArgument => StatusCode::BAD_REQUEST,
        Code::FailedPrecondition | Code::Aborted | Code::AlreadyExists => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    refuse(code, &Failure::from(s).message)
}

type Page = Result<Response, Refusal>;

fn html(m: maud::Markup) -> Page {
    Ok(m.into_response())
}

impl Ui {
    fn client(&self) -> OperatorServiceClient<Channel> {
        self.client.clone()
    }
}

async fn fleet(State(ui): State<Shared>) -> Page {
    let reply = ui.client().fleet(convoy_proto::FleetRequest {}).await.map_err(failed)?;
    html(pages::fleet(&ui, &reply.into_inner()))
}

async fn fleet_matrix(State(ui): State<Shared>) -> Page {
    let reply = ui.client().fleet(convoy_proto::FleetRequest {}).await.map_err(failed)?;
    html(pages::fleet_matrix(&reply.into_inner()))
}

#[derive(Deserialize, Default)]
struct HostsQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: u32,
}

async fn hosts(State(ui): State<Shared>, Query(q): Query<HostsQuery>) -> Page {
    let reply = ui
        .client()
        .hosts(convoy_proto::HostsRequest {
            offset: q.page.saturating_mul(HOSTS_PER_PAGE),
            limit: HOSTS_PER_PAGE,
            filter: q.q.clone(),
        })
        .await
        .map_err(failed)?;
    html(pages::hosts(&ui, &q.q, q.page, &reply.into_inner()))
}

#[derive(Deserialize, Default)]
struct HistoryQuery {
    #[serde(default)]
    app: String,
    #[serde(default)]
    env: String,
    #[serde(default)]
    state: String,
}

/// The apps the fleet knows, for the pickers of history and report.
async fn apps(ui: &Ui) -> Result<Vec<String>, Refusal> {
    let reply = ui.client().fleet(convoy_proto::FleetRequest {}).await.map_err(failed)?;
    let mut apps: Vec<String> = reply.into_inner().cells.into_iter().map(|c| c.app).collect();
    apps.dedup();
    Ok(apps)
}

async fn history(State(ui): State<Shared>, Query(q): Query<HistoryQuery>) -> Page {
    let apps = apps(&ui).await?;
    let app = if q.app.is_empty() {
        apps.first().cloned().unwrap_or_default()
    } else {
        q.app.clone()
    };
    let rollouts = match app.is_empty() {
        true => vec![],
        false => {
            ui.client()
                .history(convoy_proto::HistoryRequest {
                    app: app.clone(),
                    limit: 200,
                    environment: q.env.clone(),
                    state: q.state.clone(),
                    ..Default::default()
                })
                .await
                .map_err(failed)?
                .into_inner()
                .rollouts
        }
    };
    html(pages::history(&ui, &apps, &app, &q.env, &q.state, &rollouts))
}

#[derive(Deserialize, Default)]
struct ReportQuery {
    #[serde(default)]
    app: String,
    #[serde(default)]
    days: Option<u32>,
}

async fn report(State(ui): State<Shared>, Query(q): Query<ReportQuery>) -> Page {
    let apps = apps(&ui).await?;
    let app = if q.app.is_empty() {
        apps.first().cloned().unwrap_or_default()
    } else {
        q.app.clone()
    };
    let days = q.days.unwrap_or(30).clamp(1, 365);
    let reply = match app.is_empty() {
        true => None,
        false => Some(
            ui.client()
                .report(convoy_proto::ReportRequest {
                    app: app.clone(),
                    since_secs: u64::from(days) * 86_400,
                    bucket_secs: 86_400,
                })
                .await
                .map_err(failed)?
                .into_inner(),
        ),
    };
    html(pages::report(&ui, &apps, &app, days, reply.as_ref()))
}

async fn one_rollout(ui: &Ui, id: &str) -> Result<convoy_proto::HistoryReply, Refusal> {
    Ok(ui
        .client()
        .history(convoy_proto::HistoryRequest {
            rollout_id: id.to_owned(),
            ..Default::default()
        })
        .await
        .map_err(failed)?
        .into_inner())
}

async fn rollout(State(ui): State<Shared>, Path(id): Path<String>) -> Page {
    let record = one_rollout(&ui, &id).await?;
    html(pages::rollout(&ui, &record))
}

async fn rollout_hosts(State(ui): State<Shared>, Path(id): Path<String>) -> Page {
    let record = one_rollout(&ui, &id).await?;
    html(pages::rollout_hosts(&record))
}

async fn rollout_gates(State(ui): State<Shared>, Path(id): Path<String>) -> Page {
    let record = one_rollout(&ui, &id).await?;
    html(pages::gates(&record.measurements))
}

/// The rollout's events as they happen (server-sent events): each is the
/// JSON object `--output json` prints, named by its `type`. A rollout that
/// has ended sends `ended`; one this controller cannot follow (another
/// controller drives it) sends `unavailable` with the reason; then the
/// stream closes.
async fn rollout_events(
    State(ui): State<Shared>,
    Path(id): Path<String>,
) -> Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let id_again = id.clone();
    let watched = ui.client().watch(convoy_proto::WatchRequest { rollout_id: id }).await;
    let events: futures::stream::BoxStream<'static, SseEvent> = match watched {
        Ok(stream) => stream
            .into_inner()
            .filter_map(|ev| async move {
                let json = crate::cli::event_json(&ev.ok()?)?;
                let kind = json["type"].as_str().unwrap_or("event").to_owned();
                Some(SseEvent::default().event(kind).data(json.to_string()))
            })
            .chain(futures::stream::once(async {
                SseEvent::default().event("ended").data("{}")
            }))
            .boxed(),
        Err(s) => {
            let state = one_rollout(&ui, &id_again)
                .await
                .ok()
                .and_then(|r| r.rollouts.into_iter().next())
                .map(|r| r.state)
                .unwrap_or_default();
            let kind = match crate::rollout::events::LIVE_STATES.contains(&state.as_str()) {
                true => "unavailable",
                false => "ended",
            };
            let data = serde_json::json!({"message": s.message(), "state": state}).to_string();
            futures::stream::once(async move { SseEvent::default().event(kind).data(data) }).boxed()
        }
    };
    Sse::new(events.map(Ok)).keep_alive(KeepAlive::default())
}

/// The actions a deployer takes on a running rollout, as the controller
/// names them.
pub const ACTIONS: [&str; 5] = ["pause", "resume", "abort", "approve", "promote"];

async fn confirm(State(ui): State<Shared>, Path((id, action)): Path<(String, String)>) -> Page {
    if !ACTIONS.contains(&action.as_str()) {
        return Err(refuse(StatusCode::NOT_FOUND, &format!("no action {action:?}")));
    }
    may_act(&ui, &action)?;
    let record = one_rollout(&ui, &id).await?;
    html(pages::confirm(&ui, &record, &action))
}

#[derive(Deserialize)]
struct ControlForm {
    action: String,
    csrf: String,
}

fn may_act(ui: &Ui, action: &str) -> Result<(), Refusal> {
    if ui.role < Role::Deployer {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            &format!(
                "{} is a {}: only a deployer or an admin may {action} a rollout",
                ui.operator,
                ui.role.as_str()
            ),
        ));
    }
    Ok(())
}

async fn control(
    State(ui): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(form): Form<ControlForm>,
) -> Page {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    let from_here = origin.is_none_or(|o| o.strip_prefix("http://").is_some_and(|a| a == ui.authority));
    if !from_here || !same(&form.csrf, &ui.csrf) {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "this action did not come from the dashboard's own page",
        ));
    }
    if !ACTIONS.contains(&form.action.as_str()) {
        return Err(refuse(StatusCode::BAD_REQUEST, &format!("no action {:?}", form.action)));
    }
    may_act(&ui, &form.action)?;
    ui.client()
        .control(convoy_proto::ControlRequest {
            rollout_id: id.clone(),
            action: form.action,
        })
        .await
        .map_err(failed)?;
    Ok(Redirect::to(&format!("/rollouts/{id}")).into_response())
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css")], include_str!("assets/style.css")).into_response()
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript")],
        include_str!("assets/live.js"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    const AUTHORITY: &str = "127.0.0.1:4000";

    /// A dashboard whose controller is never reached: these requests are
    /// all decided before a call would be made.
    fn ui(role: Role) -> Shared {
        let channel = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        Arc::new(Ui {
            client: OperatorServiceClient::new(channel),
            operator: "alice".into(),
            role,
            token: Mutex::new(Some("t0ken".into())),
            session: "s3ssion".into(),
            csrf: "csrf".into(),
            authority: AUTHORITY.into(),
        })
    }

    async fn send(ui: &Shared, req: axum::http::Request<Body>) -> (StatusCode, HeaderMap, String) {
        let res = router(ui.clone()).oneshot(req).await.unwrap();
        let (parts, body) = res.into_parts();
        let bytes = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn get(path: &str, host: &str, cookie: Option<&str>) -> axum::http::Request<Body> {
        let mut b = axum::http::Request::get(path).header(header::HOST, host);
        if let Some(c) = cookie {
            b = b.header(header::COOKIE, c);
        }
        b.body(Body::empty()).unwrap()
    }

    fn post(path: &str, cookie: &str, origin: &str, form: &str) -> axum::http::Request<Body> {
        axum::http::Request::post(path)
            .header(header::HOST, AUTHORITY)
            .header(header::COOKIE, cookie)
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form.to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn the_token_works_once_and_becomes_a_session_cookie() {
        let ui = ui(Role::Deployer);
        let (code, _, body) = send(&ui, get("/assets/style.css", AUTHORITY, None)).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body.contains("open the link `convoy ui` printed"), "{body}");
        let (code, _, _) = send(&ui, get("/?token=wrong", AUTHORITY, None)).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED);
        // The token under another Host name is refused before it is spent.
        let (code, _, _) = send(&ui, get("/?token=t0ken", "evil.example:4000", None)).await;
        assert_eq!(code, StatusCode::MISDIRECTED_REQUEST);
        let (code, headers, _) = send(&ui, get("/hosts?token=t0ken", AUTHORITY, None)).await;
        assert_eq!(code, StatusCode::SEE_OTHER);
        assert_eq!(
            headers[header::LOCATION],
            "/hosts",
            "the token is left out of the address"
        );
        assert_eq!(
            headers[header::SET_COOKIE],
            "convoy_ui=s3ssion; HttpOnly; SameSite=Strict; Path=/"
        );
        let (code, _, _) = send(&ui, get("/?token=t0ken", AUTHORITY, None)).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "spent");
        let (code, headers, body) =
            send(&ui, get("/assets/style.css", AUTHORITY, Some("a=1; convoy_ui=s3ssion"))).await;
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("convoy dashboard"));
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let (code, _, _) = send(
            &ui,
            get("/assets/style.css", "localhost:4000", Some("convoy_ui=s3ssion")),
        )
        .await;
        assert_eq!(code, StatusCode::OK, "localhost names the same address");
        let (code, _, _) = send(&ui, get("/assets/style.css", AUTHORITY, Some("convoy_ui=s3ssioN"))).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "another session");
    }

    #[tokio::test]
    async fn actions_need_the_forms_secret_the_pages_origin_and_a_deployer() {
        let deployer = ui(Role::Deployer);
        let cookie = "convoy_ui=s3ssion";
        for (origin, form, why) in [
            ("http://evil.example", "action=pause&csrf=csrf", "another site"),
            ("http://127.0.0.1:4000", "action=pause&csrf=nope", "a wrong secret"),
        ] {
            let (code, _, body) = send(&deployer, post("/rollouts/r1/control", cookie, origin, form)).await;
            assert_eq!(code, StatusCode::FORBIDDEN, "{why}: {body}");
            assert!(body.contains("did not come from the dashboard"), "{body}");
        }
        let own = |form| post("/rollouts/r1/control", cookie, "http://127.0.0.1:4000", form);
        let (code, _, body) = send(&deployer, own("action=explode&csrf=csrf")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("no action &quot;explode&quot;"), "{body}");
        let viewer = ui(Role::Viewer);
        let (code, _, body) = send(&viewer, own("action=abort&csrf=csrf")).await;
        assert_eq!(code, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body.contains("alice is a viewer: only a deployer or an admin may abort"),
            "{body}"
        );
        let (code, _, _) = send(&viewer, get("/rollouts/r1/confirm/abort", AUTHORITY, Some(cookie))).await;
        assert_eq!(code, StatusCode::FORBIDDEN);
    }
}

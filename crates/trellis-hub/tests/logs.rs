//! Logs read live from an outpost: the hub's HTTP endpoint, its link
//! session, and a real agent's link session over an in-memory link, with a
//! test double of the agent's runner that writes lines on demand (the real
//! runtimes' logs are tested with the runtimes).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use common::{M, TestHub, start};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_agent::runner::{ApplyOutcome, StageRunner};
use trellis_agent::{AgentOptions, ConnectError, Connector, StageKey};
use trellis_link::LinkIo;
use trellis_link::identity::{KeyFingerprint, PeerIdentity};
use trellis_link::protocol::{LogLine, LogQuery, LogStream, RuntimeInfo};

const MANIFEST: &str = "version: v1
components:
  - name: web
    docker:
      image: web:1
  - name: worker
    docker:
      image: worker:1
  - name: broken
    docker:
      image: broken:1
  - name: flood
    docker:
      image: flood:1
  - name: quiet
    docker:
      image: quiet:1
";

/// Lines of history each component has: one a second up to now.
const HISTORY: i64 = 300;

/// Writes log lines the way a runtime would: a history for `web` and
/// `worker` (every third line on stderr), `tick` lines while following, an
/// error for `broken`, as many long lines as it can for `flood`, and
/// nothing at all (following forever) for `quiet`.
#[derive(Default)]
struct Writer {
    /// Follows that ended before they were done: their sink was closed, or
    /// the agent dropped the whole request (cancelled).
    cancelled: AtomicUsize,
    flooded: AtomicUsize,
}

/// Counts a follow as cancelled unless it is disarmed.
struct Unfinished<'a>(Option<&'a AtomicUsize>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(count) = self.0 {
            count.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn line(component: &str, time: chrono::DateTime<Utc>, n: i64, text: String) -> LogLine {
    LogLine {
        time,
        component: component.into(),
        replica: u32::from(component == "worker"),
        stream: if n % 3 == 2 {
            LogStream::Stderr
        } else {
            LogStream::Stdout
        },
        line: text,
    }
}

#[async_trait]
impl StageRunner for Writer {
    fn describe(&self) -> Vec<RuntimeInfo> {
        Vec::new()
    }

    async fn apply(&self, _: &StageKey, _: u64, _: &serde_json::Value) -> ApplyOutcome {
        ApplyOutcome {
            ok: true,
            state: "running".into(),
            ..ApplyOutcome::default()
        }
    }

    async fn remove(&self, _: &StageKey) -> Result<(), String> {
        Ok(())
    }

    async fn logs(
        &self,
        stage: &StageKey,
        query: &LogQuery,
        sink: mpsc::Sender<LogLine>,
    ) -> Result<(), String> {
        let components: Vec<&str> = match &query.component {
            Some(c) => vec![c.as_str()],
            None => vec!["web", "worker"],
        };
        if components == ["broken"] {
            return Err(format!(
                "the container of component broken of {stage} is gone"
            ));
        }
        let mut unfinished = Unfinished(Some(&self.cancelled));
        if components == ["flood"] {
            let long = "x".repeat(1000);
            for n in 0..200_000 {
                let l = line("flood", Utc::now(), n, format!("{n} {long}"));
                if sink.send(l).await.is_err() {
                    return Ok(());
                }
                self.flooded.fetch_add(1, Ordering::SeqCst);
            }
            unfinished.0 = None;
            return Ok(());
        }
        if components == ["quiet"] {
            sink.closed().await;
            return Ok(());
        }
        let now = Utc::now();
        let mut history = Vec::new();
        for n in 0..HISTORY {
            let time = now - chrono::Duration::seconds(HISTORY - n);
            for c in &components {
                history.push(line(c, time, n, format!("{c} line {n}")));
            }
        }
        history.retain(|l| query.since.is_none_or(|since| l.time >= since));
        if let Some(tail) = query.tail {
            history.drain(..history.len().saturating_sub(tail));
        }
        for l in history {
            if sink.send(l).await.is_err() {
                return Ok(());
            }
        }
        if query.follow {
            for n in 0.. {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let l = line(components[0], Utc::now(), n, format!("tick {n}"));
                if sink.send(l).await.is_err() {
                    return Ok(());
                }
            }
        }
        unfinished.0 = None;
        Ok(())
    }
}

/// Connects the agent to the hub's session code over an in-memory link,
/// as outpost `edge`.
struct MemConnector {
    state: trellis_hub::state::AppState,
}

#[async_trait]
impl Connector for MemConnector {
    async fn connect(&self) -> Result<Box<dyn LinkIo>, ConnectError> {
        let (hub_end, agent_end) = trellis_link::mem::pair();
        let peer = PeerIdentity {
            outpost: "edge".into(),
            serial_hex: "01".into(),
            not_after: Utc::now() + chrono::Duration::days(30),
            public_key_fingerprint: KeyFingerprint([7; 32]),
        };
        tokio::spawn(trellis_hub::link::session::run(
            Box::new(hub_end),
            peer,
            self.state.clone(),
        ));
        Ok(Box::new(agent_end))
    }
}

struct Setup {
    hub: TestHub,
    writer: Arc<Writer>,
    _agent_dir: tempfile::TempDir,
    stop_agent: Option<tokio::sync::oneshot::Sender<()>>,
    agent: tokio::task::JoinHandle<()>,
}

/// A hub with project `shop`, stage `line3` on outpost `edge` with a
/// release, and `edge`'s agent connected with a [`Writer`].
async fn setup() -> Setup {
    let hub = start().await;
    let admin = Some(hub.admin.as_str());
    for (path, body) in [
        ("/outposts", json!({"name": "edge"})),
        ("/outposts", json!({"name": "yard"})),
        ("/projects", json!({"name": "shop"})),
    ] {
        let (s, b) = hub.call(admin, M::POST, path, Some(body)).await;
        assert!(s.is_success(), "{b}");
    }
    for (stage, outpost) in [("line3", "edge"), ("line4", "yard"), ("empty", "edge")] {
        let (_, uri) = hub
            .call(admin, M::GET, &format!("/outposts/{outpost}/uri"), None)
            .await;
        let (s, b) = hub
            .call(
                admin,
                M::POST,
                "/projects/shop/stages",
                Some(json!({"name": stage, "type": "prod", "outpost_uri": uri["uri"]})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }
    let components: Vec<Value> = ["web", "worker", "broken", "flood", "quiet"]
        .iter()
        .map(|c| json!({"name": c, "artifact": {"kind": "image", "reference": format!("{c}:1")}}))
        .collect();
    let (s, b) = hub
        .call(
            admin,
            M::POST,
            "/projects/shop/builds",
            Some(json!({
            "branch": "main", "commit": "0123456789abcdef0123456789abcdef01234567",
            "manifest_file": "trellis.yaml", "manifest": MANIFEST, "components": components})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    for stage in ["line3", "line4"] {
        let (s, b) = hub
            .call(
                admin,
                M::POST,
                &format!("/projects/shop/stages/{stage}/releases"),
                Some(json!({})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{b}");
    }

    let writer = Arc::new(Writer::default());
    let agent_dir = tempfile::tempdir().unwrap();
    let (stop_agent, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = AgentOptions {
        runtime: Some(writer.clone()),
        connector: Some(Arc::new(MemConnector {
            state: hub.state.clone(),
        })),
        rng_seed: Some(7),
        ..Default::default()
    };
    let dir = agent_dir.path().to_owned();
    let agent = tokio::spawn(async move {
        trellis_agent::run(&dir, options, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hub.state.links().is_connected("edge") {
        assert!(Instant::now() < deadline, "the agent did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Setup {
        hub,
        writer,
        _agent_dir: agent_dir,
        stop_agent: Some(stop_agent),
        agent,
    }
}

async fn request(hub: &TestHub, stage: &str, query: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!(
            "{}/projects/shop/stages/{stage}/logs{query}",
            hub.base
        ))
        .bearer_auth(&hub.admin)
        .send()
        .await
        .unwrap()
}

/// Reads a response's lines as they come.
struct Lines {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Lines {
    fn new(resp: reqwest::Response) -> Lines {
        Lines {
            resp,
            buf: Vec::new(),
        }
    }

    /// The next line as JSON; `None` at the end of the body.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.resp.chunk())
                .await
                .expect("the stream went silent")
                .expect("reading the body");
            match chunk {
                Some(bytes) => self.buf.extend_from_slice(&bytes),
                None => {
                    assert!(self.buf.is_empty(), "a partial line at the end");
                    return None;
                }
            }
        }
    }

    async fn all(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(v) = self.next().await {
            out.push(v);
        }
        out
    }
}

async fn error_of(resp: reqwest::Response) -> (StatusCode, Value) {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    (status, body["error"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lines_come_from_the_outpost_with_tail_since_and_component() {
    let s = setup().await;

    let resp = request(&s.hub, "line3", "?component=web").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let lines = Lines::new(resp).all().await;
    assert_eq!(
        lines.len(),
        HISTORY as usize,
        "every line, in frames of at most 200"
    );
    for (n, l) in lines.iter().enumerate() {
        assert_eq!(l["component"], "web");
        assert_eq!(l["line"], format!("web line {n}"), "in order");
        let stream = if n % 3 == 2 { "stderr" } else { "stdout" };
        assert_eq!(l["stream"], stream);
        assert!(l["time"].is_string());
    }

    let lines = Lines::new(request(&s.hub, "line3", "?tail=10").await)
        .all()
        .await;
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[9]["line"], "worker line 299");
    assert_eq!(lines[9]["replica"], 1);

    // `since` as a duration is turned into an instant by the hub.
    let lines = Lines::new(request(&s.hub, "line3", "?component=worker&since=1m").await)
        .all()
        .await;
    assert!(
        (59..=61).contains(&lines.len()),
        "a minute of one line a second: {}",
        lines.len()
    );
    let since = (Utc::now() - chrono::Duration::seconds(10)).to_rfc3339();
    let lines = Lines::new(
        request(
            &s.hub,
            "line3",
            &format!("?component=worker&since={}", since.replace('+', "%2B")),
        )
        .await,
    )
    .all()
    .await;
    assert!((9..=11).contains(&lines.len()), "{}", lines.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outpost_error_before_any_line_is_an_error_response() {
    let s = setup().await;
    let (status, error) = error_of(request(&s.hub, "line3", "?component=broken").await).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(error["code"], "outpost-logs-failed");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("the container of component broken"),
        "{message}"
    );
    assert!(
        error["hint"]
            .as_str()
            .unwrap()
            .contains("trellis status stage")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followed_lines_arrive_within_a_second_and_leaving_cancels_on_the_outpost() {
    let s = setup().await;
    let resp = request(&s.hub, "line3", "?component=web&tail=2&follow=true").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut lines = Lines::new(resp);
    assert_eq!(lines.next().await.unwrap()["line"], "web line 298");
    assert_eq!(lines.next().await.unwrap()["line"], "web line 299");
    for n in 0..10 {
        let l = lines.next().await.unwrap();
        assert_eq!(l["line"], format!("tick {n}"));
        let written: chrono::DateTime<Utc> = serde_json::from_value(l["time"].clone()).unwrap();
        let late = Utc::now() - written;
        assert!(
            late < chrono::Duration::milliseconds(1000),
            "tick {n} arrived {late} after it was written"
        );
    }
    assert_eq!(s.writer.cancelled.load(Ordering::SeqCst), 0);

    // The reader leaves: the outpost stops following.
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.writer.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the outpost kept following after the reader left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The link carries on: another request is answered.
    let lines = Lines::new(request(&s.hub, "line3", "?tail=4").await)
        .all()
        .await;
    assert_eq!(lines.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_leaving_a_silent_follow_cancels_it_too() {
    let s = setup().await;
    let resp = request(&s.hub, "line3", "?component=quiet&follow=true").await;
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "headers come before any line"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.writer.cancelled.load(Ordering::SeqCst), 0);
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.writer.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "a follow with nothing to send outlived its reader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_too_slow_is_cut_off_and_the_link_carries_on() {
    let s = setup().await;
    let resp = request(&s.hub, "line3", "?component=flood&follow=true").await;
    assert_eq!(resp.status(), StatusCode::OK);
    // Not reading: the socket, the response queue and the link's queue
    // for this reader fill up, and the hub cuts the request off rather
    // than hold up the link.
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.writer.cancelled.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the flood was never cut off ({} lines written)",
            s.writer.flooded.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lines = Lines::new(resp).all().await;
    let last = lines.last().unwrap();
    assert_eq!(last["error"]["code"], "logs-reader-too-slow", "{last}");
    let flood = &lines[..lines.len() - 1];
    assert!(!flood.is_empty());
    for (n, l) in flood.iter().enumerate() {
        assert!(
            l["line"].as_str().unwrap().starts_with(&format!("{n} ")),
            "lines are never reordered or skipped before the cut"
        );
    }

    // The session and its other stages were not held up.
    let lines = Lines::new(request(&s.hub, "line3", "?component=web&tail=3").await)
        .all()
        .await;
    assert_eq!(lines.len(), 3);
    let (status, body) = s
        .hub
        .call(
            Some(&s.hub.admin),
            M::POST,
            "/projects/shop/stages/line3/components/web/restart",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_lost_mid_stream_ends_with_an_error_line() {
    let mut s = setup().await;
    let resp = request(&s.hub, "line3", "?component=web&tail=1&follow=true").await;
    let mut lines = Lines::new(resp);
    assert_eq!(lines.next().await.unwrap()["line"], "web line 299");
    assert_eq!(lines.next().await.unwrap()["line"], "tick 0");
    s.stop_agent.take().unwrap().send(()).unwrap();
    let mut last = Value::Null;
    while let Some(l) = lines.next().await {
        last = l;
    }
    assert_eq!(last["error"]["code"], "outpost-offline", "{last}");
    (&mut s.agent).await.unwrap();

    // Now offline: a proper refusal (a state of the outpost, not a fault
    // of the hub).
    let (status, error) = error_of(request(&s.hub, "line3", "").await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error["code"], "outpost-offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn offline_outposts_and_bad_queries_get_stable_codes() {
    let s = setup().await;
    let (status, error) = error_of(request(&s.hub, "line4", "?follow=true").await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error["code"], "outpost-offline");
    assert!(error["message"].as_str().unwrap().contains("\"yard\""));
    assert!(
        error["hint"]
            .as_str()
            .unwrap()
            .contains("read live from the outpost"),
        "{error}"
    );

    for (query, code, status) in [
        ("?since=yesterday", "invalid-since", StatusCode::BAD_REQUEST),
        ("?since=10", "invalid-since", StatusCode::BAD_REQUEST),
        ("?tail=1000000", "invalid-tail", StatusCode::BAD_REQUEST),
        ("?tail=-1", "invalid-query", StatusCode::BAD_REQUEST),
        ("?follow=maybe", "invalid-query", StatusCode::BAD_REQUEST),
        ("?component=Web", "invalid-name", StatusCode::BAD_REQUEST),
        ("?component=db", "no-such-component", StatusCode::NOT_FOUND),
    ] {
        let (got, error) = error_of(request(&s.hub, "line3", query).await).await;
        assert_eq!(
            (got, error["code"].as_str().unwrap()),
            (status, code),
            "{query}: {error}"
        );
    }
    let (status, error) = error_of(request(&s.hub, "empty", "").await).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error["code"], "no-release");
    let (status, _) = error_of(request(&s.hub, "nope", "").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

//! Requests that go wrong: errors and the skip to Sync, refused plans, lost servers,
//! clients that leave mid-request, protocol violations.

use super::*;
use crate::session::timeouts::Expired;
use std::time::Duration;

#[test]
fn after_an_error_the_server_skips_to_sync_and_so_does_the_core() {
    let mut bed = Bed::new();
    // A unit ended by Flush: the client's Sync has not been sent when the error comes.
    bed.client([parse("", "SELEC 1"), bind("", ""), execute(), flush()])
        .unwrap();
    assert_eq!(tags(&bed.sent()), "PBEH");
    bed.server([error("42601")]).unwrap();
    assert_eq!(tags(&bed.answered()), "E");
    assert!(bed.held().is_some(), "the server still owes a Sync");

    // What the client sends up to its Sync is dropped, as the server would drop it; the
    // Sync itself goes on.
    bed.client([bind("", ""), execute(), sync()]).unwrap();
    assert_eq!(tags(&bed.sent()), "S");
    bed.server([ready(b'I')]).unwrap();
    assert_eq!(tags(&bed.answered()), "Z");
    assert_eq!(bed.held(), None);
    assert_eq!(bed.checkouts.len(), 1);
}

#[test]
fn without_a_server_a_unit_gets_an_error_and_the_rest_up_to_sync_is_skipped() {
    let mut bed = Bed::new();
    bed.refuse = true;
    bed.client([query("SELECT 1")]).unwrap();
    let answer = bed.answered();
    assert_eq!(tags(&answer), "EZ");

    bed.client([parse("", "SELECT 1"), bind("", ""), flush()])
        .unwrap();
    assert_eq!(tags(&bed.answered()), "E");
    bed.client([execute(), sync()]).unwrap();
    assert_eq!(tags(&bed.answered()), "Z", "only the Sync is answered");
    assert!(bed.sent().is_empty());
}

#[test]
fn a_refused_cached_plan_is_parsed_again_without_the_client_noticing() {
    let mut bed = Bed::new();
    bed.client([
        parse("", "SELECT * FROM t"),
        bind("", ""),
        execute(),
        sync(),
    ])
    .unwrap();
    bed.sent();
    bed.server(extended_select("1")).unwrap();
    bed.answered();

    // The same text again on the same server: its unnamed statement is reused.
    bed.client([
        parse("", "SELECT * FROM t"),
        bind("", ""),
        execute(),
        sync(),
    ])
    .unwrap();
    assert_eq!(tags(&bed.sent()), "BES", "the Parse is answered here");
    // The table changed meanwhile: the server refuses the old plan.
    bed.server([error("0A000")]).unwrap();
    let again = bed.sent();
    assert_eq!(tags(&again), "PBES", "sent again with its Parse");
    assert!(bed.answered().is_empty(), "the client saw nothing of it");
    bed.server([ready(b'I')]).unwrap();
    bed.server(extended_select("1")).unwrap();
    assert_eq!(tags(&bed.answered()), "12DCZ");
}

#[test]
fn a_client_leaving_mid_request_leaves_its_server_to_be_recovered() {
    let mut bed = Bed::new();
    bed.client([query("SELECT pg_sleep(10)")]).unwrap();
    match bed.core.leave_server() {
        Some(Leaving::Recover { in_flight, .. }) => assert!(in_flight),
        _ => panic!("a server with a request in flight must be recovered"),
    }
}

#[test]
fn a_read_whose_server_fails_before_answering_runs_elsewhere_unseen() {
    let mut bed = Bed::new();
    bed.client([query("SELECT 1")]).unwrap();
    bed.sent();
    bed.core.server_lost("connection reset").unwrap();
    assert!(bed.answered().is_empty(), "the client sees nothing of it");
    bed.pump().unwrap();
    assert_eq!(bed.checkouts.len(), 2, "sent again");
    assert_eq!(tags(&bed.sent()), "Q");
    bed.server([row("1"), complete("SELECT 1"), ready(b'I')])
        .unwrap();
    assert_eq!(tags(&bed.answered()), "DCZ");
}

#[test]
fn a_server_lost_inside_a_transaction_ends_the_session() {
    let mut bed = Bed::new();
    bed.client([query("BEGIN"), query("INSERT INTO t VALUES (1)")])
        .unwrap();
    bed.server(begun_then("INSERT 0 1")).unwrap();
    match bed.core.server_lost("connection reset") {
        Err(End::Fatal { code, .. }) => assert_eq!(code, "08006"),
        other => panic!("expected the session to end, got {other:?}"),
    }
}

#[test]
fn a_server_lost_outside_a_transaction_costs_the_client_one_error() {
    let mut bed = Bed::new();
    bed.client([query("INSERT INTO t VALUES (1)")]).unwrap();
    bed.core.server_lost("connection reset").unwrap();
    let answer = bed.answered();
    assert_eq!(tags(&answer), "EZ");
    assert_eq!(bed.held(), None);
    // The session goes on.
    bed.client([query("SELECT 1")]).unwrap();
    assert_eq!(bed.checkouts.len(), 2);
}

#[test]
fn a_message_with_an_unknown_tag_ends_the_session_with_a_protocol_error() {
    let mut bed = Bed::new();
    match bed.client([frame(b'?', &[])]) {
        Err(End::Fatal { code, .. }) => assert_eq!(code, "08P01"),
        other => panic!("expected a protocol violation, got {other:?}"),
    }
}

/// The timeouts' clock, as the shell reads it before each wait: a query past
/// query_timeout_ms is reported once (the shell cancels it), then the idle client's
/// own timeout runs.
#[tokio::test(start_paused = true)]
async fn a_query_past_its_timeout_is_reported_once_and_an_idle_client_after_its_own() {
    let config = CONFIG.replace(
        "pool_mode = \"transaction\"",
        "pool_mode = \"transaction\"\nquery_timeout_ms = 1000\nclient_idle_timeout_ms = 5000",
    );
    let mut bed = Bed::with_config(&config);
    bed.client([query("SELECT pg_sleep(10)")]).unwrap();
    assert_eq!(bed.core.before_wait(), Phase::Busy);
    let due = bed.core.deadline().expect("a query timeout is running");
    assert!(bed.core.timer_fired().is_none(), "not yet");

    tokio::time::advance(Duration::from_millis(1001)).await;
    assert!(Instant::now() >= due);
    assert!(matches!(
        bed.core.timer_fired(),
        Some(Expired::Query(limit)) if limit == Duration::from_secs(1)
    ));
    bed.core.before_wait();
    assert_eq!(bed.core.deadline(), None, "a query is cancelled once");

    // The cancelled query ends; the client is idle, under client_idle_timeout_ms.
    bed.server([error("57014"), ready(b'I')]).unwrap();
    assert_eq!(tags(&bed.answered()), "EZ");
    assert_eq!(bed.core.before_wait(), Phase::Idle);
    assert!(bed.core.deadline().is_some());
    tokio::time::advance(Duration::from_millis(5001)).await;
    assert!(matches!(
        bed.core.timer_fired(),
        Some(Expired::ClientIdle(_))
    ));
}

//! Requests that go right: routing, pipelining, deferred BEGIN, prepared statements,
//! settings, COPY, cancel keys, pinning and session pooling.

use super::*;

#[test]
fn a_read_goes_to_a_replica_and_its_server_returns_at_ready_for_query() {
    let mut bed = Bed::new();
    bed.client([query("SELECT 1")]).unwrap();
    assert_eq!(bed.checkouts.len(), 1);
    assert_eq!(bed.checkouts[0].0.route, Route::Replica);
    assert_eq!(bed.held(), Some("replica"));
    let sent = bed.sent();
    assert_eq!(tags(&sent), "Q");
    assert_eq!(text(&sent[0]), "SELECT 1");
    assert_eq!(bed.core.phase(), Phase::Busy);

    bed.server([row("1"), complete("SELECT 1"), ready(b'I')])
        .unwrap();
    assert_eq!(tags(&bed.answered()), "DCZ");
    assert_eq!(
        bed.held(),
        None,
        "the server goes back at ReadyForQuery(Idle)"
    );
    assert_eq!(bed.idle.borrow()["replica"].len(), 1);
    assert_eq!(bed.core.phase(), Phase::Idle);
}

#[test]
fn a_write_goes_to_the_primary() {
    let mut bed = Bed::new();
    bed.client([query("INSERT INTO t VALUES (1)")]).unwrap();
    assert_eq!(bed.checkouts[0].0.route, Route::Primary);
    assert_eq!(bed.held(), Some("primary"));
}

#[test]
fn pipelined_units_share_one_server_and_their_answers_keep_their_order() {
    let mut bed = Bed::new();
    bed.client([
        parse("", "SELECT 1"),
        bind("", ""),
        execute(),
        sync(),
        parse("", "SELECT 2"),
        bind("", ""),
        execute(),
        sync(),
    ])
    .unwrap();
    assert_eq!(bed.checkouts.len(), 1, "one checkout for the pipeline");
    assert_eq!(tags(&bed.sent()), "PBESPBES");

    bed.server(extended_select("1")).unwrap();
    assert_eq!(tags(&bed.answered()), "12DCZ");
    assert!(bed.held().is_some(), "the second unit is still in flight");

    bed.server(extended_select("2")).unwrap();
    let answers = bed.answered();
    assert_eq!(tags(&answers), "12DCZ");
    assert_eq!(&answers[2][answers[2].len() - 1..], b"2");
    assert_eq!(bed.held(), None);
}

#[test]
fn begin_waits_for_the_first_statement_and_goes_with_it() {
    let mut bed = Bed::new();
    bed.client([query("BEGIN")]).unwrap();
    assert!(bed.checkouts.is_empty(), "BEGIN alone needs no server");
    let answer = bed.answered();
    assert_eq!(tags(&answer), "CZ");
    assert_eq!(text(&answer[0]), "BEGIN");
    assert_eq!(answer[1][5], b'T');

    bed.client([query("INSERT INTO t VALUES (1)")]).unwrap();
    assert_eq!(bed.checkouts.len(), 1);
    assert_eq!(bed.checkouts[0].0.route, Route::Primary);
    let sent = bed.sent();
    // BEGIN as Parse/Bind/Execute without Sync, its portal closed (a simple query
    // leaves none), then the client's statement.
    assert_eq!(tags(&sent), "PBECQ");
    assert_eq!(text(&sent[0]), "");
    assert_eq!(text(&sent[4]), "INSERT INTO t VALUES (1)");

    bed.server(begun_then("INSERT 0 1")).unwrap();
    let answer = bed.answered();
    assert_eq!(tags(&answer), "CZ", "the BEGIN's answers are the proxy's");
    assert_eq!(text(&answer[0]), "INSERT 0 1");
    assert_eq!(bed.held(), Some("primary"), "held for the transaction");

    bed.client([query("COMMIT")]).unwrap();
    assert_eq!(tags(&bed.sent()), "Q");
    bed.server([complete("COMMIT"), ready(b'I')]).unwrap();
    assert_eq!(tags(&bed.answered()), "CZ");
    assert_eq!(bed.held(), None);
}

#[test]
fn a_transaction_with_no_statement_never_reaches_a_server() {
    let mut bed = Bed::new();
    bed.client([query("BEGIN"), query("COMMIT")]).unwrap();
    let answer = bed.answered();
    assert_eq!(tags(&answer), "CZCZ");
    assert_eq!(text(&answer[2]), "COMMIT");
    assert_eq!(answer[3][5], b'I');
    assert!(bed.checkouts.is_empty());
}

#[test]
fn a_named_statement_is_prepared_again_on_a_server_that_lacks_it() {
    let mut bed = Bed::new();
    bed.client([parse("s1", "SELECT 1"), sync()]).unwrap();
    let sent = bed.sent();
    assert_eq!(tags(&sent), "PS");
    let server_name = text(&sent[0]);
    assert_ne!(server_name, "s1", "servers know it by a proxy-wide name");
    bed.server([parse_complete(), ready(b'I')]).unwrap();
    assert_eq!(tags(&bed.answered()), "1Z");
    assert_eq!(bed.held(), None);

    // The same server again: it has the statement, so the Bind goes alone.
    bed.client([bind("", "s1"), execute(), sync()]).unwrap();
    let sent = bed.sent();
    assert_eq!(tags(&sent), "BES");
    bed.server([bind_complete(), row("1"), complete("SELECT 1"), ready(b'I')])
        .unwrap();
    assert_eq!(tags(&bed.answered()), "2DCZ");

    // A server that lacks it gets a Parse first, whose answer the client never sees.
    bed.idle.borrow_mut().clear();
    bed.client([bind("", "s1"), execute(), sync()]).unwrap();
    let sent = bed.sent();
    assert_eq!(tags(&sent), "PBES");
    assert_eq!(text(&sent[0]), server_name);
    bed.server(extended_select("1")).unwrap();
    assert_eq!(tags(&bed.answered()), "2DCZ");
}

#[test]
fn a_setting_follows_the_client_to_each_server() {
    let mut bed = Bed::new();
    bed.client([query("SET search_path TO s")]).unwrap();
    assert_eq!(tags(&bed.sent()), "Q");
    bed.server([complete("SET"), ready(b'I')]).unwrap();
    assert_eq!(tags(&bed.answered()), "CZ");

    // A server that has not seen the setting gets it first, and its answers are the
    // proxy's.
    bed.idle.borrow_mut().clear();
    bed.client([query("SELECT 1")]).unwrap();
    let sent = bed.sent();
    assert_eq!(tags(&sent), "QQ");
    assert!(text(&sent[0]).contains("search_path"), "{}", text(&sent[0]));
    assert_eq!(text(&sent[1]), "SELECT 1");
    bed.server([complete("SET"), ready(b'I')]).unwrap();
    assert!(bed.answered().is_empty());
    bed.server([row("1"), complete("SELECT 1"), ready(b'I')])
        .unwrap();
    assert_eq!(tags(&bed.answered()), "DCZ");

    // The same server again: nothing to set.
    bed.client([query("SELECT 2")]).unwrap();
    assert_eq!(tags(&bed.sent()), "Q");
}

#[test]
fn a_setting_rolled_back_is_not_kept() {
    let mut bed = Bed::new();
    bed.client([query("BEGIN"), query("SET search_path TO s")])
        .unwrap();
    bed.sent();
    bed.server(begun_then("SET")).unwrap();
    bed.client([query("ROLLBACK")]).unwrap();
    bed.server([complete("ROLLBACK"), ready(b'I')]).unwrap();
    bed.sent();
    bed.client([query("SELECT 1")]).unwrap();
    assert_eq!(tags(&bed.sent()), "Q", "no SET for the next server");
}

#[test]
fn copy_data_goes_straight_to_the_server_in_order() {
    let mut bed = Bed::new();
    bed.client([query("COPY t FROM STDIN")]).unwrap();
    assert_eq!(tags(&bed.sent()), "Q");
    bed.server([copy_in_response()]).unwrap();
    assert_eq!(tags(&bed.answered()), "G");
    assert_eq!(bed.core.phase(), Phase::Busy);
    bed.client([copy_data(b"1\n"), copy_data(b"2\n"), copy_done()])
        .unwrap();
    assert_eq!(tags(&bed.sent()), "ddc");
    bed.server([complete("COPY 2"), ready(b'I')]).unwrap();
    assert_eq!(tags(&bed.answered()), "CZ");
    assert_eq!(bed.held(), None);
}

#[test]
fn the_cancel_slot_names_the_held_server_only_while_it_is_held() {
    let mut bed = Bed::new();
    bed.client([query("SELECT pg_sleep(1)")]).unwrap();
    let target = bed.core.cancel_slot.get().expect("a server is held");
    let pid = bed.core.server.as_ref().unwrap().conn.state().pid;
    assert_eq!((target.pid, target.secret), (pid, 7));
    bed.server([complete("SELECT 1"), ready(b'I')]).unwrap();
    assert!(bed.core.cancel_slot.get().is_none());
}

#[test]
fn a_session_level_statement_pins_the_client_to_its_server() {
    let mut bed = Bed::new();
    bed.client([query("LISTEN jobs")]).unwrap();
    assert_eq!(bed.checkouts[0].0.route, Route::Primary);
    bed.server([complete("LISTEN"), ready(b'I')]).unwrap();
    assert_eq!(
        bed.held(),
        Some("primary"),
        "kept after ReadyForQuery(Idle)"
    );
    assert_eq!(bed.core.pinned, Some(PinReason::Listen));

    // Reads stay on that server too: no other checkout.
    bed.client([query("SELECT 1")]).unwrap();
    assert_eq!(bed.checkouts.len(), 1);
    bed.server([row("1"), complete("SELECT 1"), ready(b'I')])
        .unwrap();

    // When the client leaves, the next one resets what it left on the server.
    match bed.core.leave_server() {
        Some(Leaving::Release(conn)) => assert!(conn.state().needs_reset),
        _ => panic!("an idle pinned server goes back as it is, to be reset"),
    }
}

#[test]
fn session_pooling_passes_both_ways_unchanged() {
    let mut bed = Bed::with_config(&CONFIG.replace("\"transaction\"", "\"session\""));
    let node = bed.node(Route::Primary);
    let conn = bed.conn(&node);
    bed.core.attach(node, conn);
    bed.client([parse("s1", "SELECT 1"), bind("", "s1"), execute(), sync()])
        .unwrap();
    let sent = bed.sent();
    assert_eq!(tags(&sent), "PBES");
    assert_eq!(text(&sent[0]), "s1", "names stay the client's");
    assert_eq!(bed.core.phase(), Phase::Busy);
    bed.server(extended_select("1")).unwrap();
    assert_eq!(tags(&bed.answered()), "12DCZ");
    assert_eq!(bed.held(), Some("primary"), "the session keeps its server");
    assert_eq!(bed.core.phase(), Phase::Idle);
    assert!(bed.checkouts.is_empty());
    drop(bed.shared);
}

fn parameter_status(name: &str, value: &str) -> BytesMut {
    frame(b'S', &[&cstr(name), &cstr(value)])
}

/// A login with `application_name` in its startup packet, on a fresh server: the
/// setting is applied, and the client is welcomed with what the server reported.
fn login_bed() -> Bed {
    let mut bed = Bed::new();
    bed.core.settings.set("application_name", "billing");
    let node = bed.node(Route::Primary);
    let conn = bed.conn(&node);
    bed.core.attach(node, conn);
    bed.core.prepare_server();
    bed
}

#[test]
fn a_login_applies_the_startup_settings_and_welcomes_the_client_with_the_servers_values() {
    let mut bed = login_bed();
    let sent = bed.sent();
    assert_eq!(tags(&sent), "Q");
    assert!(
        text(&sent[0]).contains("application_name"),
        "{}",
        text(&sent[0])
    );
    assert!(bed.core.awaits_login_answers());

    for answer in [
        parameter_status("application_name", "billing"),
        complete("SET"),
        ready(b'I'),
    ] {
        assert!(bed.core.login_answer(&answer).is_ok());
    }
    assert!(!bed.core.awaits_login_answers());
    bed.core.welcome((41, 42));
    let welcome = bed.answered();
    assert_eq!(tags(&welcome), "SKZ");
    assert_eq!(text(&welcome[0]), "application_name");
    assert_eq!(&welcome[1][5..], &[0, 0, 0, 41, 0, 0, 0, 42]);
    assert_eq!(
        bed.held(),
        None,
        "transaction pooling gives the server back"
    );
    assert_eq!(bed.idle.borrow()["primary"].len(), 1);
}

#[test]
fn a_refused_startup_setting_fails_the_login_and_a_lost_server_allows_another() {
    let mut bed = login_bed();
    bed.sent();
    match bed.core.login_answer(&error("22023")) {
        Err(Greeting::Refused(End::Fatal { code, .. })) => assert_eq!(code, "22023"),
        _ => panic!("a refused setting must end the login"),
    }

    let mut bed = login_bed();
    bed.sent();
    let mut fatal = BytesMut::new();
    msg::error_response(&mut fatal, "FATAL", "57P01", "terminating connection");
    assert!(matches!(
        bed.core.login_answer(&fatal),
        Err(Greeting::ServerLost(_))
    ));
    bed.core.login_server_lost();
    assert_eq!(bed.held(), None);
    assert!(!bed.core.awaits_login_answers());
    assert!(bed.sent().is_empty(), "nothing is left for the next server");
    assert!(
        bed.idle.borrow().get("primary").is_none_or(Vec::is_empty),
        "the dead connection is not given back to the pool"
    );
}

use super::*;

fn route(sql: &str) -> Route {
    classify(sql).route
}

#[test]
fn reads_go_to_replicas() {
    for sql in [
        "SELECT 1",
        "select * from users where id = $1",
        "SELECT count(*) FROM a JOIN b ON a.id = b.a_id",
        "SHOW search_path",
        "EXPLAIN SELECT 1",
        "COPY users TO STDOUT",
        "COPY (SELECT 1) TO STDOUT",
        "WITH x AS (SELECT 1) SELECT * FROM x",
        "SELECT pg_is_in_recovery(), inet_server_port()",
        "VALUES (1), (2)",
        "",
    ] {
        assert_eq!(route(sql), Route::Replica, "{sql}");
    }
}

#[test]
fn writes_and_side_effects_go_to_the_primary() {
    for sql in [
        "INSERT INTO t VALUES (1)",
        "UPDATE t SET a = 1",
        "DELETE FROM t",
        "CREATE TABLE t (id int)",
        "COPY t FROM STDIN",
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR SHARE",
        "SELECT 1 FOR UPDATE",
        "SELECT * FROM t FOR NO KEY UPDATE",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
        "WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i",
        "SELECT nextval('s')",
        "SELECT setval('s', 1)",
        "SELECT my_function(1)",
        "SELECT app.compute(1)",
        "SELECT pg_advisory_xact_lock(1)",
        "SELECT * INTO t2 FROM t",
        "CALL p()",
        "DO $$ BEGIN END $$",
        "EXPLAIN ANALYZE DELETE FROM t",
        "SELECT 1; INSERT INTO t VALUES (1)",
        "this is not sql",
        "BEGIN",
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY",
        "NOTIFY ch",
        "VACUUM t",
        "TRUNCATE t",
    ] {
        assert_eq!(route(sql), Route::Primary, "{sql}");
    }
}

#[test]
fn transactions_are_recognised() {
    assert_eq!(classify("BEGIN").tx, TxEffect::Begin);
    let ro = classify("BEGIN READ ONLY");
    assert_eq!(ro.tx, TxEffect::Begin);
    assert_eq!(ro.route, Route::Replica);
    assert_eq!(
        classify("START TRANSACTION READ ONLY").route,
        Route::Replica
    );
    assert_eq!(classify("COMMIT").tx, TxEffect::End);
    assert_eq!(classify("ROLLBACK").tx, TxEffect::End);
    assert_eq!(classify("ROLLBACK TO SAVEPOINT a").tx, TxEffect::None);
}

#[test]
fn session_state_that_cannot_move_pins() {
    for sql in [
        "LISTEN ch",
        "CREATE TEMP TABLE t (id int)",
        "CREATE TEMPORARY TABLE t (id int)",
        "SELECT pg_advisory_lock(1)",
        "SELECT pg_try_advisory_lock(1)",
        "SELECT pg_advisory_lock_shared(1)",
        "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
        "PREPARE p AS SELECT 1",
        "SET SESSION AUTHORIZATION bob",
    ] {
        let d = classify(sql);
        assert!(d.pin.is_some(), "{sql}");
        assert_eq!(d.route, Route::Primary, "{sql}");
    }
    assert!(classify("SELECT pg_advisory_xact_lock(1)").pin.is_none());
    assert!(classify("DECLARE c CURSOR FOR SELECT 1").pin.is_none());
}

#[test]
fn set_statements_become_session_effects() {
    assert_eq!(
        classify("SET search_path TO app, public").effects,
        vec![SessionEffect::Set {
            name: "search_path".into(),
            value: "app, public".into()
        }]
    );
    assert_eq!(
        classify("SET statement_timeout = '5s'").effects,
        vec![SessionEffect::Set {
            name: "statement_timeout".into(),
            value: "'5s'".into()
        }]
    );
    assert_eq!(
        classify("SET TIME ZONE 'UTC'").effects,
        vec![SessionEffect::Set {
            name: "timezone".into(),
            value: "'UTC'".into()
        }]
    );
    assert!(
        classify("SET LOCAL statement_timeout = 1")
            .effects
            .is_empty()
    );
    assert_eq!(classify("RESET ALL").effects, vec![SessionEffect::ResetAll]);
    assert_eq!(
        classify("RESET search_path").effects,
        vec![SessionEffect::Reset {
            name: "search_path".into()
        }]
    );
    assert!(
        classify("DISCARD ALL")
            .effects
            .contains(&SessionEffect::ForgetPrepared)
    );
    assert!(
        classify("DEALLOCATE ALL")
            .effects
            .contains(&SessionEffect::ForgetPrepared)
    );
    for sql in ["DISCARD ALL", "DEALLOCATE ALL", "deallocate prepare all"] {
        assert!(
            classify(sql)
                .effects
                .contains(&SessionEffect::ForgetClientStatements),
            "{sql}"
        );
    }
    for sql in ["DEALLOCATE s1", "DEALLOCATE \"ALL\""] {
        assert!(
            !classify(sql)
                .effects
                .contains(&SessionEffect::ForgetClientStatements),
            "{sql}"
        );
    }
    // The other DISCARDs keep settings and prepared statements.
    for sql in ["DISCARD PLANS", "DISCARD SEQUENCES", "DISCARD TEMP"] {
        assert_eq!(classify(sql).effects, vec![], "{sql}");
    }
}

#[test]
fn hints_override_the_route() {
    assert_eq!(route("/* replicator: primary */ SELECT 1"), Route::Primary);
    assert_eq!(
        route("  /*replicator:replica*/ SELECT my_func()"),
        Route::Replica
    );
    assert_eq!(route("/* other comment */ SELECT 1"), Route::Replica);
    assert!(classify("/* replicator: primary */ SELECT 1").hinted);
}

//! Users from the database (`[auth]`): looked up through a SECURITY DEFINER function
//! as the README describes, checked against their SCRAM verifier or md5 hash, and
//! logged in to primary and replicas without a plain password (SCRAM passthrough).

mod common;

use std::time::Duration;

use common::*;

/// The README's setup: a lookup role that may only call one function.
fn setup_lookup() {
    let primary = &cluster().primary;
    primary
        .psql(
            "app",
            "CREATE ROLE aq_lookup LOGIN PASSWORD 'lookup-pw';
             CREATE SCHEMA replicator_auth;
             CREATE FUNCTION replicator_auth.lookup(login text)
               RETURNS TABLE (rolname text, rolpassword text)
               LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS
               $$ SELECT rolname::text, rolpassword::text FROM pg_authid
                  WHERE rolname = login AND rolcanlogin
                    AND (rolvaliduntil IS NULL OR rolvaliduntil > now()) $$;
             REVOKE ALL ON FUNCTION replicator_auth.lookup(text) FROM PUBLIC;
             GRANT USAGE ON SCHEMA replicator_auth TO aq_lookup;
             GRANT EXECUTE ON FUNCTION replicator_auth.lookup(text) TO aq_lookup;
             CREATE ROLE aq_scram LOGIN PASSWORD 'aq-scram-pw';
             CREATE TABLE aq_t (id int);
             GRANT ALL ON aq_t TO aq_scram, md5_user;",
        )
        .unwrap();
}

fn config(ttl_ms: u64) -> String {
    // Only `app` is listed; md5_user (md5 hash) and aq_scram come from the database.
    let text = cluster().proxy_toml("127.0.0.1:0", "127.0.0.1:0", "");
    format!(
        "{text}\n[auth]\nuser = \"aq_lookup\"\npassword = \"lookup-pw\"\n\
         query = \"SELECT * FROM replicator_auth.lookup($1)\"\ncache_ttl_ms = {ttl_ms}\n"
    )
}

#[tokio::test]
async fn users_from_the_database_log_in_without_a_password_in_proxy_toml() {
    setup_lookup();
    wait_replicas().await;
    let proxy = start_proxy_with(&config(300)).await;

    // SCRAM: checked against the verifier, then logged in to replicas and the primary
    // with the keys of the client's own proof.
    let client = connect(&proxy_url(&proxy, "aq_scram", "aq-scram-pw", "app"))
        .await
        .expect("aq_scram from the database");
    let row = client
        .query_one("SELECT current_user::text, pg_is_in_recovery()", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "aq_scram");
    assert!(row.get::<_, bool>(1), "the read went to a replica");
    client
        .batch_execute("INSERT INTO aq_t VALUES (1)")
        .await
        .expect("a write on the primary");
    // md5: the stored hash checks the client and logs in to servers.
    let md5 = connect(&proxy_url(&proxy, "md5_user", "secret", "app"))
        .await
        .expect("md5_user from the database");
    let who: String = md5
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(who, "md5_user");
    // Listed users work as before.
    app_client(&proxy).await;

    // Wrong passwords and unknown users: the same refusal as for listed users.
    for (user, password) in [
        ("aq_scram", "wrong"),
        ("md5_user", "wrong"),
        ("nobody_here", "x"),
        ("aq_lookup", "wrong"),
    ] {
        let err = connect(&proxy_url(&proxy, user, password, "app"))
            .await
            .expect_err("refused");
        assert_eq!(
            err.code().map(|c| c.code()),
            Some("28P01"),
            "{user}: {err:?}"
        );
    }

    // A changed password applies once the lookup expires; the old one stops working.
    cluster()
        .primary
        .psql("app", "ALTER ROLE aq_scram PASSWORD 'aq-new-pw'")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        connect(&proxy_url(&proxy, "aq_scram", "aq-scram-pw", "app"))
            .await
            .is_err()
    );
    wait_replicas().await;
    let renewed = connect(&proxy_url(&proxy, "aq_scram", "aq-new-pw", "app"))
        .await
        .expect("the new password");
    for _ in 0..4 {
        let row = renewed
            .query_one("SELECT count(*)::int FROM aq_t", &[])
            .await
            .expect("server logins with the new keys");
        assert_eq!(row.get::<_, i32>(0), 1);
    }
    renewed
        .batch_execute("INSERT INTO aq_t VALUES (2)")
        .await
        .unwrap();
}

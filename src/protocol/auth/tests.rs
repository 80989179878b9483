//! SCRAM and md5 against known answers, refusals of what a client must not send, and
//! the keys recovered from a proof.

use super::*;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

#[test]
fn scram_accepts_right_password_and_rejects_wrong_one() {
    let verifier = ScramVerifier::from_password("secret");
    for (password, ok) in [("secret", true), ("wrong", false)] {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unrequested());
        let (server, first) =
            ScramServer::start(verifier.clone(), client.message(), Binding::NONE).unwrap();
        client.update(first.as_bytes()).unwrap();
        let result = server.finish(client.message());
        if ok {
            let (final_msg, _) = result.unwrap();
            client.finish(final_msg.as_bytes()).unwrap();
        } else {
            assert_eq!(result.unwrap_err(), ScramError::WrongProof);
        }
    }
}

#[test]
fn verifiers_match_what_postgres_stores() {
    // libpq's (and the server's) verifier, recomputed from its own salt.
    let theirs = ScramVerifier::parse(&postgres_protocol::password::scram_sha_256(
        "sécret\u{00A0}pw".as_bytes(),
    ))
    .unwrap();
    let again = ScramVerifier::from_password_and_salt("sécret\u{00A0}pw", &theirs.salt);
    assert_eq!(again, theirs);
    let salt = [7u8; 16];
    let ours = ScramVerifier::from_password_and_salt("secret", &salt);
    let mut client = ScramSha256::new(b"secret", ChannelBinding::unrequested());
    let (server, first) =
        ScramServer::start(ours.clone(), client.message(), Binding::NONE).unwrap();
    client.update(first.as_bytes()).unwrap();
    let (last, _) = server.finish(client.message()).unwrap();
    client.finish(last.as_bytes()).unwrap();
    assert_eq!(ours.salt, salt);
    assert_eq!(ours.iterations, 4096);
}

#[test]
fn made_up_salts_are_stable_per_user_and_secret() {
    let secret = LoginSecret::from_secrets(["a", "b"]);
    let again = LoginSecret::from_secrets(["a", "b"]);
    let other = LoginSecret::from_secrets(["ab"]);
    assert_eq!(secret.salt_for("bob"), again.salt_for("bob"));
    assert_ne!(secret.salt_for("bob"), secret.salt_for("alice"));
    assert_ne!(secret.salt_for("bob"), other.salt_for("bob"));
    let known = Secret::from_config("bob", "pw", &secret);
    let Secret::Scram(known) = known else {
        panic!("plain passwords become SCRAM verifiers")
    };
    assert_eq!(known.salt, ScramVerifier::unmatchable(&again, "bob").salt);
}

#[test]
fn channel_binding_binds_to_the_certificate_and_refuses_downgrades() {
    let verifier = ScramVerifier::from_password("secret");
    let end_point = [9u8; 32];
    let plus = Binding {
        plus: true,
        end_point: Some(&end_point),
    };
    let run = |client_binding: ChannelBinding, binding: Binding<'_>| {
        let mut client = ScramSha256::new(b"secret", client_binding);
        let (server, first) = ScramServer::start(verifier.clone(), client.message(), binding)?;
        client.update(first.as_bytes()).unwrap();
        server.finish(client.message()).map(|(last, _)| last)
    };
    assert!(
        run(
            ChannelBinding::tls_server_end_point(end_point.to_vec()),
            plus
        )
        .is_ok()
    );
    // Another certificate (a man in the middle's): the proof does not bind.
    assert!(run(ChannelBinding::tls_server_end_point(vec![1; 32]), plus).is_err());
    // "y" while PLUS was offered over TLS: the offer was stripped.
    let offered = Binding {
        plus: false,
        end_point: Some(&end_point),
    };
    // (postgres-protocol: `unrequested` sends "y", `unsupported` sends "n".)
    assert!(run(ChannelBinding::unrequested(), offered).is_err());
    assert!(run(ChannelBinding::unsupported(), offered).is_ok());
    // PLUS chosen without binding data, or binding without PLUS: refused.
    assert!(run(ChannelBinding::unsupported(), plus).is_err());
    assert!(
        run(
            ChannelBinding::tls_server_end_point(end_point.to_vec()),
            offered
        )
        .is_err()
    );
}

#[test]
fn keys_recovered_from_a_proof_log_in_to_a_server_with_the_same_verifier() {
    let verifier = ScramVerifier::from_password("secret");
    // A client logs in to the proxy; the proxy learns its ClientKey.
    let mut client = ScramSha256::new(b"secret", ChannelBinding::unsupported());
    let (server, first) =
        ScramServer::start(verifier.clone(), client.message(), Binding::NONE).unwrap();
    client.update(first.as_bytes()).unwrap();
    let (_, keys) = server.finish(client.message()).unwrap();
    // The proxy logs in to a "server" holding the same verifier with those keys,
    // plain and channel-bound.
    for end_point in [None, Some(&[5u8; 32][..])] {
        let binding = Binding {
            plus: end_point.is_some(),
            end_point,
        };
        let mut proxy = ScramKeyClient::new(keys.clone(), end_point, end_point.is_some());
        let (server, first) =
            ScramServer::start(verifier.clone(), proxy.first_message().as_bytes(), binding)
                .unwrap();
        let last = proxy.final_message(first.as_bytes()).unwrap();
        let (server_final, again) = server.finish(last.as_bytes()).unwrap();
        proxy.verify_server(server_final.as_bytes()).unwrap();
        assert_eq!(again, keys);
    }
    // Another verifier (another password): refused.
    let other = ScramVerifier::from_password("other");
    let mut proxy = ScramKeyClient::new(keys, None, false);
    let (server, first) =
        ScramServer::start(other, proxy.first_message().as_bytes(), Binding::NONE).unwrap();
    let last = proxy.final_message(first.as_bytes()).unwrap();
    assert_eq!(
        server.finish(last.as_bytes()).unwrap_err(),
        ScramError::WrongProof
    );
}

#[test]
fn md5_matches_libpq_response() {
    let stored = postgres_protocol::password::md5(b"pw", "bob");
    let salt = [1, 2, 3, 4];
    let response = postgres_protocol::authentication::md5_hash(b"bob", b"pw", salt);
    assert!(md5_response_matches(&stored, salt, response.as_bytes()));
    assert!(!md5_response_matches(
        &stored,
        [0, 0, 0, 0],
        response.as_bytes()
    ));
}

#[test]
fn garbage_is_rejected_not_panicked_on() {
    let verifier = ScramVerifier::random();
    assert!(ScramServer::start(verifier.clone(), b"", Binding::NONE).is_err());
    assert!(ScramServer::start(verifier.clone(), b"p=tls,,n=,r=x", Binding::NONE).is_err());
    let (server, _) = ScramServer::start(verifier, b"n,,n=,r=abc", Binding::NONE).unwrap();
    assert!(server.finish(b"c=biws,r=wrong,p=AAAA").is_err());
}

//! Authentication of clients against `[[users]]` (SCRAM-SHA-256 or md5), done by the
//! proxy itself, never forwarded to a server.
//!
//! A plain configured password is turned into a SCRAM verifier once at config load, so
//! the per-login cost is one HMAC round, not 4096 PBKDF2 iterations.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngExt;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// What the proxy knows about a user's secret.
#[derive(Clone, Debug)]
pub enum Secret {
    /// SCRAM-SHA-256 verifier (from a plain password or a `SCRAM-SHA-256$...` string).
    Scram(ScramVerifier),
    /// `md5` + md5(password || username), as stored by Postgres.
    Md5 { hash: String },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Self {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// The verifier Postgres would store for `password` with `salt` (4096 iterations,
    /// the password SASLprep'ed when it can be, as libpq and the server do).
    pub fn from_password_and_salt(password: &str, salt: &[u8]) -> Self {
        let prepared = stringprep::saslprep(password)
            .map(|p| p.into_owned())
            .unwrap_or_else(|_| password.to_string());
        let salted = salted_password(prepared.as_bytes(), salt, SCRAM_ITERATIONS);
        let client_key = hmac(&salted, b"Client Key");
        Self {
            iterations: SCRAM_ITERATIONS,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// A verifier for `password` with a random salt.
    pub fn from_password(password: &str) -> Self {
        let salt: [u8; 16] = rand::rng().random();
        Self::from_password_and_salt(password, &salt)
    }

    /// A verifier no password matches, used for unknown users so that the exchange looks
    /// the same as for a known user with a wrong password.
    pub fn random() -> Self {
        let mut rng = rand::rng();
        Self {
            iterations: SCRAM_ITERATIONS,
            salt: rng.random::<[u8; 16]>().to_vec(),
            stored_key: rng.random(),
            server_key: rng.random(),
        }
    }

    /// Like [`ScramVerifier::random`], but the salt is the one `secret` gives this user
    /// name every time: asking twice for an unknown user shows the same salt, as it does
    /// for a known one.
    pub fn unmatchable(secret: &LoginSecret, user: &str) -> Self {
        Self {
            salt: secret.salt_for(user).to_vec(),
            ..Self::random()
        }
    }
}

/// Iterations of the verifiers the proxy makes (Postgres' default).
const SCRAM_ITERATIONS: u32 = 4096;

/// RFC 5802's Hi(): PBKDF2 with HMAC-SHA-256 and one output block.
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = Vec::with_capacity(salt.len() + 4);
    block.extend_from_slice(salt);
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u.iter()) {
            *o ^= x;
        }
    }
    out
}

/// The proxy's secret for the salts it makes up: the same user name gets the same salt
/// across reloads, restarts and every proxy of a fleet with the same config, whether
/// the user exists or not, so salts give no hint of who exists.
#[derive(Clone)]
pub struct LoginSecret([u8; 32]);

impl LoginSecret {
    /// Derived from the config's secrets (users' passwords, the auth_query password,
    /// the admin token): nobody who lacks them can predict the salts.
    pub fn from_secrets<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(b"replicator login salts v1");
        for secret in secrets {
            hasher.update((secret.len() as u64).to_be_bytes());
            hasher.update(secret.as_bytes());
        }
        LoginSecret(hasher.finalize().into())
    }

    pub fn salt_for(&self, user: &str) -> [u8; 16] {
        let full = hmac(&self.0, user.as_bytes());
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&full[..16]);
        salt
    }
}

impl std::fmt::Debug for LoginSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoginSecret(..)")
    }
}

impl Secret {
    /// The secret for a configured password: a SCRAM verifier or md5 hash as given, or
    /// a verifier made from a plain password with the salt `secret` gives this user.
    pub fn from_config(user: &str, password: &str, secret: &LoginSecret) -> Secret {
        if let Some(v) = ScramVerifier::parse(password) {
            Secret::Scram(v)
        } else if is_md5_hash(password) {
            Secret::Md5 {
                hash: password.to_string(),
            }
        } else {
            Secret::Scram(ScramVerifier::from_password_and_salt(
                password,
                &secret.salt_for(user),
            ))
        }
    }
}

/// A configured password that is the password itself, not a SCRAM verifier or an md5
/// hash (only such a one can answer a clear-text or SCRAM request from a server).
pub fn is_plain_password(s: &str) -> bool {
    !s.is_empty() && ScramVerifier::parse(s).is_none() && !is_md5_hash(s)
}

pub fn is_md5_hash(s: &str) -> bool {
    s.len() == 35 && s.starts_with("md5") && s[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The md5 password response for a stored hash (`md5` + hex): `"md5" + md5(hex || salt)`.
/// The client computes it from its password; the proxy computes it from the hash, both
/// to check a client and to log in to a server on a client's behalf.
pub fn md5_salted_response(stored_hash: &str, salt: [u8; 4]) -> Option<String> {
    let inner = stored_hash.strip_prefix("md5")?;
    let mut hasher = md5::Md5::new();
    md5::Digest::update(&mut hasher, inner.as_bytes());
    md5::Digest::update(&mut hasher, salt);
    Some(format!("md5{}", hex(&md5::Digest::finalize(hasher))))
}

/// Checks a client's md5 response against the stored hash.
pub fn md5_response_matches(stored_hash: &str, salt: [u8; 4], response: &[u8]) -> bool {
    md5_salted_response(stored_hash, salt)
        .is_some_and(|expected| constant_time_eq(expected.as_bytes(), response))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Server side of one SCRAM-SHA-256 or SCRAM-SHA-256-PLUS exchange (RFC 5802/7677,
/// channel binding tls-server-end-point as RFC 5929 and PostgreSQL have it).
pub struct ScramServer {
    verifier: ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
    /// What the client must send as `c=`: the gs2 header, then the binding data.
    expected_channel: Vec<u8>,
}

/// The mechanism a client chose and what it can bind to.
#[derive(Debug, Clone, Copy)]
pub struct Binding<'a> {
    /// The client chose SCRAM-SHA-256-PLUS.
    pub plus: bool,
    /// The connection is TLS with this tls-server-end-point hash (PLUS was offered).
    pub end_point: Option<&'a [u8]>,
}

impl Binding<'_> {
    pub const NONE: Binding<'static> = Binding {
        plus: false,
        end_point: None,
    };
}

#[derive(Debug, PartialEq)]
pub enum ScramError {
    Malformed(&'static str),
    WrongProof,
}

impl ScramServer {
    /// Consumes the client-first-message and returns the server-first-message.
    pub fn start(
        verifier: ScramVerifier,
        client_first: &[u8],
        binding: Binding<'_>,
    ) -> Result<(Self, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (cbind, rest) = text
            .split_once(',')
            .ok_or(ScramError::Malformed("missing gs2 header"))?;
        // gs2 cbind-flag: "n" (no binding), "y" (the client could bind but believes
        // the server cannot), "p=tls-server-end-point" (bound).
        let binding_data: &[u8] = match (cbind, binding.plus, binding.end_point) {
            ("p=tls-server-end-point", true, Some(end_point)) => end_point,
            ("p=tls-server-end-point", true, None) => {
                return Err(ScramError::Malformed(
                    "channel binding needs an encrypted connection",
                ));
            }
            (flag, true, _) if !flag.starts_with("p=") => {
                return Err(ScramError::Malformed(
                    "SCRAM-SHA-256-PLUS chosen without channel binding data",
                ));
            }
            (flag, true, _) => {
                let _ = flag;
                return Err(ScramError::Malformed(
                    "unsupported channel binding type (only tls-server-end-point)",
                ));
            }
            (flag, false, _) if flag.starts_with("p=") => {
                return Err(ScramError::Malformed(
                    "channel binding requested with SCRAM-SHA-256; choose SCRAM-SHA-256-PLUS",
                ));
            }
            // PLUS was offered: a client that says it would bind but thinks we
            // cannot has had the offer stripped on the way (a downgrade).
            ("y", false, Some(_)) => {
                return Err(ScramError::Malformed(
                    "SCRAM channel binding negotiation error: the client believes the server does not support channel binding",
                ));
            }
            ("n" | "y", false, _) => &[],
            _ => return Err(ScramError::Malformed("invalid gs2 header")),
        };
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or(ScramError::Malformed("missing gs2 header"))?;
        let client_nonce = bare
            .split(',')
            .find_map(|attr| attr.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing client nonce"))?;
        if client_nonce.is_empty() {
            return Err(ScramError::Malformed("empty client nonce"));
        }
        let server_nonce: [u8; 18] = rand::rng().random();
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let mut expected_channel = format!("{cbind},{authzid},").into_bytes();
        expected_channel.extend_from_slice(binding_data);
        let state = Self {
            verifier,
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            expected_channel,
        };
        Ok((state, server_first))
    }

    /// Checks the client-final-message; returns the server-final-message on success
    /// and the client's ClientKey, recovered from its proof (what logs in to servers
    /// holding the same verifier without knowing the password: SCRAM passthrough).
    pub fn finish(self, client_final: &[u8]) -> Result<(String, ScramKeys), ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let expected_channel = B64.encode(&self.expected_channel);
        if channel != Some(expected_channel.as_str()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::WrongProof);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof
            .iter()
            .zip(client_signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        let stored = Sha256::digest(&client_key);
        if !constant_time_eq(stored.as_slice(), &self.verifier.stored_key) {
            return Err(ScramError::WrongProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(&client_key);
        Ok((
            format!("v={}", B64.encode(server_signature)),
            ScramKeys {
                client_key: key,
                server_key: self.verifier.server_key,
            },
        ))
    }
}

/// What a SCRAM login needs instead of the password: ClientKey (proves the client)
/// and ServerKey (checks the server's signature).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(..)")
    }
}

/// The client side of SCRAM-SHA-256(-PLUS) from [`ScramKeys`], for servers that hold
/// the verifier the keys came from.
pub struct ScramKeyClient {
    keys: ScramKeys,
    gs2_header: String,
    binding_data: Vec<u8>,
    client_first_bare: String,
    nonce: String,
    auth_message: Option<String>,
}

impl ScramKeyClient {
    /// `end_point`: bind to this tls-server-end-point hash (the server offered PLUS);
    /// `tls`: the connection is TLS but unbound ("y").
    pub fn new(keys: ScramKeys, end_point: Option<&[u8]>, tls: bool) -> Self {
        let nonce_bytes: [u8; 18] = rand::rng().random();
        let nonce = B64.encode(nonce_bytes);
        let gs2_header = match (end_point, tls) {
            (Some(_), _) => "p=tls-server-end-point,,",
            (None, true) => "y,,",
            (None, false) => "n,,",
        };
        ScramKeyClient {
            keys,
            gs2_header: gs2_header.to_string(),
            binding_data: end_point.map(<[u8]>::to_vec).unwrap_or_default(),
            client_first_bare: format!("n=,r={nonce}"),
            nonce,
            auth_message: None,
        }
    }

    pub fn first_message(&self) -> String {
        format!("{}{}", self.gs2_header, self.client_first_bare)
    }

    /// The client-final-message for the server-first-message.
    pub fn final_message(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let nonce = text
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("missing nonce"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed(
                "the server's nonce does not extend ours",
            ));
        }
        let mut channel = self.gs2_header.as_bytes().to_vec();
        channel.extend_from_slice(&self.binding_data);
        let without_proof = format!("c={},r={nonce}", B64.encode(channel));
        let auth_message = format!("{},{text},{without_proof}", self.client_first_bare);
        let stored_key: [u8; 32] = Sha256::digest(self.keys.client_key).into();
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = self
            .keys
            .client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks the server-final-message: the server knew the verifier too.
    pub fn verify_server(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or(ScramError::Malformed("missing server signature"))?;
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(ScramError::Malformed("server-final before client-final"))?;
        let expected = hmac(&self.keys.server_key, auth_message.as_bytes());
        if constant_time_eq(&expected, &signature) {
            Ok(())
        } else {
            Err(ScramError::WrongProof)
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length, so this cannot fail; fall back to an
    // impossible-to-match value rather than panic.
    let Ok(mut mac) = <HmacSha256 as KeyInit>::new_from_slice(key) else {
        return [0; 32];
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests;

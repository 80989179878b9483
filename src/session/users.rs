//! Users allowed to log in, with what the proxy needs to check them and to log in to
//! servers on their behalf.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::protocol::auth::Secret;

pub struct UserEntry {
    pub name: String,
    pub secret: Secret,
    /// What the proxy presents to servers: the configured password as written.
    pub backend_password: String,
    pub admin: bool,
}

pub type Users = HashMap<String, Arc<UserEntry>>;

pub fn from_config(config: &Config) -> Users {
    config
        .users
        .iter()
        .map(|u| {
            (
                u.name.clone(),
                Arc::new(UserEntry {
                    name: u.name.clone(),
                    secret: Secret::from_config(&u.name, &u.password),
                    backend_password: u.password.clone(),
                    admin: u.admin,
                }),
            )
        })
        .collect()
}

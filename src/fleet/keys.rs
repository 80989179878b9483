//! Where everything lives in etcd, under the fleet's prefix.

use super::FleetSettings;

pub fn leader(s: &FleetSettings) -> String {
    format!("{}/leader", s.prefix)
}

pub fn members(s: &FleetSettings) -> String {
    format!("{}/members/", s.prefix)
}

pub fn member(s: &FleetSettings, instance: &str) -> String {
    format!("{}{instance}", members(s))
}

pub fn topologies(s: &FleetSettings) -> String {
    format!("{}/topology/", s.prefix)
}

pub fn topology(s: &FleetSettings, project: &str) -> String {
    format!("{}{project}", topologies(s))
}

pub fn all_knowledge(s: &FleetSettings) -> String {
    format!("{}/knowledge/", s.prefix)
}

pub fn knowledge(s: &FleetSettings, project: &str) -> String {
    format!("{}{project}", all_knowledge(s))
}

/// The last path element of `key` under `folder`.
pub fn name_under<'a>(key: &'a [u8], folder: &str) -> Option<&'a str> {
    std::str::from_utf8(key).ok()?.strip_prefix(folder)
}

pub fn cdc(s: &FleetSettings, rule: &str) -> String {
    format!("{}/cdc/{rule}", s.prefix)
}

pub fn runtime(s: &FleetSettings) -> String {
    format!("{}/runtime", s.prefix)
}

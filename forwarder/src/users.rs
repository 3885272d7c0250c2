//! Self-service on a shared bastion: who a control-socket caller is (the
//! uid from SO_PEERCRED, its name and groups from the user database), the
//! backend policy non-root callers are held to (`--user-allow` /
//! `--user-deny`, per group too), their quotas (sessions, flows, new flows
//! per second; defaults with overrides per user and per group), and the
//! audit log target. Root is held to neither policy nor quotas.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::IpNet;
use serde::Deserialize;

/// The tracing target of the audit log: one line per change (add, remove,
/// expiry) and per refused request, with who, uid and what. Operators
/// filter on it (`RUST_LOG=info` includes it; `journalctl -u forwarder |
/// grep forwarder::audit`, or `RUST_LOG=warn,forwarder::audit=info` for
/// warnings and the audit lines only).
pub const AUDIT: &str = "forwarder::audit";

/// Writes the audit line of a change: `who` did `action` (add, remove,
/// expire) to `session`. Expiry lines name the session's owner as `who`.
pub fn audit_change(who: &Owner, action: &'static str, session: &forwarder_api::SessionInfo) {
    tracing::info!(
        target: AUDIT,
        user = %who.name,
        uid = who.uid,
        action,
        session = %session.id,
        port = session.port,
        backend = %session.backend,
        owner = %session.owner.name,
        owner_uid = session.owner.uid,
        "audit: {action} session {}",
        session.id
    );
}

/// Writes the audit line of a refused request, with the reason given to the caller.
pub fn audit_refusal(who: &Owner, action: &'static str, target: &str, reason: &str) {
    tracing::info!(
        target: AUDIT,
        user = %who.name,
        uid = who.uid,
        action,
        target,
        outcome = "refused",
        reason,
        "audit: {action} {target} refused"
    );
}

/// Who asked: the caller of a control request, or the owner of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    /// The user name, or the uid in decimal when the user database has no entry.
    pub name: String,
    /// Every group the user is a member of (primary and supplementary), by name.
    pub groups: Vec<String>,
}

impl Owner {
    pub fn root() -> Self {
        Self {
            uid: 0,
            name: "root".into(),
            groups: vec!["root".into()],
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Looks `uid` up in the user database (NSS: may block, keep it off the
    /// relay lock when serving). A uid without an entry keeps its number as
    /// its name and only the group `gid` (SO_PEERCRED's), if known.
    pub fn lookup(uid: u32, gid: Option<u32>) -> Self {
        use nix::unistd::{Gid, Group, Uid, User};
        if uid == 0 {
            return Self::root();
        }
        let group_name = |gid: Gid| {
            Group::from_gid(gid)
                .ok()
                .flatten()
                .map_or_else(|| gid.to_string(), |group| group.name)
        };
        let Some(user) = User::from_uid(Uid::from_raw(uid)).ok().flatten() else {
            return Self {
                uid,
                name: uid.to_string(),
                groups: gid
                    .map(|gid| group_name(Gid::from_raw(gid)))
                    .into_iter()
                    .collect(),
            };
        };
        let gids = std::ffi::CString::new(user.name.clone())
            .ok()
            .and_then(|name| nix::unistd::getgrouplist(&name, user.gid).ok())
            .unwrap_or_else(|| vec![user.gid]);
        Self {
            uid,
            groups: gids.into_iter().map(group_name).collect(),
            name: user.name,
        }
    }

    /// How the API shows an owner.
    pub fn info(&self) -> forwarder_api::OwnerInfo {
        forwarder_api::OwnerInfo {
            uid: self.uid,
            name: self.name.clone(),
        }
    }
}

/// Backend ports a rule covers: `22`, `60000-61000`, `22,60000-60100`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet(Vec<RangeInclusive<u16>>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|range| range.contains(&port))
    }
}

impl FromStr for PortSet {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |part: &str| match part.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!(
                "{part:?} is not a port (1-65535): write ports as 22, 60000-61000 or 22,60000-60100"
            )),
            Ok(port) => Ok(port),
        };
        let ranges = text
            .split(',')
            .map(|part| match part.split_once('-') {
                Some((lo, hi)) => {
                    let (lo, hi) = (port(lo)?, port(hi)?);
                    if lo > hi {
                        return Err(format!(
                            "port range {part:?} runs backwards: write LOW-HIGH"
                        ));
                    }
                    Ok(lo..=hi)
                }
                None => port(part).map(|p| p..=p),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, range) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            if range.start() == range.end() {
                write!(f, "{}", range.start())?;
            } else {
                write!(f, "{}-{}", range.start(), range.end())?;
            }
        }
        Ok(())
    }
}

/// One `--user-allow` / `--user-deny` rule: `CIDR[:PORTS]`, IPv4 or IPv6
/// (`10.0.0.0/8:60000-61000`, `2001:db8::/32`, `[2001:db8::/32]:22`; a bare
/// address is a /32 or a /128; no ports: every port). A rule of one family
/// never matches a backend of the other.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct BackendRule {
    pub net: IpNet,
    pub ports: Option<PortSet>,
}

impl BackendRule {
    pub fn matches(&self, backend: SocketAddr) -> bool {
        self.net.contains(&backend.ip())
            && self
                .ports
                .as_ref()
                .is_none_or(|ports| ports.contains(backend.port()))
    }
}

impl FromStr for BackendRule {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let refuse = |why: String| {
            format!(
                "backend rule {text:?}: {why} (expected CIDR[:PORTS], e.g. 10.0.0.0/8:60000-61000 or [2001:db8::/32]:60000-61000)"
            )
        };
        // IPv6 with ports goes in brackets, as backends do: `[2001:db8::/32]:22`.
        let (net, ports) = if let Some(bracketed) = text.strip_prefix('[') {
            let Some((net, rest)) = bracketed.split_once(']') else {
                return Err(refuse("the bracket is not closed".into()));
            };
            match rest.strip_prefix(':') {
                Some(ports) => (net, Some(ports.parse::<PortSet>().map_err(refuse)?)),
                None if rest.is_empty() => (net, None),
                None => return Err(refuse(format!("{rest:?} after the bracket is not :PORTS"))),
            }
        } else if text.matches(':').count() > 1 {
            // More than one colon: IPv6, all address (ports need brackets).
            (text, None)
        } else {
            match text.split_once(':') {
                Some((net, ports)) => (net, Some(ports.parse::<PortSet>().map_err(refuse)?)),
                None => (text, None),
            }
        };
        let net = match net.parse::<IpNet>() {
            Ok(net) => net,
            Err(_) => match net.parse::<IpAddr>() {
                Ok(ip) => IpNet::from(ip),
                Err(_) if text.matches(':').count() > 1 && !text.starts_with('[') => {
                    return Err(refuse(format!(
                        "{net:?} is not an IPv6 address or CIDR (IPv6 with ports goes in brackets: [2001:db8::/32]:22)"
                    )));
                }
                Err(_) => {
                    return Err(refuse(format!(
                        "{net:?} is not an IPv4 or IPv6 address or CIDR"
                    )));
                }
            },
        };
        Ok(Self { net, ports })
    }
}

impl TryFrom<String> for BackendRule {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl fmt::Display for BackendRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.net, &self.ports) {
            (IpNet::V6(net), Some(_)) => write!(f, "[{net}]")?,
            (net, _) => write!(f, "{net}")?,
        }
        if let Some(ports) = &self.ports {
            write!(f, ":{ports}")?;
        }
        Ok(())
    }
}

/// A user's limits; 0: unlimited (as every rate in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quota {
    pub max_sessions: u32,
    pub max_flows: u32,
    pub new_flows_per_sec: u32,
}

impl Quota {
    pub const UNLIMITED: Self = Self {
        max_sessions: 0,
        max_flows: 0,
        new_flows_per_sec: 0,
    };
}

/// `[user.NAME]` in the config file: the quota fields it sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaOverride {
    pub max_sessions: Option<u32>,
    pub max_flows: Option<u32>,
    pub new_flows_per_sec: Option<u32>,
}

/// `[group.NAME]` in the config file: quota fields for its members, and
/// backend rules they get on top of the global ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRules {
    pub max_sessions: Option<u32>,
    pub max_flows: Option<u32>,
    pub new_flows_per_sec: Option<u32>,
    #[serde(default)]
    pub user_allow: Vec<BackendRule>,
    #[serde(default)]
    pub user_deny: Vec<BackendRule>,
}

impl GroupRules {
    /// Its quota fields.
    pub fn quota(&self) -> QuotaOverride {
        QuotaOverride {
            max_sessions: self.max_sessions,
            max_flows: self.max_flows,
            new_flows_per_sec: self.new_flows_per_sec,
        }
    }
}

/// One quota value as it applies to a user, with where it was set (for
/// refusals that say what to raise).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    /// 0: unlimited.
    pub value: u32,
    /// The config key that set it, e.g. `user_max_sessions` or `[group.ops] max_sessions`.
    pub source: String,
}

impl Limit {
    fn unlimited() -> Self {
        Self {
            value: 0,
            source: "root".into(),
        }
    }

    /// Whether `used` more would still fit.
    pub fn has_room(&self, used: usize) -> bool {
        self.value == 0 || used < self.value as usize
    }
}

/// A user's quota, resolved: each field with its source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserQuota {
    pub max_sessions: Limit,
    pub max_flows: Limit,
    pub new_flows_per_sec: Limit,
}

impl UserQuota {
    pub fn unlimited() -> Self {
        Self {
            max_sessions: Limit::unlimited(),
            max_flows: Limit::unlimited(),
            new_flows_per_sec: Limit::unlimited(),
        }
    }
}

/// What non-root callers may do: the backend policy and the quotas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserPolicy {
    pub allow: Vec<BackendRule>,
    pub deny: Vec<BackendRule>,
    /// For every user without an override.
    pub quota: Quota,
    pub users: BTreeMap<String, QuotaOverride>,
    pub groups: BTreeMap<String, GroupRules>,
}

impl UserPolicy {
    /// No rule (users may add nothing) and `quota` for everyone.
    pub fn new(quota: Quota) -> Self {
        Self {
            allow: Vec::new(),
            deny: Vec::new(),
            quota,
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
        }
    }
}

impl UserPolicy {
    /// `[user.NAME]` and `[group.NAME]` tables that name no user or group
    /// on this host (a typo, or an account not made yet): they apply to nobody.
    pub fn unknown_names(&self) -> Vec<String> {
        let users = self
            .users
            .keys()
            .filter(|name| !matches!(nix::unistd::User::from_name(name), Ok(Some(_))))
            .map(|name| format!("[user.{name}]"));
        let groups = self
            .groups
            .keys()
            .filter(|name| !matches!(nix::unistd::Group::from_name(name), Ok(Some(_))))
            .map(|name| format!("[group.{name}]"));
        users.chain(groups).collect()
    }
}

/// The more generous of two limits, 0 being unlimited.
fn more_generous(a: u32, b: u32) -> bool {
    a == 0 || (b != 0 && a > b)
}

impl UserPolicy {
    /// The groups of `owner` that the config has rules for.
    fn groups_of<'a>(
        &'a self,
        owner: &'a Owner,
    ) -> impl Iterator<Item = (&'a str, &'a GroupRules)> {
        owner
            .groups
            .iter()
            .filter_map(|name| self.groups.get_key_value(name))
            .map(|(name, rules)| (name.as_str(), rules))
    }

    /// The user's own override wins; else the most generous of its groups'; else the default.
    pub fn quota_for(&self, owner: &Owner) -> UserQuota {
        if owner.is_root() {
            return UserQuota::unlimited();
        }
        let user = self.users.get(&owner.name);
        let resolve = |field: &str,
                       default_key: &str,
                       default: u32,
                       pick: fn(&QuotaOverride) -> Option<u32>| {
            if let Some(value) = user.and_then(pick) {
                return Limit {
                    value,
                    source: format!("[user.{}] {field}", owner.name),
                };
            }
            let mut best: Option<Limit> = None;
            for (group, rules) in self.groups_of(owner) {
                if let Some(value) = pick(&rules.quota())
                    && best.as_ref().is_none_or(|b| more_generous(value, b.value))
                {
                    best = Some(Limit {
                        value,
                        source: format!("[group.{group}] {field}"),
                    });
                }
            }
            best.unwrap_or_else(|| Limit {
                value: default,
                source: default_key.to_string(),
            })
        };
        UserQuota {
            max_sessions: resolve(
                "max_sessions",
                "user_max_sessions (--user-max-sessions)",
                self.quota.max_sessions,
                |q| q.max_sessions,
            ),
            max_flows: resolve(
                "max_flows",
                "user_max_flows (--user-max-flows)",
                self.quota.max_flows,
                |q| q.max_flows,
            ),
            new_flows_per_sec: resolve(
                "new_flows_per_sec",
                "user_new_flows_per_sec (--user-new-flows-per-sec)",
                self.quota.new_flows_per_sec,
                |q| q.new_flows_per_sec,
            ),
        }
    }

    /// Whether `owner` may create a session towards `backend`: root always;
    /// anyone else when no deny rule matches and an allow rule does. The
    /// refusal names the rule (or the lack of one) and the way on.
    pub fn check_backend(&self, owner: &Owner, backend: SocketAddr) -> Result<(), String> {
        if owner.is_root() {
            return Ok(());
        }
        let in_groups = |pick: fn(&GroupRules) -> &Vec<BackendRule>, key: &'static str| {
            self.groups_of(owner).flat_map(move |(group, rules)| {
                pick(rules)
                    .iter()
                    .map(move |rule| (format!("[group.{group}] {key}"), rule))
            })
        };
        let deny = self
            .deny
            .iter()
            .map(|rule| ("user_deny (--user-deny)".to_string(), rule))
            .chain(in_groups(|g| &g.user_deny, "user_deny"));
        for (source, rule) in deny {
            if rule.matches(backend) {
                return Err(format!(
                    "backend {backend} is refused for user {} (uid {}) by the deny rule {rule} ({source}): \
                     ask the relay's administrator if you need it",
                    owner.name, owner.uid
                ));
            }
        }
        let mut allow = self
            .allow
            .iter()
            .map(|rule| ("user_allow (--user-allow)".to_string(), rule))
            .chain(in_groups(|g| &g.user_allow, "user_allow"))
            .peekable();
        if allow.peek().is_none() {
            return Err(format!(
                "user {} (uid {}) may not add sessions: no user_allow rule is configured, and without one \
                 users may add nothing; ask the relay's administrator to allow your servers \
                 (`forwarder run --user-allow CIDR[:PORTS]`, or user_allow in the config file)",
                owner.name, owner.uid
            ));
        }
        if allow.any(|(_, rule)| rule.matches(backend)) {
            return Ok(());
        }
        Err(format!(
            "backend {backend} is not allowed for user {} (uid {}): no user_allow rule matches it; \
             ask the relay's administrator to add one (`forwarder run --user-allow CIDR[:PORTS]`, \
             or user_allow in the config file)",
            owner.name, owner.uid
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str]) -> Owner {
        Owner {
            uid: 1000,
            name: name.into(),
            groups: groups.iter().map(|g| (*g).to_string()).collect(),
        }
    }

    const QUOTA: Quota = Quota {
        max_sessions: 8,
        max_flows: 32,
        new_flows_per_sec: 4,
    };

    fn rule(text: &str) -> BackendRule {
        text.parse().unwrap()
    }

    fn at(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn rules_parse_and_say_what_is_wrong() {
        let r = rule("10.0.0.0/8:22,60000-60100");
        assert!(r.matches(at("10.1.2.3:22")));
        assert!(r.matches(at("10.1.2.3:60100")));
        assert!(!r.matches(at("10.1.2.3:60101")));
        assert!(!r.matches(at("11.0.0.1:22")));
        assert_eq!(r.to_string(), "10.0.0.0/8:22,60000-60100");
        let host = rule("192.0.2.7");
        assert!(host.matches(at("192.0.2.7:1")) && host.matches(at("192.0.2.7:65535")));
        assert!(!host.matches(at("192.0.2.8:1")));
        assert_eq!(host.to_string(), "192.0.2.7/32");
        assert!(rule("0.0.0.0/0").matches(at("203.0.113.9:60001")));

        let v6 = rule("[2001:db8::/32]:22,60000-60100");
        assert!(v6.matches(at("[2001:db8:1::2]:22")));
        assert!(v6.matches(at("[2001:db8:1::2]:60100")));
        assert!(!v6.matches(at("[2001:db8:1::2]:60101")));
        assert!(!v6.matches(at("[2001:db9::2]:22")));
        assert_eq!(v6.to_string(), "[2001:db8::/32]:22,60000-60100");
        assert_eq!(v6.to_string().parse::<BackendRule>().unwrap(), v6);
        let all_ports = rule("2001:db8::/48");
        assert!(all_ports.matches(at("[2001:db8:0:1::9]:1")));
        assert_eq!(all_ports.to_string(), "2001:db8::/48");
        let v6_host = rule("fd00::7");
        assert_eq!(v6_host.to_string(), "fd00::7/128");
        assert!(v6_host.matches(at("[fd00::7]:60001")) && !v6_host.matches(at("[fd00::8]:60001")));
        // Families never cross: ::/0 is not 0.0.0.0/0, nor the other way round.
        assert!(!rule("::/0").matches(at("10.0.0.1:60001")));
        assert!(!rule("0.0.0.0/0").matches(at("[2001:db8::1]:60001")));
        assert!(!rule("::ffff:10.0.0.0/104").matches(at("10.0.0.1:60001")));
        for (bad, says) in [
            ("10.0.0.0/33", "not an IPv4 or IPv6 address or CIDR"),
            ("server:22", "not an IPv4 or IPv6 address or CIDR"),
            ("2001:db8::/129", "not an IPv6 address or CIDR"),
            ("2001:db8::/32:22", "goes in brackets"),
            ("[2001:db8::/32", "bracket is not closed"),
            ("[2001:db8::/32]22", "is not :PORTS"),
            ("[2001:db8::/32]:0", "not a port"),
            ("10.0.0.0/8:0", "not a port"),
            ("10.0.0.0/8:70000", "not a port"),
            ("10.0.0.0/8:61000-60000", "runs backwards"),
            ("10.0.0.0/8:", "not a port"),
            ("10.0.0.0/8:22,,23", "not a port"),
        ] {
            let error = bad.parse::<BackendRule>().unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
            assert!(error.contains("CIDR[:PORTS]"), "{bad}: {error}");
        }
    }

    #[test]
    fn deny_wins_allow_permits_and_nothing_is_allowed_by_default() {
        let alice = user("alice", &["alice", "ops"]);
        let mut policy = UserPolicy::new(QUOTA);
        let nothing = policy
            .check_backend(&alice, at("10.0.0.1:60001"))
            .unwrap_err();
        assert!(
            nothing.contains("no user_allow rule is configured"),
            "{nothing}"
        );
        assert!(
            policy
                .check_backend(&Owner::root(), at("10.0.0.1:60001"))
                .is_ok()
        );

        policy.allow = vec![rule("10.0.0.0/8:60000-61000")];
        policy.deny = vec![rule("10.9.0.0/16")];
        assert!(policy.check_backend(&alice, at("10.0.0.1:60001")).is_ok());
        let port = policy.check_backend(&alice, at("10.0.0.1:22")).unwrap_err();
        assert!(port.contains("no user_allow rule matches"), "{port}");
        let denied = policy
            .check_backend(&alice, at("10.9.1.1:60001"))
            .unwrap_err();
        assert!(
            denied.contains("deny rule 10.9.0.0/16 (user_deny"),
            "{denied}"
        );

        // A group's rules apply to its members only, on top of the global ones.
        policy.groups.insert(
            "ops".into(),
            GroupRules {
                user_allow: vec![rule("172.16.0.0/12:22")],
                user_deny: vec![rule("10.0.0.66")],
                ..GroupRules::default()
            },
        );
        let bob = user("bob", &["bob"]);
        assert!(policy.check_backend(&alice, at("172.16.1.1:22")).is_ok());
        assert!(policy.check_backend(&bob, at("172.16.1.1:22")).is_err());
        let group_deny = policy
            .check_backend(&alice, at("10.0.0.66:60001"))
            .unwrap_err();
        assert!(group_deny.contains("[group.ops] user_deny"), "{group_deny}");
        assert!(policy.check_backend(&bob, at("10.0.0.66:60001")).is_ok());
        // Root is held to nothing, deny rules included.
        assert!(
            policy
                .check_backend(&Owner::root(), at("10.9.1.1:1"))
                .is_ok()
        );
    }

    #[test]
    fn quotas_resolve_user_then_most_generous_group_then_default() {
        let mut policy = UserPolicy::new(QUOTA);
        let alice = user("alice", &["alice", "ops", "dev"]);
        let q = policy.quota_for(&alice);
        assert_eq!(
            q.max_sessions.value,
            crate::config::defaults::USER_MAX_SESSIONS
        );
        assert!(q.max_sessions.source.starts_with("user_max_sessions"));
        assert_eq!(policy.quota_for(&Owner::root()), UserQuota::unlimited());

        let group = |max_sessions, max_flows| GroupRules {
            max_sessions: Some(max_sessions),
            max_flows: Some(max_flows),
            ..GroupRules::default()
        };
        policy.groups.insert("ops".into(), group(20, 0));
        policy.groups.insert("dev".into(), group(30, 50));
        policy.groups.insert("other".into(), group(99, 99));
        let q = policy.quota_for(&alice);
        assert_eq!(
            q.max_sessions,
            Limit {
                value: 30,
                source: "[group.dev] max_sessions".into()
            }
        );
        assert_eq!(q.max_flows.value, 0, "0 (unlimited) is the most generous");
        assert_eq!(q.max_flows.source, "[group.ops] max_flows");
        assert!(
            q.new_flows_per_sec
                .source
                .starts_with("user_new_flows_per_sec")
        );

        policy.users.insert(
            "alice".into(),
            QuotaOverride {
                max_sessions: Some(2),
                ..QuotaOverride::default()
            },
        );
        let q = policy.quota_for(&alice);
        assert_eq!(q.max_sessions.value, 2, "the user's own override wins");
        assert_eq!(q.max_sessions.source, "[user.alice] max_sessions");
        assert!(!q.max_sessions.has_room(2) && q.max_sessions.has_room(1));
        assert!(q.max_flows.has_room(1_000_000));
    }

    #[test]
    fn port_sets_print_as_parsed() {
        for text in ["22", "22,60000-60100", "1-65535"] {
            assert_eq!(text.parse::<PortSet>().unwrap().to_string(), text);
        }
    }
}

//! Who may map what: miniupnpd's permission rules, same syntax and same
//! reading (`allow|deny EXTERNAL_PORTS HOST[/MASK] INTERNAL_PORTS`, the first
//! rule that matches decides, no match denies), so an operator can carry a
//! miniupnpd.conf's `allow`/`deny` lines over unchanged.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::ports::PortRange;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// One `allow|deny` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde_with::DeserializeFromStr)]
pub struct Rule {
    pub verdict: Verdict,
    pub external_ports: PortRange,
    pub host: Ipv4Addr,
    pub prefix_len: u8,
    pub internal_ports: PortRange,
}

impl Rule {
    /// Hosts of `subnet/prefix_len`, any internal port, external ports in `external`.
    pub fn allow_subnet(external: PortRange, subnet: Ipv4Addr, prefix_len: u8) -> Self {
        Self {
            verdict: Verdict::Allow,
            external_ports: external,
            host: mask(subnet, prefix_len),
            prefix_len,
            internal_ports: PortRange { lo: 1, hi: 65535 },
        }
    }

    pub fn matches(&self, external_port: u16, host: Ipv4Addr, internal_port: u16) -> bool {
        self.external_ports.contains(external_port)
            && mask(host, self.prefix_len) == self.host
            && self.internal_ports.contains(internal_port)
    }
}

fn mask(address: Ipv4Addr, prefix_len: u8) -> Ipv4Addr {
    let bits = u32::from(address);
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    Ipv4Addr::from(bits & mask)
}

/// The verdict of the first matching rule; none matching denies (as miniupnpd).
pub fn check(rules: &[Rule], external_port: u16, host: Ipv4Addr, internal_port: u16) -> Verdict {
    rules
        .iter()
        .find(|rule| rule.matches(external_port, host, internal_port))
        .map_or(Verdict::Deny, |rule| rule.verdict)
}

/// "60000", "60000-60999"; 0 is allowed, as in miniupnpd's `0-65535`.
fn ports(text: &str, what: &str, line: &str) -> Result<PortRange, String> {
    let bad =
        || format!("{what} {text:?} in rule {line:?} is not a port or a range LO-HI (0-65535)");
    let (lo, hi) = text.split_once('-').unwrap_or((text, text));
    let lo: u16 = lo.trim().parse().map_err(|_| bad())?;
    let hi: u16 = hi.trim().parse().map_err(|_| bad())?;
    if lo > hi {
        return Err(bad());
    }
    Ok(PortRange { lo, hi })
}

impl FromStr for Rule {
    type Err = String;

    fn from_str(line: &str) -> Result<Self, Self::Err> {
        let usage = "a rule reads `allow|deny EXTERNAL_PORTS HOST[/MASK] INTERNAL_PORTS`, \
                     e.g. `allow 60000-60999 192.168.1.0/24 1024-65535`";
        let words: Vec<&str> = line.split_whitespace().collect();
        let [verdict, external, host, internal] = words[..] else {
            return Err(format!("{line:?}: {usage}"));
        };
        let verdict = match verdict {
            "allow" => Verdict::Allow,
            "deny" => Verdict::Deny,
            other => return Err(format!("{other:?} in rule {line:?}: {usage}")),
        };
        let (address, prefix_len) = match host.split_once('/') {
            None => (host, 32),
            Some((address, mask_text)) => {
                let prefix_len = match mask_text.parse::<u8>() {
                    Ok(len) if len <= 32 => len,
                    Ok(_) => return Err(format!("mask /{mask_text} in rule {line:?} is over 32")),
                    // miniupnpd also takes a dotted mask (192.168.1.0/255.255.255.0).
                    Err(_) => {
                        let dotted: Ipv4Addr = mask_text
                            .parse()
                            .map_err(|_| format!("mask {mask_text:?} in rule {line:?}: {usage}"))?;
                        let bits = u32::from(dotted);
                        if bits.leading_ones() + bits.trailing_zeros() != 32 {
                            return Err(format!(
                                "mask {mask_text} in rule {line:?} is not contiguous"
                            ));
                        }
                        bits.leading_ones() as u8
                    }
                };
                (address, prefix_len)
            }
        };
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("host {address:?} in rule {line:?} is not an IPv4 address"))?;
        Ok(Rule {
            verdict,
            external_ports: ports(external, "external ports", line)?,
            host: mask(address, prefix_len),
            prefix_len,
            internal_ports: ports(internal, "internal ports", line)?,
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = match self.verdict {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
        };
        write!(
            f,
            "{verdict} {} {}/{} {}",
            self.external_ports, self.host, self.prefix_len, self.internal_ports
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_miniupnpd_lines() {
        let rule: Rule = "allow 1024-65535 192.168.0.0/24 1024-65535"
            .parse()
            .unwrap();
        assert_eq!(rule.verdict, Verdict::Allow);
        assert_eq!(rule.prefix_len, 24);
        assert_eq!(
            rule.to_string(),
            "allow 1024-65535 192.168.0.0/24 1024-65535"
        );
        let dotted: Rule = "deny 22 10.1.2.3/255.255.0.0 22".parse().unwrap();
        assert_eq!(dotted.host, Ipv4Addr::new(10, 1, 0, 0));
        assert_eq!(dotted.prefix_len, 16);
        let single: Rule = "allow 60000 10.0.0.5 60001".parse().unwrap();
        assert_eq!(single.prefix_len, 32);
        let all: Rule = "deny 0-65535 0.0.0.0/0 0-65535".parse().unwrap();
        assert!(all.matches(0, Ipv4Addr::new(1, 2, 3, 4), 65535));
        assert!(single.matches(60000, Ipv4Addr::new(10, 0, 0, 5), 60001));
        assert!(!single.matches(60000, Ipv4Addr::new(10, 0, 0, 6), 60001));
    }

    #[test]
    fn refuses_malformed_lines_with_the_syntax() {
        for line in [
            "",
            "permit 1 10.0.0.0/8 1",
            "allow 1 10.0.0.0/33 1",
            "allow 1 10.0.0.0/255.0.255.0 1",
            "allow 2-1 10.0.0.0/8 1",
            "allow 70000 10.0.0.0/8 1",
            "allow 1 host 1",
            "allow 1 10.0.0.0/8",
        ] {
            assert!(line.parse::<Rule>().is_err(), "{line:?} parsed");
        }
        let error = "allow 1-x 10.0.0.0/8 1".parse::<Rule>().unwrap_err();
        assert!(error.contains("external ports"), "{error}");
    }

    #[test]
    fn first_match_decides_and_none_denies() {
        let rules: Vec<Rule> = [
            "deny 60022 10.0.0.0/24 1-65535",
            "allow 60000-60999 10.0.0.0/24 1024-65535",
        ]
        .iter()
        .map(|line| line.parse().unwrap())
        .collect();
        let host = Ipv4Addr::new(10, 0, 0, 7);
        assert_eq!(check(&rules, 60022, host, 5000), Verdict::Deny);
        assert_eq!(check(&rules, 60023, host, 5000), Verdict::Allow);
        assert_eq!(check(&rules, 60023, host, 80), Verdict::Deny);
        assert_eq!(
            check(&rules, 60023, Ipv4Addr::new(10, 0, 1, 7), 5000),
            Verdict::Deny
        );
        assert_eq!(check(&[], 60023, host, 5000), Verdict::Deny);
        let everyone = Rule::allow_subnet(PortRange { lo: 1, hi: 65535 }, host, 0);
        assert!(everyone.matches(1, Ipv4Addr::new(1, 2, 3, 4), 9));
    }
}

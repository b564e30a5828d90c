//! `slirp4netns:` options, parsed as podman parses them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netaddr::Ipv4Net;

use crate::Error;

/// podman's default MTU for slirp4netns (the maximum is 65521).
pub const DEFAULT_MTU: u32 = 65520;
/// The smallest MTU podman accepts (the IPv4 minimum).
pub const MIN_MTU: u32 = 68;
/// The largest MTU slirp4netns accepts.
pub const MAX_MTU: u32 = 65521;

/// The options of one slirp4netns instance.
///
/// Built by [`parse_options`] from the engine's options followed by the container's;
/// the [`Default`] is podman's: host loopback disabled, MTU 65520, IPv6 on, ports
/// forwarded by rootlessport (not slirp4netns), sandbox allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlirpOptions {
    /// `cidr=`: the IPv4 network of the virtual LAN (default 10.0.2.0/24).
    pub cidr: Option<Ipv4Net>,
    /// `allow_host_loopback=false` (the default): the guest cannot reach the host's 127.0.0.1.
    pub disable_host_loopback: bool,
    /// `enable_ipv6=`: give the guest fd00::/64.
    pub enable_ipv6: bool,
    /// `port_handler=slirp4netns`: publish ports through slirp4netns's API socket
    /// instead of the rootlessport helper.
    pub is_slirp_host_forward: bool,
    /// From the engine config: do not pass `--enable-sandbox` (it needs `pivot_root`).
    pub no_pivot_root: bool,
    /// `mtu=`: the tap's MTU.
    pub mtu: u32,
    /// `outbound_addr=`: an IPv4 address or an interface name for outgoing traffic.
    pub outbound_addr: Option<String>,
    /// `outbound_addr6=`: an IPv6 address or an interface name for outgoing traffic.
    pub outbound_addr6: Option<String>,
}

impl Default for SlirpOptions {
    fn default() -> Self {
        SlirpOptions {
            cidr: None,
            disable_host_loopback: true,
            enable_ipv6: true,
            is_slirp_host_forward: false,
            no_pivot_root: false,
            mtu: DEFAULT_MTU,
            outbound_addr: None,
            outbound_addr6: None,
        }
    }
}

impl SlirpOptions {
    /// The defaults, with `no_pivot_root` taken from the engine configuration.
    pub fn with_no_pivot_root(no_pivot_root: bool) -> Self {
        SlirpOptions {
            no_pivot_root,
            ..Self::default()
        }
    }

    /// The IPv4 subnet in use: `cidr` or slirp4netns's default.
    pub fn subnet(&self) -> Ipv4Net {
        self.cidr.unwrap_or_else(netaddr::default_subnet)
    }

    /// Apply `opts` (each `key=value`) on top of `self`, later keys winning.
    ///
    /// # Errors
    ///
    /// As [`parse_options`]. The options before the failing one are applied already.
    pub fn apply<I, S>(&mut self, opts: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        for opt in opts {
            self.apply_one(opt.as_ref())?;
        }
        Ok(())
    }

    fn apply_one(&mut self, opt: &str) -> Result<(), Error> {
        let Some((key, value)) = opt.split_once('=') else {
            return Err(Error::UnknownOption(opt.to_owned()));
        };
        match key {
            "cidr" => self.cidr = Some(parse_cidr(value)?),
            "port_handler" => {
                self.is_slirp_host_forward = match value {
                    "slirp4netns" => true,
                    "rootlesskit" => false,
                    _ => return Err(Error::UnknownPortHandler(value.to_owned())),
                }
            }
            "allow_host_loopback" => {
                self.disable_host_loopback = !parse_bool(value)
                    .ok_or_else(|| Error::InvalidAllowHostLoopback(value.to_owned()))?
            }
            "enable_ipv6" => {
                self.enable_ipv6 =
                    parse_bool(value).ok_or_else(|| Error::InvalidEnableIpv6(value.to_owned()))?
            }
            "outbound_addr" => {
                if !(parse_go_ipv4(value).is_some() || interface_exists(value)) {
                    return Err(Error::InvalidOutboundAddr(value.to_owned()));
                }
                self.outbound_addr = Some(value.to_owned());
            }
            "outbound_addr6" => {
                if !(parse_go_ipv6(value).is_some() || interface_exists(value)) {
                    return Err(Error::InvalidOutboundAddr6(value.to_owned()));
                }
                self.outbound_addr6 = Some(value.to_owned());
            }
            "mtu" => self.mtu = parse_mtu(value)?,
            _ => return Err(Error::UnknownOption(opt.to_owned())),
        }
        Ok(())
    }
}

/// Parse podman-style slirp4netns options (engine options first, then the
/// container's) on top of the defaults ([`SlirpOptions::default`]), as podman's
/// `parseSlirp4netnsNetworkOptions` (`libpod/networking_slirp4netns.go`) does: each
/// one `key=value`, the keys `cidr`, `port_handler`, `allow_host_loopback`,
/// `enable_ipv6`, `outbound_addr`, `outbound_addr6` and `mtu`.
///
/// ```
/// let o = slirp_config::parse_options(["mtu=1500", "allow_host_loopback=true"]).unwrap();
/// assert_eq!(o.mtu, 1500);
/// assert!(!o.disable_host_loopback);
/// let e = slirp_config::parse_options(["mtu=big"]).unwrap_err();
/// assert_eq!(e.to_string(), r#"invalid mtu "big""#);
/// ```
///
/// # Errors
///
/// The first option that fails, with podman's text: [`Error::UnknownOption`] for an
/// item without `=` or with an unknown key, else the `Invalid...` variant of its key
/// ([`Error::InvalidMtu`], [`Error::InvalidCidr`], ...).
pub fn parse_options<I, S>(opts: I) -> Result<SlirpOptions, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut o = SlirpOptions::default();
    o.apply(opts)?;
    Ok(o)
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

/// An IPv4 CIDR as Go's `net.ParseCIDR` accepts it, host bits kept (podman passes
/// the string on unchanged). IPv4-mapped IPv6 CIDRs count as IPv4 in Go.
fn parse_cidr(v: &str) -> Result<Ipv4Net, Error> {
    let bad = || Error::InvalidCidr(v.to_owned());
    let (addr, prefix) = v.split_once('/').ok_or_else(bad)?;
    let prefix = parse_go_decimal(prefix).ok_or_else(bad)?;
    if let Ok(a) = addr.parse::<Ipv4Addr>() {
        return Ipv4Net::new(a, u8::try_from(prefix).map_err(|_| bad())?).map_err(|_| bad());
    }
    // Go keeps "::ffff:a.b.c.d/N" (N >= 96) as an IPv4 network of prefix N - 96.
    let a = addr.parse::<Ipv6Addr>().map_err(|_| bad())?;
    let v4 = a.to_ipv4_mapped().ok_or_else(bad)?;
    let p = prefix
        .checked_sub(96)
        .filter(|_| prefix <= 128)
        .ok_or_else(bad)?;
    Ipv4Net::new(v4, u8::try_from(p).map_err(|_| bad())?).map_err(|_| bad())
}

/// Go's CIDR prefix: decimal digits only, no sign, no leading '+'.
fn parse_go_decimal(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// An IPv4 address as Go's `net.ParseIP(v).To4() != nil` accepts it.
fn parse_go_ipv4(v: &str) -> Option<Ipv4Addr> {
    match v.parse::<IpAddr>().ok()? {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// An IPv6 address as Go's `net.ParseIP(v)` with `To4() == nil` accepts it.
fn parse_go_ipv6(v: &str) -> Option<Ipv6Addr> {
    match v.parse::<IpAddr>().ok()? {
        IpAddr::V6(a) if a.to_ipv4_mapped().is_none() => Some(a),
        _ => None,
    }
}

/// Whether a network interface of that name exists in the caller's network namespace.
fn interface_exists(name: &str) -> bool {
    // Names the kernel could never have: skip the lookup (and any odd bytes).
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', '\0'])
        || name.contains(char::is_whitespace)
    {
        return false;
    }
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Go's `strconv.Atoi` followed by podman's `< 68` check; we also refuse what
/// slirp4netns itself would refuse (> 65521) so the error comes before the launch.
fn parse_mtu(v: &str) -> Result<u32, Error> {
    // u32's parser takes what Atoi takes here: an optional '+', leading zeros;
    // a '-' or an overflow is an error, as a negative value is for podman.
    match v.parse::<u32>() {
        Ok(mtu) if (MIN_MTU..=MAX_MTU).contains(&mtu) => Ok(mtu),
        _ => Err(Error::InvalidMtu(v.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(opts: &[&str]) -> String {
        parse_options(opts).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_podmans() {
        let o = parse_options(Vec::<String>::new()).unwrap();
        assert_eq!(o, SlirpOptions::default());
        assert!(o.disable_host_loopback);
        assert_eq!(o.mtu, 65520);
        assert!(o.enable_ipv6);
        assert!(!o.is_slirp_host_forward);
        assert!(!o.no_pivot_root);
        assert_eq!(o.cidr, None);
        assert_eq!(o.subnet().to_string(), "10.0.2.0/24");
    }

    #[test]
    fn every_option_accepted() {
        let o = parse_options([
            "cidr=10.5.0.0/16",
            "port_handler=slirp4netns",
            "allow_host_loopback=true",
            "enable_ipv6=false",
            "outbound_addr=192.0.2.7",
            "outbound_addr6=2001:db8::7",
            "mtu=1500",
        ])
        .unwrap();
        assert_eq!(o.cidr, Some("10.5.0.0/16".parse().unwrap()));
        assert!(o.is_slirp_host_forward);
        assert!(!o.disable_host_loopback);
        assert!(!o.enable_ipv6);
        assert_eq!(o.outbound_addr.as_deref(), Some("192.0.2.7"));
        assert_eq!(o.outbound_addr6.as_deref(), Some("2001:db8::7"));
        assert_eq!(o.mtu, 1500);
    }

    #[test]
    fn later_options_override_earlier() {
        let engine = [
            "mtu=1500",
            "port_handler=slirp4netns",
            "allow_host_loopback=true",
        ];
        let container = [
            "mtu=9000",
            "port_handler=rootlesskit",
            "allow_host_loopback=false",
        ];
        let o = parse_options(engine.iter().chain(container.iter())).unwrap();
        assert_eq!(o.mtu, 9000);
        assert!(!o.is_slirp_host_forward);
        assert!(o.disable_host_loopback);
        let o = parse_options(["enable_ipv6=false", "enable_ipv6=true"]).unwrap();
        assert!(o.enable_ipv6);
    }

    #[test]
    fn value_table() {
        // (option, accepted?)
        let table: &[(&str, bool)] = &[
            ("cidr=10.0.2.0/24", true),
            ("cidr=10.0.2.5/24", true),
            ("cidr=192.168.0.0/16", true),
            ("cidr=0.0.0.0/0", true),
            ("cidr=10.0.0.0/32", true),
            ("cidr=::ffff:10.1.0.0/112", true),
            ("cidr=10.0.0.0/33", false),
            ("cidr=10.0.0.0", false),
            ("cidr=10.0.0.0/", false),
            ("cidr=10.0.0.0/+8", false),
            ("cidr=010.0.0.0/8", false),
            ("cidr=fd00::/64", false),
            ("cidr=", false),
            ("port_handler=slirp4netns", true),
            ("port_handler=rootlesskit", true),
            ("port_handler=Slirp4netns", false),
            ("port_handler=", false),
            ("allow_host_loopback=true", true),
            ("allow_host_loopback=false", true),
            ("allow_host_loopback=1", false),
            ("allow_host_loopback=TRUE", false),
            ("enable_ipv6=true", true),
            ("enable_ipv6=false", true),
            ("enable_ipv6=yes", false),
            ("outbound_addr=10.1.2.3", true),
            ("outbound_addr=::ffff:10.1.2.3", true),
            ("outbound_addr=lo", true),
            ("outbound_addr=fd00::1", false),
            ("outbound_addr=no-such-if0", false),
            ("outbound_addr=", false),
            ("outbound_addr6=fd00::1", true),
            ("outbound_addr6=lo", true),
            ("outbound_addr6=10.1.2.3", false),
            ("outbound_addr6=::ffff:10.1.2.3", false),
            ("outbound_addr6=../../etc", false),
            ("mtu=68", true),
            ("mtu=1500", true),
            ("mtu=+1500", true),
            ("mtu=01500", true),
            ("mtu=65520", true),
            ("mtu=65521", true),
            ("mtu=65522", false),
            ("mtu=67", false),
            ("mtu=0", false),
            ("mtu=-1500", false),
            ("mtu=1e3", false),
            ("mtu=99999999999999999999", false),
            ("mtu=", false),
            ("mtu= 1500", false),
        ];
        for (opt, ok) in table {
            assert_eq!(parse_options([opt]).is_ok(), *ok, "{opt}");
        }
    }

    #[test]
    fn error_texts_are_podmans() {
        let table: &[(&[&str], &str)] = &[
            (&["mtu"], r#"unknown option for slirp4netns: "mtu""#),
            (&[""], r#"unknown option for slirp4netns: """#),
            (&["bogus=1"], r#"unknown option for slirp4netns: "bogus=1""#),
            (
                &["MTU=1500"],
                r#"unknown option for slirp4netns: "MTU=1500""#,
            ),
            (&["cidr=10.0.2.0"], r#"invalid cidr "10.0.2.0""#),
            (&["cidr=fd00::/64"], r#"invalid cidr "fd00::/64""#),
            (
                &["port_handler=foo"],
                r#"unknown port_handler for slirp4netns: "foo""#,
            ),
            (
                &["allow_host_loopback=yes"],
                r#"invalid value of allow_host_loopback for slirp4netns: "yes""#,
            ),
            (
                &["enable_ipv6=no"],
                r#"invalid value of enable_ipv6 for slirp4netns: "no""#,
            ),
            (
                &["outbound_addr=fd00::1"],
                r#"invalid outbound_addr "fd00::1""#,
            ),
            (
                &["outbound_addr6=1.2.3.4"],
                r#"invalid outbound_addr6: "1.2.3.4""#,
            ),
            (&["mtu=12"], r#"invalid mtu "12""#),
            (&["mtu=abc"], r#"invalid mtu "abc""#),
            (&["mtu=70000"], r#"invalid mtu "70000""#),
            // Values are quoted the Go way.
            (&["mtu=a\"b"], r#"invalid mtu "a\"b""#),
            (&["cidr=a\\b\t"], r#"invalid cidr "a\\b\t""#),
            // The first bad option stops parsing; the value after '=' may hold '='.
            (
                &["mtu=1500", "port_handler=a=b", "mtu=1"],
                r#"unknown port_handler for slirp4netns: "a=b""#,
            ),
        ];
        for (opts, want) in table {
            assert_eq!(err(opts), *want, "{opts:?}");
        }
    }

    #[test]
    fn cidr_keeps_host_bits_as_given() {
        let o = parse_options(["cidr=10.0.2.5/24"]).unwrap();
        assert_eq!(o.cidr.unwrap().to_string(), "10.0.2.5/24");
        let o = parse_options(["cidr=::ffff:10.1.0.0/112"]).unwrap();
        assert_eq!(o.cidr.unwrap().to_string(), "10.1.0.0/16");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(opts in proptest::collection::vec(".{0,40}", 0..6)) {
            let _ = parse_options(&opts);
        }

        #[test]
        fn mtu_in_range_roundtrips(mtu in MIN_MTU..=MAX_MTU) {
            proptest::prop_assert_eq!(parse_options([format!("mtu={mtu}")]).unwrap().mtu, mtu);
        }
    }
}

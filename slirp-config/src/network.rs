//! The user-facing network string, `slirp4netns[:k=v,k=v...]`.

use crate::Error;

/// Split `slirp4netns:k=v,k=v` into its options, ready for [`crate::parse_options`].
///
/// `slirp4netns` and `slirp4netns:` have no options. Empty items between commas are
/// kept so that [`crate::parse_options`] reports them as podman does.
///
/// ```
/// let opts = slirp_config::parse_network("slirp4netns:mtu=1500,cidr=10.5.0.0/16").unwrap();
/// assert_eq!(opts, ["mtu=1500", "cidr=10.5.0.0/16"]);
/// assert!(slirp_config::parse_network("slirp4netns:").unwrap().is_empty());
/// ```
///
/// The options are not checked here; podman splits them off its `--network` value the
/// same way (`pkg/specgen` `ParseNetworkFlag`) before `parse_options` sees them.
///
/// # Errors
///
/// [`Error::NotSlirpNetwork`] for any other network mode (`bridge`, `pasta`, ...).
pub fn parse_network(network: &str) -> Result<Vec<String>, Error> {
    match network.split_once(':') {
        None if network == "slirp4netns" => Ok(Vec::new()),
        Some(("slirp4netns", "")) => Ok(Vec::new()),
        Some(("slirp4netns", opts)) => Ok(opts.split(',').map(str::to_owned).collect()),
        _ => Err(Error::NotSlirpNetwork(network.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_options;

    #[test]
    fn shapes() {
        assert!(parse_network("slirp4netns").unwrap().is_empty());
        assert!(parse_network("slirp4netns:").unwrap().is_empty());
        assert_eq!(parse_network("slirp4netns:mtu=1500").unwrap(), ["mtu=1500"]);
        assert_eq!(
            parse_network("slirp4netns:port_handler=slirp4netns,enable_ipv6=false").unwrap(),
            ["port_handler=slirp4netns", "enable_ipv6=false"]
        );
        // A value may hold ':'.
        assert_eq!(
            parse_network("slirp4netns:outbound_addr6=fd00::1").unwrap(),
            ["outbound_addr6=fd00::1"]
        );
        assert_eq!(
            parse_network("slirp4netns:a=b,,c=d").unwrap(),
            ["a=b", "", "c=d"]
        );
    }

    #[test]
    fn not_slirp() {
        for bad in [
            "",
            "bridge",
            "pasta:-T,80",
            "slirp4netnsx",
            "slirp4netns2:mtu=1",
            "Slirp4netns",
        ] {
            let e = parse_network(bad).unwrap_err().to_string();
            assert!(e.starts_with("network mode \""), "{e}");
            assert!(e.contains("is not slirp4netns"), "{e}");
        }
        assert_eq!(
            parse_network("bridge").unwrap_err().to_string(),
            r#"network mode "bridge" is not slirp4netns (expected "slirp4netns" or "slirp4netns:OPTIONS")"#
        );
    }

    #[test]
    fn through_to_options() {
        let o =
            parse_options(parse_network("slirp4netns:mtu=9000,allow_host_loopback=true").unwrap())
                .unwrap();
        assert_eq!(o.mtu, 9000);
        assert!(!o.disable_host_loopback);
        let e = parse_options(parse_network("slirp4netns:mtu=9000,,").unwrap()).unwrap_err();
        assert_eq!(e.to_string(), r#"unknown option for slirp4netns: """#);
    }
}

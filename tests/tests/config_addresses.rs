//! slirp-config options feeding netaddr: what an engine computes before it launches.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use proptest::prelude::*;
use slirp_config::parse_options;

fn addresses(opts: &[&str]) -> Result<[String; 3], String> {
    let o = parse_options(opts).map_err(|e| e.to_string())?;
    let s = o.cidr;
    let f = |r: Result<std::net::Ipv4Addr, netaddr::Error>| {
        r.map(|a| a.to_string()).map_err(|e| e.to_string())
    };
    Ok([
        f(netaddr::slirp4netns_ip(s.as_ref()))?,
        f(netaddr::slirp4netns_gateway(s.as_ref()))?,
        f(netaddr::slirp4netns_dns(s.as_ref()))?,
    ])
}

#[test]
fn default_and_custom_cidr() {
    assert_eq!(
        addresses(&[]).unwrap(),
        ["10.0.2.100", "10.0.2.2", "10.0.2.3"]
    );
    assert_eq!(
        addresses(&["cidr=10.88.0.0/16"]).unwrap(),
        ["10.88.0.100", "10.88.0.2", "10.88.0.3"]
    );
    // Host bits in the option are kept for slirp4netns but ignored by the arithmetic.
    assert_eq!(
        addresses(&["cidr=192.168.9.200/24"]).unwrap(),
        ["192.168.9.100", "192.168.9.2", "192.168.9.3"]
    );
}

#[test]
fn errors_reach_the_user_in_podmans_words() {
    assert_eq!(
        addresses(&["cidr=10.0.2.0/28"]).unwrap_err(),
        "calculated ip address 10.0.2.100 is not within given subnet 10.0.2.0/28"
    );
    assert_eq!(
        addresses(&["cidr=10.0.2.0/33"]).unwrap_err(),
        r#"invalid cidr "10.0.2.0/33""#
    );
}

#[test]
fn subnet_helper_matches_netaddr_default() {
    let o = parse_options(Vec::<&str>::new()).unwrap();
    assert_eq!(o.subnet(), netaddr::default_subnet());
}

proptest! {
    #[test]
    fn any_accepted_cidr_gives_addresses_inside_or_a_clear_error(a in any::<[u8; 4]>(), p in 0u8..=32) {
        let cidr = format!("cidr={}.{}.{}.{}/{}", a[0], a[1], a[2], a[3], p);
        let o = parse_options([&cidr]).unwrap();
        let subnet = o.cidr.unwrap();
        match netaddr::slirp4netns_ip(Some(&subnet)) {
            Ok(ip) => prop_assert!(subnet.contains(&ip)),
            Err(e) => prop_assert!(e.to_string().contains("is not within given subnet")
                || e.to_string().starts_with("integer overflow")),
        }
    }
}

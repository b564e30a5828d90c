//! Tests that need the harness: the namespaces it makes and the system programs it
//! installs. Run by `cargo xtask itest`.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::process::Command;

use slirp_config::{build_args, check_slirp_flags, slirp_version, SlirpFeatures, SlirpOptions};
use tests::{fixture, require_harness, slirp4netns};

#[test]
#[ignore = "itest: needs the cargo xtask itest namespaces"]
fn harness_gives_a_private_network_namespace() {
    require_harness();
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    let init = std::fs::read_link("/proc/1/ns/net");
    // PID 1 is the host's init: we must not share its network namespace.
    if let Ok(init) = init {
        assert_ne!(own, init, "tests run in the host's network namespace");
    }
    let out = Command::new("ip")
        .args(["-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(str::trim))
        .collect();
    assert_eq!(names, ["lo"], "a fresh netns has only loopback: {links}");
    assert!(
        links.contains("UP"),
        "the harness brings loopback up: {links}"
    );
    // Loopback really works: a TCP round trip on 127.0.0.1.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let c = std::net::TcpStream::connect(addr).unwrap();
    drop((c, l.accept().unwrap()));
}

#[test]
#[ignore = "itest: needs slirp4netns installed"]
fn installed_slirp4netns_features() {
    require_harness();
    let bin = slirp4netns();
    let f = check_slirp_flags(&bin).unwrap();
    let v = slirp_version(&bin).unwrap();
    let (major, minor, _) = v.numeric().expect("numeric slirp4netns version");
    // Whatever the version, podman's default arguments must build.
    assert!(
        f.has_mtu && f.has_ipv6 && f.has_disable_host_loopback,
        "{f:?}"
    );
    build_args(&SlirpOptions::default(), &f).unwrap();
    if (major, minor) >= (1, 0) {
        assert!(f.has_netns_type && f.has_enable_sandbox, "{f:?}");
    }
    // The installed 1.2.x must look exactly like the captured help text.
    if (major, minor) == (1, 2) {
        let help = std::fs::read_to_string(fixture("slirp4netns-1.2.0-help.txt")).unwrap();
        assert_eq!(f, SlirpFeatures::from_help(&help));
        assert!(
            v.libslirp.is_some() && v.slirp_config_version_max.is_some(),
            "{v:?}"
        );
    }
    // The raw --help text agrees with what the probe saw.
    let out = Command::new(&bin).arg("--help").output().unwrap();
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    assert_eq!(SlirpFeatures::from_help(&text), f);
}

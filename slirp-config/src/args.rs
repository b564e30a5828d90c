//! The slirp4netns command line, in podman's order.

use std::ffi::OsString;
use std::path::Path;

use crate::{Error, Netns, SlirpFeatures, SlirpOptions};

/// The option arguments for `opts` on a binary with `features`, in podman's order, up to
/// and including `--outbound-addr6` (see [`build_command_args`] for the whole line).
///
/// ```
/// use slirp_config::{build_args, SlirpFeatures, SlirpOptions};
/// let f = SlirpFeatures::from_help("--mtu --enable-ipv6 --disable-host-loopback");
/// let args = build_args(&SlirpOptions::default(), &f).unwrap();
/// assert_eq!(args, ["--disable-host-loopback", "--mtu=65520", "--enable-ipv6"]);
/// ```
///
/// podman's `createBasicSlirp4netnsCmdArgs` (`libpod/networking_slirp4netns.go`): an
/// option the binary lacks is left out when it is only an improvement (sandbox,
/// seccomp, MTU, host loopback) and refused when the user asked for it.
///
/// # Errors
///
/// [`Error::CidrNotSupported`], [`Error::EnableIpv6NotSupported`],
/// [`Error::OutboundAddrNotSupported`], [`Error::OutboundAddr6NotSupported`] for a
/// requested option the binary lacks; [`Error::OutboundAddr6NeedsIpv6`] for
/// `outbound_addr6` with IPv6 off.
pub fn build_args(opts: &SlirpOptions, features: &SlirpFeatures) -> Result<Vec<String>, Error> {
    let mut args = Vec::new();
    if opts.disable_host_loopback && features.has_disable_host_loopback {
        args.push("--disable-host-loopback".to_owned());
    }
    if features.has_mtu {
        args.push(format!("--mtu={}", opts.mtu));
    }
    if uses_sandbox(opts, features) {
        args.push("--enable-sandbox".to_owned());
    }
    if features.has_enable_seccomp {
        args.push("--enable-seccomp".to_owned());
    }
    if let Some(cidr) = &opts.cidr {
        if !features.has_cidr {
            return Err(Error::CidrNotSupported);
        }
        args.push(format!("--cidr={cidr}"));
    }
    if opts.enable_ipv6 {
        if !features.has_ipv6 {
            return Err(Error::EnableIpv6NotSupported);
        }
        args.push("--enable-ipv6".to_owned());
    }
    if let Some(addr) = &opts.outbound_addr {
        if !features.has_outbound_addr {
            return Err(Error::OutboundAddrNotSupported);
        }
        args.push(format!("--outbound-addr={addr}"));
    }
    if let Some(addr) = &opts.outbound_addr6 {
        if !features.has_outbound_addr || !features.has_ipv6 {
            return Err(Error::OutboundAddr6NotSupported);
        }
        if !opts.enable_ipv6 {
            return Err(Error::OutboundAddr6NeedsIpv6);
        }
        args.push(format!("--outbound-addr6={addr}"));
    }
    Ok(args)
}

/// Whether the binary runs with `--enable-sandbox`, and so needs its own mount namespace
/// (podman starts it in a new one then, as slirp4netns's sandbox pivots the root of the
/// mount namespace it is in).
pub fn uses_sandbox(opts: &SlirpOptions, features: &SlirpFeatures) -> bool {
    !opts.no_pivot_root && features.has_enable_sandbox
}

/// The fd slirp4netns gets the exit pipe's read end on (`-e 3`): it exits when the pipe
/// reaches end of file, i.e. when every write end (the engine's, the container
/// monitor's) is closed. podman hands the fds over in this order.
pub const EXIT_FD: i32 = 3;
/// The fd slirp4netns gets the ready pipe's write end on (`-r 4`): it writes to it once
/// `tap0` is configured, and closes it.
pub const READY_FD: i32 = 4;
/// The tap device slirp4netns creates in the namespace.
pub const TAP_NAME: &str = "tap0";

/// The whole argument list after the program name: [`build_args`], then
/// `-c -e 3 -r 4`, `--api-socket PATH` when given, `--userns-path=PATH` when given (a
/// caller without privilege over the netns joins its owning user namespace), then the
/// namespace and `tap0`.
///
/// A [`Netns::Path`] needs `--netns-type`; on older binaries the caller must
/// name a PID instead. The order is podman's `setupSlirp4netns`.
///
/// # Errors
///
/// As [`build_args`]; [`Error::UsernsPathNotSupported`] for `userns` on a binary
/// without `--userns-path`, [`Error::NetnsTypeNotSupported`] for a [`Netns::Path`] on
/// one without `--netns-type`.
pub fn build_command_args(
    opts: &SlirpOptions,
    features: &SlirpFeatures,
    api_socket: Option<&Path>,
    target: &Netns,
    userns: Option<&Path>,
) -> Result<Vec<OsString>, Error> {
    let mut args: Vec<OsString> = build_args(opts, features)?
        .into_iter()
        .map(OsString::from)
        .collect();
    args.extend(["-c", "-e", "3", "-r", "4"].iter().map(OsString::from));
    if let Some(sock) = api_socket {
        args.push("--api-socket".into());
        args.push(sock.into());
    }
    if let Some(userns) = userns {
        if !features.has_userns_path {
            return Err(Error::UsernsPathNotSupported);
        }
        let mut arg = OsString::from("--userns-path=");
        arg.push(userns);
        args.push(arg);
    }
    match target {
        Netns::Path(path) => {
            if !features.has_netns_type {
                return Err(Error::NetnsTypeNotSupported);
            }
            args.push("--netns-type=path".into());
            args.push(path.into());
        }
        Netns::Pid(pid) => args.push(pid.to_string().into()),
    }
    args.push(TAP_NAME.into());
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_options;

    const HELP_030: &str = include_str!("../fixtures/slirp4netns-0.3.0-help.txt");
    const HELP_100: &str = include_str!("../fixtures/slirp4netns-1.0.0-help.txt");
    const HELP_120: &str = include_str!("../fixtures/slirp4netns-1.2.0-help.txt");

    fn args(opts: &[&str], help: &str) -> Result<Vec<String>, String> {
        let o = parse_options(opts).map_err(|e| e.to_string())?;
        build_args(&o, &SlirpFeatures::from_help(help)).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_per_version() {
        assert_eq!(
            args(&[], HELP_120).unwrap(),
            [
                "--disable-host-loopback",
                "--mtu=65520",
                "--enable-sandbox",
                "--enable-seccomp",
                "--enable-ipv6"
            ]
        );
        assert_eq!(
            args(&[], HELP_100).unwrap(),
            [
                "--disable-host-loopback",
                "--mtu=65520",
                "--enable-sandbox",
                "--enable-seccomp",
                "--enable-ipv6"
            ]
        );
        // 0.3.0 has no sandbox and no seccomp: they are silently left out.
        assert_eq!(
            args(&[], HELP_030).unwrap(),
            ["--disable-host-loopback", "--mtu=65520", "--enable-ipv6"]
        );
        // A binary that advertises nothing: only IPv6 is asked for, and refused.
        assert_eq!(args(&[], "").unwrap_err(), "enable_ipv6 not supported");
        assert_eq!(
            args(&["enable_ipv6=false"], "").unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn every_option_in_podmans_order() {
        let all = [
            "cidr=10.9.0.0/16",
            "allow_host_loopback=false",
            "enable_ipv6=true",
            "outbound_addr=192.0.2.1",
            "outbound_addr6=2001:db8::1",
            "mtu=1500",
        ];
        assert_eq!(
            args(&all, HELP_120).unwrap(),
            [
                "--disable-host-loopback",
                "--mtu=1500",
                "--enable-sandbox",
                "--enable-seccomp",
                "--cidr=10.9.0.0/16",
                "--enable-ipv6",
                "--outbound-addr=192.0.2.1",
                "--outbound-addr6=2001:db8::1"
            ]
        );
    }

    #[test]
    fn loopback_and_sandbox_switches() {
        let help = HELP_120;
        let a = args(&["allow_host_loopback=true", "enable_ipv6=false"], help).unwrap();
        assert_eq!(a, ["--mtu=65520", "--enable-sandbox", "--enable-seccomp"]);
        let mut o = SlirpOptions::with_no_pivot_root(true);
        o.enable_ipv6 = false;
        let f = SlirpFeatures::from_help(help);
        assert!(!uses_sandbox(&o, &f));
        assert_eq!(
            build_args(&o, &f).unwrap(),
            ["--disable-host-loopback", "--mtu=65520", "--enable-seccomp"]
        );
        assert!(uses_sandbox(&SlirpOptions::default(), &f));
        assert!(!uses_sandbox(
            &SlirpOptions::default(),
            &SlirpFeatures::from_help(HELP_030)
        ));
    }

    #[test]
    fn cidr_keeps_the_given_text() {
        let a = args(&["cidr=10.9.0.7/16", "enable_ipv6=false"], HELP_120).unwrap();
        assert!(a.contains(&"--cidr=10.9.0.7/16".to_owned()), "{a:?}");
    }

    #[test]
    fn not_supported_errors() {
        // 0.3.0 has --cidr but no --outbound-addr.
        assert_eq!(
            args(&["outbound_addr=192.0.2.1"], HELP_030).unwrap_err(),
            "outbound_addr not supported"
        );
        assert_eq!(
            args(&["outbound_addr6=2001:db8::1"], HELP_030).unwrap_err(),
            "outbound_addr6 not supported"
        );
        assert_eq!(
            args(&["outbound_addr6=2001:db8::1"], HELP_100).unwrap_err(),
            "outbound_addr6 not supported"
        );
        assert_eq!(
            args(&["cidr=10.9.0.0/16"], "--mtu --enable-ipv6").unwrap_err(),
            "cidr not supported"
        );
        assert_eq!(
            args(&[], "--outbound-addr --mtu").unwrap_err(),
            "enable_ipv6 not supported"
        );
        // outbound_addr6 needs --enable-ipv6 in the binary as well as --outbound-addr.
        assert_eq!(
            args(
                &["enable_ipv6=false", "outbound_addr6=2001:db8::1"],
                "--outbound-addr --mtu"
            )
            .unwrap_err(),
            "outbound_addr6 not supported"
        );
        assert_eq!(
            args(
                &["enable_ipv6=false", "outbound_addr6=2001:db8::1"],
                HELP_120
            )
            .unwrap_err(),
            "enable_ipv6=true is required for outbound_addr6"
        );
        // The first failing check wins, in podman's order.
        assert_eq!(
            args(&["cidr=10.9.0.0/16", "outbound_addr=192.0.2.1"], "").unwrap_err(),
            "cidr not supported"
        );
    }

    #[test]
    fn full_command_line() {
        let f = SlirpFeatures::from_help(HELP_120);
        let o = parse_options(["enable_ipv6=false", "allow_host_loopback=true"]).unwrap();
        let a = build_command_args(
            &o,
            &f,
            Some(Path::new("/run/user/1000/slirp.sock")),
            &Netns::Path("/run/netns/x".into()),
            None,
        )
        .unwrap();
        let want: Vec<OsString> = [
            "--mtu=65520",
            "--enable-sandbox",
            "--enable-seccomp",
            "-c",
            "-e",
            "3",
            "-r",
            "4",
            "--api-socket",
            "/run/user/1000/slirp.sock",
            "--netns-type=path",
            "/run/netns/x",
            "tap0",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(a, want);

        let f = SlirpFeatures::from_help(HELP_030);
        let a = build_command_args(&o, &f, None, &Netns::Pid(4242), None).unwrap();
        let want: Vec<OsString> = ["--mtu=65520", "-c", "-e", "3", "-r", "4", "4242", "tap0"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(a, want);
        let e = build_command_args(&o, &f, None, &Netns::Path("/x".into()), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "netns-type=path not supported: this slirp4netns needs a PID"
        );
        let e =
            build_command_args(&o, &f, None, &Netns::Pid(1), Some(Path::new("/u"))).unwrap_err();
        assert_eq!(e.to_string(), "userns-path not supported");
        let f = SlirpFeatures::from_help(HELP_120);
        let a = build_command_args(
            &o,
            &f,
            None,
            &Netns::Path("/proc/7/ns/net".into()),
            Some(Path::new("/proc/7/ns/user")),
        )
        .unwrap();
        let tail: Vec<OsString> = a[a.len() - 4..].to_vec();
        let want: Vec<OsString> = [
            "--userns-path=/proc/7/ns/user",
            "--netns-type=path",
            "/proc/7/ns/net",
            "tap0",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(tail, want);
    }
}

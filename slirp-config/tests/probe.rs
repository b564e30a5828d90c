//! Feature probing against real executables: fake `slirp4netns` scripts in a temp dir.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use slirp_config::{build_args, check_slirp_flags, parse_options, slirp_version};

const HELP_030: &str = include_str!("../fixtures/slirp4netns-0.3.0-help.txt");
const HELP_120: &str = include_str!("../fixtures/slirp4netns-1.2.0-help.txt");

/// Install (atomically, by rename) a script at `path` that appends a line to `log`
/// every time it runs and prints `text` whatever its arguments.
fn install_fake(path: &Path, log: &Path, text: &str, exit: i32) {
    let body = format!(
        "#!/bin/sh\necho \"$@\" >> '{}'\ncat <<'TEXT_EOF'\n{}TEXT_EOF\nexit {}\n",
        log.display(),
        text,
        exit
    );
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, body).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn runs(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("slirp4netns");
    let log = dir.path().join("runs.log");
    (dir, bin, log)
}

#[test]
fn probes_once_and_again_after_replacement() {
    let (_dir, bin, log) = setup();
    install_fake(&bin, &log, HELP_120, 0);
    let f1 = check_slirp_flags(&bin).unwrap();
    assert!(f1.has_outbound_addr && f1.has_enable_sandbox);
    let f2 = check_slirp_flags(&bin).unwrap();
    assert_eq!(f1, f2);
    assert_eq!(runs(&log), 1, "second call must come from the cache");

    // An "upgrade" to a binary with other features: a new file at the same path.
    install_fake(&bin, &log, HELP_030, 0);
    let f3 = check_slirp_flags(&bin).unwrap();
    assert_eq!(runs(&log), 2, "a replaced binary must be probed again");
    assert!(!f3.has_enable_sandbox && !f3.has_outbound_addr && f3.has_cidr);
    check_slirp_flags(&bin).unwrap();
    assert_eq!(runs(&log), 2);
}

#[test]
fn not_supported_errors_from_a_real_probe() {
    let (_dir, bin, log) = setup();
    install_fake(&bin, &log, HELP_030, 0);
    let f = check_slirp_flags(&bin).unwrap();
    let o = parse_options(["outbound_addr=127.0.0.1"]).unwrap();
    assert_eq!(
        build_args(&o, &f).unwrap_err().to_string(),
        "outbound_addr not supported"
    );
    let o = parse_options(["outbound_addr6=::1"]).unwrap();
    assert_eq!(
        build_args(&o, &f).unwrap_err().to_string(),
        "outbound_addr6 not supported"
    );
    install_fake(&bin, &log, "-m, --mtu=MTU\n", 0);
    let f = check_slirp_flags(&bin).unwrap();
    assert_eq!(
        build_args(&parse_options(["cidr=10.1.0.0/16"]).unwrap(), &f)
            .unwrap_err()
            .to_string(),
        "cidr not supported"
    );
    assert_eq!(
        build_args(&parse_options(Vec::<&str>::new()).unwrap(), &f)
            .unwrap_err()
            .to_string(),
        "enable_ipv6 not supported"
    );
}

#[test]
fn failing_binary_reports_output_and_names_binary() {
    let (_dir, bin, log) = setup();
    install_fake(&bin, &log, "boom: cannot start\n", 3);
    let e = check_slirp_flags(&bin).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "slirp4netns \"boom: cannot start\\n\": {} --help: exit status: 3",
            bin.display()
        )
    );
    // A failure is not cached: once fixed, the binary works.
    install_fake(&bin, &log, HELP_120, 0);
    assert!(check_slirp_flags(&bin).unwrap().has_ipv6);
}

#[test]
fn missing_and_unrunnable_binaries() {
    let (dir, _bin, _log) = setup();
    let missing = dir.path().join("nope");
    let e = check_slirp_flags(&missing).unwrap_err().to_string();
    assert!(e.starts_with("slirp4netns \"\": "), "{e}");
    assert!(e.contains(&missing.display().to_string()), "{e}");
    assert!(e.contains("No such file or directory"), "{e}");

    let noexec = dir.path().join("noexec");
    std::fs::write(&noexec, "#!/bin/sh\n").unwrap();
    let e = check_slirp_flags(&noexec).unwrap_err().to_string();
    assert!(e.contains("Permission denied"), "{e}");
    assert!(e.contains(&noexec.display().to_string()), "{e}");

    // The OS error is kept, to match on without reading the text.
    let errno = |bin: &Path| match check_slirp_flags(bin).unwrap_err() {
        slirp_config::Error::Probe {
            reason: slirp_config::ProbeFailure::Io(e),
            ..
        } => e.raw_os_error(),
        other => panic!("{other:?}"),
    };
    assert_eq!(errno(&missing), Some(nix::libc::ENOENT));
    assert_eq!(errno(&noexec), Some(nix::libc::EACCES));
}

#[test]
fn version_probe() {
    let (_dir, bin, log) = setup();
    install_fake(
        &bin,
        &log,
        include_str!("../fixtures/slirp4netns-1.2.0-version.txt"),
        0,
    );
    let v = slirp_version(&bin).unwrap();
    assert_eq!(v.numeric(), Some((1, 2, 0)));
    assert_eq!(v.libslirp.as_deref(), Some("4.7.0"));
    slirp_version(&bin).unwrap();
    assert_eq!(runs(&log), 1);

    install_fake(&bin, &log, "something else\n", 0);
    let e = slirp_version(&bin).unwrap_err().to_string();
    assert!(e.starts_with("cannot parse version output of "), "{e}");
    assert!(e.ends_with(r#": "something else\n""#), "{e}");
}

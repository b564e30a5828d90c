//! `rootlessport-ctl` against a real podman's container, shared by both tests: the
//! container publishes `A:80`; `add B:80` and `add U:53/udp` make the container
//! reachable on B (bytes echoed) and U (a UDP echo); `list` and `list --json` show the
//! three ports with the exact bytes the clients moved; `remove A:80` makes A refuse
//! while B still answers; `add 127.0.0.1:A:80/tcp4` publishes A again for IPv4 only
//! (listed as `tcp4`); an `add` whose output cannot be written (`> /dev/full`) says
//! that the port was published, and it was; with stdout closed nothing is done; an
//! `add` of a host port in use fails with one line naming the container, exit 1, and
//! publishes nothing (not even the free port asked for with it); `--container
//! nosuchname` fails with one line naming it, and a created container that never ran
//! is said to be not running.
//!
//! The ctl finds the socket as a user would: it resolves the name with podman (a
//! wrapper script giving podman this test's global options, passed as `--podman`)
//! and reads podman's `CONTAINERS_CONF`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{connect, lo, read_line, wait_for, wait_greeting, Podman, Report};

/// The host ports of the checks.
pub(super) struct CtlPorts {
    /// Published by podman (`-p A:80`), then removed with the ctl.
    pub a: u16,
    /// Added with the ctl (TCP).
    pub b: u16,
    /// Added with the ctl (UDP).
    pub u: u16,
    /// Held by a listener of this test: adding it must fail.
    pub busy: u16,
    /// Free, asked for together with `busy`: must not be published.
    pub free: u16,
}

/// What the ctl printed and its exit status.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Exit 0 and nothing on stderr: stdout.
    fn ok(self) -> Result<String, String> {
        if self.code == Some(0) && self.stderr.is_empty() {
            Ok(self.stdout)
        } else {
            Err(format!(
                "exit {:?}, stderr {:?}, stdout {:?}",
                self.code, self.stderr, self.stdout
            ))
        }
    }

    /// Exit 1, one line on stderr, nothing on stdout: that line.
    fn failed(self) -> Result<String, String> {
        if self.code == Some(1) && self.stdout.is_empty() && self.stderr.lines().count() == 1 {
            Ok(self.stderr.trim_end().to_owned())
        } else {
            Err(format!(
                "want exit 1 and one stderr line; exit {:?}, stderr {:?}, stdout {:?}",
                self.code, self.stderr, self.stdout
            ))
        }
    }
}

struct Ctl<'a> {
    bin: PathBuf,
    wrapper: PathBuf,
    podman: &'a Podman,
}

impl Ctl<'_> {
    fn run(&self, container: &str, args: &[&str]) -> Result<Out, String> {
        self.run_redirected(container, args, "")
    }

    /// As [`Ctl::run`], through `sh -c 'exec ... REDIRECT'` (`>&-`, `>/dev/full`)
    /// when `redirect` is not empty.
    fn run_redirected(
        &self,
        container: &str,
        args: &[&str],
        redirect: &str,
    ) -> Result<Out, String> {
        let mut c = if redirect.is_empty() {
            Command::new(&self.bin)
        } else {
            let mut c = Command::new("sh");
            c.args(["-c", &format!("exec \"$0\" \"$@\" {redirect}")])
                .arg(&self.bin);
            c
        };
        c.arg("--podman")
            .arg(&self.wrapper)
            .args(["--container", container])
            .args(args)
            .stdin(Stdio::null());
        for (k, v) in &self.podman.env {
            c.env(k, v);
        }
        let out = c
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.bin.display()))?;
        Ok(Out {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `list --json`, parsed.
    fn list_json(&self, container: &str) -> Result<Vec<serde_json::Value>, String> {
        let text = self.run(container, &["list", "--json"])?.ok()?;
        serde_json::from_str(&text).map_err(|e| format!("list --json is not JSON ({e}): {text:?}"))
    }
}

/// A script running podman with this test's global options (and its timeout).
fn write_wrapper(podman: &Podman, dir: &Path) -> Result<PathBuf, String> {
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut line = String::from("exec");
    if let Some(secs) = podman.timeout {
        line.push_str(&format!(" timeout -k 5 {secs}"));
    }
    line.push_str(" podman");
    for g in &podman.global {
        line.push(' ');
        line.push_str(&quote(g));
    }
    let path = dir.join("podman-for-ctl");
    let text = format!(
        "#!/bin/sh\n# Written by cargo xtask: podman as the test runs it.\n{line} \"$@\"\n"
    );
    std::fs::write(&path, text)
        .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}

/// One connection to `addr`: the greeting, then `n` bytes echoed back after a
/// half-close. Returns the greeting's length with its newline.
fn echo_exchange(addr: SocketAddr, n: usize) -> Result<u64, String> {
    let mut c = connect(addr)?;
    let greeting = read_line(&mut c)?;
    if !greeting.starts_with("tcp 80 from ") {
        return Err(format!("unexpected greeting {greeting:?}"));
    }
    let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
    c.write_all(&payload).map_err(|e| e.to_string())?;
    c.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    c.read_to_end(&mut back).map_err(|e| e.to_string())?;
    if back != payload {
        return Err(format!("echoed {} bytes, sent {n}", back.len()));
    }
    Ok(greeting.len() as u64 + 1)
}

/// `ping`s to `addr` until one answer; the answer's length.
fn udp_ping(addr: SocketAddr) -> Result<u64, String> {
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        s.send_to(b"ping", addr).map_err(|e| e.to_string())?;
        if let Ok(n) = s.recv(&mut buf) {
            let got = String::from_utf8_lossy(&buf[..n]);
            return if got.starts_with("udp 53 from ") && got.ends_with(": ping") {
                Ok(n as u64)
            } else {
                Err(format!("unexpected UDP reply {got:?}"))
            };
        }
    }
    Err(format!("no UDP reply from {addr}"))
}

fn port_of(ports: &[serde_json::Value], host_port: u16) -> Option<&serde_json::Value> {
    ports
        .iter()
        .find(|p| p["host_port"].as_u64() == Some(u64::from(host_port)))
}

/// What `rootlessport-ctl` printed, `out`, is exactly `want`.
fn printed(out: &str, want: &str) -> Result<(), String> {
    (out == want)
        .then_some(())
        .ok_or(format!("printed {out:?}, want {want:?}"))
}

/// `field` of `port` is `want`.
fn expect(port: &serde_json::Value, field: &str, want: u64) -> Result<(), String> {
    match port[field].as_u64() {
        Some(v) if v == want => Ok(()),
        got => Err(format!(
            "port {}: {field} is {got:?}, want {want}",
            port["host_port"]
        )),
    }
}

/// Every ctl check, on a container `name` started here (and removed at the end).
pub(super) fn checks(
    r: &mut Report,
    podman: &Podman,
    ctl_bin: &Path,
    state_dir: &Path,
    common: &[String],
    name: &str,
    ports: &CtlPorts,
) {
    let wrapper = match write_wrapper(podman, state_dir) {
        Ok(w) => w,
        Err(e) => {
            r.check("ctl: podman wrapper", Err::<(), _>(e));
            return;
        }
    };
    let ctl = Ctl {
        bin: ctl_bin.to_owned(),
        wrapper,
        podman,
    };
    let _ = podman.run(&["rm", "-f", "-t", "0", name]);
    let started = r.check(
        &format!("ctl: start a container publishing {}:80", ports.a),
        podman
            .run_echo(
                name,
                "slirp4netns",
                &[format!("{}:80", ports.a)],
                common,
                &["--tcp", "80", "--udp", "53"],
            )
            .and_then(|()| wait_greeting(lo(ports.a), "tcp 80 from ").map(|_| ())),
    );
    if started.is_none() {
        return;
    }
    let (a, b, u) = (ports.a, ports.b, ports.u);
    r.check(
        &format!("ctl: add {b}:80 prints the port published"),
        ctl.run(name, &["add", &format!("{b}:80")])
            .and_then(Out::ok)
            .and_then(|out| printed(&out, &format!("published tcp 0.0.0.0:{b} -> 80\n"))),
    );
    const PAYLOAD: usize = 100_000;
    let greeting = r.check(
        &format!("ctl: a client reaches the container on {b} ({PAYLOAD} bytes echoed)"),
        echo_exchange(lo(b), PAYLOAD),
    );
    r.check(
        &format!("ctl: add {u}:53/udp prints the port published"),
        ctl.run(name, &["add", &format!("{u}:53/udp")])
            .and_then(Out::ok)
            .and_then(|out| printed(&out, &format!("published udp 0.0.0.0:{u} -> 53\n"))),
    );
    let reply = r.check(&format!("ctl: a UDP echo through {u}"), udp_ping(lo(u)));
    r.check(
        "ctl: list shows the three ports, one aligned row each",
        ctl.run(name, &["list"]).and_then(Out::ok).and_then(|t| {
            let lines: Vec<&str> = t.lines().collect();
            let header = lines.first().ok_or("no output")?;
            if !header.starts_with("HOST ") || !header.contains("BYTES IN") {
                return Err(format!("unexpected header {header:?}"));
            }
            for (port, proto) in [(a, "tcp"), (b, "tcp"), (u, "udp")] {
                let row = lines
                    .iter()
                    .find(|l| l.starts_with(&format!("0.0.0.0:{port} ")))
                    .ok_or(format!("no row for {port} in {t:?}"))?;
                let cells: Vec<&str> = row.split_whitespace().collect();
                if cells.get(2) != Some(&proto) {
                    return Err(format!("row {row:?}: want protocol {proto}"));
                }
            }
            // Aligned: every row as wide as the header up to its last column.
            let bytes_in_end = header.find("BYTES IN").unwrap_or(0) + "BYTES IN".len();
            if lines[1..].iter().any(|l| l.len() < bytes_in_end) {
                return Err(format!("rows are not aligned: {t:?}"));
            }
            Ok(())
        }),
    );
    r.check(
        "ctl: list --json counts exactly the bytes the clients moved",
        wait_for(Duration::from_secs(5), || {
            let list = ctl.list_json(name)?;
            if list.len() != 3 {
                return Err(format!("{} ports listed, want 3", list.len()));
            }
            let pb = port_of(&list, b).ok_or(format!("no {b} in {list:?}"))?;
            expect(pb, "connections_total", 1)?;
            expect(pb, "connections_open", 0)?;
            expect(pb, "bytes_in", PAYLOAD as u64)?;
            if let Some(g) = greeting {
                expect(pb, "bytes_out", g + PAYLOAD as u64)?;
            }
            let pu = port_of(&list, u).ok_or(format!("no {u} in {list:?}"))?;
            let (din, dout) = (
                pu["datagrams_in"].as_u64().unwrap_or(0),
                pu["datagrams_out"].as_u64().unwrap_or(0),
            );
            if din == 0 || dout == 0 {
                return Err(format!("UDP port {u}: no datagrams counted: {pu}"));
            }
            expect(pu, "bytes_in", 4 * din)?;
            if let Some(n) = reply {
                expect(pu, "bytes_out", n * dout)?;
            }
            (pu["protocol"] == "udp")
                .then_some(())
                .ok_or(format!("UDP port {u}: protocol {}", pu["protocol"]))
        }),
    );
    r.check(
        &format!("ctl: remove {a}:80 prints the port removed"),
        ctl.run(name, &["remove", &format!("{a}:80")])
            .and_then(Out::ok)
            .and_then(|out| {
                let want = format!("removed tcp 0.0.0.0:{a} -> 80 (");
                (out.starts_with(&want) && out.lines().count() == 1)
                    .then_some(())
                    .ok_or(format!("printed {out:?}, want {want:?}..."))
            }),
    );
    r.check(
        &format!("ctl: {a} refuses connections now, {b} still answers"),
        refused(lo(a)).and_then(|()| echo_exchange(lo(b), 10).map(|_| ())),
    );
    r.check(
        &format!("ctl: add 127.0.0.1:{a}:80/tcp4 publishes {a} again, listed as tcp4"),
        ctl.run(name, &["add", &format!("127.0.0.1:{a}:80/tcp4")])
            .and_then(Out::ok)
            .and_then(|out| printed(&out, &format!("published tcp4 127.0.0.1:{a} -> 80\n")))
            .and_then(|()| echo_exchange(lo(a), 10))
            .and_then(|_| {
                let list = ctl.list_json(name)?;
                let pa = port_of(&list, a).ok_or(format!("no {a} in {list:?}"))?;
                (pa["protocol"] == "tcp4" && pa["host_ip"] == "127.0.0.1")
                    .then_some(())
                    .ok_or(format!("port {a} listed as {pa}"))
            })
            .and_then(|()| {
                ctl.run(name, &["remove", &format!("127.0.0.1:{a}:80/tcp4")])?
                    .ok()
                    .map(|_| ())
            })
            .and_then(|()| refused(lo(a))),
    );
    r.check(
        &format!("ctl: add {a}:80 >/dev/full fails, says the port was published, and it was"),
        ctl.run_redirected(name, &["add", &format!("{a}:80")], ">/dev/full")
            .and_then(Out::failed)
            .and_then(|line| {
                let want = format!("rootlessport-ctl: container \"{name}\" (ID ");
                let tail = "): ports added, but writing to stdout failed: No space left on device";
                if !line.starts_with(&want) || !line.contains(tail) {
                    return Err(format!("unexpected error line {line:?}"));
                }
                echo_exchange(lo(a), 10)?;
                ctl.run(name, &["remove", &format!("{a}:80")])?.ok()?;
                refused(lo(a))
            }),
    );
    r.check(
        &format!("ctl: add {a}:80 with stdout closed fails in one line, publishes nothing"),
        ctl.run_redirected(name, &["add", &format!("{a}:80")], ">&-")
            .and_then(|out| {
                // Its stdout is closed: only stderr and the status tell.
                if out.code != Some(1) || out.stderr.lines().count() != 1 {
                    return Err(format!(
                        "want exit 1 and one stderr line; exit {:?}, stderr {:?}",
                        out.code, out.stderr
                    ));
                }
                if !out.stderr.contains("stdout is closed") {
                    return Err(format!("unexpected error line {:?}", out.stderr));
                }
                refused(lo(a))
            }),
    );
    let (busy, free) = (ports.busy, ports.free);
    r.check(
        &format!(
            "ctl: add of {free}:80 with {busy}:80 (in use) fails in one line, publishes nothing"
        ),
        TcpListener::bind(("0.0.0.0", busy))
            .map_err(|e| format!("holding port {busy}: {e}"))
            .and_then(|_held| {
                let line = ctl
                    .run(name, &["add", &format!("{free}:80"), &format!("{busy}:80")])?
                    .failed()?;
                let who = format!("rootlessport-ctl: container \"{name}\" (ID ");
                let asked = format!("): add {free}:80 {busy}:80: ");
                if !line.starts_with(&who)
                    || !line.contains(&asked)
                    || !line.contains(&busy.to_string())
                    || !line.contains("address already in use")
                {
                    return Err(format!("unexpected error line {line:?}"));
                }
                let list = ctl.list_json(name)?;
                if port_of(&list, free).is_some() || port_of(&list, busy).is_some() {
                    return Err(format!("published anyway: {list:?}"));
                }
                refused(lo(free))
            }),
    );
    r.check(
        "ctl: --container nosuchname fails in one line naming it",
        ctl.run("nosuchname", &["list"])
            .and_then(Out::failed)
            .and_then(|line| {
                let want = "rootlessport-ctl: container \"nosuchname\": no such container";
                (line == want)
                    .then_some(())
                    .ok_or(format!("said {line:?}, want {want:?}"))
            }),
    );
    r.check(
        "ctl: remove the container",
        podman.run(&["rm", "-f", "-t", "0", name]).map(|_| ()),
    );
    let created = format!("{name}-created");
    let _ = podman.run(&["rm", "-f", "-t", "0", &created]);
    r.check(
        "ctl: a created container that never ran is said to be not running",
        podman
            .run(&["create", "--name", &created, super::IMAGE, "/x/xtask"])
            .and_then(|id| {
                let line = ctl.run(&created, &["list"])?.failed()?;
                let short = id.get(..12).unwrap_or(&id);
                let want =
                    format!("rootlessport-ctl: container \"{created}\" (ID {short}) is not running (created)");
                (line == want)
                    .then_some(())
                    .ok_or(format!("said {line:?}, want {want:?}"))
            }),
    );
    r.check(
        "ctl: remove the created container",
        podman.run(&["rm", "-f", "-t", "0", &created]).map(|_| ()),
    );
}

/// A connection to `addr` is refused.
fn refused(addr: SocketAddr) -> Result<(), String> {
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
        Err(e) => Err(format!("connect {addr}: {e}, want refused")),
        Ok(_) => Err(format!("{addr} still accepts connections")),
    }
}

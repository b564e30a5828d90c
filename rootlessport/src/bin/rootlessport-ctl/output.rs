//! What `rootlessport-ctl` prints: the `list` table, its JSON, and the lines of
//! `add` and `remove` (pure: strings from [`PortStatus`] values).

use std::net::IpAddr;

use rootlessport::control::PortStatus;
use slirp_config::{PortMapping, Protocol};

/// `IP:PORT`, an IPv6 address in brackets.
fn host(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` UTC (the proleptic Gregorian calendar).
pub fn utc(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The `list` table: a header and one row per port, columns aligned. TCP rows leave
/// the UDP columns as `-`, and the other way round.
pub fn table(ports: &[PortStatus]) -> String {
    const HEADER: [&str; 10] = [
        "HOST",
        "CONTAINER",
        "PROTO",
        "SINCE (UTC)",
        "TCP OPEN/TOTAL",
        "BYTES IN",
        "BYTES OUT",
        "UDP LIVE/TOTAL",
        "DATAGRAMS IN/OUT",
        "REFUSED",
    ];
    let mut rows: Vec<[String; 10]> = vec![HEADER.map(str::to_owned)];
    for p in ports {
        let c = &p.counters;
        let udp = p.protocol.protocol == Protocol::Udp;
        let (tcp_conns, udp_flows, datagrams) = if udp {
            (
                "-".to_owned(),
                format!("{}/{}", c.flows_live, c.flows_total),
                format!("{}/{}", c.datagrams_in, c.datagrams_out),
            )
        } else {
            (
                format!("{}/{}", c.connections_open, c.connections_total),
                "-".to_owned(),
                "-".to_owned(),
            )
        };
        rows.push([
            host(p.host_ip, p.host_port),
            p.container_port.to_string(),
            p.protocol.to_string(),
            utc(p.published_at),
            tcp_conns,
            c.bytes_in.to_string(),
            c.bytes_out.to_string(),
            udp_flows,
            datagrams,
            c.refused.to_string(),
        ]);
    }
    let mut widths = [0usize; 10];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            // Text columns to the left, numbers to the right.
            if i < 4 {
                line.push_str(&format!("{cell:<w$}"));
            } else {
                line.push_str(&format!("{cell:>w$}"));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The `list --json` output: the ports as the helper reported them, a JSON array.
pub fn json(ports: &[PortStatus]) -> String {
    let mut s = serde_json::to_string_pretty(ports).unwrap_or_else(|_| "[]".to_owned());
    s.push('\n');
    s
}

/// `published tcp 0.0.0.0:8081 -> 80`.
pub fn added(p: &PortStatus) -> String {
    format!(
        "published {} {} -> {}",
        p.protocol,
        host(p.host_ip, p.host_port),
        p.container_port
    )
}

/// `removed tcp 0.0.0.0:8080 -> 80 (3 connections, 100 bytes in, 124 out)`, with the
/// port's final counters (flows and datagrams for UDP).
pub fn removed(p: &PortStatus) -> String {
    let c = &p.counters;
    let what = if p.protocol.protocol == Protocol::Udp {
        format!(
            "{} flows, {} datagrams in, {} out",
            c.flows_total, c.datagrams_in, c.datagrams_out
        )
    } else {
        format!(
            "{} connections, {} bytes in, {} out",
            c.connections_total, c.bytes_in, c.bytes_out
        )
    };
    format!(
        "removed {} {} -> {} ({what})",
        p.protocol,
        host(p.host_ip, p.host_port),
        p.container_port
    )
}

/// How many ports an error line names before it counts the rest.
const SPECS_SHOWN: usize = 3;

/// A mapping in `-p` syntax, without the default `/tcp`.
pub fn short_spec(m: &PortMapping) -> String {
    let s = m.to_string();
    match s.strip_suffix("/tcp") {
        Some(short) => short.to_owned(),
        None => s,
    }
}

/// The ports of a request for an error line: the first three in `-p` syntax, then
/// `... (N more)` (a batch of hundreds must not make a line of kilobytes).
pub fn spec_list(mappings: &[PortMapping]) -> String {
    let mut words: Vec<String> = mappings.iter().take(SPECS_SHOWN).map(short_spec).collect();
    if mappings.len() > SPECS_SHOWN {
        words.push(format!("... ({} more)", mappings.len() - SPECS_SHOWN));
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> Vec<PortStatus> {
        serde_json::from_str(
            r#"[{"host_ip":"0.0.0.0","host_port":8080,"container_port":80,"protocol":"tcp",
                 "published_at":1700000000,"connections_open":1,"connections_total":3,
                 "refused":0,"bytes_in":100000,"bytes_out":100024,"flows_live":0,
                 "flows_total":0,"datagrams_in":0,"datagrams_out":0},
                {"host_ip":"::1","host_port":5353,"container_port":53,"protocol":"udp6",
                 "published_at":1709251199,"connections_open":0,"connections_total":0,
                 "refused":2,"bytes_in":40,"bytes_out":90,"flows_live":1,
                 "flows_total":4,"datagrams_in":10,"datagrams_out":9}]"#,
        )
        .unwrap()
    }

    #[test]
    fn ctl_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000), "2023-11-14 22:13:20");
        // The leap day, and the second before March.
        assert_eq!(utc(1_709_164_800), "2024-02-29 00:00:00");
        assert_eq!(utc(1_709_251_199), "2024-02-29 23:59:59");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(4_102_444_800), "2100-01-01 00:00:00");
    }

    #[test]
    fn ctl_table_is_aligned_with_every_counter() {
        let t = table(&ports());
        let expected = "\
HOST          CONTAINER  PROTO  SINCE (UTC)          TCP OPEN/TOTAL  BYTES IN  BYTES OUT  UDP LIVE/TOTAL  DATAGRAMS IN/OUT  REFUSED
0.0.0.0:8080  80         tcp    2023-11-14 22:13:20             1/3    100000     100024               -                 -        0
[::1]:5353    53         udp6   2024-02-29 23:59:59               -        40         90             1/4              10/9        2
";
        assert_eq!(t, expected);
        // No ports: the header alone.
        assert_eq!(table(&[]).lines().count(), 1);
    }

    #[test]
    fn ctl_json_round_trips() {
        let p = ports();
        let back: Vec<PortStatus> = serde_json::from_str(&json(&p)).unwrap();
        assert_eq!(back, p);
        assert_eq!(json(&[]), "[]\n");
    }

    #[test]
    fn ctl_add_remove_lines() {
        let p = ports();
        assert_eq!(added(&p[0]), "published tcp 0.0.0.0:8080 -> 80");
        assert_eq!(added(&p[1]), "published udp6 [::1]:5353 -> 53");
        assert_eq!(
            removed(&p[0]),
            "removed tcp 0.0.0.0:8080 -> 80 (3 connections, 100000 bytes in, 100024 out)"
        );
        assert_eq!(
            removed(&p[1]),
            "removed udp6 [::1]:5353 -> 53 (4 flows, 10 datagrams in, 9 out)"
        );
    }

    #[test]
    fn ctl_error_names_at_most_three_specs() {
        let m = |port: u16| PortMapping::new("", port, 80, 1, "tcp");
        assert_eq!(spec_list(&[]), "");
        assert_eq!(spec_list(&[m(1)]), "1:80");
        assert_eq!(
            spec_list(&[
                m(1),
                PortMapping::new("::1", 2, 53, 2, "udp6"),
                PortMapping::new("127.0.0.1", 4, 80, 1, "tcp,udp"),
            ]),
            "1:80 [::1]:2-3:53-54/udp6 127.0.0.1:4:80/tcp,udp"
        );
        assert_eq!(
            spec_list(&[m(1), m(2), m(3), m(4)]),
            "1:80 2:80 3:80 ... (1 more)"
        );
        let many: Vec<PortMapping> = (1..=900).map(m).collect();
        assert_eq!(spec_list(&many), "1:80 2:80 3:80 ... (897 more)");
    }
}

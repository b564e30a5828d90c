//! What the client-address keeping ([`crate::source_ip`]) needs from the container
//! netns, behind one small trait: rules, the local default route of our tables, and
//! `net.ipv4.tcp_fwmark_accept`. [`NetnsRouting`] is the real thing (rtnetlink and
//! `/proc`); the test double (`fake`, tests only) keeps all of it in memory and
//! answers like the kernel does, including like a kernel before 4.17 that stores
//! less than asked, so the logic above it is unit-tested without root or an old
//! kernel.

use std::io;
use std::net::IpAddr;
use std::ops::Range;

use crate::netlink::{DumpedRule, IpFamily, Rtnl, Rule, TableRoute};

/// A sysctl shared by every helper in a netns (per netns: the file shows the netns of
/// the thread that opens it), which keeping client addresses needs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sysctl {
    /// `net.ipv4.tcp_fwmark_accept`: an accepted TCP socket takes the mark of the SYN
    /// (both families), so the container's replies on our connections carry our mark.
    TcpFwmarkAccept,
    /// `net.ipv4.fwmark_reflect`: the kernel's own replies (a RST for a closed port, an
    /// ICMP error) take the mark of the packet they answer, so they reach our socket.
    FwmarkReflect4,
    /// `net.ipv6.fwmark_reflect`, the same for IPv6.
    FwmarkReflect6,
}

impl Sysctl {
    /// Every one, in the order they are turned on.
    pub const ALL: [Sysctl; 3] = [
        Sysctl::TcpFwmarkAccept,
        Sysctl::FwmarkReflect4,
        Sysctl::FwmarkReflect6,
    ];

    /// Its file under `/proc/sys`.
    pub fn path(self) -> &'static str {
        match self {
            Sysctl::TcpFwmarkAccept => "/proc/sys/net/ipv4/tcp_fwmark_accept",
            Sysctl::FwmarkReflect4 => "/proc/sys/net/ipv4/fwmark_reflect",
            Sysctl::FwmarkReflect6 => "/proc/sys/net/ipv6/fwmark_reflect",
        }
    }
}

/// The privileged operations on one netns's routing. Errors are the kernel's answers
/// (`EEXIST`, `ENOENT`/`ESRCH`, `EPERM` without `CAP_NET_ADMIN` over the netns,
/// `EAFNOSUPPORT` without IPv6).
pub(crate) trait RoutingOps {
    /// Add a rule (`NLM_F_EXCL`: `EEXIST` when an identical rule is there).
    fn add_rule(&mut self, rule: &Rule) -> io::Result<()>;
    /// Add a rule without the kernel's duplicate check (no `NLM_F_EXCL`, which walks
    /// every rule of the netns): for rules the caller knows are new.
    fn append_rule(&mut self, rule: &Rule) -> io::Result<()>;
    /// Delete the first rule matching every attribute `rule` sets (`ENOENT`: none).
    fn del_rule(&mut self, rule: &Rule) -> io::Result<()>;
    /// Delete a rule exactly as it was dumped.
    fn del_dumped_rule(&mut self, rule: &DumpedRule) -> io::Result<()>;
    /// Every rule of `family`, in the kernel's order (by priority).
    fn rules(&mut self, family: IpFamily) -> io::Result<Vec<DumpedRule>>;
    /// Every route of `family` in the tables numbered `tables`.
    fn routes_in(&mut self, family: IpFamily, tables: Range<u32>) -> io::Result<Vec<TableRoute>>;
    /// Delete a route exactly as it was dumped.
    fn del_route(&mut self, route: &TableRoute) -> io::Result<()>;
    /// `local default dev lo table TABLE [src PREFSRC]` (`EEXIST`: the table has a
    /// default route already).
    fn add_local_default(
        &mut self,
        family: IpFamily,
        table: u32,
        prefsrc: Option<IpAddr>,
    ) -> io::Result<()>;
    /// Delete that route again (`ESRCH`: it is not there).
    fn del_local_default(&mut self, family: IpFamily, table: u32) -> io::Result<()>;
    /// Whether `which` is on (anything but `0`); `ENOENT` when the netns has no such
    /// sysctl (no IPv6).
    fn sysctl(&mut self, which: Sysctl) -> io::Result<bool>;
    /// Write `1` or `0` to `which`.
    fn set_sysctl(&mut self, which: Sysctl, on: bool) -> io::Result<()>;
}

/// The real netns: rtnetlink from a socket made in the calling thread's netns, and
/// that netns's [`Sysctl`]s (call from a thread inside it).
pub(crate) struct NetnsRouting {
    rtnl: Rtnl,
}

impl NetnsRouting {
    /// # Errors
    /// The netlink socket cannot be made or bound.
    pub fn open() -> io::Result<NetnsRouting> {
        Ok(NetnsRouting {
            rtnl: Rtnl::open()?,
        })
    }
}

impl RoutingOps for NetnsRouting {
    fn add_rule(&mut self, rule: &Rule) -> io::Result<()> {
        self.rtnl.add_rule(rule)
    }

    fn append_rule(&mut self, rule: &Rule) -> io::Result<()> {
        self.rtnl.append_rule(rule)
    }

    fn del_rule(&mut self, rule: &Rule) -> io::Result<()> {
        self.rtnl.del_rule(rule)
    }

    fn del_dumped_rule(&mut self, rule: &DumpedRule) -> io::Result<()> {
        self.rtnl.del_dumped_rule(rule)
    }

    fn rules(&mut self, family: IpFamily) -> io::Result<Vec<DumpedRule>> {
        self.rtnl.rules(family)
    }

    fn routes_in(&mut self, family: IpFamily, tables: Range<u32>) -> io::Result<Vec<TableRoute>> {
        self.rtnl.routes_in(family, |t| tables.contains(&t))
    }

    fn del_route(&mut self, route: &TableRoute) -> io::Result<()> {
        self.rtnl.del_route(route)
    }

    fn add_local_default(
        &mut self,
        family: IpFamily,
        table: u32,
        prefsrc: Option<IpAddr>,
    ) -> io::Result<()> {
        self.rtnl.add_local_default(family, table, prefsrc)
    }

    fn del_local_default(&mut self, family: IpFamily, table: u32) -> io::Result<()> {
        self.rtnl.del_local_default(family, table)
    }

    fn sysctl(&mut self, which: Sysctl) -> io::Result<bool> {
        Ok(std::fs::read_to_string(which.path())?.trim() != "0")
    }

    fn set_sysctl(&mut self, which: Sysctl, on: bool) -> io::Result<()> {
        std::fs::write(which.path(), if on { "1" } else { "0" })
    }
}

/// A recording test double of one netns: rules, routes and the sysctl in memory,
/// answered as the kernel answers.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::*;

    /// How the fake kernel behaves.
    #[derive(Debug, Clone, Copy)]
    pub struct Kernel {
        /// What is left of a rule once the kernel parsed it, for adding and for
        /// deleting alike (a kernel ignores attributes it does not know).
        pub parses: fn(&mut Rule),
        /// The errno a rule is refused with, if any (after parsing).
        pub refuses: fn(&Rule) -> Option<i32>,
        /// IPv6 is there (otherwise every IPv6 request is `EAFNOSUPPORT`).
        pub ipv6: bool,
        /// Every change is refused with `EPERM` (no `CAP_NET_ADMIN` over the netns);
        /// dumps and reading the sysctl still work, as they do for anyone.
        pub eperm: bool,
        /// Writing the sysctl fails with `EACCES`.
        pub sysctl_read_only: bool,
    }

    impl Kernel {
        /// A kernel that knows every attribute we send (4.17 and later).
        pub const MODERN: Kernel = Kernel {
            parses: as_sent,
            refuses: |_| None,
            ipv6: true,
            eperm: false,
            sysctl_read_only: false,
        };
        /// Linux 4.16: `FRA_IP_PROTO`, `FRA_SPORT_RANGE` and `FRA_DPORT_RANGE` came
        /// in 4.17; before, they are silently ignored.
        pub const V4_16: Kernel = Kernel {
            parses: without_port_matches,
            ..Kernel::MODERN
        };
    }

    /// Every attribute kept.
    pub fn as_sent(_: &mut Rule) {}

    /// What a kernel before 4.17 keeps of a rule.
    pub fn without_port_matches(rule: &mut Rule) {
        rule.ip_proto = None;
        rule.sport = None;
        rule.dport = None;
    }

    /// `local default dev lo table TABLE [src PREFSRC]`, or another table's route.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Route {
        pub family: IpFamily,
        pub table: u32,
        /// The preferred source (`src`), if any.
        pub prefsrc: Option<IpAddr>,
    }

    /// Everything the fake netns holds.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Snapshot {
        /// Both families' rules, each family in the kernel's order.
        pub rules: Vec<Rule>,
        /// Every table's routes, in the order they were added.
        pub routes: Vec<Route>,
        /// `net.ipv4.tcp_fwmark_accept` is 1.
        pub tcp_fwmark_accept: bool,
        /// `net.ipv4.fwmark_reflect` and `net.ipv6.fwmark_reflect` are 1.
        pub fwmark_reflect: [bool; 2],
    }

    struct State {
        kernel: Kernel,
        netns: Snapshot,
        /// Every change asked for, with its answer.
        log: Vec<String>,
    }

    /// One fake netns; every handle (clone, [`FakeNetns::ops`]) works on the same
    /// store. A new one holds what a fresh netns holds: the default rules, one route
    /// in the main table, `tcp_fwmark_accept` 0.
    #[derive(Clone)]
    pub struct FakeNetns(Arc<Mutex<State>>);

    fn err(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    /// The kernel's rule lookup for a delete (`rule_find`): every attribute the
    /// request sets must match; the ones it leaves out match anything.
    fn matches(asked: &Rule, stored: &Rule) -> bool {
        fn set_and_equal<T: PartialEq>(asked: Option<T>, stored: Option<T>) -> bool {
            asked.is_none() || asked == stored
        }
        asked.family == stored.family
            && asked.priority == stored.priority
            && asked.goto.is_some() == stored.goto.is_some()
            && (asked.table == 0 || asked.table == stored.table)
            && set_and_equal(asked.goto, stored.goto)
            && set_and_equal(asked.dst, stored.dst)
            && set_and_equal(asked.fwmark, stored.fwmark)
            && set_and_equal(asked.ip_proto, stored.ip_proto)
            && set_and_equal(asked.sport, stored.sport)
            && set_and_equal(asked.dport, stored.dport)
    }

    impl FakeNetns {
        /// A fresh netns on `kernel`.
        pub fn new(kernel: Kernel) -> FakeNetns {
            let v4 = |prio, table| Rule::to_table(IpFamily::V4, prio, table);
            let v6 = |prio, table| Rule::to_table(IpFamily::V6, prio, table);
            let rules = vec![
                v4(0, 255),
                v4(32766, 254),
                v4(32767, 253),
                v6(0, 255),
                v6(32766, 254),
            ];
            let routes = vec![Route {
                family: IpFamily::V4,
                table: 254,
                prefsrc: Some(IpAddr::from([10, 0, 2, 100])),
            }];
            FakeNetns(Arc::new(Mutex::new(State {
                kernel,
                netns: Snapshot {
                    rules,
                    routes,
                    tcp_fwmark_accept: false,
                    fwmark_reflect: [false; 2],
                },
                log: Vec::new(),
            })))
        }

        fn state(&self) -> MutexGuard<'_, State> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }

        /// A handle for a helper.
        pub fn ops(&self) -> Box<dyn RoutingOps + Send> {
            Box::new(self.clone())
        }

        /// What the netns holds now.
        pub fn snapshot(&self) -> Snapshot {
            self.state().netns.clone()
        }

        /// The rules of both families.
        pub fn rules(&self) -> Vec<Rule> {
            self.snapshot().rules
        }

        /// Every change asked for so far, with its answer, one per line.
        pub fn log(&self) -> String {
            self.state().log.join("\n")
        }

        /// A rule someone else added (another program, or another helper by hand):
        /// stored as the kernel parses it, after the rules of its priority, unchecked.
        pub fn insert_rule(&self, rule: Rule) {
            let mut st = self.state();
            st.log.push(format!("inserted {rule:?}"));
            st.insert(rule);
        }

        /// Set the sysctl as someone else would.
        pub fn preset_tcp_fwmark_accept(&self, on: bool) {
            self.preset_sysctl(Sysctl::TcpFwmarkAccept, on);
        }

        /// Set a sysctl as someone else would.
        pub fn preset_sysctl(&self, which: Sysctl, on: bool) {
            *self.state().netns.sysctl(which) = on;
        }

        /// Change how the kernel behaves from now on.
        pub fn set_kernel(&self, kernel: Kernel) {
            self.state().kernel = kernel;
        }

        /// RTM_NEWRULE, with the kernel's duplicate check (`NLM_F_EXCL`) or without.
        fn new_rule(&mut self, verb: &str, rule: &Rule, exclusive: bool) -> io::Result<()> {
            self.request(format!("{verb} {rule:?}"), Some(rule.family), true, |st| {
                let parsed = st.parsed(rule);
                if let Some(errno) = (st.kernel.refuses)(&parsed) {
                    return Err(err(errno));
                }
                if exclusive && st.netns.rules.contains(&parsed) {
                    return Err(err(libc::EEXIST));
                }
                st.insert(rule.clone());
                Ok(())
            })
        }

        /// Run one request: recorded, refused as the kernel would, else `f`.
        fn request<T>(
            &mut self,
            what: String,
            family: Option<IpFamily>,
            change: bool,
            f: impl FnOnce(&mut State) -> io::Result<T>,
        ) -> io::Result<T> {
            let mut st = self.state();
            let result = if change && st.kernel.eperm {
                Err(err(libc::EPERM))
            } else if family == Some(IpFamily::V6) && !st.kernel.ipv6 {
                Err(err(libc::EAFNOSUPPORT))
            } else {
                f(&mut st)
            };
            if change {
                let answer = match &result {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.to_string(),
                };
                st.log.push(format!("{what} -> {answer}"));
            }
            result
        }
    }

    impl State {
        fn parsed(&self, rule: &Rule) -> Rule {
            let mut r = rule.clone();
            (self.kernel.parses)(&mut r);
            r
        }

        /// After the last rule of the same or a lower priority, as the kernel does.
        fn insert(&mut self, rule: Rule) {
            let rule = self.parsed(&rule);
            let rules = &mut self.netns.rules;
            let at = rules
                .iter()
                .rposition(|r| r.family == rule.family && r.priority <= rule.priority)
                .map_or_else(
                    || {
                        rules
                            .iter()
                            .position(|r| r.family == rule.family)
                            .unwrap_or(rules.len())
                    },
                    |i| i + 1,
                );
            rules.insert(at, rule);
        }

        fn delete_rule(&mut self, asked: &Rule) -> io::Result<()> {
            let asked = self.parsed(asked);
            let at = self
                .netns
                .rules
                .iter()
                .position(|r| matches(&asked, r))
                .ok_or_else(|| err(libc::ENOENT))?;
            self.netns.rules.remove(at);
            Ok(())
        }

        fn delete_route(&mut self, family: IpFamily, table: u32) -> io::Result<()> {
            let at = self
                .netns
                .routes
                .iter()
                .position(|r| r.family == family && r.table == table)
                .ok_or_else(|| err(libc::ESRCH))?;
            self.netns.routes.remove(at);
            Ok(())
        }
    }

    impl RoutingOps for FakeNetns {
        fn add_rule(&mut self, rule: &Rule) -> io::Result<()> {
            self.new_rule("add", rule, true)
        }

        fn append_rule(&mut self, rule: &Rule) -> io::Result<()> {
            self.new_rule("append", rule, false)
        }

        fn del_rule(&mut self, rule: &Rule) -> io::Result<()> {
            self.request(format!("del {rule:?}"), Some(rule.family), true, |st| {
                st.delete_rule(rule)
            })
        }

        fn del_dumped_rule(&mut self, rule: &DumpedRule) -> io::Result<()> {
            let family = rule.rule.as_ref().map(|r| r.family);
            self.request(
                format!("del dumped {rule:?}"),
                family,
                true,
                |st| match &rule.rule {
                    Some(r) => st.delete_rule(r),
                    None => Err(err(libc::ENOENT)),
                },
            )
        }

        fn rules(&mut self, family: IpFamily) -> io::Result<Vec<DumpedRule>> {
            self.request(String::new(), Some(family), false, |st| {
                Ok(st
                    .netns
                    .rules
                    .iter()
                    .filter(|r| r.family == family)
                    .map(DumpedRule::stored)
                    .collect())
            })
        }

        fn routes_in(
            &mut self,
            family: IpFamily,
            tables: Range<u32>,
        ) -> io::Result<Vec<TableRoute>> {
            self.request(String::new(), Some(family), false, |st| {
                Ok(st
                    .netns
                    .routes
                    .iter()
                    .filter(|r| r.family == family && tables.contains(&r.table))
                    .map(|r| TableRoute::local_default(r.family, r.table, r.prefsrc))
                    .collect())
            })
        }

        fn del_route(&mut self, route: &TableRoute) -> io::Result<()> {
            let family = route.family();
            self.request(format!("del route {route:?}"), family, true, |st| {
                let family = family.ok_or_else(|| err(libc::EAFNOSUPPORT))?;
                st.delete_route(family, route.table)
            })
        }

        fn add_local_default(
            &mut self,
            family: IpFamily,
            table: u32,
            prefsrc: Option<IpAddr>,
        ) -> io::Result<()> {
            let what = format!("add local default {family:?} table {table} src {prefsrc:?}");
            self.request(what, Some(family), true, |st| {
                let routes = &mut st.netns.routes;
                if routes
                    .iter()
                    .any(|r| r.family == family && r.table == table)
                {
                    return Err(err(libc::EEXIST));
                }
                routes.push(Route {
                    family,
                    table,
                    prefsrc,
                });
                Ok(())
            })
        }

        fn del_local_default(&mut self, family: IpFamily, table: u32) -> io::Result<()> {
            let what = format!("del local default {family:?} table {table}");
            self.request(what, Some(family), true, |st| {
                st.delete_route(family, table)
            })
        }

        fn sysctl(&mut self, which: Sysctl) -> io::Result<bool> {
            let mut st = self.state();
            if which == Sysctl::FwmarkReflect6 && !st.kernel.ipv6 {
                return Err(err(libc::ENOENT));
            }
            Ok(*st.netns.sysctl(which))
        }

        fn set_sysctl(&mut self, which: Sysctl, on: bool) -> io::Result<()> {
            self.request(format!("{which:?} = {on}"), None, true, |st| {
                if which == Sysctl::FwmarkReflect6 && !st.kernel.ipv6 {
                    return Err(err(libc::ENOENT));
                }
                if st.kernel.sysctl_read_only {
                    return Err(err(libc::EACCES));
                }
                *st.netns.sysctl(which) = on;
                Ok(())
            })
        }
    }

    impl Snapshot {
        fn sysctl(&mut self, which: Sysctl) -> &mut bool {
            match which {
                Sysctl::TcpFwmarkAccept => &mut self.tcp_fwmark_accept,
                Sysctl::FwmarkReflect4 => &mut self.fwmark_reflect[0],
                Sysctl::FwmarkReflect6 => &mut self.fwmark_reflect[1],
            }
        }
    }

    mod tests {
        use super::*;

        fn flow() -> Rule {
            Rule {
                dst: Some(IpAddr::from([192, 0, 2, 2])),
                ip_proto: Some(17),
                sport: Some((53, 53)),
                dport: Some((40000, 40000)),
                ..Rule::to_table(IpFamily::V4, 102, 7)
            }
        }

        fn errno<T>(r: io::Result<T>) -> Option<i32> {
            r.err().and_then(|e| e.raw_os_error())
        }

        #[test]
        fn answers_like_the_kernel() {
            let netns = FakeNetns::new(Kernel::MODERN);
            let mut ops = netns.ops();
            ops.add_rule(&flow()).unwrap();
            assert_eq!(errno(ops.add_rule(&flow())), Some(libc::EEXIST));
            // Another priority, or one attribute more, is another rule.
            ops.add_rule(&Rule {
                priority: 103,
                ..flow()
            })
            .unwrap();
            ops.add_rule(&Rule {
                fwmark: Some((1, u32::MAX)),
                ..flow()
            })
            .unwrap();
            let dumped = ops.rules(IpFamily::V4).unwrap();
            assert_eq!(dumped[1].rule, Some(flow()), "sorted by priority");
            ops.del_rule(&flow()).unwrap();
            ops.del_rule(&flow()).unwrap();
            assert_eq!(errno(ops.del_rule(&flow())), Some(libc::ENOENT));
            let d = ops.rules(IpFamily::V4).unwrap().remove(1);
            ops.del_dumped_rule(&d).unwrap();
            assert_eq!(netns.rules(), FakeNetns::new(Kernel::MODERN).rules());

            ops.add_local_default(IpFamily::V6, 7, None).unwrap();
            assert_eq!(
                errno(ops.add_local_default(IpFamily::V6, 7, None)),
                Some(libc::EEXIST)
            );
            assert_eq!(ops.routes_in(IpFamily::V4, 0..1000).unwrap().len(), 1);
            assert_eq!(ops.routes_in(IpFamily::V4, 1..100).unwrap().len(), 0);
            let r = ops.routes_in(IpFamily::V6, 7..8).unwrap();
            ops.del_route(&r[0]).unwrap();
            assert_eq!(
                errno(ops.del_local_default(IpFamily::V6, 7)),
                Some(libc::ESRCH)
            );
            assert_eq!(netns.snapshot(), FakeNetns::new(Kernel::MODERN).snapshot());
        }

        #[test]
        fn a_4_16_kernel_stores_a_flow_rule_as_a_catch_all() {
            let netns = FakeNetns::new(Kernel::V4_16);
            let mut ops = netns.ops();
            ops.add_rule(&flow()).unwrap();
            let stored = ops.rules(IpFamily::V4).unwrap()[1].rule.clone();
            let catch_all = Rule {
                dst: flow().dst,
                ..Rule::to_table(IpFamily::V4, 102, 7)
            };
            assert_eq!(stored, Some(catch_all.clone()));
            // Another flow to the same host is the same rule to it.
            let other = Rule {
                dport: Some((40001, 40001)),
                ..flow()
            };
            assert_eq!(errno(ops.add_rule(&other)), Some(libc::EEXIST));
            ops.del_rule(&other).unwrap();
            assert!(!netns.rules().contains(&catch_all));
        }

        #[test]
        fn refusals() {
            let netns = FakeNetns::new(Kernel {
                eperm: true,
                ..Kernel::MODERN
            });
            let mut ops = netns.ops();
            assert_eq!(errno(ops.add_rule(&flow())), Some(libc::EPERM));
            assert_eq!(
                errno(ops.add_local_default(IpFamily::V4, 7, None)),
                Some(libc::EPERM)
            );
            assert_eq!(
                errno(ops.set_sysctl(Sysctl::TcpFwmarkAccept, true)),
                Some(libc::EPERM)
            );
            assert_eq!(ops.rules(IpFamily::V6).unwrap().len(), 2, "dumps work");
            assert!(netns.log().contains("Operation not permitted"));

            netns.set_kernel(Kernel {
                ipv6: false,
                sysctl_read_only: true,
                ..Kernel::MODERN
            });
            assert_eq!(errno(ops.rules(IpFamily::V6)), Some(libc::EAFNOSUPPORT));
            assert_eq!(
                errno(ops.add_local_default(IpFamily::V6, 7, None)),
                Some(libc::EAFNOSUPPORT)
            );
            assert_eq!(
                errno(ops.set_sysctl(Sysctl::TcpFwmarkAccept, true)),
                Some(libc::EACCES)
            );
            assert!(!ops.sysctl(Sysctl::TcpFwmarkAccept).unwrap());
            assert_eq!(netns.snapshot(), FakeNetns::new(Kernel::MODERN).snapshot());
        }
    }
}

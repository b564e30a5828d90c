//! Just enough rtnetlink to add and remove policy-routing rules and routes, so that
//! keeping client addresses needs neither `ip` nor `iptables`. Works on the netns of
//! the calling thread.

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const FRA_SRC: u16 = 2;
const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FRA_IP_PROTO: u16 = 22;
const FRA_SPORT_RANGE: u16 = 23;
const FR_ACT_TO_TBL: u8 = 1;

const RTA_OIF: u16 = 4;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const RTPROT_STATIC: u8 = 4;
const RT_SCOPE_HOST: u8 = 254;
const RTN_LOCAL: u8 = 2;

/// A policy-routing rule: `[from SRC] [fwmark M/MASK] [ipproto P] [sport A-B] lookup
/// TABLE priority PRIO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub family: IpFamily,
    pub priority: u32,
    pub table: u32,
    pub fwmark: Option<(u32, u32)>,
    pub ip_proto: Option<u8>,
    pub sport: Option<(u16, u16)>,
    pub src: Option<IpAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    fn af(self) -> u8 {
        match self {
            IpFamily::V4 => libc::AF_INET as u8,
            IpFamily::V6 => libc::AF_INET6 as u8,
        }
    }

    pub fn of(ip: IpAddr) -> IpFamily {
        match ip {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// A NETLINK_ROUTE socket in the netns it was made in.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

struct Msg(Vec<u8>);

impl Msg {
    fn new(kind: u16, flags: u16, seq: u32, header: &[u8]) -> Msg {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish()
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&seq.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(header);
        Msg(v)
    }

    fn attr(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: we just created fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(Rtnl { fd, seq: 1 })
    }

    /// Send one request and wait for its acknowledgement.
    fn request(&mut self, msg: Msg) -> io::Result<()> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut bytes = msg.finish();
        bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        // SAFETY: sockaddr_nl is plain data; zeroes address the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: sendto from a buffer we own to a valid sockaddr_nl.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: recv into a buffer we own.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut off = 0usize;
            let n = n as usize;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or([0; 4])) as usize;
                let kind = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or([0; 2]));
                let rseq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().unwrap_or([0; 4]));
                if len < 16 || off + len > n {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink reply",
                    ));
                }
                if kind == NLMSG_ERROR && rseq == seq && len >= 20 {
                    let err =
                        i32::from_ne_bytes(buf[off + 16..off + 20].try_into().unwrap_or([0; 4]));
                    return if err == 0 {
                        Ok(())
                    } else {
                        Err(io::Error::from_raw_os_error(-err))
                    };
                }
                off += (len + 3) & !3;
            }
        }
    }

    fn rule_msg(&self, kind: u16, flags: u16, r: &Rule) -> Msg {
        let src_len = match r.src {
            Some(IpAddr::V4(_)) => 32,
            Some(IpAddr::V6(_)) => 128,
            None => 0,
        };
        // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action, flags
        let header = [
            r.family.af(),
            0,
            src_len,
            0,
            0,
            0,
            0,
            FR_ACT_TO_TBL,
            0,
            0,
            0,
            0,
        ];
        let mut m = Msg::new(kind, flags, 0, &header);
        m.attr(FRA_TABLE, &r.table.to_ne_bytes());
        m.attr(FRA_PRIORITY, &r.priority.to_ne_bytes());
        if let Some(src) = r.src {
            m.attr(FRA_SRC, &ip_bytes(src));
        }
        if let Some((mark, mask)) = r.fwmark {
            m.attr(FRA_FWMARK, &mark.to_ne_bytes());
            m.attr(FRA_FWMASK, &mask.to_ne_bytes());
        }
        if let Some(p) = r.ip_proto {
            m.attr(FRA_IP_PROTO, &[p]);
        }
        if let Some((a, b)) = r.sport {
            let mut range = a.to_ne_bytes().to_vec();
            range.extend_from_slice(&b.to_ne_bytes());
            m.attr(FRA_SPORT_RANGE, &range);
        }
        m
    }

    pub fn add_rule(&mut self, r: &Rule) -> io::Result<()> {
        let m = self.rule_msg(
            RTM_NEWRULE,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            r,
        );
        self.request(m)
    }

    pub fn del_rule(&mut self, r: &Rule) -> io::Result<()> {
        let m = self.rule_msg(RTM_DELRULE, NLM_F_REQUEST | NLM_F_ACK, r);
        self.request(m)
    }

    fn local_default_msg(
        &self,
        kind: u16,
        flags: u16,
        family: IpFamily,
        table: u32,
        prefsrc: Option<IpAddr>,
    ) -> io::Result<Msg> {
        let oif = loopback_index()?;
        // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
        let header = [
            family.af(),
            0,
            0,
            0,
            0,
            RTPROT_STATIC,
            RT_SCOPE_HOST,
            RTN_LOCAL,
            0,
            0,
            0,
            0,
        ];
        let mut m = Msg::new(kind, flags, 0, &header);
        m.attr(RTA_TABLE, &table.to_ne_bytes());
        m.attr(RTA_OIF, &oif.to_ne_bytes());
        if let Some(src) = prefsrc {
            m.attr(RTA_PREFSRC, &ip_bytes(src));
        }
        Ok(m)
    }

    /// `local default dev lo table TABLE [src PREFSRC]`: everything routed by that
    /// table is ours; an unbound socket replying through it speaks from PREFSRC.
    pub fn add_local_default(
        &mut self,
        family: IpFamily,
        table: u32,
        prefsrc: Option<IpAddr>,
    ) -> io::Result<()> {
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let m = self.local_default_msg(RTM_NEWROUTE, flags, family, table, prefsrc)?;
        self.request(m)
    }

    pub fn del_local_default(&mut self, family: IpFamily, table: u32) -> io::Result<()> {
        let m =
            self.local_default_msg(RTM_DELROUTE, NLM_F_REQUEST | NLM_F_ACK, family, table, None)?;
        self.request(m)
    }
}

fn loopback_index() -> io::Result<u32> {
    nix::net::if_::if_nametoindex("lo").map_err(io::Error::from)
}

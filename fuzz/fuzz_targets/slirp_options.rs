//! `--network slirp4netns:...` strings and option lists, through to the command line.
#![no_main]
use libfuzzer_sys::fuzz_target;

const HELP_030: &str = include_str!("../../slirp-config/fixtures/slirp4netns-0.3.0-help.txt");
const HELP_120: &str = include_str!("../../slirp-config/fixtures/slirp4netns-1.2.0-help.txt");

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // The whole network string, and the same text as a list of options.
    let mut lists = vec![text.split('\n').map(str::to_owned).collect::<Vec<_>>()];
    if let Ok(opts) = slirp_config::parse_network(text) {
        lists.push(opts);
    }
    for opts in lists {
        if let Ok(o) = slirp_config::parse_options(&opts) {
            for help in [HELP_030, HELP_120, ""] {
                let _ = slirp_config::build_args(&o, &slirp_config::SlirpFeatures::from_help(help));
            }
            let _ = netaddr::slirp4netns_ip(o.cidr.as_ref());
        }
    }
    let _ = slirp_config::SlirpVersion::parse(text).map(|v| v.numeric());
});

//! Replies from the slirp4netns API socket.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = slirp_portfwd::decode_add(data);
    let _ = slirp_portfwd::decode_list(data);
    let _ = slirp_portfwd::decode_remove(data);
});

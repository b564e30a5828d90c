#!/bin/bash
# xtask/symbol-order.sh: regenerate xtask/rootlessport.symbol-order, the link order of the
# static release helper (xtask/src/helper.rs). Runs the helper under callgrind with the
# bench's load (1 TCP port with iperf3 both ways, 2 x 500 short connections, 1,000
# ping-pongs, UDP for 2 s, 200 held connections, then exit; then a start with 300 ports)
# and lists every function it executed, most instructions first. glibc picks its string functions by CPU (ifunc) and
# valgrind's CPU is not the machine's, so every variant of a string function that ran is
# listed too. Needs root (a netns), valgrind, iperf3. Usage: xtask/symbol-order.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T=${CARGO_TARGET_DIR:-target}; TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
# Built exactly as xtask/src/helper.rs's `release_helper` builds it (`cargo rustc`, the flags
# of `helper_rustflags`: the workspace path remapped): ThinLTO's `.llvm.N` suffixes in the
# names listed differ between `cargo build` and `cargo rustc`, and with the checkout's path.
# (The link arguments `release_helper` adds after `--` do not change them: measured.)
CARGO_ENCODED_RUSTFLAGS=$(printf '%s\x1f' -C target-feature=+crt-static -C relocation-model=static "--remap-path-prefix=$PWD=." | sed 's/\x1f$//') cargo rustc -q --release \
    -p rootlessport --bin rootlessport --target "$TRIPLE"
cargo build -q -p xtask
BIN=$T/$TRIPLE/release/rootlessport X=$T/debug/xtask NS=symorder-$$ D=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; ip netns del $NS 2>/dev/null; rm -rf $D' EXIT
ip netns add $NS; ip -n $NS link set lo up
ip netns exec $NS $X echo-server --plain --tcp 7 --udp 7 >/dev/null 2>&1 &
ip netns exec $NS iperf3 -s -p 5201 >/dev/null 2>&1 &
cat > $D/cfg.json <<J
{"Mappings":[{"host_ip":"127.0.0.1","container_port":5201,"host_port":25301,"range":1,"protocol":"tcp"},
 {"host_ip":"127.0.0.1","container_port":7,"host_port":25307,"range":1,"protocol":"tcp,udp"}],
 "NetNSPath":"/run/netns/$NS","ExitFD":3,"ReadyFD":4,"TmpDir":"$D","ChildIP":"127.0.0.1",
 "ContainerID":"symorder","RootlessCNI":false}
J
mkfifo $D/exit $D/ready; sleep infinity > $D/exit & HOLD=$!
valgrind -q --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file=$D/cg \
    "$BIN" < $D/cfg.json 3<$D/exit 4>$D/ready 2>$D/err & P=$!
head -c1 $D/ready >/dev/null
iperf3 -c 127.0.0.1 -p 25301 -t 1 >/dev/null; iperf3 -c 127.0.0.1 -p 25301 -t 1 -R >/dev/null
$X bench-client conn 127.0.0.1:25307 500 >/dev/null & $X bench-client conn 127.0.0.1:25307 500 >/dev/null
wait %%
$X bench-client pingpong 127.0.0.1:25307 1000 >/dev/null
$X bench-client udp 127.0.0.1:25307 10000 2 >/dev/null
sleep 2; $X bench-client hold 127.0.0.1:25307 200 1 >/dev/null
kill $HOLD; wait $P
# Start-up with 300 ports: from 256 on the listeners are bound by several threads.
python3 -c 'import json,sys; print(json.dumps({"Mappings":[{"host_ip":"127.0.0.1","container_port":p,
 "host_port":p,"range":1,"protocol":"tcp"} for p in range(26000,26300)],"NetNSPath":sys.argv[1],
 "ExitFD":3,"ReadyFD":4,"TmpDir":sys.argv[2],"ChildIP":"127.0.0.1","ContainerID":"symorder2"}))' \
    /run/netns/$NS $D > $D/cfg2.json
rm $D/exit $D/ready; mkfifo $D/exit $D/ready; sleep infinity > $D/exit & HOLD=$!
valgrind -q --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file=$D/cg2 \
    "$BIN" < $D/cfg2.json 3<$D/exit 4>$D/ready 2>$D/err & P=$!
head -c1 $D/ready >/dev/null; kill $HOLD; wait $P
# Self cost per function ("fn=" blocks; the line after "calls=" is a callee's inclusive cost).
awk 'FNR==1 { delete name } /^c?fn=\(/ { id=$1; sub(/^c?fn=/,"",id); if (NF>1) name[id]=$2
                  if ($1 ~ /^fn=/) { cur=name[id]; seen[cur]=1 }; next }
     /^calls=/ { skip=1; next }
     /^[+-]?[0-9]+ [0-9]+/ { if (!skip) cost[cur]+=$2; skip=0 }
     END { for (n in seen) if (n !~ /^(0x|\()/) print cost[n]+0, n }' $D/cg $D/cg2 | sort -k1,1nr -k2 | cut -d' ' -f2 |
    sed "s/'[0-9]*\$//" | awk '!seen[$0]++' > $D/ran   # callgrind names recursion levels fn'2
nm --defined-only "$BIN" | awk '$2 ~ /^[tTwWiI]$/ {print $3}' | sort -u > $D/syms
V='_(sse2|ssse3|sse4_1|sse4_2|sse42|avx|avx2|evex|evex512|avx512|erms|rtm|unaligned|generic|movbe)(_|$)'
# (a family whose ifunc resolver ran counts too: valgrind may run another copy of the function)
{ grep -E "^__[a-z0-9]+$V" $D/ran | sed -E 's/^__([a-z0-9]+)_.*/\1/'; sed -n 's/^\([a-z0-9]*\)_ifunc$/\1/p' $D/ran; } |
    sort -u > $D/fams
# callgrind calls the C start-up "(below main)": named here.
printf '%s\n' _start __libc_start_main __libc_start_call_main >> $D/ran
{ cat $D/ran; grep -E "^__[a-z0-9_]+$V" $D/syms | grep -E "^__($(paste -sd'|' $D/fams))_" | grep -vxFf $D/ran || true; } \
    > xtask/rootlessport.symbol-order
echo "xtask/rootlessport.symbol-order: $(wc -l < xtask/rootlessport.symbol-order) symbols"

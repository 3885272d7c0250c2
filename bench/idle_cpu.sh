#!/usr/bin/env bash
# Idle daemon CPU (docs/BENCHMARKS.md, "Round two removed that spawn"): a relay
# namespace with two veths whose peers are in named namespaces, the daemon in
# native XDP mode, its CPU time and its children's over 60 s. Needs root.
# usage: idle_cpu.sh BIN
set -euo pipefail
BIN=$1; T=$$; R=icr$T; A=ica$T; B=icb$T
cleanup(){ [ -n "${PID:-}" ] && kill $PID 2>/dev/null; sleep 1; for n in $R $A $B; do ip netns del $n 2>/dev/null || true; done; rm -rf /tmp/idle$T; }
trap cleanup EXIT
for n in $R $A $B; do ip netns add $n; done
ip -n $R link add va type veth peer name pa netns $A
ip -n $R link add vb type veth peer name pb netns $B
ip -n $R addr add 10.77.1.1/24 dev va; ip -n $R addr add 10.77.2.1/24 dev vb
ip -n $A addr add 10.77.1.2/24 dev pa; ip -n $B addr add 10.77.2.2/24 dev pb
for n in $R $A $B; do ip -n $n link set lo up; done
ip -n $R link set va up; ip -n $R link set vb up; ip -n $A link set pa up; ip -n $B link set pb up
ip netns exec $A ethtool -K pa gro on; ip netns exec $B ethtool -K pb gro on
ip netns exec $R sysctl -qw net.ipv4.ip_forward=1
mkdir -p /tmp/idle$T
nsenter --net=/run/netns/$R $BIN run --instance idle$T --state-dir /tmp/idle$T --iface va --iface vb --xdp-mode native > /tmp/idle$T/log 2>&1 &
PID=$!
sleep 5
kill -0 $PID
tck=$(getconf CLK_TCK)
s1=$(awk '{print $14+$15+$16+$17}' /proc/$PID/stat); sleep 60; s2=$(awk '{print $14+$15+$16+$17}' /proc/$PID/stat)
echo "idle CPU over 60 s: $(( (s2-s1)*1000/tck )) ms ($BIN)"

#!/bin/sh
# Run a command (e.g. the test suite) and report every packet it sent off the machine.
#
#   scripts/watch-egress.sh .venv/bin/python -m pytest -q tests/integration
#
# Needs root and nft.  The command runs with a group id of its own (setpriv --regid), so an
# nftables table in the root namespace can tell its sockets (meta skgid) from those of other
# users of a shared machine.  Counted, for that group:
#   dns:     UDP/TCP port 53 to the host's resolvers (the nameservers in /etc/resolv.conf)
#   other:   any IPv4 destination outside 127.0.0.0/8, 10.231.0.0/16 (the test veth pool) and
#            the machine's own addresses, any IPv6 destination outside ::1, fe80::/10, ff00::/8
#            and the machine's own addresses
#   forward: anything the root namespace forwards (a test namespace trying to get out)
# with each destination (address . protocol . port) kept in a set that is printed at the end.
# Exit status: the command's, or 3 if it ran cleanly but something left the machine.
# The machine's own addresses (e.g. eth0's, which magicsock offers as endpoints) count as
# local: the kernel delivers those over loopback.
# Run it around pytest itself, not around an install step (pip/apt reach registries).
set -eu

[ "$#" -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: needs root (nftables in the root namespace)" >&2; exit 2; }
command -v nft >/dev/null || { echo "$0: nft is missing" >&2; exit 2; }

gid=$(( 40000 + $$ % 20000 ))
table="tsp_egress_$$"
resolvers=$(awk '$1 == "nameserver" && $2 ~ /^[0-9.]+$/ { printf "%s%s", sep, $2; sep = ", " }' /etc/resolv.conf)
[ -n "$resolvers" ] || resolvers="10.255.255.53"

own4=$(ip -o -4 addr show | awk '{ split($4, a, "/"); printf ", %s", a[1] }')
own6=$(ip -o -6 addr show | awk '{ split($4, a, "/"); printf ", %s", a[1] }')

cleanup() { nft delete table inet "$table" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nft -f - <<EOF
table inet $table {
  set dst4 { type ipv4_addr . inet_proto . inet_service; flags dynamic; size 65536; }
  set dst6 { type ipv6_addr . inet_proto . inet_service; flags dynamic; size 65536; }
  chain out {
    type filter hook output priority -300; policy accept;
    meta skgid $gid ip daddr { $resolvers } udp dport 53 counter comment "dns-udp"
    meta skgid $gid ip daddr { $resolvers } tcp dport 53 counter comment "dns-tcp"
    meta skgid $gid ip daddr != { 127.0.0.0/8, 10.231.0.0/16$own4 } counter add @dst4 { ip daddr . meta l4proto . th dport } comment "other-v4"
    meta skgid $gid ip6 daddr != { ::1, fe80::/10, ff00::/8$own6 } counter add @dst6 { ip6 daddr . meta l4proto . th dport } comment "other-v6"
  }
  chain forwarded {
    type filter hook forward priority -300; policy accept;
    counter comment "forward"
  }
}
EOF

echo "watch-egress: group $gid, table inet $table, resolvers { $resolvers }" >&2
set +e
setpriv --regid "$gid" --clear-groups -- "$@"
rc=$?
set -e

listing=$(nft list table inet "$table")
count() { printf '%s\n' "$listing" | awk -v c="\"$1\"" '$0 ~ c { for (i = 1; i <= NF; i++) if ($i == "packets") print $(i + 1) }'; }
dns=$(( $(count dns-udp) + $(count dns-tcp) ))
v4=$(count other-v4); v6=$(count other-v6); fwd=$(count forward)
echo "watch-egress: DNS packets to the host resolver: $dns" >&2
echo "watch-egress: packets to non-local IPv4: $v4, IPv6: $v6; forwarded by the root namespace: $fwd" >&2
printf '%s\n' "$listing" | awk '/elements = /,/}/' | sed 's/^/watch-egress:   /' >&2
if [ "$rc" = 0 ] && [ $(( dns + v4 + v6 + fwd )) -ne 0 ]; then
  exit 3
fi
exit "$rc"

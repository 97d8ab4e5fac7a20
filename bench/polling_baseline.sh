#!/bin/sh
# The 1 s polling peer of the benchmarks, shaped like the original product's script:
# every INTERVAL seconds `kill -0 $(cat PIDFILE)`; on failure put the REJECT rule in the chain,
# on success empty the chain. Run it only inside a network namespace made for the benchmark.
#
#   polling_baseline.sh loop PIDFILE [PORT] [CHAIN] [INTERVAL]   the polling loop (creates the chain)
#   polling_baseline.sh setup   [PORT] [CHAIN]                   create the chain and its INPUT jump
#   polling_baseline.sh block   [PORT] [CHAIN]                   the failure action (monit's exec too)
#   polling_baseline.sh unblock [PORT] [CHAIN]                   the success action (monit's exec too)
set -u
IPTABLES=${IPTABLES:-iptables}

setup() {  # port chain
  $IPTABLES -w -N "$2" 2>/dev/null || true
  $IPTABLES -w -C INPUT -j "$2" 2>/dev/null || $IPTABLES -w -I INPUT 1 -j "$2"
}

block() {  # port chain: one REJECT rule, whatever the chain held before
  $IPTABLES -w -F "$2"
  $IPTABLES -w -A "$2" ! -i lo -p tcp -m tcp --dport "$1" -j REJECT --reject-with icmp-port-unreachable
}

unblock() {  # port chain
  $IPTABLES -w -F "$2"
}

cmd=${1:-}
case "$cmd" in
  setup|block|unblock)
    "$cmd" "${2:-8080}" "${3:-sslvpn-heartbeat-chain}"
    ;;
  loop)
    [ $# -ge 2 ] || { echo "usage: $0 loop PIDFILE [PORT] [CHAIN] [INTERVAL]" >&2; exit 2; }
    pidfile=$2; port=${3:-8080}; chain=${4:-sslvpn-heartbeat-chain}; interval=${5:-1}
    setup "$port" "$chain"
    state=unknown
    while :; do
      if kill -0 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null; then
        [ "$state" = open ] || { unblock "$port" "$chain" && state=open; }
      else
        [ "$state" = blocked ] || { block "$port" "$chain" && state=blocked; }
      fi
      sleep "$interval"
    done
    ;;
  *)
    echo "usage: $0 loop PIDFILE [PORT] [CHAIN] [INTERVAL] | setup|block|unblock [PORT] [CHAIN]" >&2
    exit 2
    ;;
esac

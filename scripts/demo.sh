#!/usr/bin/env bash
# The local marketplace serving a paid job end to end, as its users would run it by hand:
#   chain up (Anvil + `brownie run deploy`) -> embedded IPFS node -> import SmolLM2, shard it in
#   three bf16 ranges, publish the shards (pinned, registered on chain) -> three workers with
#   different profiles fetch their shards by CID, each staked and registered by its operator
#   -> broker -> a client deposits escrow and runs a paid job -> settled on chain.
#
# Everything binds to 127.0.0.1. Processes keep running afterwards (pids in $DLIS_HOME/run):
#   stop them all:   bash scripts/demo.sh stop      (or: make demo-stop)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PWD/.venv/bin:$PATH"
export DLIS_HOME="${DLIS_HOME:-$PWD/.dlis-demo}"
PORT="${DEMO_PORT:-8545}"
BROKER_PORT="${DEMO_BROKER_PORT:-8080}"
ORACLE_PORT="${DEMO_ORACLE_PORT:-8090}"
METRICS_BASE="${DEMO_METRICS_BASE:-9100}"  # worker i serves /metrics on METRICS_BASE + i (ops/prometheus.yml)
# Every port is settable, so a second copy runs next to the first with its own DLIS_HOME, e.g.
#   DLIS_HOME=/tmp/demo2 DEMO_PORT=8645 DEMO_BROKER_PORT=8180 DEMO_ORACLE_PORT=8190 \
#   DEMO_IPFS_API_PORT=5901 DEMO_IPFS_SWARM_PORT=4901 DEMO_IPFS_GATEWAY_PORT=8901 DEMO_METRICS_BASE=9200 \
#   bash scripts/demo.sh
# (workers and their DHT take free ports by themselves).
export DLIS_STORAGE__API_PORT="${DEMO_IPFS_API_PORT:-5801}"
export DLIS_STORAGE__SWARM_PORT="${DEMO_IPFS_SWARM_PORT:-4801}"
export DLIS_STORAGE__GATEWAY_PORT="${DEMO_IPFS_GATEWAY_PORT:-8801}"
export DLIS_CHAIN__RPC_URL="http://127.0.0.1:${PORT}"
export DLIS_BROKER__PORT="$BROKER_PORT"
export DLIS_BROKER__SETTLE_INTERVAL_S=2
RUN="$DLIS_HOME/run"
LOGS="$DLIS_HOME/logs"
mkdir -p "$RUN" "$LOGS"

stop_all() {
  for pidfile in "$RUN"/*.pid; do
    [ -e "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true  # each process shuts its own children down on SIGTERM
    rm -f "$pidfile"
  done
  dlis chain down --port "$PORT" || true
}
if [ "${1:-}" = "stop" ]; then stop_all; exit 0; fi

running() { [ -e "$RUN/$1.pid" ] && kill -0 "$(cat "$RUN/$1.pid")" 2>/dev/null; }
spawn() {  # spawn NAME LOGFILE CMD...: a background process that outlives this script, pid in $RUN/NAME.pid
  local name=$1 log=$2; shift 2
  nohup "$@" >"$log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}
phase() { echo "== [${SECONDS}s] $*"; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "timed out waiting for $what; see $LOGS" >&2; exit 1; fi
    sleep 1
  done
}
# json EXPR: evaluate EXPR on the JSON document on stdin (d); a command's progress lines before it are skipped
json() { python -c "
import json, sys
t = sys.stdin.read().strip()
d = json.loads(t[t.index('{'):] if t[:1] != '[' and '{' in t else t)
print($1)"; }
# the dev mnemonic's first ten addresses, derived once (dev:0 deploys, dev:1 brokers, dev:4-7 operate workers, dev:9 pays)
read -r -a DEV_ADDRS <<< "$(python -c "from dlis_market.chain.accounts import dev_accounts as d; from dlis_market.settings import Settings as S; print(*(a.address for a in d(S.load().chain.dev_mnemonic)[:10]))")"
dev_addr() { echo "${DEV_ADDRS[$1]}"; }

phase "chain"
dlis chain up --port "$PORT"
DEPLOY="$DLIS_HOME/deployments/31337.json"
MARKET=$(python -c "import json; print(json.load(open('$DEPLOY'))['contracts']['JobMarket']['address'])")
REGISTRY=$(python -c "import json; print(json.load(open('$DEPLOY'))['contracts']['NodeRegistry']['address'])")
REPUTATION=$(python -c "import json; print(json.load(open('$DEPLOY'))['contracts']['ReputationOracle']['address'])")
ORACLE_URL="http://127.0.0.1:${ORACLE_PORT}"

phase "oracle (telemetry, reputation epochs, spot-check evidence -> slashing) and IPFS (embedded Kubo, private, loopback), started together"
if ! running oracle; then
  # the broker (dev:1) re-executes stage calls and signs the evidence: the oracle trusts it as a runner
  DLIS_ORACLE__SPOT_CHECK_RUNNERS="[\"$(dev_addr 1)\"]" spawn oracle "$LOGS/oracle.log" dlis oracle start --port "$ORACLE_PORT"
fi
if ! running ipfs; then spawn ipfs "$LOGS/ipfs.log" dlis ipfs daemon; fi
wait_for 60 "the IPFS daemon" dlis ipfs id
wait_for 60 "the oracle" python -c "import httpx; httpx.get('$ORACLE_URL/metrics').raise_for_status()"
# what the node advertises to fetchers: its read-only trustless gateway (never its RPC API)
IPFS_GATEWAY=$(dlis ipfs id --json | json 'd["gateway"]')

phase "model: import, shard, publish"
SHARDS="$DLIS_HOME/shards/smollm2-135m"
dlis model import smollm2-135m
# (re-)shard when there are no shards, or they were written by an older format this build refuses
if ! python -c "from pathlib import Path; from dlis_market.inference.manifest import load_manifest; load_manifest(Path('$SHARDS'))" 2>/dev/null; then
  rm -rf "$SHARDS"
  dlis model shard "$DLIS_HOME/models/smollm2-135m" --stages 3 --dtype bf16 --out "$SHARDS"
fi
PUB=$(dlis model publish "$SHARDS" --json)
CID=$(echo "$PUB" | json 'd["manifest_cid"]')
SHA=$(echo "$PUB" | json 'd["manifest_sha256"]')
echo "manifest CID $CID (sha256 $SHA), registered on chain"

phase "workers: three profiles and a second laptop on [10, 20) to re-check the first; the first is the DHT bootstrap, the rest start as soon as its DHT listens"
SPECS=("0:10 phone 2048 1 1000000000000" "10:20 laptop 8192 1 2000000000000" "20:30 server 65536 2 3000000000000"
       "10:20 laptop 8192 1 2000000000000")
BOOT=""
start_worker() {  # start_worker I: spawn worker I (1-based) unless it runs
  local i=$1 W="$DLIS_HOME/workers/w$1" LAYERS CLASS MEM THREADS PRICE
  read -r LAYERS CLASS MEM THREADS PRICE <<< "${SPECS[$((i - 1))]}"
  mkdir -p "$W/deployments" && cp "$DEPLOY" "$W/deployments/"
  [ -e "$W/password" ] || python -c "import secrets; print(secrets.token_hex(16))" > "$W/password"
  if ! running "worker$i"; then
    local PEERS=(); [ -n "$BOOT" ] && PEERS=(--initial-peer "$BOOT")
    DLIS_HOME="$W" spawn "worker$i" "$LOGS/worker$i.log" dlis node start --manifest-cid "$CID" \
      --manifest-sha256 "$SHA" --provider "$IPFS_GATEWAY" --layers "$LAYERS" --threads "$THREADS" --price "$PRICE" \
      --chain-id 31337 --market "$MARKET" --registry "$REGISTRY" --password-file "$W/password" "${PEERS[@]}" \
      --oracle-url "$ORACLE_URL" --reputation "$REPUTATION" --metrics-port $((METRICS_BASE + i))
  fi
}
line_json() { grep "^DLIS_NODE_$2 " "$LOGS/worker$1.log" | tail -1 | sed "s/^DLIS_NODE_$2 //"; }  # line_json I JOINED|READY
enroll_worker() {  # enroll_worker I: worker I's operator dev:(3+I) stakes once the node's DHT is up, registers once it serves
  local i=$1 W="$DLIS_HOME/workers/w$1" OP=$((3 + $1)) LAYERS CLASS MEM THREADS PRICE READY NODE NEW=""
  read -r LAYERS CLASS MEM THREADS PRICE <<< "${SPECS[$((i - 1))]}"
  wait_for 300 "worker $i's DHT" grep -q '^DLIS_NODE_JOINED ' "$LOGS/worker$i.log"
  NODE=$(line_json "$i" JOINED | json 'd["node_address"]')
  if ! DLIS_HOME="$W" dlis node status "$NODE" --json | json 'd["nodes"]' | grep -q "$NODE"; then
    NEW=1
    wait_for 120 "the operators' funding (see $LOGS/funding.log)" test -e "$RUN/operators-funded"
    DLIS_HOME="$W" dlis node stake 1000 --account "dev:$OP"  # while the worker loads its stage
  fi
  wait_for 300 "worker $i" grep -q '^DLIS_NODE_READY ' "$LOGS/worker$i.log"
  if [ -n "$NEW" ]; then  # registering needs the attestation hash of the serving worker
    READY=$(line_json "$i" READY)
    DLIS_HOME="$W" dlis node register --account "dev:$OP" --node-key node --node-password-file "$W/password" \
      --peer-id "$(echo "$READY" | json 'd["peer_id"]')" --attestation-hash "$(echo "$READY" | json 'd["attestation_hash"]')" \
      --endpoint "$(echo "$READY" | json 'd["maddrs"][0]')" --device-class "$CLASS" --memory-mib "$MEM"
  fi
  echo "[${SECONDS}s] worker $i serves [${LAYERS/:/, }) as a $CLASS, node $NODE"
}
start_worker 1
# meanwhile the deployer funds the four operators and a client (one account: its transactions go
# one at a time), and the client deposits escrow for the broker
CLIENT=$(dev_addr 9)
rm -f "$RUN/operators-funded"
( for i in 1 2 3 4; do dlis chain faucet "$(dev_addr $((3 + i)))" 1500 >/dev/null; done
  touch "$RUN/operators-funded"
  dlis chain faucet "$CLIENT" 100 && dlis job deposit 50 --account dev:9 ) > "$LOGS/funding.log" 2>&1 &
FUNDING=$!
wait_for 300 "worker 1's DHT" grep -q '^DLIS_NODE_JOINED ' "$LOGS/worker1.log"
echo "[${SECONDS}s] worker 1's DHT is up: the others join through it while it loads its stage"
BOOT=$(line_json 1 JOINED | json 'd["maddrs"][0] + "/p2p/" + d["peer_id"] if "/p2p/" not in d["maddrs"][0] else d["maddrs"][0]')
for i in 2 3 4; do start_worker "$i"; done
if ! running broker; then  # it needs only the DHT bootstrap: it finds the workers as they announce
  # every stage call is spot-checked here (default 2 %) so that the demo shows one
  DLIS_BROKER__ORACLE_URL="$ORACLE_URL" DLIS_BROKER__SPOT_CHECK_FRACTION=1 \
    spawn broker "$LOGS/broker.log" dlis broker start --model-dir "$SHARDS" --initial-peer "$BOOT"
fi
ENROLL=()
for i in 1 2 3 4; do enroll_worker "$i" & ENROLL+=($!); done  # four operators: four nonce sequences, in parallel
for pid in "${ENROLL[@]}"; do wait "$pid"; done
wait "$FUNDING" || { cat "$LOGS/funding.log" >&2; exit 1; }

phase "broker"
wait_for 120 "the broker" python -c "import httpx; httpx.get('http://127.0.0.1:$BROKER_PORT/healthz').raise_for_status()"

phase "a client pays for a job"
cat "$LOGS/funding.log"  # its escrow, deposited while the workers started
JOB=$(dlis job submit --account dev:9 --prompt "What is the capital of France?" --chat --max-tokens 24 --json)
echo "$JOB" | python -c "
import json, sys
j = json.load(sys.stdin)
print('answer :', j['answer'].strip())
print('route  :', ' -> '.join(f\"{h['node'][:10]} [{h['start']}, {h['end']})\" for h in j['route']))
print(f\"latency: {j['latency_ms']:.0f} ms, first token {j['ttft_ms']:.0f} ms\")
print(f\"cost   : {int(j['cost'])/1e18:.6f} DLIS + protocol fee {int(j['fee'])/1e18:.6f} DLIS\")
"
JOB_ID=$(echo "$JOB" | json 'd["id"]')
dlis job status "$JOB_ID" --wait 60 --json | json '"settled in transaction " + d["settlement"]["tx_hash"] + " (block " + str(d["settlement"]["block"]) + ")"'
METRICS="http://127.0.0.1:$BROKER_PORT/metrics"
wait_for 60 "the spot check" python -c "import httpx; assert 'spot_checks_total{outcome=\"pass\"}' in httpx.get('$METRICS').text"
CHECKS=$(python -c "
import httpx
rows = [l for l in httpx.get('$METRICS').text.splitlines() if l.startswith('dlis_broker_spot_checks_total')]
print(', '.join(l.split('\"')[1] + ' ' + str(int(float(l.rsplit(' ', 1)[1]))) for l in rows))")
echo "spot checks (stage calls re-run on another node, judged by the oracle): $CHECKS"
echo
phase "done"
echo "Dashboard and explorer: http://127.0.0.1:$BROKER_PORT/  (API: /docs)"
echo "Everything keeps running (pids in $RUN). Stop it all with: bash scripts/demo.sh stop"

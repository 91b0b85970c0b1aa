#!/usr/bin/env bash
# The local marketplace, as an operator would bring it up by hand:
# chain up (Anvil + `brownie run deploy`), fund an operator, stake, register a node, show it all.
# Keep it running: the chain stays up in the background (state in $DLIS_HOME/chain).
# Stop it:         .venv/bin/dlis chain down
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/node_modules/.bin:$PWD/.venv/bin:$PATH"
export DLIS_HOME="${DLIS_HOME:-$PWD/.dlis-demo}"
PORT="${DEMO_PORT:-8545}"
export DLIS_CHAIN__RPC_URL="http://127.0.0.1:${PORT}"

dlis chain up --port "$PORT"

# Dev chain accounts: dev:4 is the demo operator, dev:5 its node's signing key.
OPERATOR=$(python -c "from dlis_market.chain.accounts import dev_accounts as d; from dlis_market.settings import Settings as S; print(d(S.load().chain.dev_mnemonic)[4].address)")
NODE=$(python -c "from dlis_market.chain.accounts import dev_accounts as d; from dlis_market.settings import Settings as S; print(d(S.load().chain.dev_mnemonic)[5].address)")

if ! dlis node status "$OPERATOR" --json | python -c "import json,sys; sys.exit(0 if json.load(sys.stdin)['nodes'] else 1)"; then
  dlis chain faucet "$OPERATOR" 5000
  dlis node stake 2000 --account dev:4
  dlis node register --account dev:4 --node-key dev:5 \
    --peer-id "12D3KooWDemoNode${NODE:2:8}" --endpoint /ip4/127.0.0.1/tcp/31337 \
    --memory-mib 8192 --gflops 120 --bandwidth-mbps 1000 --device-class laptop
fi
echo
dlis chain status
echo
dlis node status "$OPERATOR"
echo
echo "The chain keeps running on 127.0.0.1:${PORT} (state in $DLIS_HOME/chain). Stop it with: DLIS_HOME=$DLIS_HOME .venv/bin/dlis chain down --port ${PORT}"

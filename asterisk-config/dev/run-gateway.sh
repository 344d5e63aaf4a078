#!/usr/bin/env bash
# `make run`: the gateway on the dev PBX (already up), with a dev config, a dev API
# key and a curl that rings the simulated phone. Everything it makes lives in var/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

mkdir -p var
config=var/dev.yaml
[ -f "$config" ] || cp config.example.yaml "$config"
if [ ! -f var/dev.env ]; then
    umask 077
    {
        echo "AMI_SECRET=otp-dev-secret"
        echo "OTP_CODE_SECRET=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
    } >var/dev.env
fi
set -a
# shellcheck disable=SC1091
. var/dev.env
set +a

py=.venv/bin/python
key=$(cat var/dev.key 2>/dev/null || true)
if [ -z "$key" ] || ! $py - "$config" "$key" <<'PY'
import asyncio, sys
from gateway import apikeys, config
from gateway.store import open_store

async def valid() -> bool:
    store = await open_store(config.database_url(config.load(sys.argv[1]).database))
    try:
        return await apikeys.authenticate(store, sys.argv[2]) is not None
    finally:
        await store.close()

sys.exit(0 if asyncio.run(valid()) else 1)
PY
then
    key=$($py -m gateway keys create dev --config "$config" | tail -n 1)
    (umask 077 && echo "$key" >var/dev.key)
fi

port=$($py -c "from gateway import config; print(config.load('$config').http.port)")
operator=$($py -c "from gateway import config; h = config.load('$config').http; print(f'{h.operator_host}:{h.operator_port}')")
cat <<TXT

  otp-gateway dev: config $config, API key in var/dev.key
  Ring the simulated phone (numbers ending in 0 ring; see tests/sipp/README.md):

    curl -sS -X POST http://127.0.0.1:$port/v1/verifications \\
      -H "Authorization: Bearer $key" \\
      -H 'Content-Type: application/json' \\
      -d '{"phone": "+6281234567890"}'

  Or follow one call live:  OTP_API_KEY=$key $py -m gateway call +6281234567890 --url http://127.0.0.1:$port
  Dashboard: http://$operator/dashboard   Metrics: http://$operator/metrics
  Stop with Ctrl-C; then 'make pbx-down farend-down' stops the dev PBX and the far end.

TXT
exec $py -m gateway run --config "$config"

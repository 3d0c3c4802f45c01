#!/bin/bash
# The enclave container of deploy/lesion-fleet.yaml: start the EIF with nitro-cli (never
# --debug-mode: a debug enclave's PCRs are all zero and the host can read its console),
# publish its CID for the relay, stay up while it runs, terminate it when the pod stops.
set -euo pipefail
: "${EIF_PATH:?}" "${ENCLAVE_CPUS:?}" "${ENCLAVE_MEMORY_MIB:?}" "${CID_FILE:?}"

started=$(nitro-cli run-enclave --eif-path "$EIF_PATH" --cpu-count "$ENCLAVE_CPUS" \
          --memory "$ENCLAVE_MEMORY_MIB")
enclave_id=$(jq -r .EnclaveID <<<"$started")
cid=$(jq -r .EnclaveCID <<<"$started")
echo "enclave $enclave_id running with CID $cid"
printf '%s\n' "$cid" > "$CID_FILE.tmp" && mv "$CID_FILE.tmp" "$CID_FILE"

stop() {
    nitro-cli terminate-enclave --enclave-id "$enclave_id" || true
    exit 0
}
trap stop TERM INT

# The pod lives as long as the enclave: if it stops, exit so Kubernetes restarts the pod.
while [ "$(nitro-cli describe-enclaves | jq -r --arg id "$enclave_id" \
          '.[] | select(.EnclaveID == $id) | .State')" = "RUNNING" ]; do
    sleep 5 &
    wait $!
done
echo "enclave $enclave_id is no longer running" >&2
exit 1

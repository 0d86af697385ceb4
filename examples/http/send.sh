#!/bin/sh
# Send events to the Nexus gateway with curl. Usage: TOKEN=nxg_... ./send.sh [http://127.0.0.1:8080]
# The event id is the idempotency key: re-running this script answers "duplicate", journals nothing twice.
set -eu
GW=${1:-http://127.0.0.1:8080}
: "${TOKEN:?set TOKEN (nexus tokens create NAME --sources ... --types ...)}"

# one event
curl -sS "$GW/v1/events" -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \
  -d '{"type": "parrot.notification", "source": "parrot", "id": "example-1", "payload": {
        "app_id": "outlook", "app_name": "Outlook", "title": "Hi", "body": "Lunch?",
        "notification_type": "message", "received_at": 1720000000.5}}'
echo

# a batch: one result per event (207 when some are rejected)
curl -sS -w ' (HTTP %{http_code})\n' "$GW/v1/events" -H "Authorization: Bearer $TOKEN" \
  -H 'Content-Type: application/json' \
  -d '[{"type": "parrot.notification", "source": "parrot", "id": "example-2", "payload": {"app_id": "x"}},
       {"type": "parrot.notification", "source": "parrot", "id": "example-1", "payload": {
        "app_id": "outlook", "app_name": "Outlook", "title": "Hi", "body": "Lunch?",
        "notification_type": "message", "received_at": 1720000000.5}}]'

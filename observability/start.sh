#!/usr/bin/env bash
# Start Prometheus and Grafana for a `xbench serve` running on this host (port 8080 by default).
set -euo pipefail
cd "$(dirname "$0")"
docker compose up -d
echo "Prometheus: http://localhost:9090  Grafana: http://localhost:3000 (dashboard: xbench rerank server)"

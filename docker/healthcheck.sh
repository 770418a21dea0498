#!/usr/bin/env bash
# Docker HEALTHCHECK: every supervised program RUNNING, and the nnInteractive server answering.
set -euo pipefail
supervisorctl -c /etc/segmentation-machine/supervisord.conf status >/dev/null
curl -fsS --max-time 5 -o /dev/null http://127.0.0.1:8000/healthz

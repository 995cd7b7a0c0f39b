#!/usr/bin/env bash
# Rebuild dashboard/static/plotly-routescope.min.js (plotly.js with only the dashboard's trace
# types, docs/dashboard.md "plotly.js") from the npm registry, with the pinned versions of
# scripts/plotly_bundle/package-lock.json. Needs node and npm; not part of CI or of installing
# routescope (the built file is in the repository). After changing the trace list in
# dashboard/plotly_bundle.json, or the plotly.js version there and in package.json, run this
# and commit the bundle and the json (its sha256 is checked by tests/test_dashboard_javascript.py).
set -euo pipefail
cd "$(dirname "$0")/plotly_bundle"
npm ci --no-audit --no-fund --ignore-scripts=false
node build.js

#!/usr/bin/env bash
# `make demo` → `bash scripts/run-demo.sh $(BIN)`: the napari-smsdl demo on the built-in sample.
#
# With a display, napari opens with the sample loaded and the Load / Register / Train / Compare /
# Export & project widgets docked. With no display (CI, ssh, a container) or SMSDL_DEMO_HEADLESS=1,
# the whole pipeline runs headless (fast preset) and writes figure.png and metrics.json into
# ${DEMO_OUTPUT:-demo-output}. The display check (can Qt really open it?) is done in Python.
set -euo pipefail

BIN="${1:-.venv/bin}"
OUT="${DEMO_OUTPUT:-demo-output}"
ARGS=(-o "$OUT")
if [[ "${SMSDL_DEMO_HEADLESS:-0}" == "1" ]]; then
    ARGS+=(--headless)
fi
if [[ ! -x "$BIN/python" ]]; then
    echo "run-demo.sh: no Python at $BIN/python (run 'make demo', which creates the venv)" >&2
    exit 2
fi
exec "$BIN/python" -m napari_smsdl demo "${ARGS[@]}"

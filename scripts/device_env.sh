# Sourced by scripts/device_ladder.sh and scripts/device_saturate.sh (from the
# repository root): PY is the interpreter ($PYTHON, default python3). With
# WHEELS=DIR, DIR/*.whl and this checkout go into a private site directory
# first, for a bare machine that cannot reach a package index.
PY=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
    # The installed layout: router/ and shard/ inside the garin package. (The
    # tools' garin_bench needs nothing: scripts/*.py find it beside them.)
    cp -r garin "$SITE/garin" && cp -r router "$SITE/garin/router" && cp -r shard "$SITE/garin/shard"
    export PYTHONPATH=$SITE
fi

#!/usr/bin/env bash
# Check that the lower bounds in pyproject.toml are honest: install every direct dependency
# ([project] dependencies and the [cpu] and [test] extras) at its LOWEST allowed version
# (uv's --resolution lowest-direct; indirect dependencies take their newest compatible
# release) into a throwaway venv, then run the quick tests against it.
#
#   scripts/check_lower_bounds.sh            # the quick tests
#   scripts/check_lower_bounds.sh -k cube    # extra pytest arguments are passed on
#
# Environment: PYTHON (default python3, >= 3.11), KEEP_VENV=1 keeps the venv (its path is
# printed). Needs PyPI; takes a few minutes (about 1 GB of wheels, TensorFlow included, on
# a cold uv cache). Nothing in the repository or its .venv is touched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
QUICK_TESTS=(
  tests/test_config.py tests/test_bad_config.py tests/test_patches.py tests/test_stac.py
  tests/test_cube.py tests/test_composite.py tests/test_outdir.py tests/test_labels.py
  tests/test_vectorize.py tests/test_cluster.py
)

start=$SECONDS
TMP="$(mktemp -d -t agriland-lowest-XXXXXX)"
cleanup() {
  if [[ "${KEEP_VENV:-0}" == 1 ]]; then
    echo "kept the venv: $TMP/venv"
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT

VENV="$TMP/venv"
echo "== venv $VENV ($("$PYTHON" --version))"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet uv

echo "== installing the lowest direct versions of .[cpu,test]"
# one source build at a time: the machines have 2 cores
UV_CONCURRENT_BUILDS="${UV_CONCURRENT_BUILDS:-1}" \
  "$VENV/bin/uv" pip install --python "$VENV/bin/python" --resolution lowest-direct \
  -e "$ROOT[cpu,test]"

echo "== versions installed"
"$VENV/bin/uv" pip list --python "$VENV/bin/python" 2>/dev/null | grep -iE \
  '^(numpy|xarray|dask|distributed|zarr|rasterio|rioxarray|pystac|pystac-client|odc-stac|odc-geo|keras|tensorflow|tensorflow-cpu|scikit-learn|pydantic|shapely|geopandas|pandas|scipy|pyarrow|matplotlib|affine|pyproj|rustac) ' || true

echo "== quick tests"
cd "$ROOT"
# the editable install makes the venv import agriland_scale from this checkout
"$VENV/bin/python" -c 'import agriland_scale, sys; print("agriland_scale from", agriland_scale.__file__)'
rc=0
"$VENV/bin/python" -m pytest -x -q -p no:cacheprovider -m "not slow" "${QUICK_TESTS[@]}" "$@" || rc=$?
echo "== lower-bounds check: pytest exit $rc, $((SECONDS - start)) s"
exit "$rc"

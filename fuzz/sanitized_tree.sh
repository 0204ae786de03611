# Sourced by run_sanitized.sh and run_tsan.sh (POSIX sh, set -eu): copy the tree into
# a temporary directory, removed on exit, build the compiled core there with the
# sanitizers in $SANITIZERS (KVMEMU_SANITIZE, see setup.py), and cd into it.  The
# normal in-place build is not touched.
python -c 'import Cython, setuptools; assert int(setuptools.__version__.split(".")[0]) >= 77' \
    2>/dev/null || { echo "needs the build requirements: pip install 'setuptools>=77' 'Cython>=3.1' numpy" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kvmemu-sanitized.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

mkdir -p "$WORK/tree"
cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$ROOT/kvmemu" "$ROOT/tests" \
      "$ROOT/examples" "$ROOT/docs" \
      "$ROOT/fuzz" "$WORK/tree/"
find "$WORK/tree/kvmemu" -name '*.so' -delete
cd "$WORK/tree"
KVMEMU_SANITIZE=$SANITIZERS python setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1 \
    || { cat "$WORK/build.log"; exit 1; }
export PYTHONPATH="$WORK/tree"
export PYTHONDONTWRITEBYTECODE=1

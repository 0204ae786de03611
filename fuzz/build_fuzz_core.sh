#!/bin/sh
# Build the compiled core for coverage-guided fuzzing -- clang's
# -fsanitize=fuzzer-no-link (libFuzzer's coverage counters, which atheris reads)
# with AddressSanitizer -- in a temporary copy of the tree, then run the fast
# harness (fuzz/fuzz_fast.py) on it with atheris's ASan+libFuzzer runtime
# preloaded.  The arguments go to libFuzzer; the corpus directory comes first.
#
#   fuzz/build_fuzz_core.sh /tmp/corpus fuzz/corpus -max_total_time=600
#   fuzz/build_fuzz_core.sh /tmp/corpus fuzz/corpus -fork=2 -max_total_time=3600
#
# Needs clang (apt-get install clang), atheris (pip install atheris) and the build
# requirements (pip install 'setuptools>=77' 'Cython>=3.1' numpy); the normal in-place
# build is not touched.  KVMEMU_FUZZ_KEEP=DIR keeps the built tree in DIR for the next
# run; KVMEMU_FUZZ_SANITIZE=fuzzer-no-link,undefined builds without ASan (faster;
# memory errors then show only as crashes).
set -eu
command -v clang >/dev/null || { echo "needs clang (apt-get install clang)" >&2; exit 2; }
python -c 'import atheris, Cython, setuptools; assert int(setuptools.__version__.split(".")[0]) >= 77' \
    2>/dev/null || { echo "needs: pip install atheris 'setuptools>=77' 'Cython>=3.1' numpy" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${KVMEMU_FUZZ_KEEP:-$(mktemp -d "${TMPDIR:-/tmp}/kvmemu-fuzz.XXXXXX")}
[ -n "${KVMEMU_FUZZ_KEEP:-}" ] || trap 'rm -rf "$WORK"' EXIT

if [ ! -f "$WORK/tree/.built" ]; then
    mkdir -p "$WORK/tree"
    cp -r "$ROOT/setup.py" "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/LICENSE" "$ROOT/kvmemu" \
          "$ROOT/fuzz" "$WORK/tree/"
    find "$WORK/tree/kvmemu" -name '*.so' -delete
    (cd "$WORK/tree" && CC=clang CXX=clang++ LDSHARED="clang -shared" \
        KVMEMU_SANITIZE=${KVMEMU_FUZZ_SANITIZE:-fuzzer-no-link,address} \
        python setup.py -q build_ext --inplace \
        >"$WORK/build.log" 2>&1) || { cat "$WORK/build.log"; exit 1; }
    touch "$WORK/tree/.built"
fi

ATHERIS=$(python -c 'import atheris, os; print(atheris.path())')
case ${KVMEMU_FUZZ_SANITIZE:-address} in          # libFuzzer's runtime, with the sanitizer's
    *address*) export LD_PRELOAD="$ATHERIS/asan_with_fuzzer.so"
               export ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 ;;
    *)         export LD_PRELOAD="$ATHERIS/ubsan_with_fuzzer.so" ;;
esac
export PYTHONPATH="$WORK/tree"
export PYTHONDONTWRITEBYTECODE=1
chmod +x "$WORK/tree/fuzz/fuzz_fast.py"     # -fork re-runs it as a command
exec python "$WORK/tree/fuzz/fuzz_fast.py" "$@"

#!/bin/sh
# Build the compiled core with ThreadSanitizer in a temporary copy of the tree, then
# run the tests that run vCPUs, conversions and memslot changes on real threads
# (tests/test_threads.py, tests/test_loop_faults.py) under it, on the compiled core.
# The interpreter is not instrumented: ThreadSanitizer checks the core's own memory
# accesses, and sees the GIL and the core's locks through the pthread calls.  Table
# entries are relaxed atomics in this build (volatile accesses otherwise: the same
# loads and stores on x86).  The normal in-place build is not touched.
#
#   fuzz/run_tsan.sh [PYTEST ARGS...]     # default: the two threaded test files
set -eu
SANITIZERS=thread
. "$(dirname "$0")/sanitized_tree.sh"

# The interpreter itself, not a wrapper script (a preloaded runtime must start with it).
PYTHON=$(python -c 'import sys; print(sys.executable)')
LIBTSAN=$(${CC:-gcc} -print-file-name=libtsan.so)
# Reports go to files (pytest captures the tests' stderr), printed if there are any.
export TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0:exitcode=66:log_path=$WORK/tsan"
export OPENBLAS_NUM_THREADS=1
[ $# -gt 0 ] || set -- tests/test_threads.py tests/test_loop_faults.py
status=0
LD_PRELOAD="$LIBTSAN" "$PYTHON" -m pytest -q -p no:cacheprovider -p no:randomly -k cython "$@" \
    || status=$?
if ls "$WORK"/tsan.* >/dev/null 2>&1; then
    cat "$WORK"/tsan.*
    exit 66
fi
[ "$status" -eq 0 ] || exit "$status"
echo "thread-sanitized run clean"

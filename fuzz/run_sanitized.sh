#!/bin/sh
# Build the compiled core with AddressSanitizer and UndefinedBehaviorSanitizer in a
# temporary copy of the tree (bounds checks stay off, as in the release build, so the
# sanitizers see what the core itself does), then run under it: the fuzz corpus, the
# whole test suite, the state machine once more (KVMEMU_HYPOTHESIS_PROFILE=long for a long
# run) and random fuzz inputs for SECONDS (default 120).
# The normal in-place build is not touched.
#
#   fuzz/run_sanitized.sh [SECONDS]
#   KVMEMU_DEBUG_BUILD=1 fuzz/run_sanitized.sh   # also bounds checks on, -O0 -g
set -eu
SECONDS_TO_FUZZ=${1:-120}
SANITIZERS=address,undefined
. "$(dirname "$0")/sanitized_tree.sh"

LIBASAN=$(${CC:-gcc} -print-file-name=libasan.so)
export LD_PRELOAD="$LIBASAN"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
python -c 'import kvmemu._core as c; print("sanitized core:", c.__file__)'
python -m pytest -q -p no:cacheprovider tests
KVMEMU_HYPOTHESIS_PROFILE=${KVMEMU_HYPOTHESIS_PROFILE:-default} \
    python -m pytest -q -p no:cacheprovider tests/test_state_machine.py
python -m kvmemu.testing fuzz/corpus/* --seconds "$SECONDS_TO_FUZZ"
echo "sanitized run clean"

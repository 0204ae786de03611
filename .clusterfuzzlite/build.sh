#!/bin/bash -eu
# ClusterFuzzLite / OSS-Fuzz build: the compiled core built with the engine's compiler
# and flags (CC, CFLAGS carry -fsanitize=fuzzer-no-link and the sanitizer, so libFuzzer
# sees the core's C code), then each harness packaged with its interpreter.
python3 -m pip install 'setuptools>=77' 'Cython>=3.1' 'numpy>=1.25'
LDSHARED="$CC -shared" python3 -m pip install --no-build-isolation -v .
for harness in fuzz/fuzz_fast.py fuzz/fuzz_api.py; do
    compile_python_fuzzer "$harness"
    zip -j "$OUT/$(basename "$harness" .py)_seed_corpus.zip" fuzz/corpus/*
done

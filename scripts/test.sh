#!/usr/bin/env bash
# Runs the whole test suite: every test of the Release build (CPU; 'gpu' tests skip where
# no device is visible), then the unit tests and the CUDA simulator's kernel tests again under
# ASan/UBSan in build-asan/, then
# the fuzz targets for a bounded time in build-fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="$(nproc)"

ctest --test-dir build --output-on-failure -j"$jobs"

cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOETRAIN_SANITIZE=ON -DMOETRAIN_CUDA=OFF
cmake --build build-asan -j"$jobs"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ctest --test-dir build-asan -L 'unit|cuda_sim' -LE slow --output-on-failure -j"$jobs"

# Fuzzing (docs/FUZZING.md): the readers of configs, token shards, checkpoints and
# safetensors headers as libFuzzer targets, built with clang under ASan/UBSan in build-fuzz/
# (only what they need), each fuzzed from its seed corpus for a bounded time (CTest label
# 'fuzz'); any crash, sanitizer report or leak fails the run.
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DMOETRAIN_CUDA=OFF -DMOETRAIN_TESTS=OFF -DMOETRAIN_FUZZ=ON
cmake --build build-fuzz --target moetrain_fuzzers -j"$jobs"
ctest --test-dir build-fuzz -L fuzz --output-on-failure -j"$jobs"

#!/usr/bin/env bash
# Add to the anchors copy what tools/gpu/gemm.sh needs beyond ../shared/anchors (run on a machine with the network
# or a DeepGEMM mirror; the device has neither):
#   src/DeepGEMM_8dfa329/   deepseek-ai/DeepGEMM at 8dfa329 (deep_gemm/, LICENSE, README.md; ~220 KB)
#   wheels/                 cuda_bindings 12.9 for CPython 3.12 (the device's) + cuda_pathfinder (~8 MB)
#   bash tools/deepgemm/stage_anchors.sh [ANCHORS=.anchors] [DEEPGEMM_GIT_DIR]
# DEEPGEMM_GIT_DIR: a clone or bare mirror of deepseek-ai/DeepGEMM holding commit 8dfa329.
set -eu
A=${1:-.anchors}
G=${2:-}
mkdir -p "$A/src" "$A/wheels"
if [ ! -d "$A/src/DeepGEMM_8dfa329/deep_gemm" ]; then
    [ -n "$G" ] || { echo "stage_anchors: give a DeepGEMM git dir holding 8dfa329"; exit 1; }
    mkdir -p "$A/src/DeepGEMM_8dfa329"
    git --git-dir="$G" archive 8dfa3298274bfe6b242f6f8a3e6f3eff2707dd9f deep_gemm LICENSE README.md \
        | tar -x -C "$A/src/DeepGEMM_8dfa329"
    echo 8dfa3298274bfe6b242f6f8a3e6f3eff2707dd9f > "$A/src/DeepGEMM_8dfa329/.anchor_commit"
fi
ls "$A"/wheels/cuda_bindings-12.9.*-cp312-*.whl > /dev/null 2>&1 || \
    pip download "cuda-bindings==12.9.*" --no-deps --python-version 3.12 --only-binary=:all: -d "$A/wheels"
ls "$A"/wheels/cuda_pathfinder-*.whl > /dev/null 2>&1 || \
    pip download "cuda-pathfinder~=1.1" --no-deps --only-binary=:all: -d "$A/wheels"
du -sh "$A/src/DeepGEMM_8dfa329" "$A/wheels"

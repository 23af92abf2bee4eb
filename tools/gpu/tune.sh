#!/usr/bin/env bash
# One device call (issue 18, item 1): this GPU's FP8 grouped GEMM tables by `moe_kernels.tune --challenge untried`
# (the Gluon configs with the WS and PERSISTENT variants, whose GPU tests pass since 2026-12-07, against each
# bucket's incumbent timed in the same run). A GPU without tables of its own (the H100 borrows the H200's) starts
# from the same chip's tables as incumbents. Then the grouped GEMM bench (quick) on the new tables. The tables to
# commit come back in results.tgz (configs/), with the sweep's timings (tune.json) and logs.
#   T_TOTAL=560 [T_TUNE=420] bash tools/gpu/tune.sh
set -u
R=/tmp/gpu_tune TOTAL=${T_TOTAL:-560}
source "$(dirname "$0")/_lib.sh"
tune_untried "${T_TUNE:-420}" 100
gemm_quick 90 5
pack

// The raw-pointer entry points of the extension's kernels. Nothing here knows torch: bindings.cpp checks the
// tensors, allocates the outputs and calls these.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#include <cuda_runtime.h>
#else
typedef struct CUstream_st* cudaStream_t;
#endif

namespace moe_kernels {

// Dispatch layout: from each token's top-k expert ids and the expert -> rank map, which ranks each token must be
// sent to (once per rank, however many of its k experts live there), how many tokens each rank receives, and how
// many (token, k) pairs each expert receives.
//
//   topk_ids          [num_tokens, k]          IdT (int32 or int64), row-major; -1 = "no expert", skipped
//   expert_to_rank    [num_experts]            int32, values in [0, num_ranks)
//   tokens_per_rank   [num_ranks]              int32, written (the callee zeroes it)
//   is_token_in_rank  [num_tokens, num_ranks]  bool stored as uint8, written (the callee zeroes it)
//   tokens_per_expert [num_experts]            int32, written (the callee zeroes it)

// Enqueues the work on `stream`; returns the cudaError_t of the memsets and the launch (0 = success).
// On the device, ids outside [0, num_experts) and ranks outside [0, num_ranks) are skipped, never dereferenced:
// the Python layer raises on them before the launch.
template <typename IdT>
int dispatch_layout_cuda(const IdT* topk_ids, const int32_t* expert_to_rank, int64_t num_tokens, int64_t k,
                         int64_t num_experts, int64_t num_ranks, int32_t* tokens_per_rank, uint8_t* is_token_in_rank,
                         int32_t* tokens_per_expert, cudaStream_t stream);

// The same algorithm as a plain loop. Returns -1 on success, else the flat index of the first entry of topk_ids
// that is out of range (or whose expert maps to a rank out of range); the outputs are then unspecified.
template <typename IdT>
int64_t dispatch_layout_cpu(const IdT* topk_ids, const int32_t* expert_to_rank, int64_t num_tokens, int64_t k,
                            int64_t num_experts, int64_t num_ranks, int32_t* tokens_per_rank,
                            uint8_t* is_token_in_rank, int32_t* tokens_per_expert);

}  // namespace moe_kernels

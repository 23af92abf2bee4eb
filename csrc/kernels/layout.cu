// Dispatch layout on the GPU. See api.h for the arguments.
//
// One thread per token, 256 tokens per block (grid-stride when there are more tokens than the grid covers).
// Each block counts into shared memory, then adds its non-zero bins to the global counters with one atomic each,
// so global atomics scale with blocks x bins instead of with tokens. expert_to_rank is staged in shared memory
// too, since every (token, k) pair reads it. When the counters do not fit in shared memory (huge E), the same
// code counts straight into global memory.
#include <cuda_runtime.h>

#include <algorithm>

#include "../api.h"

namespace moe_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;
constexpr size_t kMaxSharedBytes = 48 * 1024;  // the default dynamic shared-memory limit, no opt-in needed

template <typename IdT>
__global__ void __launch_bounds__(kThreads)
    dispatch_layout_kernel(const IdT* __restrict__ topk_ids, const int32_t* __restrict__ expert_to_rank,
                           int64_t num_tokens, int64_t k, int64_t num_experts, int64_t num_ranks, bool use_smem,
                           int32_t* __restrict__ tokens_per_rank, uint8_t* __restrict__ is_token_in_rank,
                           int32_t* __restrict__ tokens_per_expert) {
  extern __shared__ int32_t smem[];
  // Shared layout: [rank counts: num_ranks][expert counts: num_experts][expert_to_rank: num_experts].
  int32_t* rank_count = use_smem ? smem : tokens_per_rank;
  int32_t* expert_count = use_smem ? smem + num_ranks : tokens_per_expert;
  const int32_t* rank_of = use_smem ? smem + num_ranks + num_experts : expert_to_rank;
  if (use_smem) {
    for (int64_t i = threadIdx.x; i < num_ranks + num_experts; i += blockDim.x) smem[i] = 0;
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x)
      smem[num_ranks + num_experts + e] = expert_to_rank[e];
    __syncthreads();
  }

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tokens; t += stride) {
    const IdT* ids = topk_ids + t * k;                  // this token's k expert ids
    uint8_t* in_rank = is_token_in_rank + t * num_ranks;  // this token's destination row (zeroed by the host)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = static_cast<int64_t>(ids[j]);
      if (e < 0 || e >= num_experts) continue;  // -1: no expert
      atomicAdd(&expert_count[e], 1);
      const int32_t r = rank_of[e];
      if (r < 0 || r >= num_ranks) continue;
      // The token crosses to rank r once: only at its first expert living there.
      bool first = true;
      for (int64_t jj = 0; jj < j && first; ++jj) {
        const int64_t prev = static_cast<int64_t>(ids[jj]);
        first = !(prev >= 0 && prev < num_experts && rank_of[prev] == r);
      }
      if (first) {
        in_rank[r] = 1;
        atomicAdd(&rank_count[r], 1);
      }
    }
  }

  if (use_smem) {
    __syncthreads();
    for (int64_t r = threadIdx.x; r < num_ranks; r += blockDim.x)
      if (rank_count[r]) atomicAdd(&tokens_per_rank[r], rank_count[r]);
    for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x)
      if (expert_count[e]) atomicAdd(&tokens_per_expert[e], expert_count[e]);
  }
}

}  // namespace

template <typename IdT>
int dispatch_layout_cuda(const IdT* topk_ids, const int32_t* expert_to_rank, int64_t num_tokens, int64_t k,
                         int64_t num_experts, int64_t num_ranks, int32_t* tokens_per_rank, uint8_t* is_token_in_rank,
                         int32_t* tokens_per_expert, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(tokens_per_rank, 0, sizeof(int32_t) * num_ranks, stream);
  if (err == cudaSuccess && num_experts > 0)
    err = cudaMemsetAsync(tokens_per_expert, 0, sizeof(int32_t) * num_experts, stream);
  if (err == cudaSuccess && num_tokens > 0)
    err = cudaMemsetAsync(is_token_in_rank, 0, static_cast<size_t>(num_tokens * num_ranks), stream);
  if (err != cudaSuccess || num_tokens == 0 || k == 0) return static_cast<int>(err);

  const int64_t blocks = std::min((num_tokens + kThreads - 1) / kThreads, kMaxBlocks);
  const size_t smem_bytes = sizeof(int32_t) * static_cast<size_t>(num_ranks + 2 * num_experts);
  const bool use_smem = smem_bytes <= kMaxSharedBytes;
  dispatch_layout_kernel<IdT><<<static_cast<unsigned>(blocks), kThreads, use_smem ? smem_bytes : 0, stream>>>(
      topk_ids, expert_to_rank, num_tokens, k, num_experts, num_ranks, use_smem, tokens_per_rank, is_token_in_rank,
      tokens_per_expert);
  return static_cast<int>(cudaGetLastError());
}

template int dispatch_layout_cuda<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                           int32_t*, uint8_t*, int32_t*, cudaStream_t);
template int dispatch_layout_cuda<int64_t>(const int64_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                           int32_t*, uint8_t*, int32_t*, cudaStream_t);

}  // namespace moe_kernels

// Dispatch layout on the CPU: the result of layout.cu computed by one loop over tokens. CPU tensors use it, and CI
// (which has no GPU) tests the compiled extension through it. See api.h for the arguments.
#include <cstring>

#include "../api.h"

namespace moe_kernels {

template <typename IdT>
int64_t dispatch_layout_cpu(const IdT* topk_ids, const int32_t* expert_to_rank, int64_t num_tokens, int64_t k,
                            int64_t num_experts, int64_t num_ranks, int32_t* tokens_per_rank,
                            uint8_t* is_token_in_rank, int32_t* tokens_per_expert) {
  std::memset(tokens_per_rank, 0, sizeof(int32_t) * num_ranks);
  if (num_experts > 0) std::memset(tokens_per_expert, 0, sizeof(int32_t) * num_experts);
  if (num_tokens > 0) std::memset(is_token_in_rank, 0, static_cast<size_t>(num_tokens * num_ranks));
  for (int64_t t = 0; t < num_tokens; ++t) {
    const IdT* ids = topk_ids + t * k;
    uint8_t* in_rank = is_token_in_rank + t * num_ranks;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t e = static_cast<int64_t>(ids[j]);
      if (e == -1) continue;  // no expert
      if (e < -1 || e >= num_experts) return t * k + j;
      ++tokens_per_expert[e];
      const int32_t r = expert_to_rank[e];
      if (r < 0 || r >= num_ranks) return t * k + j;
      // The row doubles as the "already sent to r" flag: a token counts once per rank.
      if (!in_rank[r]) {
        in_rank[r] = 1;
        ++tokens_per_rank[r];
      }
    }
  }
  return -1;
}

template int64_t dispatch_layout_cpu<int32_t>(const int32_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                              int32_t*, uint8_t*, int32_t*);
template int64_t dispatch_layout_cpu<int64_t>(const int64_t*, const int32_t*, int64_t, int64_t, int64_t, int64_t,
                                              int32_t*, uint8_t*, int32_t*);

}  // namespace moe_kernels

// The only file of the extension that speaks torch: argument checks, output allocation, the launch on the current
// stream. Ops are registered with the dispatcher as torch.ops.moe_kernels_C.<name>, with CPU, CUDA and Meta
// (shape-only, for torch.compile / fake tensors) implementations. Importing moe_kernels._C registers them.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "api.h"

namespace {

using at::Tensor;
using Layout = std::tuple<Tensor, Tensor, Tensor>;

// Host checks before every launch; TORCH_CHECK_TYPE / _VALUE surface in Python as TypeError / ValueError.
void check_layout_args(const Tensor& topk_ids, const Tensor& expert_to_rank, int64_t num_ranks) {
  TORCH_CHECK_VALUE(topk_ids.dim() == 2, "dispatch_layout: topk_ids must be 2-D [num_tokens, k], got shape ",
                    topk_ids.sizes());
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
                   "dispatch_layout: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  TORCH_CHECK_VALUE(expert_to_rank.dim() == 1, "dispatch_layout: expert_to_rank must be 1-D [num_experts], got shape ",
                    expert_to_rank.sizes());
  TORCH_CHECK_TYPE(expert_to_rank.scalar_type() == at::kInt, "dispatch_layout: expert_to_rank must be int32, got ",
                   expert_to_rank.scalar_type());
  TORCH_CHECK_TYPE(topk_ids.device() == expert_to_rank.device(), "dispatch_layout: expert_to_rank is on ",
                   expert_to_rank.device(), " but topk_ids is on ", topk_ids.device());
  TORCH_CHECK_VALUE(num_ranks >= 1, "dispatch_layout: num_ranks must be >= 1, got ", num_ranks);
}

// (tokens_per_rank int32 [R], is_token_in_rank bool [T, R], tokens_per_expert int32 [E]) on topk_ids' device.
Layout empty_layout(const Tensor& topk_ids, const Tensor& expert_to_rank, int64_t num_ranks) {
  const auto i32 = topk_ids.options().dtype(at::kInt);
  return {at::empty({num_ranks}, i32), at::empty({topk_ids.size(0), num_ranks}, topk_ids.options().dtype(at::kBool)),
          at::empty({expert_to_rank.size(0)}, i32)};
}

Layout dispatch_layout_meta(const Tensor& topk_ids, const Tensor& expert_to_rank, int64_t num_ranks) {
  check_layout_args(topk_ids, expert_to_rank, num_ranks);
  return empty_layout(topk_ids, expert_to_rank, num_ranks);
}

Layout dispatch_layout_cpu(const Tensor& topk_ids_in, const Tensor& expert_to_rank_in, int64_t num_ranks) {
  check_layout_args(topk_ids_in, expert_to_rank_in, num_ranks);
  const Tensor topk_ids = topk_ids_in.contiguous();
  const Tensor expert_to_rank = expert_to_rank_in.contiguous();
  auto [per_rank, in_rank, per_expert] = empty_layout(topk_ids, expert_to_rank, num_ranks);
  const auto run = [&](auto* ids) {
    return moe_kernels::dispatch_layout_cpu(ids, expert_to_rank.data_ptr<int32_t>(), topk_ids.size(0),
                                            topk_ids.size(1), expert_to_rank.size(0), num_ranks,
                                            per_rank.data_ptr<int32_t>(),
                                            reinterpret_cast<uint8_t*>(in_rank.data_ptr<bool>()),
                                            per_expert.data_ptr<int32_t>());
  };
  const int64_t bad = topk_ids.scalar_type() == at::kInt ? run(topk_ids.data_ptr<int32_t>())
                                                         : run(topk_ids.data_ptr<int64_t>());
  TORCH_CHECK_VALUE(bad < 0, "dispatch_layout: topk_ids.flatten()[", bad, "] is not -1 nor an expert in [0, ",
                    expert_to_rank.size(0), ") whose expert_to_rank entry lies in [0, ", num_ranks, ")");
  return {per_rank, in_rank, per_expert};
}

Layout dispatch_layout_cuda(const Tensor& topk_ids_in, const Tensor& expert_to_rank_in, int64_t num_ranks) {
  check_layout_args(topk_ids_in, expert_to_rank_in, num_ranks);
  const c10::cuda::CUDAGuard guard(topk_ids_in.device());
  const Tensor topk_ids = topk_ids_in.contiguous();
  const Tensor expert_to_rank = expert_to_rank_in.contiguous();
  auto [per_rank, in_rank, per_expert] = empty_layout(topk_ids, expert_to_rank, num_ranks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(topk_ids.device().index()).stream();
  const auto launch = [&](auto* ids) {
    return moe_kernels::dispatch_layout_cuda(ids, expert_to_rank.data_ptr<int32_t>(), topk_ids.size(0),
                                             topk_ids.size(1), expert_to_rank.size(0), num_ranks,
                                             per_rank.data_ptr<int32_t>(),
                                             reinterpret_cast<uint8_t*>(in_rank.data_ptr<bool>()),
                                             per_expert.data_ptr<int32_t>(), stream);
  };
  const int err = topk_ids.scalar_type() == at::kInt ? launch(topk_ids.data_ptr<int32_t>())
                                                     : launch(topk_ids.data_ptr<int64_t>());
  TORCH_CHECK(err == 0, "dispatch_layout: CUDA launch failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
  return {per_rank, in_rank, per_expert};
}

}  // namespace

TORCH_LIBRARY(moe_kernels_C, m) {
  m.def("dispatch_layout(Tensor topk_ids, Tensor expert_to_rank, int num_ranks) -> (Tensor, Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(moe_kernels_C, CPU, m) { m.impl("dispatch_layout", &dispatch_layout_cpu); }
TORCH_LIBRARY_IMPL(moe_kernels_C, CUDA, m) { m.impl("dispatch_layout", &dispatch_layout_cuda); }
TORCH_LIBRARY_IMPL(moe_kernels_C, Meta, m) { m.impl("dispatch_layout", &dispatch_layout_meta); }

// `import moe_kernels._C` needs a Python module; it holds nothing, the ops above are its content.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "moe-kernels C++/CUDA ops: see torch.ops.moe_kernels_C",
                               -1, nullptr};
  return PyModule_Create(&module);
}

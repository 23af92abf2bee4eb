// Expert-parallel dispatch and combine over CUDA IPC (see p2p.h for the buffer layout and the protocol).
//
// Both kernels run kNumBlocks blocks in four phases:
//   1. wait until every peer acknowledged the previous call of the same kind (it has read its region),
//   2. write this rank's records straight into the destinations' regions (one warp per record),
//   3. raise this block's flag in every rank's buffer (fence, then a release store of the epoch),
//   4. wait for every (source, block) flag of this epoch, consume this rank's own region, acknowledge.
// Every wait has a timeout (globaltimer, nanoseconds): on expiry the missing rank goes to the host-mapped error
// word and the block returns; the host raises naming it. Data written by peers is read with ld.global.cg (L2,
// the point of coherence), never through L1 where a line from the previous epoch could still sit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "p2p.h"
#include "p2p_device.cuh"

namespace moe_kernels {
namespace p2p {
namespace {

__global__ void __launch_bounds__(kNumThreads, 1) dispatch_kernel(const DispatchArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  void* const my_base = a.peers[a.rank];
  const int64_t record = a.row_bytes + a.meta_bytes;

  // 1. the receivers of the previous dispatch have copied their regions out
  if (!wait_signals(my_base, kDispatchAck, a.num_ranks, a.epoch - 1, a.timeout_ns, kDispatchAckTimeout, a.epoch,
                    a.error))
    return;

  // 2. each record once into its destination's region, at the slot the host computed from the count matrix
  for (int64_t i = warp; i < a.num_send; i += num_warps) {
    uint8_t* dst = static_cast<uint8_t*>(a.peers[a.send_dest[i]]) + a.region_offset +
                   static_cast<int64_t>(a.send_row[i]) * record;
    warp_copy<false>(dst, a.rows + static_cast<int64_t>(a.send_token[i]) * a.row_bytes, a.row_bytes, lane);
    warp_copy<false>(dst + a.row_bytes, a.meta + i * a.meta_bytes, a.meta_bytes, lane);
  }

  // 3. this block's records are in place everywhere
  signal_all(a.peers, kDispatchFlag, a.num_ranks, a.rank, a.epoch);

  // 4. every block of every source delivered; expand each record to its k local-expert rows
  if (!wait_signals(my_base, kDispatchFlag, a.num_ranks, a.epoch, a.timeout_ns, kDispatchTimeout, a.epoch, a.error))
    return;
  const uint8_t* region = static_cast<const uint8_t*>(my_base) + a.region_offset;
  for (int64_t i = warp; i < a.num_recv; i += num_warps) {
    const uint8_t* rec = region + i * record;
    const int32_t* meta = reinterpret_cast<const int32_t*>(rec + a.row_bytes);
    warp_copy<true>(a.out_meta + i * a.meta_bytes, rec + a.row_bytes, a.meta_bytes, lane);
    const int32_t lane_pos = lane < a.k ? __ldcg(meta + lane) : -1;  // lane j holds slot j's position
    for (int j = 0; j < a.k; ++j) {
      const int32_t pos = __shfl_sync(0xffffffffu, lane_pos, j);
      if (pos < 0) continue;  // that expert lives on another rank
      warp_copy<true>(a.out_rows + static_cast<int64_t>(pos) * a.row_bytes, rec, a.row_bytes, lane);
      if (lane == 0) a.out_weight[pos] = __int_as_float(__ldcg(meta + a.k + j));
      for (int c = lane; c < a.num_scales; c += 32)
        a.out_scale[static_cast<int64_t>(pos) * a.num_scales + c] = __int_as_float(__ldcg(meta + 2 * a.k + c));
    }
  }
  signal_all(a.peers, kDispatchAck, a.num_ranks, a.rank, a.epoch);  // our region may be overwritten again
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename Wire, typename Out>
__global__ void __launch_bounds__(kNumThreads, 1) combine_kernel(const CombineArgs a) {
  constexpr int kVec = 16 / sizeof(Wire);  // elements per 16-byte load
  const int lane = threadIdx.x % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  void* const my_base = a.peers[a.rank];
  const int64_t row_bytes = a.hidden * static_cast<int64_t>(sizeof(Wire));

  // 1. the homes have reduced the previous combine out of their regions
  if (!wait_signals(my_base, kCombineAck, a.num_ranks, a.epoch - 1, a.timeout_ns, kCombineAckTimeout, a.epoch,
                    a.error))
    return;

  // 2. every partial sum (one per received record) to its home rank, at the record's send-order position
  for (int64_t i = warp; i < a.num_rows; i += num_warps) {
    uint8_t* dst = static_cast<uint8_t*>(a.peers[a.dst_rank[i]]) + a.region_offset +
                   static_cast<int64_t>(a.dst_row[i]) * row_bytes;
    warp_copy<false>(dst, a.partial + i * row_bytes, row_bytes, lane);
  }

  // 3. + 4. flags up; then, with every rank's partials here, out[t] = sum over t's slots in k order (fp32)
  signal_all(a.peers, kCombineFlag, a.num_ranks, a.rank, a.epoch);
  if (!wait_signals(my_base, kCombineFlag, a.num_ranks, a.epoch, a.timeout_ns, kCombineTimeout, a.epoch, a.error))
    return;
  const Wire* region = reinterpret_cast<const Wire*>(static_cast<const uint8_t*>(my_base) + a.region_offset);
  Out* out = static_cast<Out*>(a.out);
  for (int64_t t = warp; t < a.num_tokens; t += num_warps) {
    const int32_t* slots = a.home_slot + t * a.k;
    for (int64_t h = static_cast<int64_t>(lane) * kVec; h < a.hidden; h += 32 * kVec) {
      float acc[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) acc[u] = 0.f;
      for (int j = 0; j < a.k; ++j) {
        const int32_t s = __ldg(slots + j);
        if (s < 0) continue;
        const int4 v = __ldcg(reinterpret_cast<const int4*>(region + static_cast<int64_t>(s) * a.hidden + h));
        const Wire* e = reinterpret_cast<const Wire*>(&v);
#pragma unroll
        for (int u = 0; u < kVec; ++u) acc[u] += to_float(e[u]);
      }
#pragma unroll
      for (int u = 0; u < kVec; ++u) out[t * a.hidden + h + u] = from_float<Out>(acc[u]);
    }
  }
  signal_all(a.peers, kCombineAck, a.num_ranks, a.rank, a.epoch);
}

template <typename Wire>
cudaError_t launch_combine_to(const CombineArgs& a, DType out, cudaStream_t stream) {
  switch (out) {
    case DType::kFloat32:
      combine_kernel<Wire, float><<<kNumBlocks, kNumThreads, 0, stream>>>(a);
      break;
    case DType::kBFloat16:
      combine_kernel<Wire, __nv_bfloat16><<<kNumBlocks, kNumThreads, 0, stream>>>(a);
      break;
    case DType::kFloat16:
      combine_kernel<Wire, __half><<<kNumBlocks, kNumThreads, 0, stream>>>(a);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_dispatch(const DispatchArgs& args, cudaStream_t stream) {
  dispatch_kernel<<<kNumBlocks, kNumThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_combine(const CombineArgs& args, DType wire, DType out, cudaStream_t stream) {
  switch (wire) {
    case DType::kFloat32:
      return launch_combine_to<float>(args, out, stream);
    case DType::kBFloat16:
      return launch_combine_to<__nv_bfloat16>(args, out, stream);
    case DType::kFloat16:
      return launch_combine_to<__half>(args, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace p2p
}  // namespace moe_kernels

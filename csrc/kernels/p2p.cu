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

namespace moe_kernels {
namespace p2p {
namespace {

constexpr int kWarpsPerBlock = kNumThreads / 32;

__device__ __forceinline__ uint64_t load_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_sys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t* signal_slot(void* base, int kind, int num_ranks, int rank, int block) {
  return reinterpret_cast<uint64_t*>(base) + (static_cast<int64_t>(kind) * num_ranks + rank) * kNumBlocks + block;
}

__device__ void report(unsigned long long* error, int code, int rank, uint64_t epoch) {
  const unsigned long long word = (static_cast<unsigned long long>(code) << 56) |
                                  (static_cast<unsigned long long>(rank & 0xFFFFFF) << 32) |
                                  (epoch & 0xFFFFFFFFull);
  *reinterpret_cast<volatile unsigned long long*>(error) = word;  // one aligned 64-bit store: never torn
  __threadfence_system();
}

// Block-wide: wait until the num_ranks x kNumBlocks signals of `kind` in this rank's buffer reach `expected`.
// Returns false (for the whole block) on timeout, after reporting the first missing rank seen.
__device__ bool wait_signals(void* my_base, int kind, int num_ranks, uint64_t expected, uint64_t timeout_ns, int code,
                             uint64_t epoch, unsigned long long* error) {
  const uint64_t* flags = signal_slot(my_base, kind, num_ranks, 0, 0);
  const int n = num_ranks * kNumBlocks;
  int missing = -1;
  const uint64_t start = global_ns();
  for (int i = threadIdx.x; i < n && missing < 0; i += blockDim.x) {
    while (load_acquire_sys(flags + i) < expected) {
      if (global_ns() - start > timeout_ns) {
        missing = i / kNumBlocks;
        break;
      }
    }
  }
  if (missing >= 0) report(error, code, missing, epoch);
  return __syncthreads_or(missing >= 0) == 0;
}

// Block-wide, after the block's writes (or reads, for an ack): publish `value` in signal [kind][rank][block] of
// every rank's buffer.
__device__ void signal_all(void* const* peers, int kind, int num_ranks, int rank, uint64_t value) {
  __threadfence_system();  // this thread's writes are visible to the whole system...
  __syncthreads();         // ...and so are every other thread's, before a flag goes up
  for (int r = threadIdx.x; r < num_ranks; r += blockDim.x)
    store_release_sys(signal_slot(peers[r], kind, num_ranks, rank, blockIdx.x), value);
}

// A warp copies `bytes` (a multiple of 16), 16 bytes per lane per step. kFromPeers: the source was written by
// other GPUs (read through L2 only); otherwise it is an input of this launch (read-only path).
template <bool kFromPeers>
__device__ __forceinline__ void warp_copy(uint8_t* dst, const uint8_t* src, int64_t bytes, int lane) {
  int4* d = reinterpret_cast<int4*>(dst);
  const int4* s = reinterpret_cast<const int4*>(src);
  const int64_t n = bytes / 16;
#pragma unroll 4
  for (int64_t i = lane; i < n; i += 32) d[i] = kFromPeers ? __ldcg(s + i) : __ldg(s + i);
}

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

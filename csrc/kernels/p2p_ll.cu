// Low-latency expert-parallel dispatch and combine for decoding (see p2p.h, "low-latency mode", for the layout).
//
// Four launches per call, each with its grid fixed by shapes and every count read on the device (so a call can be
// captured in a CUDA graph and replayed with new routing):
//   dispatch send: one warp per global expert scans this rank's [T, k] ids in token order and copies each token
//                  routed to it into the expert rank's fixed slots [local expert][this rank][0..N), then publishes
//                  the count with the call's epoch (a release store): the count is the data's flag;
//   dispatch recv: one block per local expert waits for the R counts of this epoch and packs the rows into the
//                  masked layout [local expert, R * N] (stable: source rank, then token), with each row's source;
//   combine send:  every expert output row goes to its home's combine region at (token, slot), then each block
//                  raises its flag in every rank's buffer;
//   combine recv:  the home waits for every (rank, block) flag of this epoch and sums its tokens' k rows weighted
//                  by their routing weights (fp32) into bf16; a one-thread launch then bumps the buffer's epoch.
#include <cuda_bf16.h>

#include "p2p.h"
#include "p2p_device.cuh"

namespace moe_kernels {
namespace p2p {
namespace {

__device__ __forceinline__ uint8_t* region(void* base, int64_t offset) { return static_cast<uint8_t*>(base) + offset; }

__device__ __forceinline__ uint64_t call_epoch(const LLArgs& a) {
  // written only by this rank's own bump kernel, in stream order before this launch
  return *reinterpret_cast<const volatile uint64_t*>(region(a.peers[a.rank], a.dispatch_offset + a.lay.epoch_off())) +
         1;
}

struct WarpGrid {
  int lane, warp, num_warps;  // lane in the warp, warp in the grid, warps in the grid
};

__device__ __forceinline__ WarpGrid warp_grid() {
  return {static_cast<int>(threadIdx.x % 32), static_cast<int>(blockIdx.x * kWarpsPerBlock + threadIdx.x / 32),
          static_cast<int>(gridDim.x * kWarpsPerBlock)};
}

__global__ void __launch_bounds__(kNumThreads, 1) ll_dispatch_send_kernel(const LLArgs a) {
  const auto [lane, warp, num_warps] = warp_grid();
  const LLLayout& L = a.lay;
  const uint64_t epoch = call_epoch(a);
  const int64_t pairs = a.num_tokens * L.k;
  for (int e = warp; e < a.num_experts; e += num_warps) {
    const int r = a.expert_rank[e], le = a.expert_local[e];
    uint8_t* slots = region(a.peers[r], a.dispatch_offset + L.records_off()) +
                     (static_cast<int64_t>(le) * L.num_ranks + a.rank) * L.max_tokens * L.record_bytes;
    int count = 0;
    for (int64_t base = 0; base < pairs; base += 32) {
      const int64_t idx = base + lane;
      unsigned hits = __ballot_sync(0xffffffffu, idx < pairs && __ldg(a.ids + idx) == e);
      while (hits) {  // the same on every lane: token order
        const int b = __ffs(hits) - 1;
        hits &= hits - 1;
        const int64_t p = base + b;
        const int64_t t = p / L.k;
        if (count < L.max_tokens) {
          uint8_t* rec = slots + static_cast<int64_t>(count) * L.record_bytes;
          warp_copy<false>(rec, a.rows + t * L.row_bytes, L.row_bytes, lane);
          float* sc = reinterpret_cast<float*>(rec + L.row_bytes);
          for (int c = lane; c < a.num_scales; c += 32) sc[c] = __ldg(a.scales + t * a.num_scales + c);
          if (lane == 0) {
            int32_t* meta = reinterpret_cast<int32_t*>(rec + L.row_bytes + L.scale_bytes);
            meta[0] = static_cast<int32_t>(t);
            meta[1] = static_cast<int32_t>(p - t * L.k);
          }
        } else if (lane == 0) {
          report(a.error, kLLOverflow, r, epoch);
        }
        ++count;
      }
    }
    __threadfence_system();  // this lane's rows are visible everywhere...
    __syncwarp();            // ...and so are the other lanes', before the count goes up
    if (lane == 0) {
      uint64_t* flag = reinterpret_cast<uint64_t*>(region(a.peers[r], a.dispatch_offset + L.counts_off())) +
                       static_cast<int64_t>(le) * L.num_ranks + a.rank;
      store_release_sys(flag, (epoch << 32) | static_cast<uint32_t>(count < L.max_tokens ? count : L.max_tokens));
    }
  }
}

__global__ void __launch_bounds__(kNumThreads, 1) ll_dispatch_recv_kernel(const LLArgs a) {
  __shared__ int s_count[kLLMaxRanks];
  __shared__ int s_base[kLLMaxRanks + 1];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const LLLayout& L = a.lay;
  const int R = L.num_ranks, le = blockIdx.x;
  const uint64_t epoch = call_epoch(a);
  uint8_t* const mine = region(a.peers[a.rank], a.dispatch_offset);
  const uint64_t* counts = reinterpret_cast<const uint64_t*>(mine + L.counts_off()) + static_cast<int64_t>(le) * R;
  int missing = -1;
  const uint64_t start = global_ns();
  for (int s = threadIdx.x; s < R && missing < 0; s += blockDim.x) {
    uint64_t v;
    while (((v = load_acquire_sys(counts + s)) >> 32) < epoch) {
      if (global_ns() - start > a.timeout_ns) {
        missing = s;
        break;
      }
    }
    s_count[s] = static_cast<int>(v & 0xFFFFFFFFu);
  }
  if (missing >= 0) report(a.error, kLLDispatchTimeout, missing, epoch);
  if (__syncthreads_or(missing >= 0)) return;
  if (threadIdx.x == 0) {
    int total = 0;
    for (int s = 0; s < R; ++s) {
      s_base[s] = total;
      total += s_count[s];
    }
    s_base[R] = total;
    a.out_count[le] = total;
  }
  __syncthreads();
  const int64_t rows_per_expert = static_cast<int64_t>(R) * L.max_tokens;
  for (int s = 0; s < R; ++s) {
    const uint8_t* slots = mine + L.records_off() + (static_cast<int64_t>(le) * R + s) * L.max_tokens * L.record_bytes;
    for (int i = warp; i < s_count[s]; i += kWarpsPerBlock) {
      const uint8_t* rec = slots + static_cast<int64_t>(i) * L.record_bytes;
      const int64_t row = static_cast<int64_t>(le) * rows_per_expert + s_base[s] + i;
      warp_copy<true>(a.out_rows + row * L.row_bytes, rec, L.row_bytes, lane);
      const float* sc = reinterpret_cast<const float*>(rec + L.row_bytes);
      for (int c = lane; c < a.num_scales; c += 32) a.out_scale[row * a.num_scales + c] = __ldcg(sc + c);
      if (lane == 0) {
        const int32_t* meta = reinterpret_cast<const int32_t*>(rec + L.row_bytes + L.scale_bytes);
        a.out_src[2 * row] = s;
        a.out_src[2 * row + 1] = __ldcg(meta) * L.k + __ldcg(meta + 1);
      }
    }
  }
}

__global__ void __launch_bounds__(kNumThreads, 1) ll_combine_send_kernel(const LLArgs a) {
  const auto [lane, warp, num_warps] = warp_grid();
  const LLLayout& L = a.lay;
  const uint64_t epoch = call_epoch(a);
  const int64_t row_bytes = 2 * L.hidden;
  const int64_t rows_per_expert = static_cast<int64_t>(L.num_ranks) * L.max_tokens;
  const uint8_t* y = static_cast<const uint8_t*>(a.y);
  for (int le = 0; le < a.num_local; ++le) {
    const int count = a.out_count[le];
    for (int i = warp; i < count; i += num_warps) {
      const int64_t row = static_cast<int64_t>(le) * rows_per_expert + i;
      const int home = a.out_src[2 * row], slot = a.out_src[2 * row + 1];  // slot = token * k + j at the home
      warp_copy<false>(region(a.peers[home], a.combine_offset) + static_cast<int64_t>(slot) * row_bytes,
                       y + row * row_bytes, row_bytes, lane);
    }
  }
  __threadfence_system();
  __syncthreads();
  for (int r = threadIdx.x; r < L.num_ranks; r += blockDim.x) {
    uint64_t* flags = reinterpret_cast<uint64_t*>(region(a.peers[r], a.dispatch_offset + L.flags_off()));
    store_release_sys(flags + static_cast<int64_t>(a.rank) * kNumBlocks + blockIdx.x, epoch);
  }
}

__global__ void __launch_bounds__(kNumThreads, 1) ll_combine_recv_kernel(const LLArgs a) {
  const auto [lane, warp, num_warps] = warp_grid();
  const LLLayout& L = a.lay;
  const uint64_t epoch = call_epoch(a);
  uint8_t* const mine = region(a.peers[a.rank], a.dispatch_offset);
  if (!wait_flags(reinterpret_cast<const uint64_t*>(mine + L.flags_off()), L.num_ranks, epoch, a.timeout_ns,
                  kLLCombineTimeout, epoch, a.error))
    return;
  const __nv_bfloat16* rows = reinterpret_cast<const __nv_bfloat16*>(region(a.peers[a.rank], a.combine_offset));
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(a.out);
  constexpr int kVec = 8;  // bf16 per 16-byte load
  for (int64_t t = warp; t < a.num_tokens; t += num_warps) {
    for (int64_t h = static_cast<int64_t>(lane) * kVec; h < L.hidden; h += 32 * kVec) {
      float acc[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) acc[u] = 0.f;
      for (int j = 0; j < L.k; ++j) {
        const int32_t e = __ldg(a.ids + t * L.k + j);
        if (e < 0 || e >= a.num_experts) continue;
        const float w = __ldg(a.weights + t * L.k + j);
        const int4 v = __ldcg(reinterpret_cast<const int4*>(rows + (t * L.k + j) * L.hidden + h));
        const __nv_bfloat16* x = reinterpret_cast<const __nv_bfloat16*>(&v);
#pragma unroll
        for (int u = 0; u < kVec; ++u) acc[u] += w * __bfloat162float(x[u]);
      }
      alignas(16) __nv_bfloat16 o[kVec];
#pragma unroll
      for (int u = 0; u < kVec; ++u) o[u] = __float2bfloat16_rn(acc[u]);
      *reinterpret_cast<int4*>(out + t * L.hidden + h) = *reinterpret_cast<const int4*>(o);
    }
  }
}

__global__ void ll_bump_epoch_kernel(uint64_t* epoch) { *epoch += 1; }

}  // namespace

cudaError_t launch_ll_dispatch_send(const LLArgs& a, cudaStream_t stream) {
  ll_dispatch_send_kernel<<<kNumBlocks, kNumThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_dispatch_recv(const LLArgs& a, cudaStream_t stream) {
  if (a.num_local > 0) ll_dispatch_recv_kernel<<<a.num_local, kNumThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_combine_send(const LLArgs& a, cudaStream_t stream) {
  ll_combine_send_kernel<<<kNumBlocks, kNumThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t launch_ll_combine_recv(const LLArgs& a, cudaStream_t stream) {
  ll_combine_recv_kernel<<<kNumBlocks, kNumThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // this rank's epoch word lives in its own allocation: self_base is a device address usable from the host
  ll_bump_epoch_kernel<<<1, 1, 0, stream>>>(reinterpret_cast<uint64_t*>(
      static_cast<uint8_t*>(a.self_base) + a.dispatch_offset + a.lay.epoch_off()));
  return cudaGetLastError();
}

}  // namespace p2p
}  // namespace moe_kernels

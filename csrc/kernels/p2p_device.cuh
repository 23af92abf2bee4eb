// Device helpers shared by the P2P kernels (p2p.cu, p2p_ll.cu): system-scope acquire/release, the global timer,
// the error word, the signal waits and the warp copies. Internal linkage: every translation unit gets its own.
#pragma once
#include <cstdint>

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

// Block-wide: wait until the num_ranks x kNumBlocks flags (rank-major) reach `expected`. Returns false (for the
// whole block) on timeout, after reporting the first missing rank seen.
__device__ bool wait_flags(const uint64_t* flags, int num_ranks, uint64_t expected, uint64_t timeout_ns, int code,
                           uint64_t epoch, unsigned long long* error) {
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

// wait_flags on the signals of `kind` in this rank's buffer.
__device__ bool wait_signals(void* my_base, int kind, int num_ranks, uint64_t expected, uint64_t timeout_ns, int code,
                             uint64_t epoch, unsigned long long* error) {
  return wait_flags(signal_slot(my_base, kind, num_ranks, 0, 0), num_ranks, expected, timeout_ns, code, epoch, error);
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

}  // namespace
}  // namespace p2p
}  // namespace moe_kernels

// Intra-node expert-parallel dispatch/combine over CUDA IPC: every rank owns one symmetric buffer (same size on
// every rank) that all its peers have mapped; kernels write records straight into the destination's buffer and
// raise per-(source, block) flags. Raw pointers only; the torch binding lives in p2p.cpp.
//
// Buffer layout (bytes, every rank alike):
//   [0, signal_bytes)            uint64 signals[4][num_ranks][kNumBlocks]  (zeroed at allocation)
//        kDispatchFlag  [s][b]: written by source s's block b when its records for this rank are in place
//        kDispatchAck   [r][b]: written by receiver r's block b when it has copied out what this rank sent it
//        kCombineFlag, kCombineAck: the same for combine
//   [dispatch region)            records of dispatch: row bytes + metadata bytes each (both multiples of 16)
//   [combine region)             partial-sum rows of combine, at the home rank's send-order positions
// Every signal holds the epoch (1, 2, ...) of the last call that wrote it; a call of epoch e waits for flags
// >= e and for acks >= e - 1 (the previous call's receivers are done with the region it is about to overwrite).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace moe_kernels {
namespace p2p {

constexpr int kNumBlocks = 20;    // blocks of every launch: the signals are indexed by block
constexpr int kNumThreads = 512;  // one warp per record
constexpr int kNumSignalKinds = 4;
enum SignalKind : int { kDispatchFlag = 0, kDispatchAck = 1, kCombineFlag = 2, kCombineAck = 3 };

inline int64_t signal_bytes(int num_ranks) {
  const int64_t raw = static_cast<int64_t>(kNumSignalKinds) * num_ranks * kNumBlocks * 8;
  return (raw + 4095) / 4096 * 4096;
}

// The error word (host-mapped): code << 56 | missing rank << 32 | epoch (low 32 bits); 0 = no error.
enum ErrorCode : int {
  kNoError = 0,
  kDispatchAckTimeout = 1,   // a receiver never released the previous dispatch's region
  kDispatchTimeout = 2,      // a source never delivered its records
  kCombineAckTimeout = 3,
  kCombineTimeout = 4,
};

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct DispatchArgs {
  void* const* peers;          // device array [num_ranks]: every rank's buffer base, as mapped here
  int rank, num_ranks;
  uint64_t epoch, timeout_ns;
  int64_t region_offset;       // byte offset of the dispatch region in every buffer
  // send: record i = rows[send_token[i]] + meta[i] -> rank send_dest[i], record slot send_row[i]
  const uint8_t* rows;         // [T, row_bytes]
  const uint8_t* meta;         // [num_send, meta_bytes]: int32 pos[k], fp32 weight[k], fp32 scale[num_scales], pad
  const int32_t* send_token;
  const int32_t* send_dest;
  const int32_t* send_row;
  int64_t num_send, row_bytes, meta_bytes;
  // receive: the num_recv records in this rank's region, each row copied to its k positions (pos >= 0)
  int64_t num_recv;
  uint8_t* out_rows;           // [M, row_bytes]
  float* out_scale;            // [M, num_scales], or null
  float* out_weight;           // [M]
  uint8_t* out_meta;           // [num_recv, meta_bytes]
  int k, num_scales;
  unsigned long long* error;   // device pointer of the host-mapped error word
};

struct CombineArgs {
  void* const* peers;
  int rank, num_ranks;
  uint64_t epoch, timeout_ns;
  int64_t region_offset;       // byte offset of the combine region in every buffer
  // send: partial row i -> rank dst_rank[i], row dst_row[i] of its combine region
  const uint8_t* partial;      // [num_rows, hidden] of the wire dtype
  const int32_t* dst_rank;
  const int32_t* dst_row;
  int64_t num_rows, hidden;
  // receive: out[t] = sum_j region[home_slot[t, j]] (slots < 0 skipped), fp32, in j order
  const int32_t* home_slot;    // [num_tokens, k]
  int64_t num_tokens;
  int k;
  void* out;                   // [num_tokens, hidden] of the output dtype
  unsigned long long* error;
};

// Both return the launch's cudaError_t. Every launch is kNumBlocks x kNumThreads on `stream`.
cudaError_t launch_dispatch(const DispatchArgs& args, cudaStream_t stream);
cudaError_t launch_combine(const CombineArgs& args, DType wire, DType out, cudaStream_t stream);

// ---- low-latency mode (p2p_ll.cu): fixed receive slots, counts travel with the data, no host sync ----------------
// The same symmetric buffer, its dispatch region laid out as (L = the most local experts of any rank, R ranks,
// N = max tokens per rank, byte offsets from the region's start):
//   counts   uint64 [L][R]            (epoch << 32) | rows source s sent to local expert le (the flag of the data)
//   flags    uint64 [R][kNumBlocks]   epoch of the last combine whose rows source s's block b wrote here
//   epoch    uint64                   calls completed on this buffer (this rank's; bumped after each combine)
//   records  [L][R][N] x record bytes: row bytes + scale bytes (16-multiple) + 16 bytes (int32 token, int32 slot)
// and its combine region as bf16 [N][k][H]: the expert output of this rank's (token, slot), weighted at home.
// Every kernel reads its epoch (calls completed + 1) from the buffer, so a captured CUDA graph replays correctly.
// Reuse is safe without acknowledgements: a rank's next dispatch into a peer follows its own combine, which waited
// for every rank's combine flags, each raised after that rank had received (and copied out) its dispatch.
constexpr int kLLMaxRanks = 256;

enum LLErrorCode : int {
  kLLDispatchTimeout = 5,    // a source never sent its counts
  kLLCombineTimeout = 6,     // an expert rank never sent its outputs
  kLLOverflow = 7,           // more rows for one (expert, source) than max tokens (cannot happen with top-k ids)
};

struct LLLayout {
  int num_ranks, max_local, max_tokens, k;
  int64_t row_bytes, scale_bytes, record_bytes, hidden;  // hidden: of the bf16 combine rows
  __host__ __device__ int64_t counts_off() const { return 0; }
  __host__ __device__ int64_t flags_off() const { return 8ll * max_local * num_ranks; }
  __host__ __device__ int64_t epoch_off() const { return flags_off() + 8ll * num_ranks * kNumBlocks; }
  __host__ __device__ int64_t records_off() const { return (epoch_off() + 8 + 15) / 16 * 16; }
  __host__ __device__ int64_t dispatch_bytes() const {
    return records_off() + static_cast<int64_t>(max_local) * num_ranks * max_tokens * record_bytes;
  }
  __host__ __device__ int64_t combine_bytes() const { return 2ll * max_tokens * k * hidden; }
};

struct LLArgs {
  void* const* peers;                       // device array [R]: every rank's buffer base, as mapped here
  void* self_base;                          // this rank's buffer base (host-side copy of peers[rank])
  int rank;
  uint64_t timeout_ns;
  int64_t dispatch_offset, combine_offset;  // of the two regions in every buffer
  LLLayout lay;
  int num_experts, num_local;               // num_local: this rank's local experts
  const int32_t* expert_rank;               // [E] rank of each expert
  const int32_t* expert_local;              // [E] its index among that rank's experts
  // dispatch send: rows [T, row_bytes] (+ fp32 scales [T, num_scales]) of the tokens, ids int32 [T, k]
  const uint8_t* rows;
  const float* scales;
  int num_scales;
  const int32_t* ids;
  int64_t num_tokens;
  // dispatch recv: the masked layout [num_local, R * N]: rows, scales, the source of each row (rank, token*k+slot)
  uint8_t* out_rows;
  float* out_scale;
  int32_t* out_count;                       // [num_local] rows per local expert
  int32_t* out_src;                         // [num_local, R * N, 2]
  // combine send: y bf16 [num_local, R * N, hidden] in the masked layout
  const void* y;
  // combine recv: weights fp32 [T, k], out bf16 [T, hidden] (ids as above: slots < 0 skipped)
  const float* weights;
  void* out;
  unsigned long long* error;
};

cudaError_t launch_ll_dispatch_send(const LLArgs& args, cudaStream_t stream);
cudaError_t launch_ll_dispatch_recv(const LLArgs& args, cudaStream_t stream);
cudaError_t launch_ll_combine_send(const LLArgs& args, cudaStream_t stream);
cudaError_t launch_ll_combine_recv(const LLArgs& args, cudaStream_t stream);  // then bumps the buffer's epoch

}  // namespace p2p
}  // namespace moe_kernels

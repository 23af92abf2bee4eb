// torch binding of the P2P dispatch/combine kernels: a custom class torch.classes.moe_kernels_C.P2PBuffer that
// owns one rank's symmetric buffer (cudaMalloc), the mappings of its peers' buffers (CUDA IPC) and the
// host-mapped error word. Python (moe_kernels/dist/buffer.py) exchanges the IPC handles, computes every offset
// and launches through dispatch()/combine() on its communication stream. Only this file speaks torch for p2p.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#include <torch/custom_class.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "kernels/p2p.h"

namespace {

using torch::Tensor;
namespace p2p = moe_kernels::p2p;

#define P2P_CUDA_CHECK(expr)                                                                 \
  do {                                                                                       \
    const cudaError_t err_ = (expr);                                                         \
    TORCH_CHECK(err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(err_));          \
  } while (0)

p2p::DType to_dtype(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case torch::kFloat32:
      return p2p::DType::kFloat32;
    case torch::kBFloat16:
      return p2p::DType::kBFloat16;
    case torch::kFloat16:
      return p2p::DType::kFloat16;
    default:
      TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return p2p::DType::kFloat32;  // unreachable
}

void check_arg(const Tensor& t, const char* name, c10::ScalarType dtype, int64_t ndim, int64_t device) {
  TORCH_CHECK(t.is_cuda() && t.get_device() == device, name, " must be a CUDA tensor on device ", device, ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

p2p::LLLayout ll_layout(int64_t num_ranks, const std::vector<int64_t>& layout) {
  TORCH_CHECK(layout.size() == 8, "layout must have 8 entries, got ", layout.size());
  TORCH_CHECK(num_ranks >= 1 && num_ranks <= p2p::kLLMaxRanks, "low-latency mode: at most ", p2p::kLLMaxRanks,
              " ranks, got ", num_ranks);
  p2p::LLLayout l{};
  l.num_ranks = static_cast<int>(num_ranks);
  l.max_local = static_cast<int>(layout[0]);
  l.max_tokens = static_cast<int>(layout[1]);
  l.k = static_cast<int>(layout[2]);
  l.row_bytes = layout[3];
  l.scale_bytes = layout[4];
  l.hidden = layout[5];
  TORCH_CHECK(l.max_local >= 1 && l.max_tokens >= 1 && l.k >= 1 && l.k <= 32 && l.hidden >= 8 && l.hidden % 8 == 0,
              "bad low-latency layout (max_local, max_tokens >= 1; 1 <= k <= 32; hidden a multiple of 8)");
  TORCH_CHECK(l.row_bytes > 0 && l.row_bytes % 16 == 0 && l.scale_bytes >= 0 && l.scale_bytes % 16 == 0,
              "row and scale bytes must be multiples of 16");
  l.record_bytes = l.row_bytes + l.scale_bytes + 16;
  return l;
}

class P2PBuffer : public torch::CustomClassHolder {
 public:
  // One rank's buffer: signals + a dispatch region + a combine region (both multiples of 16 bytes), zeroed.
  P2PBuffer(int64_t rank, int64_t num_ranks, int64_t dispatch_bytes, int64_t combine_bytes, int64_t device)
      : rank_(rank), num_ranks_(num_ranks), device_(device), dispatch_bytes_(dispatch_bytes),
        combine_bytes_(combine_bytes) {
    TORCH_CHECK(num_ranks >= 1 && rank >= 0 && rank < num_ranks, "rank ", rank, " is not in [0, ", num_ranks, ")");
    TORCH_CHECK(dispatch_bytes >= 0 && combine_bytes >= 0 && dispatch_bytes % 16 == 0 && combine_bytes % 16 == 0,
                "region sizes must be non-negative multiples of 16 bytes, got ", dispatch_bytes, " and ",
                combine_bytes);
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    signal_bytes_ = p2p::signal_bytes(static_cast<int>(num_ranks));
    const int64_t total = signal_bytes_ + dispatch_bytes + combine_bytes;
    P2P_CUDA_CHECK(cudaMalloc(&base_, total));
    P2P_CUDA_CHECK(cudaMemset(base_, 0, total));  // every signal starts at epoch 0
    P2P_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_host_), sizeof(unsigned long long),
                                 cudaHostAllocMapped));
    *error_host_ = 0;
    P2P_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_dev_), error_host_, 0));
    P2P_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&peers_dev_), num_ranks * sizeof(void*)));
    peers_.assign(num_ranks, nullptr);
    peers_[rank] = base_;
    P2P_CUDA_CHECK(cudaDeviceSynchronize());  // zeroed before any peer can map and write it
  }

  ~P2PBuffer() override { release(); }

  // This buffer's CUDA IPC handle: uint8 [64] on the CPU.
  Tensor ipc_handle() {
    check_open();
    cudaIpcMemHandle_t handle;
    P2P_CUDA_CHECK(cudaIpcGetMemHandle(&handle, base_));
    Tensor out = torch::empty({static_cast<int64_t>(sizeof(handle))}, torch::kUInt8);
    std::memcpy(out.data_ptr(), &handle, sizeof(handle));
    return out;
  }

  // Map every peer's buffer: handles uint8 [num_ranks, 64] (CPU), row r from rank r (this rank's row unused).
  void open_peers(Tensor handles) {
    check_open();
    TORCH_CHECK(!opened_, "open_peers was already called");
    TORCH_CHECK(handles.device().is_cpu() && handles.scalar_type() == torch::kUInt8 && handles.dim() == 2 &&
                    handles.size(0) == num_ranks_ && handles.size(1) == sizeof(cudaIpcMemHandle_t),
                "handles must be a CPU uint8 tensor [", num_ranks_, ", ", sizeof(cudaIpcMemHandle_t), "], got ",
                handles.sizes());
    handles = handles.contiguous();
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    for (int64_t r = 0; r < num_ranks_; ++r) {
      if (r == rank_) continue;
      cudaIpcMemHandle_t handle;
      std::memcpy(&handle, handles.data_ptr<uint8_t>() + r * sizeof(handle), sizeof(handle));
      const cudaError_t err = cudaIpcOpenMemHandle(&peers_[r], handle, cudaIpcMemLazyEnablePeerAccess);
      TORCH_CHECK(err == cudaSuccess, "cannot map the buffer of rank ", r, ": ", cudaGetErrorString(err));
    }
    P2P_CUDA_CHECK(cudaMemcpy(peers_dev_, peers_.data(), num_ranks_ * sizeof(void*), cudaMemcpyHostToDevice));
    opened_ = true;
  }

  int64_t signal_bytes() const { return signal_bytes_; }
  int64_t dispatch_offset() const { return signal_bytes_; }
  int64_t combine_offset() const { return signal_bytes_ + dispatch_bytes_; }
  int64_t dispatch_bytes() const { return dispatch_bytes_; }
  int64_t combine_bytes() const { return combine_bytes_; }
  int64_t num_blocks() const { return p2p::kNumBlocks; }

  // The host-mapped error word (0: none); see p2p.h for its fields.
  int64_t error_word() const {
    return error_host_ ? static_cast<int64_t>(*reinterpret_cast<volatile unsigned long long*>(error_host_)) : 0;
  }
  void clear_error() {
    if (error_host_) *reinterpret_cast<volatile unsigned long long*>(error_host_) = 0;
  }

  // Launch dispatch on the current stream. rows uint8 [T, row_bytes]; meta uint8 [S, meta_bytes]; send_token,
  // send_dest, send_row int32 [S]; out_rows uint8 [M, row_bytes]; out_scale fp32 [M, num_scales] (numel 0: none);
  // out_weight fp32 [M]; out_meta uint8 [num_recv, meta_bytes].
  void dispatch(Tensor rows, Tensor meta, Tensor send_token, Tensor send_dest, Tensor send_row, Tensor out_rows,
                Tensor out_scale, Tensor out_weight, Tensor out_meta, int64_t k, int64_t epoch, int64_t timeout_ns) {
    check_ready(epoch);
    check_arg(rows, "rows", torch::kUInt8, 2, device_);
    check_arg(meta, "meta", torch::kUInt8, 2, device_);
    const int64_t S = meta.size(0), row_bytes = rows.size(1), meta_bytes = meta.size(1);
    const auto check_index = [&](const Tensor& t, const char* name) {
      check_arg(t, name, torch::kInt32, 1, device_);
      TORCH_CHECK(t.size(0) == S, name, " must have ", S, " entries (one per record), got ", t.size(0));
    };
    check_index(send_token, "send_token");
    check_index(send_dest, "send_dest");
    check_index(send_row, "send_row");
    TORCH_CHECK(row_bytes % 16 == 0 && meta_bytes % 16 == 0, "row and metadata bytes must be multiples of 16, got ",
                row_bytes, " and ", meta_bytes);
    TORCH_CHECK(k >= 1 && k <= 32 && 8 * k <= meta_bytes, "k must be in [1, 32] and fit the metadata, got ", k);
    check_arg(out_rows, "out_rows", torch::kUInt8, 2, device_);
    TORCH_CHECK(out_rows.size(1) == row_bytes, "out_rows must have ", row_bytes, " bytes per row");
    check_arg(out_weight, "out_weight", torch::kFloat32, 1, device_);
    TORCH_CHECK(out_weight.size(0) == out_rows.size(0), "out_weight must have one entry per out_rows row");
    int num_scales = 0;
    if (out_scale.numel() > 0) {
      check_arg(out_scale, "out_scale", torch::kFloat32, 2, device_);
      TORCH_CHECK(out_scale.size(0) == out_rows.size(0), "out_scale must have one row per out_rows row");
      num_scales = static_cast<int>(out_scale.size(1));
      TORCH_CHECK(4 * (2 * k + num_scales) <= meta_bytes, "the scales do not fit the metadata");
    }
    check_arg(out_meta, "out_meta", torch::kUInt8, 2, device_);
    TORCH_CHECK(out_meta.size(1) == meta_bytes, "out_meta must have ", meta_bytes, " bytes per row");
    const int64_t num_recv = out_meta.size(0);
    TORCH_CHECK(num_recv * (row_bytes + meta_bytes) <= dispatch_bytes_, "dispatch: ", num_recv,
                " records of ", row_bytes + meta_bytes, " bytes overflow the ", dispatch_bytes_, "-byte region");

    p2p::DispatchArgs a{};
    a.peers = peers_dev_;
    a.rank = static_cast<int>(rank_);
    a.num_ranks = static_cast<int>(num_ranks_);
    a.epoch = static_cast<uint64_t>(epoch);
    a.timeout_ns = static_cast<uint64_t>(timeout_ns);
    a.region_offset = dispatch_offset();
    a.rows = rows.data_ptr<uint8_t>();
    a.meta = meta.data_ptr<uint8_t>();
    a.send_token = send_token.data_ptr<int32_t>();
    a.send_dest = send_dest.data_ptr<int32_t>();
    a.send_row = send_row.data_ptr<int32_t>();
    a.num_send = S;
    a.row_bytes = row_bytes;
    a.meta_bytes = meta_bytes;
    a.num_recv = num_recv;
    a.out_rows = out_rows.data_ptr<uint8_t>();
    a.out_scale = num_scales ? out_scale.data_ptr<float>() : nullptr;
    a.out_weight = out_weight.data_ptr<float>();
    a.out_meta = out_meta.data_ptr<uint8_t>();
    a.k = static_cast<int>(k);
    a.num_scales = num_scales;
    a.error = error_dev_;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    P2P_CUDA_CHECK(p2p::launch_dispatch(a, at::cuda::getCurrentCUDAStream()));
  }

  // Launch combine on the current stream. partial [N, H] (fp32/bf16/fp16); dst_rank, dst_row int32 [N];
  // home_slot int32 [T, k]; out [T, H] (fp32/bf16/fp16).
  void combine(Tensor partial, Tensor dst_rank, Tensor dst_row, Tensor home_slot, Tensor out, int64_t epoch,
               int64_t timeout_ns) {
    check_ready(epoch);
    const p2p::DType wire = to_dtype(partial, "partial");
    const p2p::DType out_dtype = to_dtype(out, "out");
    check_arg(partial, "partial", partial.scalar_type(), 2, device_);
    const int64_t N = partial.size(0), H = partial.size(1);
    TORCH_CHECK((H * partial.element_size()) % 16 == 0, "partial rows must be multiples of 16 bytes, got H=", H);
    check_arg(dst_rank, "dst_rank", torch::kInt32, 1, device_);
    check_arg(dst_row, "dst_row", torch::kInt32, 1, device_);
    TORCH_CHECK(dst_rank.size(0) == N && dst_row.size(0) == N, "dst_rank/dst_row must have ", N, " entries");
    check_arg(home_slot, "home_slot", torch::kInt32, 2, device_);
    check_arg(out, "out", out.scalar_type(), 2, device_);
    TORCH_CHECK(out.size(0) == home_slot.size(0) && out.size(1) == H, "out must have shape [", home_slot.size(0),
                ", ", H, "], got ", out.sizes());
    TORCH_CHECK(home_slot.size(1) >= 1 && home_slot.size(1) <= 32, "home_slot must have 1 to 32 columns");

    p2p::CombineArgs a{};
    a.peers = peers_dev_;
    a.rank = static_cast<int>(rank_);
    a.num_ranks = static_cast<int>(num_ranks_);
    a.epoch = static_cast<uint64_t>(epoch);
    a.timeout_ns = static_cast<uint64_t>(timeout_ns);
    a.region_offset = combine_offset();
    a.partial = static_cast<const uint8_t*>(partial.data_ptr());
    a.dst_rank = dst_rank.data_ptr<int32_t>();
    a.dst_row = dst_row.data_ptr<int32_t>();
    a.num_rows = N;
    a.hidden = H;
    a.home_slot = home_slot.data_ptr<int32_t>();
    a.num_tokens = home_slot.size(0);
    a.k = static_cast<int>(home_slot.size(1));
    a.out = out.data_ptr();
    a.error = error_dev_;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    P2P_CUDA_CHECK(p2p::launch_combine(a, wire, out_dtype, at::cuda::getCurrentCUDAStream()));
  }

  // ---- low-latency mode (kernels/p2p_ll.cu) ----------------------------------------------------------------
  // `layout` = [max_local, max_tokens, k, row_bytes, scale_bytes, hidden, num_experts, num_local] (see p2p.h).

  // rows uint8 [T, row_bytes]; scales fp32 [T, num_scales] (numel 0: none); ids int32 [T, k];
  // expert_rank, expert_local int32 [num_experts].
  void ll_dispatch_send(Tensor rows, Tensor scales, Tensor ids, Tensor expert_rank, Tensor expert_local,
                        std::vector<int64_t> layout, int64_t timeout_ns) {
    p2p::LLArgs a = ll_args(layout, timeout_ns);
    check_arg(rows, "rows", torch::kUInt8, 2, device_);
    TORCH_CHECK(rows.size(1) == a.lay.row_bytes, "rows must have ", a.lay.row_bytes, " bytes per row");
    const int64_t T = rows.size(0);
    TORCH_CHECK(T <= a.lay.max_tokens, "low-latency dispatch: ", T, " tokens exceed max_tokens ", a.lay.max_tokens);
    check_arg(ids, "ids", torch::kInt32, 2, device_);
    TORCH_CHECK(ids.size(0) == T && ids.size(1) == a.lay.k, "ids must have shape [", T, ", ", a.lay.k, "]");
    a.num_scales = ll_scales(scales, T, a);
    check_arg(expert_rank, "expert_rank", torch::kInt32, 1, device_);
    check_arg(expert_local, "expert_local", torch::kInt32, 1, device_);
    TORCH_CHECK(expert_rank.size(0) == a.num_experts && expert_local.size(0) == a.num_experts,
                "expert_rank / expert_local must have ", a.num_experts, " entries");
    a.rows = rows.data_ptr<uint8_t>();
    a.scales = a.num_scales ? scales.data_ptr<float>() : nullptr;
    a.ids = ids.data_ptr<int32_t>();
    a.num_tokens = T;
    a.expert_rank = expert_rank.data_ptr<int32_t>();
    a.expert_local = expert_local.data_ptr<int32_t>();
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    P2P_CUDA_CHECK(p2p::launch_ll_dispatch_send(a, at::cuda::getCurrentCUDAStream()));
  }

  // out_rows uint8 [num_local, R * N, row_bytes]; out_scale fp32 [num_local, R * N, num_scales] (numel 0: none);
  // out_count int32 [num_local]; out_src int32 [num_local, R * N, 2].
  void ll_dispatch_recv(Tensor out_rows, Tensor out_scale, Tensor out_count, Tensor out_src,
                        std::vector<int64_t> layout, int64_t timeout_ns) {
    p2p::LLArgs a = ll_args(layout, timeout_ns);
    const int64_t rows = num_ranks_ * a.lay.max_tokens;
    check_arg(out_rows, "out_rows", torch::kUInt8, 3, device_);
    TORCH_CHECK(out_rows.size(0) == a.num_local && out_rows.size(1) == rows && out_rows.size(2) == a.lay.row_bytes,
                "out_rows must have shape [", a.num_local, ", ", rows, ", ", a.lay.row_bytes, "]");
    a.num_scales = ll_scales(out_scale.numel() ? out_scale.view({-1, out_scale.size(-1)}) : out_scale,
                             a.num_local * rows, a);
    ll_sources(out_count, out_src, a);
    a.out_rows = out_rows.data_ptr<uint8_t>();
    a.out_scale = a.num_scales ? out_scale.data_ptr<float>() : nullptr;
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    P2P_CUDA_CHECK(p2p::launch_ll_dispatch_recv(a, at::cuda::getCurrentCUDAStream()));
  }

  // y bf16 [num_local, R * N, hidden]; out_count, out_src: what ll_dispatch_recv wrote.
  void ll_combine_send(Tensor y, Tensor out_count, Tensor out_src, std::vector<int64_t> layout, int64_t timeout_ns) {
    p2p::LLArgs a = ll_args(layout, timeout_ns);
    const int64_t rows = num_ranks_ * a.lay.max_tokens;
    check_arg(y, "y", torch::kBFloat16, 3, device_);
    TORCH_CHECK(y.size(0) == a.num_local && y.size(1) == rows && y.size(2) == a.lay.hidden, "y must have shape [",
                a.num_local, ", ", rows, ", ", a.lay.hidden, "]");
    ll_sources(out_count, out_src, a);
    a.y = y.data_ptr();
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    P2P_CUDA_CHECK(p2p::launch_ll_combine_send(a, at::cuda::getCurrentCUDAStream()));
  }

  // weights fp32 [T, k]; ids int32 [T, k]; out bf16 [T, hidden].
  void ll_combine_recv(Tensor weights, Tensor ids, Tensor out, std::vector<int64_t> layout, int64_t timeout_ns) {
    p2p::LLArgs a = ll_args(layout, timeout_ns);
    check_arg(out, "out", torch::kBFloat16, 2, device_);
    const int64_t T = out.size(0);
    TORCH_CHECK(T <= a.lay.max_tokens && out.size(1) == a.lay.hidden, "out must have shape [T <= ",
                a.lay.max_tokens, ", ", a.lay.hidden, "]");
    check_arg(weights, "weights", torch::kFloat32, 2, device_);
    check_arg(ids, "ids", torch::kInt32, 2, device_);
    TORCH_CHECK(weights.size(0) == T && weights.size(1) == a.lay.k && ids.sizes() == weights.sizes(),
                "weights and ids must have shape [", T, ", ", a.lay.k, "]");
    a.weights = weights.data_ptr<float>();
    a.ids = ids.data_ptr<int32_t>();
    a.num_tokens = T;
    a.out = out.data_ptr();
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_));
    P2P_CUDA_CHECK(p2p::launch_ll_combine_recv(a, at::cuda::getCurrentCUDAStream()));
  }

  // Unmap the peers and free this rank's memory. The caller makes sure no kernel of any rank still uses them
  // (buffer.py synchronises and barriers first); the destructor calls it too.
  void close() { release(); }

 private:
  void check_open() const { TORCH_CHECK(base_ != nullptr, "the P2P buffer was closed"); }

  p2p::LLArgs ll_args(const std::vector<int64_t>& layout, int64_t timeout_ns) const {
    check_ready(1);
    p2p::LLArgs a{};
    a.lay = ll_layout(num_ranks_, layout);
    TORCH_CHECK(a.lay.dispatch_bytes() <= dispatch_bytes_ && a.lay.combine_bytes() <= combine_bytes_,
                "low-latency layout needs ", a.lay.dispatch_bytes(), " + ", a.lay.combine_bytes(),
                " bytes; the buffer has ", dispatch_bytes_, " + ", combine_bytes_);
    a.peers = peers_dev_;
    a.self_base = base_;
    a.rank = static_cast<int>(rank_);
    a.timeout_ns = static_cast<uint64_t>(timeout_ns);
    a.dispatch_offset = dispatch_offset();
    a.combine_offset = combine_offset();
    a.num_experts = static_cast<int>(layout[6]);
    a.num_local = static_cast<int>(layout[7]);
    TORCH_CHECK(a.num_local >= 0 && a.num_local <= a.lay.max_local, "num_local out of range");
    a.error = error_dev_;
    return a;
  }

  // Check out_count int32 [num_local] and out_src int32 [num_local, R * N, 2] and point `a` at them.
  void ll_sources(const Tensor& out_count, const Tensor& out_src, p2p::LLArgs& a) const {
    const int64_t rows = num_ranks_ * a.lay.max_tokens;
    check_arg(out_count, "out_count", torch::kInt32, 1, device_);
    TORCH_CHECK(out_count.size(0) == a.num_local, "out_count must have ", a.num_local, " entries");
    check_arg(out_src, "out_src", torch::kInt32, 3, device_);
    TORCH_CHECK(out_src.size(0) == a.num_local && out_src.size(1) == rows && out_src.size(2) == 2,
                "out_src must have shape [", a.num_local, ", ", rows, ", 2]");
    a.out_count = out_count.data_ptr<int32_t>();
    a.out_src = out_src.data_ptr<int32_t>();
  }

  // num_scales of an optional fp32 [rows, num_scales] tensor (numel 0: none), checked against the layout.
  int ll_scales(const Tensor& scales, int64_t rows, const p2p::LLArgs& a) const {
    if (scales.numel() == 0) return 0;
    check_arg(scales, "scales", torch::kFloat32, 2, device_);
    TORCH_CHECK(scales.size(0) == rows, "scales must have ", rows, " rows");
    TORCH_CHECK(4 * scales.size(1) <= a.lay.scale_bytes, "scales do not fit the layout's scale bytes");
    return static_cast<int>(scales.size(1));
  }

  void check_ready(int64_t epoch) const {
    check_open();
    TORCH_CHECK(opened_, "open_peers must be called before dispatch/combine");
    TORCH_CHECK(epoch >= 1, "epoch must be >= 1, got ", epoch);
  }

  void release() noexcept {
    if (base_ == nullptr) return;
    cudaSetDevice(static_cast<int>(device_));
    for (int64_t r = 0; r < static_cast<int64_t>(peers_.size()); ++r)
      if (r != rank_ && peers_[r] != nullptr) cudaIpcCloseMemHandle(peers_[r]);
    cudaFree(peers_dev_);
    cudaFree(base_);
    cudaFreeHost(error_host_);
    base_ = nullptr;
    peers_dev_ = nullptr;
    error_host_ = nullptr;
    error_dev_ = nullptr;
    peers_.clear();
    opened_ = false;
  }

  int64_t rank_, num_ranks_, device_, dispatch_bytes_, combine_bytes_, signal_bytes_ = 0;
  void* base_ = nullptr;
  void** peers_dev_ = nullptr;
  std::vector<void*> peers_;
  unsigned long long* error_host_ = nullptr;
  unsigned long long* error_dev_ = nullptr;
  bool opened_ = false;
};

}  // namespace

namespace {

// [dispatch region bytes, combine region bytes] of a low-latency layout.
std::vector<int64_t> p2p_ll_bytes(int64_t num_ranks, std::vector<int64_t> layout) {
  const p2p::LLLayout l = ll_layout(num_ranks, layout);
  return {l.dispatch_bytes(), l.combine_bytes()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(moe_kernels_C, m) {
  m.def("p2p_ll_bytes", &p2p_ll_bytes);
  m.class_<P2PBuffer>("P2PBuffer")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t>())
      .def("ipc_handle", &P2PBuffer::ipc_handle)
      .def("open_peers", &P2PBuffer::open_peers)
      .def("signal_bytes", &P2PBuffer::signal_bytes)
      .def("dispatch_offset", &P2PBuffer::dispatch_offset)
      .def("combine_offset", &P2PBuffer::combine_offset)
      .def("dispatch_bytes", &P2PBuffer::dispatch_bytes)
      .def("combine_bytes", &P2PBuffer::combine_bytes)
      .def("num_blocks", &P2PBuffer::num_blocks)
      .def("error_word", &P2PBuffer::error_word)
      .def("clear_error", &P2PBuffer::clear_error)
      .def("dispatch", &P2PBuffer::dispatch)
      .def("combine", &P2PBuffer::combine)
      .def("ll_dispatch_send", &P2PBuffer::ll_dispatch_send)
      .def("ll_dispatch_recv", &P2PBuffer::ll_dispatch_recv)
      .def("ll_combine_send", &P2PBuffer::ll_combine_send)
      .def("ll_combine_recv", &P2PBuffer::ll_combine_recv)
      .def("close", &P2PBuffer::close);
}

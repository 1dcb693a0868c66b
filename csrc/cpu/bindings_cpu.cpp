// twotower_rt._cpu: the CPU kernels, a pybind11 module of its own that needs no CUDA, so that a
// machine without nvcc builds it too. Like _C it takes raw pointers (Python ints) and sizes and
// links no libtorch; python/twotower_rt/ops/mamba_cpu.py checks the tensors before it calls in.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "twotower_rt/attention_cpu.h"
#include "twotower_rt/cpu_common.h"
#include "twotower_rt/cpu_pool.h"
#include "twotower_rt/cpu_stream.h"
#include "twotower_rt/linear_cpu.h"
#include "twotower_rt/linear_dot_cpu.h"
#include "twotower_rt/mamba_cpu.h"
#include "twotower_rt/mask_decide_cpu.h"
#include "twotower_rt/moe_cpu.h"
#include "twotower_rt/norm_cpu.h"

namespace py = pybind11;

#ifndef TWOTOWER_RT_VERSION
#define TWOTOWER_RT_VERSION "unknown"
#endif
#ifndef TWOTOWER_RT_HOST_COMPILER
#define TWOTOWER_RT_HOST_COMPILER "unknown"
#endif

namespace twotower_rt {
namespace {

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Runs kernel(params) without the GIL (pure C++ over memory the caller keeps alive) and turns
// its error message, if any, into a ValueError; inside a stream scope of the calling thread
// (cpu_stream.h) queues it instead, and the scope's end reports its error.
template <typename Params>
void Run(const char* (*kernel)(const Params&), const Params& params) {
  if (cpu::stream_active()) {
    cpu::stream_push([kernel, params] { return kernel(params); });
    return;
  }
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = kernel(params);
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

void MambaChunk(std::uintptr_t zxbcdt, std::uintptr_t conv_state, std::uintptr_t ssm_state,
                std::uintptr_t conv_taps, std::uintptr_t conv_bias, std::uintptr_t dt_bias,
                std::uintptr_t A, std::uintptr_t D, std::uintptr_t norm_weight,
                std::uintptr_t n_valid, std::uintptr_t out, std::uintptr_t conv_state_out,
                std::uintptr_t ssm_state_out, int64_t batch, int64_t n, int64_t heads,
                int64_t head_dim, int64_t state_size, int64_t groups, int64_t conv_kernel,
                int64_t norm_group, double eps, double dt_min, double dt_max) {
  cpu::MambaChunkParams p;
  p.zxbcdt = ptr<const float>(zxbcdt);
  p.conv_state = ptr<const float>(conv_state);
  p.ssm_state = ptr<const float>(ssm_state);
  p.conv_taps = ptr<const float>(conv_taps);
  p.conv_bias = ptr<const float>(conv_bias);
  p.dt_bias = ptr<const float>(dt_bias);
  p.A = ptr<const float>(A);
  p.D = ptr<const float>(D);
  p.norm_weight = ptr<const float>(norm_weight);
  p.n_valid = ptr<const int64_t>(n_valid);
  p.out = ptr<float>(out);
  p.conv_state_out = ptr<float>(conv_state_out);
  p.ssm_state_out = ptr<float>(ssm_state_out);
  p.batch = batch;
  p.n = n;
  p.heads = heads;
  p.head_dim = head_dim;
  p.state_size = state_size;
  p.groups = groups;
  p.conv_kernel = conv_kernel;
  p.norm_group = norm_group;
  p.eps = static_cast<float>(eps);
  p.dt_min = static_cast<float>(dt_min);
  p.dt_max = static_cast<float>(dt_max);
  Run(cpu::mamba_chunk, p);
}

void MoeForward(std::uintptr_t x, std::uintptr_t router_weight, std::uintptr_t score_bias,
                std::uintptr_t up, std::uintptr_t down, std::uintptr_t shared_up,
                std::uintptr_t shared_down, std::uintptr_t out, int64_t tokens, int64_t hidden,
                int64_t experts, int64_t inter, int64_t shared_inter, int64_t top_k,
                bool norm_topk_prob, double routed_scaling_factor, bool weights_bf16,
                bool weights_dot) {
  cpu::MoeParams p;
  p.x = ptr<const float>(x);
  p.router_weight = ptr<const double>(router_weight);
  p.score_bias = ptr<const double>(score_bias);
  p.up = ptr<const void>(up);
  p.down = ptr<const void>(down);
  p.shared_up = ptr<const void>(shared_up);
  p.shared_down = ptr<const void>(shared_down);
  p.weights_bf16 = weights_bf16;
  p.weights_dot = weights_dot;
  p.out = ptr<float>(out);
  p.tokens = tokens;
  p.hidden = hidden;
  p.experts = experts;
  p.inter = inter;
  p.shared_inter = shared_inter;
  p.top_k = top_k;
  p.norm_topk_prob = norm_topk_prob;
  p.routed_scaling_factor = routed_scaling_factor;
  Run(cpu::moe_forward, p);
}

void MaskDecide(std::uintptr_t logits, std::uintptr_t block, std::uintptr_t step,
                std::uintptr_t out_block, std::uintptr_t out_masked,
                std::uintptr_t out_num_committed, std::uintptr_t out_prediction,
                std::uintptr_t out_confidence, int64_t batch, int64_t block_size, int64_t vocab,
                int64_t mask_token_id, int64_t steps_per_block, double confidence_threshold) {
  cpu::MaskDecideParams p;
  p.logits = ptr<const float>(logits);
  p.block = ptr<const int64_t>(block);
  p.step = ptr<const int64_t>(step);
  p.out_block = ptr<int64_t>(out_block);
  p.out_masked = ptr<bool>(out_masked);
  p.out_num_committed = ptr<int64_t>(out_num_committed);
  p.out_prediction = ptr<int64_t>(out_prediction);
  p.out_confidence = ptr<float>(out_confidence);
  p.batch = batch;
  p.block_size = block_size;
  p.vocab = vocab;
  p.mask_token_id = mask_token_id;
  p.steps_per_block = steps_per_block;
  p.confidence_threshold = static_cast<float>(confidence_threshold);
  Run(cpu::mask_decide, p);
}

void ModulatedRmsNorm(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t scale,
                      std::uintptr_t shift, std::uintptr_t out, int64_t rows, int64_t hidden,
                      int64_t rows_per_seq, double eps, bool post) {
  cpu::ModNormParams p;
  p.x = ptr<const float>(x);
  p.weight = ptr<const float>(weight);
  p.scale = ptr<const float>(scale);
  p.shift = ptr<const float>(shift);
  p.out = ptr<float>(out);
  p.rows = rows;
  p.hidden = hidden;
  p.rows_per_seq = rows_per_seq;
  p.eps = static_cast<float>(eps);
  p.post = post;
  Run(cpu::modulated_rms_norm, p);
}

// The fields linear_cpu.h's and linear_dot_cpu.h's parameters share.
template <typename Params>
void SetProjection(Params& p, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t out,
                   int64_t rows, int64_t in, int64_t out_features, int64_t x_stride,
                   int64_t w_stride) {
  p.x = ptr<const float>(x);
  p.bias = ptr<const float>(bias);
  p.out = ptr<float>(out);
  p.rows = rows;
  p.in = in;
  p.out_features = out_features;
  p.x_stride = x_stride;
  p.w_stride = w_stride;
}

void Linear(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out,
            int64_t rows, int64_t in, int64_t out_features, int64_t x_stride, int64_t w_stride,
            bool w_bf16) {
  cpu::LinearParams p;
  SetProjection(p, x, bias, out, rows, in, out_features, x_stride, w_stride);
  if (w_bf16) {
    p.w_bf16 = ptr<const uint16_t>(w);
  } else {
    p.w = ptr<const float>(w);
  }
  Run(cpu::linear, p);
}

void LinearDot(std::uintptr_t x, std::uintptr_t w, std::uintptr_t bias, std::uintptr_t out,
               int64_t rows, int64_t in, int64_t out_features, int64_t x_stride,
               int64_t w_stride) {
  cpu::LinearDotParams p;
  SetProjection(p, x, bias, out, rows, in, out_features, x_stride, w_stride);
  p.w = ptr<const uint32_t>(w);
  Run(cpu::linear_dot, p);
}

void BlockAttention(std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                    std::uintptr_t context_lens, std::uintptr_t cache_slots,
                    std::uintptr_t k_block, std::uintptr_t v_block, std::uintptr_t out,
                    int64_t batch, int64_t queries, int64_t q_heads, int64_t kv_heads,
                    int64_t head_dim, int64_t capacity, int64_t cache_rows, int64_t q_stride,
                    int64_t q_batch_stride, int64_t block_stride, int64_t block_batch_stride,
                    double scale, bool causal, bool append) {
  cpu::AttentionParams p;
  p.q = ptr<const float>(q);
  p.k_cache = ptr<float>(k_cache);
  p.v_cache = ptr<float>(v_cache);
  p.context_lens = ptr<const int64_t>(context_lens);
  p.cache_slots = ptr<const int64_t>(cache_slots);
  p.k_block = ptr<const float>(k_block);
  p.v_block = ptr<const float>(v_block);
  p.out = ptr<float>(out);
  p.batch = batch;
  p.queries = queries;
  p.q_heads = q_heads;
  p.kv_heads = kv_heads;
  p.head_dim = head_dim;
  p.capacity = capacity;
  p.cache_rows = cache_rows;
  p.q_stride = q_stride;
  p.q_batch_stride = q_batch_stride;
  p.block_stride = block_stride;
  p.block_batch_stride = block_batch_stride;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.append = append;
  Run(cpu::block_attention, p);
}

void ResidualAdd(std::uintptr_t x, std::uintptr_t y, std::uintptr_t gate, std::uintptr_t out,
                 int64_t rows, int64_t hidden, int64_t rows_per_seq, int64_t gate_stride) {
  cpu::ResidualParams p;
  p.x = ptr<const float>(x);
  p.y = ptr<const float>(y);
  p.gate = ptr<const float>(gate);
  p.out = ptr<float>(out);
  p.rows = rows;
  p.hidden = hidden;
  p.rows_per_seq = rows_per_seq;
  p.gate_stride = gate_stride;
  Run(cpu::residual_add, p);
}

// stream_end / stream_wait without the GIL (the wait may be a whole forward's kernels); an error
// of a queued call as ValueError.
void StreamFinish(const char* (*finish)()) {
  const char* error = nullptr;
  {
    py::gil_scoped_release release;
    error = finish();
  }
  if (error != nullptr) throw std::invalid_argument(error);
}

py::dict BuildInfo() {
  py::dict info;
  info["version"] = TWOTOWER_RT_VERSION;
  info["host_compiler"] = TWOTOWER_RT_HOST_COMPILER;
  return info;
}

}  // namespace
}  // namespace twotower_rt

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "twotower_rt CPU kernels (raw pointers; see twotower_rt.ops.mamba_cpu)";
  m.def("mamba_chunk", &twotower_rt::MambaChunk, "The fused Mamba-2 mixer middle (mamba_cpu.h)",
        py::arg("zxbcdt"), py::arg("conv_state"), py::arg("ssm_state"), py::arg("conv_taps"),
        py::arg("conv_bias"), py::arg("dt_bias"), py::arg("A"), py::arg("D"),
        py::arg("norm_weight"), py::arg("n_valid"), py::arg("out"), py::arg("conv_state_out"),
        py::arg("ssm_state_out"), py::arg("batch"), py::arg("n"), py::arg("heads"),
        py::arg("head_dim"), py::arg("state_size"), py::arg("groups"), py::arg("conv_kernel"),
        py::arg("norm_group"), py::arg("eps"), py::arg("dt_min"), py::arg("dt_max"));
  m.def("mask_decide", &twotower_rt::MaskDecide,
        "One greedy mask-diffusion decision (mask_decide_cpu.h)", py::arg("logits"),
        py::arg("block"), py::arg("step"), py::arg("out_block"), py::arg("out_masked"),
        py::arg("out_num_committed"), py::arg("out_prediction"), py::arg("out_confidence"),
        py::arg("batch"), py::arg("block_size"), py::arg("vocab"), py::arg("mask_token_id"),
        py::arg("steps_per_block"), py::arg("confidence_threshold"));
  m.def("moe_forward", &twotower_rt::MoeForward, "A whole MoE layer (moe_cpu.h)", py::arg("x"),
        py::arg("router_weight"), py::arg("score_bias"), py::arg("up"), py::arg("down"),
        py::arg("shared_up"), py::arg("shared_down"), py::arg("out"), py::arg("tokens"),
        py::arg("hidden"), py::arg("experts"), py::arg("inter"), py::arg("shared_inter"),
        py::arg("top_k"), py::arg("norm_topk_prob"), py::arg("routed_scaling_factor"),
        py::arg("weights_bf16"), py::arg("weights_dot") = false);
  m.def("modulated_rms_norm", &twotower_rt::ModulatedRmsNorm,
        "The denoiser's time-modulated RMSNorm (norm_cpu.h)", py::arg("x"), py::arg("weight"),
        py::arg("scale"), py::arg("shift"), py::arg("out"), py::arg("rows"), py::arg("hidden"),
        py::arg("rows_per_seq"), py::arg("eps"), py::arg("post"));
  m.def("linear", &twotower_rt::Linear, "A dense K-major projection (linear_cpu.h)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("rows"), py::arg("in"),
        py::arg("out_features"), py::arg("x_stride"), py::arg("w_stride"), py::arg("w_bf16"));
  m.def("linear_dot", &twotower_rt::LinearDot,
        "A dense projection with bfloat16 dot products (linear_dot_cpu.h)", py::arg("x"),
        py::arg("w"), py::arg("bias"), py::arg("out"), py::arg("rows"), py::arg("in"),
        py::arg("out_features"), py::arg("x_stride"), py::arg("w_stride"));
  m.def("linear_dot_supported", &twotower_rt::cpu::linear_dot_supported,
        "Whether this CPU runs linear_dot (AVX512_BF16)");
  m.def("block_attention", &twotower_rt::BlockAttention,
        "Block attention over a KV cache, optionally appending to it (attention_cpu.h)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("context_lens"),
        py::arg("cache_slots"), py::arg("k_block"), py::arg("v_block"), py::arg("out"),
        py::arg("batch"), py::arg("queries"), py::arg("q_heads"), py::arg("kv_heads"),
        py::arg("head_dim"), py::arg("capacity"), py::arg("cache_rows"), py::arg("q_stride"),
        py::arg("q_batch_stride"), py::arg("block_stride"), py::arg("block_batch_stride"),
        py::arg("scale"), py::arg("causal"), py::arg("append"));
  m.def("residual_add", &twotower_rt::ResidualAdd,
        "A layer's residual update x + gate * y, or x + y (norm_cpu.h)", py::arg("x"),
        py::arg("y"), py::arg("gate"), py::arg("out"), py::arg("rows"), py::arg("hidden"),
        py::arg("rows_per_seq"), py::arg("gate_stride"));
  m.def("stream_begin", &twotower_rt::cpu::stream_begin,
        "Opens a stream scope on this thread: its kernel calls are queued (cpu_stream.h)");
  m.def(
      "stream_end", [] { twotower_rt::StreamFinish(twotower_rt::cpu::stream_end); },
      "Closes the scope; the outermost waits for the queued calls and raises their first error "
      "(cpu_stream.h)");
  m.def(
      "stream_wait", [] { twotower_rt::StreamFinish(twotower_rt::cpu::stream_wait); },
      "Inside a scope: waits for the calls queued so far and raises their first error "
      "(cpu_stream.h)");
  m.def(
      "stream_drain_if_behind",
      [](int64_t max_pending) {
        if (max_pending < 0) {
          throw std::invalid_argument("stream_drain_if_behind: max_pending must be >= 0");
        }
        py::gil_scoped_release release;  // the wait may be several big kernel calls
        return twotower_rt::cpu::stream_drain_if_behind(max_pending);
      },
      "Inside a scope: with more than max_pending calls queued, waits for all of them and "
      "returns True; else False at once (cpu_stream.h)",
      py::arg("max_pending"));
  m.def("stream_set_sharing", &twotower_rt::cpu::stream_set_sharing,
        "Whether kernel calls outside a scope may be shared with the stream's worker "
        "(cpu_stream.h)",
        py::arg("on"));
  m.def("stream_active", &twotower_rt::cpu::stream_active,
        "Whether this thread's kernel calls are being queued (cpu_stream.h)");
  m.def("build_info", &twotower_rt::BuildInfo);
  m.def(
      "wide_vectors", [] { return twotower_rt::cpu::wide_vectors(); },
      "Whether the kernels compute in 16-float vectors (AVX-512) or in 8-float ones (cpu_common.h)");
  m.def(
      "set_wide_vectors",
      [](int wide) {
        if (wide < -1 || wide > 1) {
          throw std::invalid_argument("set_wide_vectors: -1 (as the CPU says), 0 or 1");
        }
        twotower_rt::cpu::wide_vectors_forced().store(wide, std::memory_order_relaxed);
      },
      "Forces the vector width (0: 8 floats, 1: 16; -1: as the CPU says). The bits are the same "
      "either way; tests run both on any CPU",
      py::arg("wide"));
  m.def("threads", &twotower_rt::cpu::pool_threads,
        "Threads the kernels use, the caller included (cpu_pool.h)");
  m.def(
      "set_threads",
      [](int threads) {
        if (threads < 1) throw std::invalid_argument("set_threads: threads must be >= 1");
        py::gil_scoped_release release;  // stopping workers waits for them
        twotower_rt::cpu::set_pool_threads(threads);
      },
      "Sets the kernels' threads, the caller included: 1 stops the workers (cpu_pool.h)",
      py::arg("threads"));
}

// Exact softmax attention for small head sizes on the CPU: vprkit::small_head_attention.
//
// out[b, i, h*D:(h+1)*D] = softmax_j(scale * q_i . k_j) @ v   for each head h of size D.
//
// PyTorch's CPU flash-attention kernel runs head size 8 (R2Former's re-ranker: 32 channels,
// 4 heads) far below the machine's speed: its score blocks are GEMMs with an inner size of 8.
// Here each head's keys and values are transposed once into (D, N) panels, and each query row
// is two passes over kLanes-key blocks (16 with AVX-512, 8 with AVX2), the scores kept in one
// cache-resident row:
//   1. s_j = scale * sum_c q_c K[c, j]   (D fused multiply-adds per kLanes scores), row max;
//   2. p_j = exp(s_j - max), the sum of p and sum_c-wise p_j V[c, j] accumulated lane-wise.
// The kLanes-wide blocks are fixed-size loops the compiler turns into vector registers. The
// result equals the two-pass softmax in float32 up to rounding (no running rescale, as flash
// attention does, so the order of additions differs from it).
//
// Inputs: q (B, Nq, H*D), k and v (B, N, H*D), float32, the channel dimension contiguous (views
// into a fused qkv projection's output are fine); output (B, Nq, H*D) contiguous.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "lanes.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace vprkit_kernels;

constexpr int64_t kRowsPerJob = 128;  // query rows per parallel job: balances 2..16 threads
// Query rows attended together (their scores side by side): two fill AVX-512's 32 registers at
// head size 8; with AVX2's 16, one row's query and accumulators already take half of them.
constexpr int64_t kMaxRows = kLanes == 16 ? 2 : 1;

// R query rows at once (sharing each key and value load), head size D.
template <int64_t D, int64_t R>
void attend_block(const float* q, int64_t q_row_stride, float* out, int64_t out_row_stride,
                  const float* kt, const float* vt, int64_t n, int64_t n_padded, float scale,
                  float* scores) {
  // Lanes of the last block past the last key: their scores are pushed below any real one
  // and their exp is zeroed.
  ivec lane_index;
  for (int64_t l = 0; l < kLanes; ++l) lane_index[l] = static_cast<int32_t>(l);
  const int64_t last = n_padded - kLanes;
  const ivec tail_valid = lane_index < static_cast<int32_t>(n - last);

  fvec qs[R][D];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < D; ++c) qs[r][c] = splat(q[r * q_row_stride + c] * scale);

  // Pass 1: the scores of the rows and their maxima.
  fvec lane_max[R];
  for (int64_t r = 0; r < R; ++r) lane_max[r] = splat(-3.0e38f);
  for (int64_t j0 = 0; j0 < n_padded; j0 += kLanes) {
    fvec acc[R] = {};
    for (int64_t c = 0; c < D; ++c) {
      const fvec key = load(kt + c * n_padded + j0);
      for (int64_t r = 0; r < R; ++r) acc[r] += qs[r][c] * key;
    }
    for (int64_t r = 0; r < R; ++r) {
      if (j0 == last) acc[r] = tail_valid ? acc[r] : splat(-3.0e38f);
      std::memcpy(scores + r * n_padded + j0, &acc[r], sizeof(fvec));
      lane_max[r] = lane_max[r] > acc[r] ? lane_max[r] : acc[r];
    }
  }
  float row_max[R];
  for (int64_t r = 0; r < R; ++r) {
    row_max[r] = lane_max[r][0];
    for (int64_t l = 1; l < kLanes; ++l)
      row_max[r] = row_max[r] > lane_max[r][l] ? row_max[r] : lane_max[r][l];
  }

  // Pass 2: exp, their sum and the weighted values, lane-wise; reduced over lanes at the end.
  fvec lane_sum[R] = {};
  fvec lane_out[R][D] = {};
  for (int64_t j0 = 0; j0 < n_padded; j0 += kLanes) {
    fvec p[R];
    for (int64_t r = 0; r < R; ++r) {
      p[r] = exp_nonpositive(load(scores + r * n_padded + j0) - row_max[r]);
      if (j0 == last) p[r] = tail_valid ? p[r] : fvec{};
      lane_sum[r] += p[r];
    }
    for (int64_t c = 0; c < D; ++c) {
      const fvec value = load(vt + c * n_padded + j0);
      for (int64_t r = 0; r < R; ++r) lane_out[r][c] += p[r] * value;
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    const float total = sum_lanes(lane_sum[r]);
    for (int64_t c = 0; c < D; ++c) out[r * out_row_stride + c] = sum_lanes(lane_out[r][c]) / total;
  }
}

template <int64_t D>
void attend_rows(const float* q, int64_t q_row_stride, float* out, int64_t out_row_stride,
                 int64_t rows, const float* kt, const float* vt, int64_t n, int64_t n_padded,
                 float scale, float* scores) {
  // Two rows at a time while their accumulators fit in the 32 vector registers.
  constexpr int64_t R = D <= 8 ? kMaxRows : 1;
  int64_t i = 0;
  for (; i + R <= rows; i += R)
    attend_block<D, R>(q + i * q_row_stride, q_row_stride, out + i * out_row_stride,
                       out_row_stride, kt, vt, n, n_padded, scale, scores);
  for (; i < rows; ++i)
    attend_block<D, 1>(q + i * q_row_stride, q_row_stride, out + i * out_row_stride,
                       out_row_stride, kt, vt, n, n_padded, scale, scores);
}

template <int64_t D>
void attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
               int64_t heads, double scale) {
  const int64_t batch = q.size(0), nq = q.size(1), n = k.size(1);
  const int64_t n_padded = (n + kLanes - 1) / kLanes * kLanes;
  const int64_t row_chunks = (nq + kRowsPerJob - 1) / kRowsPerJob;
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t jobs = batch * heads * row_chunks;
  // Small jobs (short sequences) are grouped so each parallel task has enough work.
  const int64_t job_size = std::max<int64_t>(1, n * std::min(nq, kRowsPerJob));
  const int64_t grain = std::max<int64_t>(1, 4096 / job_size);
  at::parallel_for(0, jobs, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(D * n_padded, 0.0f), vt(D * n_padded, 0.0f), scores(kMaxRows * n_padded);
    int64_t panel = -1;  // the (b, h) whose keys and values kt and vt hold
    for (int64_t job = begin; job < end; ++job) {
      const int64_t bh = job / row_chunks, chunk = job % row_chunks;
      const int64_t b = bh / heads, h = bh % heads;
      if (bh != panel) {
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = kp + b * ks0 + j * ks1 + h * D;
          const float* vj = vp + b * vs0 + j * vs1 + h * D;
          for (int64_t c = 0; c < D; ++c) {
            kt[c * n_padded + j] = kj[c];
            vt[c * n_padded + j] = vj[c];
          }
        }
        panel = bh;
      }
      const int64_t row0 = chunk * kRowsPerJob;
      const int64_t rows = std::min(kRowsPerJob, nq - row0);
      attend_rows<D>(qp + b * qs0 + row0 * qs1 + h * D, qs1, op + b * os0 + row0 * os1 + h * D,
                     os1, rows, kt.data(), vt.data(), n, n_padded, static_cast<float>(scale),
                     scores.data());
    }
  });
}

at::Tensor small_head_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                int64_t heads, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "small_head_attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "small_head_attention: float32 only");
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
              "small_head_attention: q, k, v must be (B, N, H*D)");
  TORCH_CHECK(k.sizes() == v.sizes(), "small_head_attention: k and v differ in shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "small_head_attention: q and k differ in batch or channels");
  TORCH_CHECK(heads > 0 && q.size(2) % heads == 0,
              "small_head_attention: channels not divisible by heads");
  TORCH_CHECK(k.size(1) > 0, "small_head_attention: no keys");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1,
              "small_head_attention: the channel dimension must be contiguous");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  switch (q.size(2) / heads) {
    case 8: attention<8>(q, k, v, out, heads, scale); break;
    case 16: attention<16>(q, k, v, out, heads, scale); break;
    case 32: attention<32>(q, k, v, out, heads, scale); break;
    default: TORCH_CHECK(false, "small_head_attention: head size must be 8, 16 or 32");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vprkit, m) {
  m.def("small_head_attention(Tensor q, Tensor k, Tensor v, int heads, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(vprkit, CPU, m) {
  m.impl("small_head_attention", &small_head_attention);
}

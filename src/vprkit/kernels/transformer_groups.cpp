// Many tiny sequences through pre-norm transformer blocks on the CPU: vprkit::groups_first_token.
//
// R2Former's re-ranker runs each of its 1,000 groups per pair (a cls token and 5 token pairs,
// 32 channels) through 2 timm blocks and reads the first token. PyTorch spends that time in
// small matrix products, (6 x 6) attention and the memory traffic between its ops. Here kLanes
// groups (16 with AVX-512, 8 with AVX2) travel together, one group per vector lane, so every
// step (layer norm, the linear layers, the per-group attention, GELU, the residuals) is plain
// lane-wise arithmetic on activations that stay in the cache, with no reduction across lanes.
//
// Each block is timm's: x + proj(attn(norm1(x))), then x + fc2(gelu(fc1(norm2(x)))); the last
// block computes the first token only (its query, projection and MLP), which is all that is read.
// Arguments: x (G, T, C) float32 contiguous; weights: 12 float32 tensors per block, in the
// order norm1.weight, norm1.bias, qkv.weight, qkv.bias, proj.weight, proj.bias, norm2.weight,
// norm2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias (nn.Linear's (out, in) layout);
// heads, the LayerNorm eps. Returns the first token after the blocks, (G, C).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "lanes.h"

namespace {

using namespace vprkit_kernels;

constexpr int64_t kWeightsPerBlock = 12;

struct Block {
  const float *norm1_w, *norm1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
  const float *norm2_w, *norm2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
  int64_t hidden;
};

// y[t] = x[t] normalized over its `c` channels, then scaled and shifted (nn.LayerNorm).
void layer_norm(const fvec* x, int64_t rows, int64_t c, const float* w, const float* b,
                float eps, fvec* y) {
  for (int64_t t = 0; t < rows; ++t, x += c, y += c) {
    fvec mean = {};
    for (int64_t i = 0; i < c; ++i) mean += x[i];
    mean = mean / static_cast<float>(c);
    fvec var = {};
    for (int64_t i = 0; i < c; ++i) var += (x[i] - mean) * (x[i] - mean);
    var = var / static_cast<float>(c) + eps;
    fvec inv;
    for (int64_t l = 0; l < kLanes; ++l) inv[l] = 1.0f / std::sqrt(var[l]);
    for (int64_t i = 0; i < c; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
  }
}

// y[t][o] = b[o] + sum_i w[o][i] x[t][i] (nn.Linear), 8 outputs per pass kept in registers.
void linear(const fvec* x, int64_t rows, int64_t in, const float* w, const float* b,
            int64_t out, fvec* y) {
  constexpr int64_t kBlock = 8;
  for (int64_t t = 0; t < rows; ++t, x += in, y += out) {
    int64_t o = 0;
    for (; o + kBlock <= out; o += kBlock) {
      fvec acc[kBlock];
      for (int64_t k = 0; k < kBlock; ++k) acc[k] = splat(b[o + k]);
      for (int64_t i = 0; i < in; ++i) {
        const fvec xi = x[i];
        for (int64_t k = 0; k < kBlock; ++k) acc[k] += w[(o + k) * in + i] * xi;
      }
      for (int64_t k = 0; k < kBlock; ++k) y[o + k] = acc[k];
    }
    for (; o < out; ++o) {
      fvec acc = splat(b[o]);
      for (int64_t i = 0; i < in; ++i) acc += w[o * in + i] * x[i];
      y[o] = acc;
    }
  }
}

// Softmax attention of queries q (tq rows, c channels) over keys k and values v (t rows each,
// row strides kv_stride), per head of c / heads channels; out (tq x c).
// s: room for t scores.
void attention(const fvec* q, int64_t q_stride, int64_t tq, const fvec* k, const fvec* v,
               int64_t kv_stride, int64_t t, int64_t c, int64_t heads, fvec* out, fvec* s) {
  const int64_t d = c / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  for (int64_t i = 0; i < tq; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const fvec* qi = q + i * q_stride + h * d;
      fvec top = splat(-3.0e38f);
      for (int64_t j = 0; j < t; ++j) {
        const fvec* kj = k + j * kv_stride + h * d;
        fvec acc = {};
        for (int64_t e = 0; e < d; ++e) acc += qi[e] * kj[e];
        s[j] = acc * scale;
        top = top > s[j] ? top : s[j];
      }
      fvec total = {};
      for (int64_t j = 0; j < t; ++j) {
        s[j] = exp_nonpositive(s[j] - top);
        total += s[j];
      }
      const fvec inv = 1.0f / total;
      fvec* oi = out + i * c + h * d;
      for (int64_t e = 0; e < d; ++e) {
        fvec acc = {};
        for (int64_t j = 0; j < t; ++j) acc += s[j] * v[j * kv_stride + h * d + e];
        oi[e] = acc * inv;
      }
    }
  }
}

struct Scratch {
  std::vector<fvec> normed, qkv, attended, projected, hidden, scores;
  Scratch(int64_t t, int64_t c, int64_t hidden_max)
      : normed(t * c), qkv(t * 3 * c), attended(t * c), projected(t * c), hidden(hidden_max),
        scores(t) {}
};

// x (rows x c) += fc2(gelu(fc1(norm2(x)))), one row at a time.
void mlp_residual(fvec* x, int64_t rows, int64_t c, const Block& bw, float eps, Scratch& s) {
  for (int64_t t = 0; t < rows; ++t) {
    fvec* xt = x + t * c;
    layer_norm(xt, 1, c, bw.norm2_w, bw.norm2_b, eps, s.normed.data());
    linear(s.normed.data(), 1, c, bw.fc1_w, bw.fc1_b, bw.hidden, s.hidden.data());
    for (int64_t i = 0; i < bw.hidden; ++i) s.hidden[i] = gelu(s.hidden[i]);
    linear(s.hidden.data(), 1, bw.hidden, bw.fc2_w, bw.fc2_b, c, s.projected.data());
    for (int64_t i = 0; i < c; ++i) xt[i] += s.projected[i];
  }
}

// One block on every token of the tile (first_only: the first token's output only).
void block(fvec* x, int64_t t, int64_t c, int64_t heads, const Block& bw, float eps,
           bool first_only, Scratch& s) {
  layer_norm(x, t, c, bw.norm1_w, bw.norm1_b, eps, s.normed.data());
  const int64_t tq = first_only ? 1 : t;
  fvec* qkv = s.qkv.data();
  if (first_only) {  // the first token's query, every token's keys and values
    linear(s.normed.data(), 1, c, bw.qkv_w, bw.qkv_b, c, qkv);
    linear(s.normed.data(), t, c, bw.qkv_w + c * c, bw.qkv_b + c, 2 * c, qkv + c);
    attention(qkv, c, 1, qkv + c, qkv + 2 * c, 2 * c, t, c, heads, s.attended.data(),
              s.scores.data());
  } else {
    linear(s.normed.data(), t, c, bw.qkv_w, bw.qkv_b, 3 * c, qkv);
    attention(qkv, 3 * c, t, qkv + c, qkv + 2 * c, 3 * c, t, c, heads, s.attended.data(),
              s.scores.data());
  }
  linear(s.attended.data(), tq, c, bw.proj_w, bw.proj_b, c, s.projected.data());
  for (int64_t i = 0; i < tq * c; ++i) x[i] += s.projected[i];
  mlp_residual(x, tq, c, bw, eps, s);
}

at::Tensor groups_first_token(const at::Tensor& x, at::TensorList weights, int64_t heads,
                              double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 &&
                  x.is_contiguous(),
              "groups_first_token: x must be a contiguous float32 CPU tensor (G, T, C)");
  TORCH_CHECK(weights.size() % kWeightsPerBlock == 0,
              "groups_first_token: 12 weight tensors per block");
  const int64_t groups = x.size(0), t = x.size(1), c = x.size(2);
  TORCH_CHECK(t > 0 && heads > 0 && c % heads == 0, "groups_first_token: bad T, C or heads");
  std::vector<Block> blocks;
  int64_t hidden_max = 0;
  for (size_t i = 0; i < weights.size(); i += kWeightsPerBlock) {
    for (size_t j = i; j < i + kWeightsPerBlock; ++j)
      TORCH_CHECK(weights[j].device().is_cpu() && weights[j].scalar_type() == at::kFloat &&
                      weights[j].is_contiguous(),
                  "groups_first_token: weights must be contiguous float32 CPU tensors");
    const int64_t hidden = weights[i + 8].size(0);
    TORCH_CHECK(weights[i + 2].numel() == 3 * c * c && weights[i + 4].numel() == c * c &&
                    weights[i + 8].numel() == hidden * c && weights[i + 10].numel() == c * hidden,
                "groups_first_token: weight shapes do not match C");
    const float* p[kWeightsPerBlock];
    for (int64_t j = 0; j < kWeightsPerBlock; ++j) p[j] = weights[i + j].data_ptr<float>();
    blocks.push_back({p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11],
                      hidden});
    hidden_max = std::max(hidden_max, hidden);
  }
  auto out = at::empty({groups, c}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tiles = (groups + kLanes - 1) / kLanes;
  at::parallel_for(0, tiles, 4, [&](int64_t begin, int64_t end) {
    Scratch s(t, c, hidden_max);
    std::vector<fvec> tile(t * c);
    for (int64_t tile_index = begin; tile_index < end; ++tile_index) {
      const int64_t g0 = tile_index * kLanes;
      const int64_t lanes = std::min(kLanes, groups - g0);
      // Transpose in: lane l holds group g0 + l; missing groups of the last tile are zeros.
      std::fill(tile.begin(), tile.end(), fvec{});
      for (int64_t l = 0; l < lanes; ++l) {
        const float* xg = xp + (g0 + l) * t * c;
        for (int64_t i = 0; i < t * c; ++i) tile[i][l] = xg[i];
      }
      for (size_t b = 0; b < blocks.size(); ++b)
        block(tile.data(), t, c, heads, blocks[b], static_cast<float>(eps),
              b + 1 == blocks.size(), s);
      for (int64_t l = 0; l < lanes; ++l)
        for (int64_t i = 0; i < c; ++i) op[(g0 + l) * c + i] = tile[i][l];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(vprkit, m) {
  m.def("groups_first_token(Tensor x, Tensor[] weights, int heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(vprkit, CPU, m) { m.impl("groups_first_token", &groups_first_token); }

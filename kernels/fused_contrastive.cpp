// Fused tiled log-sum-exp of scaled similarities: the heavy half of the CLIP (InfoNCE) loss.
//
// For queries Q [B, d] and keys K [N, d] (fp32, contiguous rows) and a scale s:
//   forward:  lse_i = log sum_j exp(s * q_i . k_j)                        -> [B]
//   backward: with P_ij = exp(s * q_i . k_j - lse_i) and row weights g_i (= dLoss/dlse_i),
//             dQ_i = s g_i sum_j P_ij k_j,  dK_j = s sum_i g_i P_ij q_i,  ds = sum_ij g_i P_ij q_i . k_j
// The B x N logits are never stored: tiles of tile_rows x tile_cols dot products live in a per-task
// buffer and are recomputed in backward. Memory O((B + N) d + threads * tile_rows * tile_cols).
//
// CPU: at::parallel_for over row tiles (forward, dQ) and column tiles (dK, so no two tasks write
// the same gradient row); register-blocked micro-kernels over contiguous rows (GCC/Clang vector
// extensions, AVX-512 / AVX2 / SSE as the JIT build machine allows). No ATen op runs inside a
// parallel region. CUDA: fused_contrastive_cuda.cu, registered below when built with WITH_CUDA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));

constexpr int kMicro = 4;  // micro-tile: 4 x 4 dot products, or 4 output rows x 4 vectors

inline vfloat load(const float* p) { vfloat v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline float hsum(vfloat v) { float s = 0; for (int l = 0; l < kLanes; ++l) s += v[l]; return s; }

// tile[a * ldt + c] = q_a . k_c for a < R rows and 4 vectors of columns, from the TRANSPOSED keys
// kt [d, ldk]: broadcast q, vector over keys, so no horizontal sums. R x 4 accumulators in registers.
template <int R>
inline void dots_panel(const float* q, const float* kt, int64_t ldk, int64_t d, float* tile, int64_t ldt) {
  vfloat acc[R][kMicro] = {};
  for (int64_t x = 0; x < d; ++x) {
    vfloat kv[kMicro];
    for (int v = 0; v < kMicro; ++v) kv[v] = load(kt + x * ldk + v * kLanes);
    for (int a = 0; a < R; ++a) {
      const float qa = q[a * d + x];
      for (int v = 0; v < kMicro; ++v) acc[a][v] += qa * kv[v];
    }
  }
  for (int a = 0; a < R; ++a)
    for (int v = 0; v < kMicro; ++v) store(tile + a * ldt + v * kLanes, acc[a][v]);
}

using PanelFn = void (*)(const float*, const float*, int64_t, int64_t, float*, int64_t);
constexpr PanelFn kPanels[kMicro] = {&dots_panel<1>, &dots_panel<2>, &dots_panel<3>, &dots_panel<4>};
constexpr int64_t kPanelCols = kMicro * kLanes;

// tile[a * cols + c] = Q[a] . K[c] for a < rows, c < cols; kt is the transposed keys [d, ldk] at
// the tile's first column (Q points at the tile's first row).
void dots_tile(const float* q, int64_t rows, const float* kt, int64_t ldk, int64_t cols, int64_t d, float* tile) {
  int64_t c = 0;
  for (; c + kPanelCols <= cols; c += kPanelCols)
    for (int64_t a = 0; a < rows; a += kMicro)
      kPanels[std::min<int64_t>(kMicro, rows - a) - 1](q + a * d, kt + c, ldk, d, tile + a * cols + c, cols);
  for (int64_t a = 0; a < rows; ++a)  // the last columns (fewer than one panel)
    for (int64_t cc = c; cc < cols; ++cc) {
      float s = 0;
      for (int64_t x = 0; x < d; ++x) s += q[a * d + x] * kt[x * ldk + cc];
      tile[a * cols + cc] = s;
    }
}

// out[r] += sum_t w[r * w_r + t * w_t] * src[t] for r < rows, t < terms (rows of width d).
// w's strides let the same kernel read a tile or its transpose.
void accumulate_weighted_rows(float* out, int64_t rows, const float* w, int64_t w_r, int64_t w_t,
                              const float* src, int64_t terms, int64_t d) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMicro) {
    const int64_t nr = std::min<int64_t>(kMicro, rows - r0);
    int64_t x = 0;
    for (; x + kMicro * kLanes <= d; x += kMicro * kLanes) {  // 4 rows x 4 vectors in registers
      vfloat acc[kMicro][kMicro];
      for (int64_t r = 0; r < nr; ++r)
        for (int v = 0; v < kMicro; ++v) acc[r][v] = load(out + (r0 + r) * d + x + v * kLanes);
      for (int64_t t = 0; t < terms; ++t) {
        vfloat sv[kMicro];
        for (int v = 0; v < kMicro; ++v) sv[v] = load(src + t * d + x + v * kLanes);
        for (int64_t r = 0; r < nr; ++r) {
          const float wt = w[(r0 + r) * w_r + t * w_t];
          for (int v = 0; v < kMicro; ++v) acc[r][v] += wt * sv[v];
        }
      }
      for (int64_t r = 0; r < nr; ++r)
        for (int v = 0; v < kMicro; ++v) store(out + (r0 + r) * d + x + v * kLanes, acc[r][v]);
    }
    for (int64_t r = 0; r < nr; ++r)  // the remaining columns (d not a multiple of 4 vectors)
      for (int64_t t = 0; t < terms; ++t) {
        const float wt = w[(r0 + r) * w_r + t * w_t];
        for (int64_t c = x; c < d; ++c) out[(r0 + r) * d + c] += wt * src[t * d + c];
      }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1),
              "fused_contrastive: queries [B, d] and keys [N, d] must share d; got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat,
              "fused_contrastive: float32 only (the Python wrapper casts)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "fused_contrastive: inputs must be contiguous");
  TORCH_CHECK(tile_rows >= 1 && tile_cols >= 1, "fused_contrastive: tile sizes must be >= 1");
}

// P_ij = g_i exp(s dot_ij - lse_i) in place over a rows x cols tile of dots; returns sum P_ij dot_ij.
double weighted_probs(float* tile, int64_t rows, int64_t cols, float scale, const float* lse, const float* g) {
  double scale_grad = 0;
  for (int64_t a = 0; a < rows; ++a) {
    float* row = tile + a * cols;
    float partial = 0;
#pragma omp simd reduction(+ : partial)
    for (int64_t b = 0; b < cols; ++b) {
      const float dot = row[b];
      const float p = g[a] * std::exp(scale * dot - lse[a]);
      partial += p * dot;
      row[b] = p;
    }
    scale_grad += partial;
  }
  return scale_grad;
}

at::Tensor lse_forward_cpu(const at::Tensor& q, const at::Tensor& k, double scale_d, int64_t tile_rows,
                           int64_t tile_cols) {
  const int64_t B = q.size(0), N = k.size(0), d = q.size(1);
  const float scale = static_cast<float>(scale_d);
  at::Tensor lse = at::empty({B}, q.options());
  const at::Tensor kt = k.t().contiguous();  // [d, N]: the dot micro-kernel reads keys as columns
  const float *qp = q.data_ptr<float>(), *ktp = kt.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t row_tiles = (B + tile_rows - 1) / tile_rows;
  at::parallel_for(0, row_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<float> tile(tile_rows * tile_cols), run_max(tile_rows), run_sum(tile_rows);
    for (int64_t rt = first; rt < last; ++rt) {
      const int64_t i0 = rt * tile_rows, rows = std::min(tile_rows, B - i0);
      std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(run_sum.begin(), run_sum.end(), 0.f);
      for (int64_t j0 = 0; j0 < N; j0 += tile_cols) {
        const int64_t cols = std::min(tile_cols, N - j0);
        dots_tile(qp + i0 * d, rows, ktp + j0, N, cols, d, tile.data());
        for (int64_t a = 0; a < rows; ++a) {  // online log-sum-exp: rescale the sum when the max grows
          float* row = tile.data() + a * cols;
          float m = run_max[a];
#pragma omp simd reduction(max : m)
          for (int64_t b = 0; b < cols; ++b) m = std::max(m, scale * row[b]);
          float s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t b = 0; b < cols; ++b) s += std::exp(scale * row[b] - m);
          s += run_sum[a] * std::exp(run_max[a] - m);
          run_max[a] = m;
          run_sum[a] = s;
        }
      }
      for (int64_t a = 0; a < rows; ++a) lp[i0 + a] = run_max[a] + std::log(run_sum[a]);
    }
  });
  return lse;
}

std::vector<at::Tensor> lse_backward_cpu(const at::Tensor& q, const at::Tensor& k, double scale_d,
                                         const at::Tensor& lse, const at::Tensor& grad_lse, int64_t tile_rows,
                                         int64_t tile_cols) {
  const int64_t B = q.size(0), N = k.size(0), d = q.size(1);
  const float scale = static_cast<float>(scale_d);
  at::Tensor grad_q = at::zeros_like(q), grad_k = at::zeros_like(k);
  const at::Tensor kt = k.t().contiguous();  // [d, N]: the dot micro-kernel reads keys as columns
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *ktp = kt.data_ptr<float>();
  const float *lp = lse.data_ptr<float>(), *gp = grad_lse.data_ptr<float>();
  float *gq = grad_q.data_ptr<float>(), *gk = grad_k.data_ptr<float>();

  // pass 1, row tiles: dQ (each task owns its rows) and the scale gradient
  const int64_t row_tiles = (B + tile_rows - 1) / tile_rows;
  std::vector<double> scale_parts(row_tiles, 0.0);
  at::parallel_for(0, row_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<float> tile(tile_rows * tile_cols);
    for (int64_t rt = first; rt < last; ++rt) {
      const int64_t i0 = rt * tile_rows, rows = std::min(tile_rows, B - i0);
      for (int64_t j0 = 0; j0 < N; j0 += tile_cols) {
        const int64_t cols = std::min(tile_cols, N - j0);
        dots_tile(qp + i0 * d, rows, ktp + j0, N, cols, d, tile.data());
        scale_parts[rt] += weighted_probs(tile.data(), rows, cols, scale, lp + i0, gp + i0);
        accumulate_weighted_rows(gq + i0 * d, rows, tile.data(), cols, 1, kp + j0 * d, cols, d);
      }
    }
  });
  // pass 2, column tiles: dK (each task owns its key rows), tiles recomputed
  const int64_t col_tiles = (N + tile_cols - 1) / tile_cols;
  at::parallel_for(0, col_tiles, 1, [&](int64_t first, int64_t last) {
    std::vector<float> tile(tile_rows * tile_cols);
    for (int64_t ct = first; ct < last; ++ct) {
      const int64_t j0 = ct * tile_cols, cols = std::min(tile_cols, N - j0);
      for (int64_t i0 = 0; i0 < B; i0 += tile_rows) {
        const int64_t rows = std::min(tile_rows, B - i0);
        dots_tile(qp + i0 * d, rows, ktp + j0, N, cols, d, tile.data());
        weighted_probs(tile.data(), rows, cols, scale, lp + i0, gp + i0);
        accumulate_weighted_rows(gk + j0 * d, cols, tile.data(), 1, cols, qp + i0 * d, rows, d);
      }
    }
  });
  double scale_grad = 0;
  for (double part : scale_parts) scale_grad += part;
  grad_q.mul_(scale);
  grad_k.mul_(scale);
  return {grad_q, grad_k, at::scalar_tensor(scale_grad, q.options())};
}

}  // namespace

#ifdef WITH_CUDA
at::Tensor lse_forward_cuda(const at::Tensor& q, const at::Tensor& k, double scale, int64_t tile_rows,
                            int64_t tile_cols);
std::vector<at::Tensor> lse_backward_cuda(const at::Tensor& q, const at::Tensor& k, double scale,
                                          const at::Tensor& lse, const at::Tensor& grad_lse, int64_t tile_rows,
                                          int64_t tile_cols);
#endif

at::Tensor lse_forward(const at::Tensor& q, const at::Tensor& k, double scale, int64_t tile_rows, int64_t tile_cols) {
  check_inputs(q, k, tile_rows, tile_cols);
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return lse_forward_cuda(q, k, scale, tile_rows, tile_cols);
#else
    TORCH_CHECK(false, "fused_contrastive was built without CUDA");
#endif
  }
  return lse_forward_cpu(q, k, scale, tile_rows, tile_cols);
}

std::vector<at::Tensor> lse_backward(const at::Tensor& q, const at::Tensor& k, double scale, const at::Tensor& lse,
                                     const at::Tensor& grad_lse, int64_t tile_rows, int64_t tile_cols) {
  check_inputs(q, k, tile_rows, tile_cols);
  TORCH_CHECK(lse.is_contiguous() && grad_lse.is_contiguous() && lse.numel() == q.size(0) &&
                  grad_lse.numel() == q.size(0) && grad_lse.scalar_type() == at::kFloat,
              "fused_contrastive: lse and grad_lse must be contiguous float32 [B]");
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return lse_backward_cuda(q, k, scale, lse, grad_lse, tile_rows, tile_cols);
#else
    TORCH_CHECK(false, "fused_contrastive was built without CUDA");
#endif
  }
  return lse_backward_cpu(q, k, scale, lse, grad_lse, tile_rows, tile_cols);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused tiled log-sum-exp of scaled similarities (forward, backward) for the contrastive loss";
  m.def("lse_forward", &lse_forward, "lse_i = log sum_j exp(s q_i . k_j), tiled",
        py::arg("queries"), py::arg("keys"), py::arg("scale"), py::arg("tile_rows"), py::arg("tile_cols"),
        py::call_guard<py::gil_scoped_release>());
  m.def("lse_backward", &lse_backward, "(dQ, dK, ds) of sum_i g_i lse_i, tiles recomputed",
        py::arg("queries"), py::arg("keys"), py::arg("scale"), py::arg("lse"), py::arg("grad_lse"),
        py::arg("tile_rows"), py::arg("tile_cols"), py::call_guard<py::gil_scoped_release>());
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
}

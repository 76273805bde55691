// Fused tiled log-sum-exp of scaled similarities: the heavy half of the CLIP (InfoNCE) loss.
//
// For queries Q [B, d] and keys K [N, d] (fp32, contiguous rows) and a scale s:
//   forward:  lse_i = log sum_j exp(s * q_i . k_j)                        -> [B]
//   backward: with P_ij = exp(s * q_i . k_j - lse_i) and row weights g_i (= dLoss/dlse_i),
//             dQ_i = s g_i sum_j P_ij k_j,  dK_j = s sum_i g_i P_ij q_i,  ds = sum_ij g_i P_ij q_i . k_j
// The B x N logits are never stored: a tile of tile_rows x tile_cols dot products lives in a
// per-task buffer (computed by the BLAS sgemm torch links, single-threaded inside our parallel
// region, as ATen's own CPU flash attention does) and is recomputed in backward. The exp and the
// online log-sum-exp run vectorised over the tile while it is in cache.
//
// CPU backward is ONE pass over the tiles: parallel over groups of key columns (each group owns its
// dK rows), each group accumulating dQ into its own [B, d] buffer, summed at the end. The buffers
// cost (groups - 1) B d floats; when that would exceed the N d of dK (large B, as in global mode),
// dQ and dK are computed in two passes instead (row tiles, then column tiles), recomputing the
// tiles once more. Memory O((B + N) d + threads * tile_rows * tile_cols).
// CUDA tensors use the Triton kernel (lilt_ds/ops/triton_contrastive.py) instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vfloat load(const float* p) { vfloat v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline vfloat splat(float x) { return vfloat{} + x; }

// exp(x) lane-wise, Cephes' single-precision polynomial (relative error ~2e-7 on [-87, 88]); inputs
// below -87.3 give ~1e-38 instead of 0, which a sum of probabilities cannot tell apart.
inline vfloat vexp(vfloat x) {
  x = x < splat(88.3f) ? x : splat(88.3f);
  x = x > splat(-87.3f) ? x : splat(-87.3f);
  const vfloat n = __builtin_convertvector(
      __builtin_convertvector(x * splat(1.44269504088896341f) + (x < splat(0.f) ? splat(-0.5f) : splat(0.5f)), vint),
      vfloat);  // round half away from zero
  const vfloat r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.f);
  const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

inline float hmax(vfloat v) { float m = v[0]; for (int l = 1; l < kLanes; ++l) m = std::max(m, v[l]); return m; }
inline float hsum(vfloat v) { float s = 0; for (int l = 0; l < kLanes; ++l) s += v[l]; return s; }

// Row-major tile[rows, cols] (leading dim cols) = Q[rows, d] . K[cols, d]^T, via column-major sgemm.
void dots_tile(const float* q, int64_t rows, const float* k, int64_t cols, int64_t d, float* tile) {
  const int m = cols, n = rows, kk = d, ld = d, ldc = cols;
  const float one = 1.f, zero = 0.f;
  sgemm_("T", "N", &m, &n, &kk, &one, k, &ld, q, &ld, &zero, tile, &ldc);
}

// out[rows, d] += alpha * P[rows, cols] . K[cols, d]   (dQ of a row tile from a column tile)
void add_probs_times_keys(float* out, const float* probs, int64_t rows, const float* k, int64_t cols, int64_t d,
                          float alpha) {
  const int m = d, n = rows, kk = cols, ld = d, ldp = cols;
  const float one = 1.f;
  sgemm_("N", "N", &m, &n, &kk, &alpha, k, &ld, probs, &ldp, &one, out, &ld);
}

// out[cols, d] += alpha * P[rows, cols]^T . Q[rows, d]   (dK of a column tile from a row tile)
void add_probs_t_times_queries(float* out, const float* probs, int64_t rows, const float* q, int64_t cols, int64_t d,
                               float alpha) {
  const int m = d, n = cols, kk = rows, ld = d, ldp = cols;
  const float one = 1.f;
  sgemm_("N", "T", &m, &n, &kk, &alpha, q, &ld, probs, &ldp, &one, out, &ld);
}

// Online log-sum-exp of one row of dots: folds exp(s * dot - m) into (run_max, run_sum).
void fold_row(const float* row, int64_t cols, float scale, float& run_max, float& run_sum) {
  int64_t b = 0;
  vfloat vm = splat(-std::numeric_limits<float>::infinity());
  for (; b + kLanes <= cols; b += kLanes) vm = vm > load(row + b) * splat(scale) ? vm : load(row + b) * splat(scale);
  float m = std::max(run_max, hmax(vm));
  for (int64_t t = b; t < cols; ++t) m = std::max(m, scale * row[t]);
  vfloat vs = vfloat{};
  for (b = 0; b + kLanes <= cols; b += kLanes) vs += vexp(load(row + b) * splat(scale) - splat(m));
  float s = hsum(vs);
  for (int64_t t = b; t < cols; ++t) s += std::exp(scale * row[t] - m);
  run_sum = s + run_sum * std::exp(run_max - m);
  run_max = m;
}

// P_ij = g_i exp(s dot_ij - lse_i) in place over a rows x cols tile of dots; returns sum P_ij dot_ij.
double weighted_probs(float* tile, int64_t rows, int64_t cols, float scale, const float* lse, const float* g) {
  double scale_grad = 0;
  for (int64_t a = 0; a < rows; ++a) {
    float* row = tile + a * cols;
    const vfloat vscale = splat(scale), vlse = splat(lse[a]), vg = splat(g[a]);
    vfloat acc = vfloat{};
    int64_t b = 0;
    for (; b + kLanes <= cols; b += kLanes) {
      const vfloat dot = load(row + b), p = vg * vexp(vscale * dot - vlse);
      acc += p * dot;
      store(row + b, p);
    }
    float partial = hsum(acc);
    for (; b < cols; ++b) {
      const float p = g[a] * std::exp(scale * row[b] - lse[a]);
      partial += p * row[b];
      row[b] = p;
    }
    scale_grad += partial;
  }
  return scale_grad;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t tile_rows, int64_t tile_cols) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1),
              "fused_contrastive: queries [B, d] and keys [N, d] must share d; got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat,
              "fused_contrastive: float32 only (the Python wrapper casts)");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous(), "fused_contrastive: inputs must be contiguous");
  TORCH_CHECK(tile_rows >= 1 && tile_cols >= 1, "fused_contrastive: tile sizes must be >= 1");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

at::Tensor lse_forward_cpu(const at::Tensor& q, const at::Tensor& k, double scale_d, int64_t tile_rows,
                           int64_t tile_cols) {
  const int64_t B = q.size(0), N = k.size(0), d = q.size(1);
  const float scale = static_cast<float>(scale_d);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  // tasks = row tiles x column groups, enough to keep every thread busy when B is small; each task
  // keeps a running (max, sum) per row over its columns, merged below
  const int64_t row_tiles = ceil_div(B, tile_rows), col_tiles = ceil_div(N, tile_cols);
  const int64_t groups = std::min(col_tiles, std::max<int64_t>(1, ceil_div(at::get_num_threads(), row_tiles)));
  std::vector<float> part_max(groups * B, -std::numeric_limits<float>::infinity()), part_sum(groups * B, 0.f);
  at::parallel_for(0, row_tiles * groups, 1, [&](int64_t first, int64_t last) {
    std::vector<float> tile(tile_rows * tile_cols);
    for (int64_t task = first; task < last; ++task) {
      const int64_t rt = task / groups, g = task % groups;
      const int64_t i0 = rt * tile_rows, rows = std::min(tile_rows, B - i0);
      float *run_max = part_max.data() + g * B + i0, *run_sum = part_sum.data() + g * B + i0;
      for (int64_t ct = g * col_tiles / groups; ct < (g + 1) * col_tiles / groups; ++ct) {
        const int64_t j0 = ct * tile_cols, cols = std::min(tile_cols, N - j0);
        dots_tile(qp + i0 * d, rows, kp + j0 * d, cols, d, tile.data());
        for (int64_t a = 0; a < rows; ++a) fold_row(tile.data() + a * cols, cols, scale, run_max[a], run_sum[a]);
      }
    }
  });
  at::Tensor lse = at::empty({B}, q.options());
  float* lp = lse.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    float m = -std::numeric_limits<float>::infinity(), total = 0;
    for (int64_t g = 0; g < groups; ++g) m = std::max(m, part_max[g * B + i]);
    for (int64_t g = 0; g < groups; ++g) total += part_sum[g * B + i] * std::exp(part_max[g * B + i] - m);
    lp[i] = m + std::log(total);
  }
  return lse;
}

// For key-column tiles [first_ct, last_ct): dK of those columns, and dQ of every row into dq (of the
// caller's group) when dq is given; returns the group's share of ds.
double backward_columns(const float* qp, const float* kp, int64_t B, int64_t N, int64_t d, float scale,
                        const float* lp, const float* gp, int64_t tile_rows, int64_t tile_cols, int64_t first_ct,
                        int64_t last_ct, float* gk, float* dq) {
  std::vector<float> tile(tile_rows * tile_cols);
  double scale_grad = 0;
  for (int64_t ct = first_ct; ct < last_ct; ++ct) {
    const int64_t j0 = ct * tile_cols, cols = std::min(tile_cols, N - j0);
    for (int64_t i0 = 0; i0 < B; i0 += tile_rows) {
      const int64_t rows = std::min(tile_rows, B - i0);
      dots_tile(qp + i0 * d, rows, kp + j0 * d, cols, d, tile.data());
      scale_grad += weighted_probs(tile.data(), rows, cols, scale, lp + i0, gp + i0);
      add_probs_t_times_queries(gk + j0 * d, tile.data(), rows, qp + i0 * d, cols, d, scale);
      if (dq != nullptr) add_probs_times_keys(dq + i0 * d, tile.data(), rows, kp + j0 * d, cols, d, scale);
    }
  }
  return scale_grad;
}

std::vector<at::Tensor> lse_backward_cpu(const at::Tensor& q, const at::Tensor& k, double scale_d,
                                         const at::Tensor& lse, const at::Tensor& grad_lse, int64_t tile_rows,
                                         int64_t tile_cols) {
  const int64_t B = q.size(0), N = k.size(0), d = q.size(1);
  const float scale = static_cast<float>(scale_d);
  at::Tensor grad_q = at::zeros_like(q), grad_k = at::zeros_like(k);
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *lp = lse.data_ptr<float>(), *gp = grad_lse.data_ptr<float>();
  float *gq = grad_q.data_ptr<float>(), *gk = grad_k.data_ptr<float>();
  const int64_t col_tiles = ceil_div(N, tile_cols);
  // One pass with up to one column group per thread, while the groups' extra dQ buffers cost at most
  // dK's size; it does 3 tile-GEMMs where two passes do 4, so it wins while it keeps >= 3/4 of the threads.
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min({threads, col_tiles, 1 + N / std::max<int64_t>(B, 1)});
  std::vector<double> scale_parts(std::max<int64_t>(groups, ceil_div(B, tile_rows)), 0.0);
  if (4 * groups >= 3 * threads) {
    at::Tensor extra_dq = at::zeros({groups - 1, B, d}, q.options());  // group 0 writes grad_q itself
    float* ep = extra_dq.data_ptr<float>();
    at::parallel_for(0, groups, 1, [&](int64_t first, int64_t last) {
      for (int64_t g = first; g < last; ++g)
        scale_parts[g] = backward_columns(qp, kp, B, N, d, scale, lp, gp, tile_rows, tile_cols,
                                          g * col_tiles / groups, (g + 1) * col_tiles / groups, gk,
                                          g == 0 ? gq : ep + (g - 1) * B * d);
    });
    if (groups > 1) grad_q.add_(extra_dq.sum(0));
  } else {
    // pass 1, row tiles: dQ (each task owns its rows) and ds; pass 2, column tiles: dK
    at::parallel_for(0, ceil_div(B, tile_rows), 1, [&](int64_t first, int64_t last) {
      std::vector<float> tile(tile_rows * tile_cols);
      for (int64_t rt = first; rt < last; ++rt) {
        const int64_t i0 = rt * tile_rows, rows = std::min(tile_rows, B - i0);
        for (int64_t j0 = 0; j0 < N; j0 += tile_cols) {
          const int64_t cols = std::min(tile_cols, N - j0);
          dots_tile(qp + i0 * d, rows, kp + j0 * d, cols, d, tile.data());
          scale_parts[rt] += weighted_probs(tile.data(), rows, cols, scale, lp + i0, gp + i0);
          add_probs_times_keys(gq + i0 * d, tile.data(), rows, kp + j0 * d, cols, d, scale);
        }
      }
    });
    at::parallel_for(0, col_tiles, 1, [&](int64_t first, int64_t last) {
      backward_columns(qp, kp, B, N, d, scale, lp, gp, tile_rows, tile_cols, first, last, gk, nullptr);
    });
  }
  double scale_grad = 0;
  for (double part : scale_parts) scale_grad += part;
  return {grad_q, grad_k, at::scalar_tensor(scale_grad, q.options())};
}

}  // namespace

at::Tensor lse_forward(const at::Tensor& q, const at::Tensor& k, double scale, int64_t tile_rows, int64_t tile_cols) {
  check_inputs(q, k, tile_rows, tile_cols);
  TORCH_CHECK(q.is_cpu() && k.is_cpu(), "fused_contrastive: the C++ kernel takes CPU tensors (CUDA: the Triton kernel)");
  return lse_forward_cpu(q, k, scale, tile_rows, tile_cols);
}

std::vector<at::Tensor> lse_backward(const at::Tensor& q, const at::Tensor& k, double scale, const at::Tensor& lse,
                                     const at::Tensor& grad_lse, int64_t tile_rows, int64_t tile_cols) {
  check_inputs(q, k, tile_rows, tile_cols);
  TORCH_CHECK(lse.is_contiguous() && grad_lse.is_contiguous() && lse.numel() == q.size(0) &&
                  grad_lse.numel() == q.size(0) && grad_lse.scalar_type() == at::kFloat,
              "fused_contrastive: lse and grad_lse must be contiguous float32 [B]");
  TORCH_CHECK(q.is_cpu() && k.is_cpu(), "fused_contrastive: the C++ kernel takes CPU tensors (CUDA: the Triton kernel)");
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
}

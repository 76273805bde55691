// CUDA side of fused_contrastive.cpp (same maths, see there).
//
// One thread block owns kRows query rows (kept in shared memory) and streams over all N keys; each
// warp takes one key at a time, reads it coalesced (lanes split d) and reduces kRows dot products
// with warp shuffles. Forward keeps a running (max, sum) per row and warp, merged at the end.
// Backward recomputes the dots, accumulates dQ in shared memory and adds dK and ds to global memory
// with atomics. The B x N logits never exist. tile_rows / tile_cols are CPU tiling knobs; the CUDA
// tiling is fixed (kRows rows per block, one key per warp).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace {

constexpr int kRows = 4;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;

__device__ inline float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// dots[r] = q_r . key for the block's rows (q_shared [kRows][d]); the same value in every lane.
__device__ inline void row_dots(const float* q_shared, const float* key, int64_t d, int rows, float* dots) {
  const int lane = threadIdx.x % 32;
  float part[kRows] = {};
  for (int64_t x = lane; x < d; x += 32) {
    const float kx = key[x];
    for (int r = 0; r < kRows; ++r) part[r] += (r < rows ? q_shared[r * d + x] : 0.f) * kx;
  }
  for (int r = 0; r < kRows; ++r) dots[r] = warp_sum(part[r]);
}

__device__ inline void load_rows(float* q_shared, const float* q, int64_t i0, int rows, int64_t d) {
  for (int64_t x = threadIdx.x; x < rows * d; x += blockDim.x) q_shared[x] = q[i0 * d + x];
}

__global__ void lse_forward_kernel(const float* __restrict__ q, const float* __restrict__ k, float scale, int64_t B,
                                   int64_t N, int64_t d, float* __restrict__ lse) {
  extern __shared__ float q_shared[];  // [kRows][d]
  __shared__ float warp_max[kWarps][kRows], warp_sum_exp[kWarps][kRows];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), B - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_rows(q_shared, q, i0, rows, d);
  __syncthreads();

  float run_max[kRows], run_sum[kRows], dots[kRows];
  for (int r = 0; r < kRows; ++r) run_max[r] = -INFINITY, run_sum[r] = 0.f;
  for (int64_t j = warp; j < N; j += kWarps) {
    row_dots(q_shared, k + j * d, d, rows, dots);
    for (int r = 0; r < kRows; ++r) {
      const float z = scale * dots[r];
      const float m = fmaxf(run_max[r], z);
      run_sum[r] = run_sum[r] * expf(run_max[r] - m) + expf(z - m);
      run_max[r] = m;
    }
  }
  if (lane == 0)
    for (int r = 0; r < kRows; ++r) warp_max[warp][r] = run_max[r], warp_sum_exp[warp][r] = run_sum[r];
  __syncthreads();
  if (threadIdx.x < rows) {
    const int r = threadIdx.x;
    float m = -INFINITY, s = 0.f;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, warp_max[w][r]);
    for (int w = 0; w < kWarps; ++w)
      if (warp_max[w][r] > -INFINITY) s += warp_sum_exp[w][r] * expf(warp_max[w][r] - m);
    lse[i0 + r] = m + logf(s);
  }
}

__global__ void lse_backward_kernel(const float* __restrict__ q, const float* __restrict__ k, float scale,
                                    const float* __restrict__ lse, const float* __restrict__ grad_lse, int64_t B,
                                    int64_t N, int64_t d, float* __restrict__ grad_q, float* __restrict__ grad_k,
                                    float* __restrict__ grad_scale) {
  extern __shared__ float shared[];  // q rows [kRows][d], then their dQ accumulators [kRows][d]
  float* q_shared = shared;
  float* dq_shared = shared + kRows * d;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), B - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_rows(q_shared, q, i0, rows, d);
  for (int64_t x = threadIdx.x; x < kRows * d; x += blockDim.x) dq_shared[x] = 0.f;
  __syncthreads();

  float weight[kRows], dots[kRows], scale_part = 0.f;
  for (int64_t j = warp; j < N; j += kWarps) {
    const float* key = k + j * d;
    row_dots(q_shared, key, d, rows, dots);
    for (int r = 0; r < kRows; ++r) {
      weight[r] = r < rows ? grad_lse[i0 + r] * expf(scale * dots[r] - lse[i0 + r]) : 0.f;
      scale_part += weight[r] * dots[r];  // identical in every lane: counted once below
    }
    for (int64_t x = lane; x < d; x += 32) {
      float dk = 0.f;
      const float kx = key[x];
      for (int r = 0; r < rows; ++r) {
        dk += weight[r] * q_shared[r * d + x];
        atomicAdd(&dq_shared[r * d + x], weight[r] * kx);
      }
      atomicAdd(&grad_k[j * d + x], scale * dk);
    }
  }
  if (lane == 0) atomicAdd(grad_scale, scale_part);
  __syncthreads();
  for (int64_t x = threadIdx.x; x < rows * d; x += blockDim.x) grad_q[i0 * d + x] = scale * dq_shared[x];
}

}  // namespace

at::Tensor lse_forward_cuda(const at::Tensor& q, const at::Tensor& k, double scale, int64_t, int64_t) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = k.size(0), d = q.size(1);
  at::Tensor lse = at::empty({B}, q.options());
  const int blocks = static_cast<int>((B + kRows - 1) / kRows);
  const size_t shared = kRows * d * sizeof(float);
  if (blocks > 0)
    lse_forward_kernel<<<blocks, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<float>(), k.data_ptr<float>(), static_cast<float>(scale), B, N, d, lse.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return lse;
}

std::vector<at::Tensor> lse_backward_cuda(const at::Tensor& q, const at::Tensor& k, double scale,
                                          const at::Tensor& lse, const at::Tensor& grad_lse, int64_t, int64_t) {
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), N = k.size(0), d = q.size(1);
  at::Tensor grad_q = at::zeros_like(q), grad_k = at::zeros_like(k);
  at::Tensor grad_scale = at::zeros({}, q.options());
  const int blocks = static_cast<int>((B + kRows - 1) / kRows);
  const size_t shared = 2 * kRows * d * sizeof(float);
  if (blocks > 0)
    lse_backward_kernel<<<blocks, kThreads, shared, c10::cuda::getCurrentCUDAStream()>>>(
        q.data_ptr<float>(), k.data_ptr<float>(), static_cast<float>(scale), lse.data_ptr<float>(),
        grad_lse.data_ptr<float>(), B, N, d, grad_q.data_ptr<float>(), grad_k.data_ptr<float>(),
        grad_scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_q, grad_k, grad_scale};
}

// Host-side launchers of the CUDA kernels. Plain CUDA runtime API, no torch headers: the binding TU
// csrc/ops.cpp allocates the tensors and passes raw pointers and the current stream. Every launcher
// returns the launch status (cudaGetLastError) for the caller to turn into an exception.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsrna::gpu {

enum class DType : int { kFloat32, kFloat64, kFloat16, kBFloat16 };

// Accumulators (weights handed to weighted_sum, partial sums) are float64 for float64 inputs and
// float32 for the others.

// out = sum_i w[i] * xs[i]; `w` is a device array of n accumulator-typed weights.
cudaError_t weighted_sum(DType dtype, const void* const* xs, int64_t n, const void* w, void* out, int64_t numel,
                         cudaStream_t stream);

// partial[i * chunks + b] = the part of <xs[i], g> summed by block b; the caller sums over b.
int64_t batched_dot_chunks(int64_t numel);
cudaError_t batched_dot(DType dtype, const void* const* xs, int64_t n, const void* g, int64_t numel, void* partial,
                        int64_t chunks, cudaStream_t stream);

struct DepthwiseGeometry {
  int64_t N, C, H, W;  // input
  int64_t Ho, Wo;      // output
  int K, stride, padding, dilation;
};

// Kernel sizes with a compiled kernel (the DARTS family).
bool depthwise_supports_kernel_size(int64_t K);

cudaError_t depthwise_forward(DType dtype, const void* x, const void* w, void* y, const DepthwiseGeometry& g,
                              cudaStream_t stream);
// float32 and float64 only (bound propagation).
cudaError_t interval_depthwise(DType dtype, const void* lower, const void* upper, const void* w, void* out_lower,
                               void* out_upper, const DepthwiseGeometry& g, cudaStream_t stream);
// grad_x ([N, C, H, W]) of the conv from grad_y ([N, C, Ho, Wo]): compiled for stride 2 at dilations 1
// and 2 (stride 1 is the forward on the flipped filter).
bool depthwise_transpose_supported(const DepthwiseGeometry& g);
cudaError_t depthwise_transpose(DType dtype, const void* grad_y, const void* w, void* grad_x,
                                const DepthwiseGeometry& g, cudaStream_t stream);
// partial: [chunks, C, K*K] accumulators; the caller sums over the chunks.
int64_t depthwise_weight_chunks(const DepthwiseGeometry& g);
cudaError_t depthwise_weight(DType dtype, const void* x, const void* grad_y, void* partial, const DepthwiseGeometry& g,
                             int64_t chunks, cudaStream_t stream);

// Several depthwise convs of one input at one stride (the first stage of every conv candidate of the
// edges leaving a state), channel-stacked: weights[t] is [M, C, K[t], K[t]] and conv (t, m) writes
// output channels (t*M + m)*C onwards of [N, T*M*C, Ho, Wo]. Every conv gives the same Ho x Wo.
constexpr int kMaxStackConvs = 8;
struct DepthwiseStackGeometry {
  int64_t N, C, H, W;  // input
  int64_t Ho, Wo;      // output of every conv
  int T, M, stride;
  int padding;  // the largest of the convs' paddings
  int K[kMaxStackConvs], padding_of[kMaxStackConvs], dilation[kMaxStackConvs];
};
cudaError_t depthwise_stack_forward(DType dtype, const void* x, const void* const* weights, void* y,
                                    const DepthwiseStackGeometry& g, cudaStream_t stream);

}  // namespace dsrna::gpu

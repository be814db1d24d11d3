// CUDA kernels of the weighted sum (the DARTS mixed op / node) and its weight gradient.
#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace dsrna::gpu {
namespace {

constexpr int kThreads = 256;
// Input pointers travel in the kernel's parameter block; longer lists are summed in chunks.
constexpr int kMaxInputs = 64;

template <typename T> struct InputPtrs { const T* p[kMaxInputs]; };

// One pass over the inputs: each thread owns V consecutive elements (a 16-byte vector when every
// pointer is 16-byte aligned) and accumulates all n inputs into them before a single store.
// `accumulate` adds to what `out` holds (chunks after the first).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
weighted_sum_kernel(InputPtrs<T> xs, int n, const acc_t<T>* __restrict__ w, bool accumulate, T* __restrict__ out,
                    int64_t numel) {
  using Acc = acc_t<T>;
  __shared__ Acc ws[kMaxInputs];
  for (int i = threadIdx.x; i < n; i += blockDim.x) ws[i] = w[i];
  __syncthreads();
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = numel / V;
  for (int64_t v = first; v < nvec; v += step) {
    Acc acc[V];
    if (accumulate) {
      const Vec<T, V> o = reinterpret_cast<const Vec<T, V>*>(out)[v];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = to_acc(o.v[k]);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = Acc(0);
    }
    for (int i = 0; i < n; ++i) {
      const Vec<T, V> x = reinterpret_cast<const Vec<T, V>*>(xs.p[i])[v];
      const Acc wi = ws[i];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += wi * to_acc(x.v[k]);
    }
    Vec<T, V> r;
#pragma unroll
    for (int k = 0; k < V; ++k) r.v[k] = from_acc<T>(acc[k]);
    reinterpret_cast<Vec<T, V>*>(out)[v] = r;
  }
  for (int64_t j = nvec * V + first; j < numel; j += step) {  // the < V trailing elements
    Acc acc = accumulate ? to_acc(out[j]) : Acc(0);
    for (int i = 0; i < n; ++i) acc += ws[i] * to_acc(xs.p[i][j]);
    out[j] = from_acc<T>(acc);
  }
}

// Block b of row i sums x_i * g over a grid-strided share of the elements into partial[i][b].
template <typename T>
__global__ void __launch_bounds__(kThreads)
batched_dot_kernel(InputPtrs<T> xs, const T* __restrict__ g, int64_t numel, acc_t<T>* __restrict__ partial,
                   int64_t chunks) {
  using Acc = acc_t<T>;
  __shared__ Acc scratch[32];
  const T* __restrict__ x = xs.p[blockIdx.y];
  Acc acc = 0;
  for (int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; j < numel; j += int64_t(gridDim.x) * blockDim.x) {
    acc += to_acc(x[j]) * to_acc(g[j]);
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partial[int64_t(blockIdx.y) * chunks + blockIdx.x] = acc;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t weighted_sum(DType dtype, const void* const* xs, int64_t n, const void* w, void* out, int64_t numel,
                         cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    constexpr int V = 16 / sizeof(T);
    bool vectorisable = aligned16(out);
    for (int64_t i = 0; i < n; ++i) vectorisable = vectorisable && aligned16(xs[i]);
    const int64_t items = vectorisable ? ceil_div(numel, V) : numel;
    const int blocks = int(std::max<int64_t>(1, std::min<int64_t>(ceil_div(items, kThreads), 8192)));
    for (int64_t start = 0; start < n; start += kMaxInputs) {
      const int count = int(std::min<int64_t>(kMaxInputs, n - start));
      InputPtrs<T> ptrs{};
      for (int i = 0; i < count; ++i) ptrs.p[i] = static_cast<const T*>(xs[start + i]);
      const Acc* wp = static_cast<const Acc*>(w) + start;
      T* op = static_cast<T*>(out);
      if (vectorisable) {
        weighted_sum_kernel<T, V><<<blocks, kThreads, 0, stream>>>(ptrs, count, wp, start > 0, op, numel);
      } else {
        weighted_sum_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(ptrs, count, wp, start > 0, op, numel);
      }
    }
    return cudaGetLastError();
  });
}

int64_t batched_dot_chunks(int64_t numel) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(numel, kThreads * 16), 512));
}

cudaError_t batched_dot(DType dtype, const void* const* xs, int64_t n, const void* g, int64_t numel, void* partial,
                        int64_t chunks, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = acc_t<T>;
    for (int64_t start = 0; start < n; start += kMaxInputs) {
      const int count = int(std::min<int64_t>(kMaxInputs, n - start));
      InputPtrs<T> ptrs{};
      for (int i = 0; i < count; ++i) ptrs.p[i] = static_cast<const T*>(xs[start + i]);
      const dim3 grid{unsigned(chunks), unsigned(count)};
      batched_dot_kernel<T><<<grid, kThreads, 0, stream>>>(ptrs, static_cast<const T*>(g), numel,
                                                         static_cast<Acc*>(partial) + start * chunks, chunks);
    }
    return cudaGetLastError();
  });
}

}  // namespace dsrna::gpu

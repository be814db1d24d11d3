// CPU kernels of the weighted sum and its weight gradient. Plain C++ (no torch headers): the
// binding TU csrc/ops.cpp instantiates them per dtype and splits the work with at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dsrna::cpu {

// out[j] = sum_i w[i] * xs[i][j] for j in [begin, end). Acc is float for float/half/bfloat16
// inputs and double for double; a block of accumulators stays in L1 while the n inputs stream by,
// and the inner loops are unit-stride so the compiler vectorises them.
template <typename T, typename Acc>
void weighted_sum(const T* const* xs, const Acc* w, int64_t n, T* out, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 1024;
  Acc acc[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t len = std::min(kBlock, end - start);
    const T* x0 = xs[0] + start;
    const Acc w0 = w[0];
    for (int64_t j = 0; j < len; ++j) acc[j] = w0 * static_cast<Acc>(x0[j]);
    for (int64_t i = 1; i < n; ++i) {
      const T* xi = xs[i] + start;
      const Acc wi = w[i];
      for (int64_t j = 0; j < len; ++j) acc[j] += wi * static_cast<Acc>(xi[j]);
    }
    T* o = out + start;
    for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(acc[j]);
  }
}

// partial[i] = sum_{j in [begin, end)} xs[i][j] * g[j]. Eight independent lanes let the compiler
// vectorise the reduction without reassociation flags, and keep the rounding error small.
template <typename T, typename Acc>
void batched_dot(const T* const* xs, const T* g, int64_t n, int64_t begin, int64_t end, Acc* partial) {
  constexpr int kLanes = 8;
  for (int64_t i = 0; i < n; ++i) {
    const T* x = xs[i];
    Acc lanes[kLanes] = {};
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<Acc>(x[j + l]) * static_cast<Acc>(g[j + l]);
    }
    Acc total = 0;
    for (; j < end; ++j) total += static_cast<Acc>(x[j]) * static_cast<Acc>(g[j]);
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
    partial[i] = total;
  }
}

}  // namespace dsrna::cpu

// CPU kernels of the weighted sum and its weight gradient. Plain C++ (no torch headers): the
// binding TU csrc/ops.cpp instantiates them per dtype and splits the work with at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dsrna::cpu {

// The inputs are rows of row_len contiguous elements (a channel slice of an [N, C, H, W] tensor is:
// N rows of C*H*W), input i's row r starting at xs[i] + r * row_strides[i]; flat index j is
// element j % row_len of row j / row_len. out is contiguous.

// out[j] = sum_i w[i] * xs[i][j] for j in [begin, end). Acc is float for float/half/bfloat16
// inputs and double for double; a block of accumulators stays in L1 while the n inputs stream by,
// and the inner loops are unit-stride so the compiler vectorises them.
template <typename T, typename Acc>
void weighted_sum(const T* const* xs, const int64_t* row_strides, int64_t row_len, const Acc* w, int64_t n, T* out,
                  int64_t begin, int64_t end) {
  constexpr int64_t kBlock = 1024;
  Acc acc[kBlock];
  for (int64_t start = begin; start < end;) {
    const int64_t row = start / row_len, col = start - row * row_len;
    const int64_t len = std::min({kBlock, end - start, row_len - col});
    const T* x0 = xs[0] + row * row_strides[0] + col;
    const Acc w0 = w[0];
    for (int64_t j = 0; j < len; ++j) acc[j] = w0 * static_cast<Acc>(x0[j]);
    for (int64_t i = 1; i < n; ++i) {
      const T* xi = xs[i] + row * row_strides[i] + col;
      const Acc wi = w[i];
      for (int64_t j = 0; j < len; ++j) acc[j] += wi * static_cast<Acc>(xi[j]);
    }
    T* o = out + start;
    for (int64_t j = 0; j < len; ++j) o[j] = static_cast<T>(acc[j]);
    start += len;
  }
}

// partial[i] = sum_{j in [begin, end)} xs[i][j] * g[j] (g contiguous). Eight independent lanes let
// the compiler vectorise the reduction without reassociation flags, and keep the rounding error small.
template <typename T, typename Acc>
void batched_dot(const T* const* xs, const int64_t* row_strides, int64_t row_len, const T* g, int64_t n,
                 int64_t begin, int64_t end, Acc* partial) {
  constexpr int kLanes = 8;
  for (int64_t i = 0; i < n; ++i) {
    Acc lanes[kLanes] = {};
    Acc total = 0;
    for (int64_t start = begin; start < end;) {
      const int64_t row = start / row_len, col = start - row * row_len;
      const int64_t len = std::min(end - start, row_len - col);
      const T* x = xs[i] + row * row_strides[i] + col;
      const T* gs = g + start;
      int64_t j = 0;
      for (; j + kLanes <= len; j += kLanes) {
        for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<Acc>(x[j + l]) * static_cast<Acc>(gs[j + l]);
      }
      for (; j < len; ++j) total += static_cast<Acc>(x[j]) * static_cast<Acc>(gs[j]);
      start += len;
    }
    for (int l = 0; l < kLanes; ++l) total += lanes[l];
    partial[i] = total;
  }
}

}  // namespace dsrna::cpu

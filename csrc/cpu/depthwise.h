// CPU kernels of the depthwise convolution family, one (n, c) plane per call. Plain C++ (no torch
// headers): csrc/ops.cpp instantiates them per dtype and runs the planes with at::parallel_for.
//
// Geometry: y[oh][ow] = sum_{kh,kw} w[kh][kw] * x[oh*s - p + kh*d][ow*s - p + kw*d], zero outside x.
// Every kernel first copies its input plane, zero-padded and split into stride x stride phases, to
// accumulator precision, and works on an output grid whose rows are as long as a phase row: then a
// tap is one branch-free, unit-stride multiply-add over the whole plane at a constant shift (the
// grid's columns past Wo are computed and dropped), which vectorises at every stride and keeps
// 8-wide vectors full on 8x8 planes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace dsrna::cpu {

struct DepthwiseGeometry {
  int64_t H, W;    // input plane
  int64_t Ho, Wo;  // output plane
  int64_t K, stride, padding, dilation;
};

// The kernels' padded layout: stride x stride phase planes of the zero-padded input, each
// W2 = ceil((W + 2p) / s) columns wide with one spare row (a tap's shifted read runs past the last
// row by less than one row).
inline int64_t padded_phase_width(const DepthwiseGeometry& g) { return (g.W + 2 * g.padding + g.stride - 1) / g.stride; }
inline int64_t padded_phase_size(const DepthwiseGeometry& g) {
  return ((g.H + 2 * g.padding + g.stride - 1) / g.stride + 1) * padded_phase_width(g);
}

// Accumulators a plane kernel needs: two output grids and two sets of padded phase planes.
inline int64_t plane_scratch(const DepthwiseGeometry& g) {
  return 2 * (g.Ho * padded_phase_width(g) + g.stride * g.stride * padded_phase_size(g));
}

// The kernels, compiled twice: `generic` for any CPU and, on x86-64 with GCC or Clang, `avx2` with
// AVX2 and FMA enabled (8-wide fused multiply-adds in the innermost loops), picked once at run time.
namespace generic {
#include "depthwise_kernels.inc"
}  // namespace generic

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DSRNA_DEPTHWISE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "depthwise_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options
#endif

inline bool use_avx2() {
#ifdef DSRNA_DEPTHWISE_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

#ifdef DSRNA_DEPTHWISE_AVX2
#define DSRNA_DISPATCH_ISA(call) (use_avx2() ? avx2::call : generic::call)
#else
#define DSRNA_DISPATCH_ISA(call) (generic::call)
#endif

template <typename T, typename Acc>
void depthwise_forward_plane(const T* x, const Acc* w, const DepthwiseGeometry& g, T* y, Acc* scratch) {
  DSRNA_DISPATCH_ISA(depthwise_forward_plane(x, w, g, y, scratch));
}

template <typename T, typename Acc>
void interval_depthwise_plane(const T* lower, const T* upper, const Acc* w, const Acc* w_abs, const DepthwiseGeometry& g,
                              T* out_lower, T* out_upper, Acc* scratch) {
  DSRNA_DISPATCH_ISA(interval_depthwise_plane(lower, upper, w, w_abs, g, out_lower, out_upper, scratch));
}

template <typename T, typename Acc, typename Out>
void depthwise_transpose_plane(const T* gy, const Acc* w, const DepthwiseGeometry& g, Out* gx, Acc* scratch,
                               bool accumulate = false) {
  DSRNA_DISPATCH_ISA(depthwise_transpose_plane(gy, w, g, gx, scratch, accumulate));
}

template <typename T, typename Acc>
void depthwise_weight_plane(const T* x, const T* gy, const DepthwiseGeometry& g, Acc* gw, Acc* scratch) {
  DSRNA_DISPATCH_ISA(depthwise_weight_plane(x, gy, g, gw, scratch));
}

#undef DSRNA_DISPATCH_ISA

}  // namespace dsrna::cpu

// CPU kernels of the depthwise convolution family, one (n, c) plane per call. Plain C++ (no torch
// headers): csrc/ops.cpp instantiates them per dtype and runs the planes with at::parallel_for.
//
// Geometry: y[oh][ow] = sum_{kh,kw} w[kh][kw] * x[oh*s - p + kh*d][ow*s - p + kw*d], zero outside x.
// Every kernel walks (tap row, tap column, output row) and runs the innermost loop over a whole
// output row, clipped once per tap to the rows and columns whose input is inside the image, so no
// branch is left in the loop; the input is split into stride phases first, so the loop is
// unit-stride at every stride and vectorises.
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

// Indices [lo, hi) of outputs i whose input i*s + offset lies inside [0, n_in): the same clipping
// for rows and columns.
inline void valid_range(int64_t n_in, int64_t n_out, int64_t s, int64_t offset, int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + s - 1) / s;
  hi = (n_in - 1 - offset) < 0 ? 0 : std::min(n_out, (n_in - 1 - offset) / s + 1);
  if (hi < lo) hi = lo;
}

// The planes are copied to accumulator precision with their columns split into `stride` phases
// (phase r holds columns r, r + s, r + 2s, ...), so that every tap reads a unit-stride run and the
// innermost loops vectorise at stride 2 too. A phase row has Wp = ceil(W / s) entries.
inline int64_t phase_width(const DepthwiseGeometry& g) { return (g.W + g.stride - 1) / g.stride; }

// Accumulators a plane kernel needs: two output planes and two phase-split input planes.
inline int64_t plane_scratch(const DepthwiseGeometry& g) {
  return 2 * g.Ho * g.Wo + 2 * g.H * g.stride * phase_width(g);
}

// Where input column ow*s + offset of row ih lives in a phase-split plane: row (ih*s + r), entry
// ow + base, with offset = base*s + r and 0 <= r < s.
struct Tap {
  int64_t phase, base;
};

inline Tap tap(int64_t offset, int64_t s) {
  const int64_t r = ((offset % s) + s) % s;
  return {r, (offset - r) / s};
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

template <typename T, typename Acc>
void depthwise_transpose_plane(const T* gy, const Acc* w, const DepthwiseGeometry& g, T* gx, Acc* scratch) {
  DSRNA_DISPATCH_ISA(depthwise_transpose_plane(gy, w, g, gx, scratch));
}

template <typename T, typename Acc>
void depthwise_weight_plane(const T* x, const T* gy, const DepthwiseGeometry& g, Acc* gw, Acc* scratch) {
  DSRNA_DISPATCH_ISA(depthwise_weight_plane(x, gy, g, gw, scratch));
}

#undef DSRNA_DISPATCH_ISA

}  // namespace dsrna::cpu

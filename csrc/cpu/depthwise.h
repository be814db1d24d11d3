// CPU kernels of the depthwise convolution family, one (n, c) plane per call. Plain C++ (no torch
// headers): csrc/ops.cpp instantiates them per dtype and runs the planes with at::parallel_for.
//
// Geometry: y[oh][ow] = sum_{kh,kw} w[kh][kw] * x[oh*s - p + kh*d][ow*s - p + kw*d], zero outside x.
// Every kernel walks (output row, tap row, tap column) and runs the innermost loop over a whole
// output row, clipped once to the columns whose input is inside the image, so no branch is left in
// the loop and, at stride 1, it is unit-stride and vectorises.
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

// Output columns [lo, hi) whose input column ow*s + offset lies inside [0, W).
inline void valid_columns(const DepthwiseGeometry& g, int64_t offset, int64_t& lo, int64_t& hi) {
  lo = offset >= 0 ? 0 : (-offset + g.stride - 1) / g.stride;
  hi = (g.W - 1 - offset) < 0 ? 0 : std::min(g.Wo, (g.W - 1 - offset) / g.stride + 1);
  if (hi < lo) hi = lo;
}

// y = conv(x, w) on one plane. `row` is scratch of Wo accumulators.
template <typename T, typename Acc>
void depthwise_forward_plane(const T* x, const Acc* w, const DepthwiseGeometry& g, T* y, Acc* row) {
  const int64_t s = g.stride;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    std::fill(row, row + g.Wo, Acc(0));
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh * s - g.padding + kh * g.dilation;
      if (ih < 0 || ih >= g.H) continue;
      const T* xr = x + ih * g.W;
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const int64_t offset = kw * g.dilation - g.padding;
        int64_t lo, hi;
        valid_columns(g, offset, lo, hi);
        const Acc wv = w[kh * g.K + kw];
        if (s == 1) {
          const T* xs = xr + offset;
          for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * static_cast<Acc>(xs[ow]);
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) row[ow] += wv * static_cast<Acc>(xr[ow * s + offset]);
        }
      }
    }
    T* yr = y + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ++ow) yr[ow] = static_cast<T>(row[ow]);
  }
}

// Interval bounds through the conv in one pass over [lower, upper]: centre (l+u)/2 through w,
// radius (u-l)/2 through |w|; out_lower = c - r, out_upper = c + r. `rows` is scratch of 2*Wo.
template <typename T, typename Acc>
void interval_depthwise_plane(const T* lower, const T* upper, const Acc* w, const DepthwiseGeometry& g,
                              T* out_lower, T* out_upper, Acc* rows) {
  const int64_t s = g.stride;
  Acc* centre = rows;
  Acc* radius = rows + g.Wo;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    std::fill(rows, rows + 2 * g.Wo, Acc(0));
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh * s - g.padding + kh * g.dilation;
      if (ih < 0 || ih >= g.H) continue;
      const T* lr = lower + ih * g.W;
      const T* ur = upper + ih * g.W;
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const int64_t offset = kw * g.dilation - g.padding;
        int64_t lo, hi;
        valid_columns(g, offset, lo, hi);
        const Acc wv = w[kh * g.K + kw];
        const Acc wa = std::abs(wv);
        for (int64_t ow = lo; ow < hi; ++ow) {
          const Acc l = static_cast<Acc>(lr[ow * s + offset]);
          const Acc u = static_cast<Acc>(ur[ow * s + offset]);
          centre[ow] += wv * (Acc(0.5) * (l + u));
          radius[ow] += wa * (Acc(0.5) * (u - l));
        }
      }
    }
    T* lo_row = out_lower + oh * g.Wo;
    T* up_row = out_upper + oh * g.Wo;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      lo_row[ow] = static_cast<T>(centre[ow] - radius[ow]);
      up_row[ow] = static_cast<T>(centre[ow] + radius[ow]);
    }
  }
}

// grad_x = conv_transpose(grad_y, w) on one plane (the adjoint of the forward map), scattered
// output row by output row into `buf` (H*W accumulators) and then stored.
template <typename T, typename Acc>
void depthwise_transpose_plane(const T* gy, const Acc* w, const DepthwiseGeometry& g, T* gx, Acc* buf) {
  const int64_t s = g.stride;
  std::fill(buf, buf + g.H * g.W, Acc(0));
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    const T* gr = gy + oh * g.Wo;
    for (int64_t kh = 0; kh < g.K; ++kh) {
      const int64_t ih = oh * s - g.padding + kh * g.dilation;
      if (ih < 0 || ih >= g.H) continue;
      Acc* br = buf + ih * g.W;
      for (int64_t kw = 0; kw < g.K; ++kw) {
        const int64_t offset = kw * g.dilation - g.padding;
        int64_t lo, hi;
        valid_columns(g, offset, lo, hi);
        const Acc wv = w[kh * g.K + kw];
        if (s == 1) {
          Acc* b = br + offset;
          for (int64_t ow = lo; ow < hi; ++ow) b[ow] += wv * static_cast<Acc>(gr[ow]);
        } else {
          for (int64_t ow = lo; ow < hi; ++ow) br[ow * s + offset] += wv * static_cast<Acc>(gr[ow]);
        }
      }
    }
  }
  for (int64_t i = 0; i < g.H * g.W; ++i) gx[i] = static_cast<T>(buf[i]);
}

// grad_w[kh][kw] = sum_{oh,ow} grad_y[oh][ow] * x[oh*s - p + kh*d][ow*s - p + kw*d] on one plane;
// the caller sums the planes of a channel over the batch.
template <typename T, typename Acc>
void depthwise_weight_plane(const T* x, const T* gy, const DepthwiseGeometry& g, Acc* gw) {
  constexpr int kLanes = 8;
  const int64_t s = g.stride;
  for (int64_t kh = 0; kh < g.K; ++kh) {
    for (int64_t kw = 0; kw < g.K; ++kw) {
      const int64_t offset = kw * g.dilation - g.padding;
      int64_t lo, hi;
      valid_columns(g, offset, lo, hi);
      Acc lanes[kLanes] = {};
      Acc total = 0;
      for (int64_t oh = 0; oh < g.Ho; ++oh) {
        const int64_t ih = oh * s - g.padding + kh * g.dilation;
        if (ih < 0 || ih >= g.H) continue;
        const T* xr = x + ih * g.W;
        const T* gr = gy + oh * g.Wo;
        int64_t ow = lo;
        if (s == 1) {
          const T* xs = xr + offset;
          for (; ow + kLanes <= hi; ow += kLanes) {
            for (int l = 0; l < kLanes; ++l) lanes[l] += static_cast<Acc>(gr[ow + l]) * static_cast<Acc>(xs[ow + l]);
          }
        }
        for (; ow < hi; ++ow) total += static_cast<Acc>(gr[ow]) * static_cast<Acc>(xr[ow * s + offset]);
      }
      for (int l = 0; l < kLanes; ++l) total += lanes[l];
      gw[kh * g.K + kw] = total;
    }
  }
}

}  // namespace dsrna::cpu

// Every CUDA kernel of csrc/cuda, run by the CPU emulator (emulate.h) through its host launcher,
// against plain loops in double precision, in every dtype the launcher takes and on shapes that span
// several tiles, many small planes per block, one-row images and the vectorised and scalar paths.
// Prints one line per case; exits nonzero if any fails. Built and run by tests/test_cuda_emulated.py.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels.h"

using namespace dsrna::gpu;

namespace {

int failures = 0;

uint64_t rng = 0x2545F4914F6CDD1DULL;
double uniform() {  // in [-1, 1)
  rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
  return double(rng >> 11) / double(1ULL << 52) - 1.0;
}

template <typename T> double as_double(T v) { return double(v); }
template <> double as_double(__half v) { return __half2float(v); }
template <> double as_double(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> T from_double(double v) { return T(v); }
template <> __half from_double(double v) { return __float2half_rn(float(v)); }
template <> __nv_bfloat16 from_double(double v) { return __float2bfloat16_rn(float(v)); }

// Per dtype: the launcher's tag, the relative tolerance of one value, a name for the report.
template <typename T> struct Info;
template <> struct Info<float> {
  static constexpr DType dtype = DType::kFloat32;
  static constexpr double tol = 1e-5;
  static constexpr const char* name = "f32";
};
template <> struct Info<double> {
  static constexpr DType dtype = DType::kFloat64;
  static constexpr double tol = 1e-12;
  static constexpr const char* name = "f64";
};
// One rounding of a float accumulator to the output type: half has an 11-bit, bfloat16 an 8-bit significand.
template <> struct Info<__half> {
  static constexpr DType dtype = DType::kFloat16;
  static constexpr double tol = 1e-3;
  static constexpr const char* name = "f16";
};
template <> struct Info<__nv_bfloat16> {
  static constexpr DType dtype = DType::kBFloat16;
  static constexpr double tol = 8e-3;
  static constexpr const char* name = "bf16";
};

template <typename T> std::vector<T> random_values(int64_t n) {
  std::vector<T> v(n);
  for (auto& e : v) e = from_double<T>(uniform());
  return v;
}

// Max over elements of |got - want| / (1 + |want|) (NaN counts as a failure), against `tol` (callers
// scale it by the number of terms of each value where a long sum runs in a float accumulator).
template <typename T> void check(const std::string& what, const T* got, const std::vector<double>& want, double tol) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(as_double(got[i]) - want[i]) / (1 + std::fabs(want[i]));
    if (!(err <= worst)) worst = err;
  }
  const bool ok = worst <= tol;
  failures += !ok;
  std::printf("%s %s: max relative error %.3g (tolerance %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(), worst, tol);
}

void launched(cudaError_t status, const std::string& what) {
  if (status != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: launcher returned %d\n", what.c_str(), int(status));
  }
}

int64_t out_size(int64_t in, int K, int s, int p, int d) { return (in + 2 * p - d * (K - 1) - 1) / s + 1; }

// Plane (n, c) of x [N, C, H, W] convolved with w_c (K x K) into channel `channel` of y [N, Cy, Ho, Wo].
template <typename T> void conv_plane(const std::vector<T>& x, int64_t C, int64_t H, int64_t W, int64_t n, int64_t c,
                                      const T* w_c, int K, int s, int p, int d, bool absolute_weights,
                                      std::vector<double>& y, int64_t Cy, int64_t channel, int64_t Ho, int64_t Wo) {
  for (int64_t oh = 0; oh < Ho; ++oh) {
    for (int64_t ow = 0; ow < Wo; ++ow) {
      double acc = 0;
      for (int kh = 0; kh < K; ++kh) {
        for (int kw = 0; kw < K; ++kw) {
          const int64_t ih = oh * s - p + kh * d, iw = ow * s - p + kw * d;
          if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
          const double wv = as_double(w_c[kh * K + kw]);
          acc += (absolute_weights ? std::fabs(wv) : wv) * as_double(x[((n * C + c) * H + ih) * W + iw]);
        }
      }
      y[((n * Cy + channel) * Ho + oh) * Wo + ow] = acc;
    }
  }
}

struct Shape {
  int64_t N, C, H, W;
  std::string str() const {
    return std::to_string(N) + "x" + std::to_string(C) + "x" + std::to_string(H) + "x" + std::to_string(W);
  }
};

// (kernel, padding, dilation) of the first depthwise conv of sep_conv_3x3, sep_conv_5x5, dil_conv_3x3, dil_conv_5x5.
struct Conv { int K, p, d; };
const std::vector<Conv> kDarts{{3, 1, 1}, {5, 2, 1}, {3, 2, 2}, {5, 4, 2}};
const std::vector<Shape> kShapes{{3, 5, 37, 45}, {4, 64, 8, 8}, {2, 3, 1, 70}, {2, 3, 9, 7}};

template <typename T> void depthwise_forward_case(Shape sh, Conv cv, int s) {
  const int64_t Ho = out_size(sh.H, cv.K, s, cv.p, cv.d), Wo = out_size(sh.W, cv.K, s, cv.p, cv.d);
  const auto x = random_values<T>(sh.N * sh.C * sh.H * sh.W);
  const auto w = random_values<T>(sh.C * cv.K * cv.K);
  std::vector<double> want(sh.N * sh.C * Ho * Wo);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t c = 0; c < sh.C; ++c)
      conv_plane(x, sh.C, sh.H, sh.W, n, c, &w[c * cv.K * cv.K], cv.K, s, cv.p, cv.d, false, want, sh.C, c, Ho, Wo);
  std::vector<T> y(want.size(), from_double<T>(NAN));
  const std::string what = std::string("depthwise_forward ") + Info<T>::name + " " + sh.str() + " k" +
                           std::to_string(cv.K) + "s" + std::to_string(s) + "d" + std::to_string(cv.d);
  const DepthwiseGeometry g{sh.N, sh.C, sh.H, sh.W, Ho, Wo, cv.K, s, cv.p, cv.d};
  launched(depthwise_forward(Info<T>::dtype, x.data(), w.data(), y.data(), g, nullptr), what);
  check(what, y.data(), want, Info<T>::tol);
}

template <typename T> void interval_depthwise_case(Shape sh, Conv cv, int s) {
  const int64_t Ho = out_size(sh.H, cv.K, s, cv.p, cv.d), Wo = out_size(sh.W, cv.K, s, cv.p, cv.d);
  auto lower = random_values<T>(sh.N * sh.C * sh.H * sh.W);
  std::vector<T> upper(lower.size()), centre(lower.size()), radius(lower.size());
  for (size_t i = 0; i < lower.size(); ++i) {
    upper[i] = lower[i] + T(0.5 * (uniform() + 1));
    centre[i] = T(0.5) * (lower[i] + upper[i]);
    radius[i] = T(0.5) * (upper[i] - lower[i]);
  }
  const auto w = random_values<T>(sh.C * cv.K * cv.K);
  std::vector<double> mid(sh.N * sh.C * Ho * Wo), rad(mid.size()), want_lower(mid.size()), want_upper(mid.size());
  for (int64_t n = 0; n < sh.N; ++n) {
    for (int64_t c = 0; c < sh.C; ++c) {
      conv_plane(centre, sh.C, sh.H, sh.W, n, c, &w[c * cv.K * cv.K], cv.K, s, cv.p, cv.d, false, mid, sh.C, c, Ho, Wo);
      conv_plane(radius, sh.C, sh.H, sh.W, n, c, &w[c * cv.K * cv.K], cv.K, s, cv.p, cv.d, true, rad, sh.C, c, Ho, Wo);
    }
  }
  for (size_t i = 0; i < mid.size(); ++i) want_lower[i] = mid[i] - rad[i], want_upper[i] = mid[i] + rad[i];
  std::vector<T> out_lower(mid.size(), T(NAN)), out_upper(mid.size(), T(NAN));
  const std::string what = std::string("interval_depthwise ") + Info<T>::name + " " + sh.str() + " k" +
                           std::to_string(cv.K) + "s" + std::to_string(s) + "d" + std::to_string(cv.d);
  launched(interval_depthwise(Info<T>::dtype, lower.data(), upper.data(), w.data(), out_lower.data(), out_upper.data(),
                              {sh.N, sh.C, sh.H, sh.W, Ho, Wo, cv.K, s, cv.p, cv.d}, nullptr), what);
  check(what + " lower", out_lower.data(), want_lower, Info<T>::tol);
  check(what + " upper", out_upper.data(), want_upper, Info<T>::tol);
}

template <typename T> void depthwise_weight_case(Shape sh, Conv cv, int s) {
  const DepthwiseGeometry g{sh.N, sh.C, sh.H, sh.W, out_size(sh.H, cv.K, s, cv.p, cv.d),
                            out_size(sh.W, cv.K, s, cv.p, cv.d), cv.K, s, cv.p, cv.d};
  const auto x = random_values<T>(sh.N * sh.C * sh.H * sh.W);
  const auto gy = random_values<T>(sh.N * sh.C * g.Ho * g.Wo);
  std::vector<double> want(sh.C * cv.K * cv.K, 0.0);
  for (int64_t n = 0; n < sh.N; ++n)
    for (int64_t c = 0; c < sh.C; ++c)
      for (int64_t oh = 0; oh < g.Ho; ++oh)
        for (int64_t ow = 0; ow < g.Wo; ++ow)
          for (int kh = 0; kh < cv.K; ++kh)
            for (int kw = 0; kw < cv.K; ++kw) {
              const int64_t ih = oh * s - cv.p + kh * cv.d, iw = ow * s - cv.p + kw * cv.d;
              if (ih < 0 || ih >= sh.H || iw < 0 || iw >= sh.W) continue;
              want[c * cv.K * cv.K + kh * cv.K + kw] += as_double(gy[((n * sh.C + c) * g.Ho + oh) * g.Wo + ow]) *
                                                        as_double(x[((n * sh.C + c) * sh.H + ih) * sh.W + iw]);
            }
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const int64_t chunks = depthwise_weight_chunks(g);
  std::vector<Acc> partial(chunks * want.size(), Acc(NAN));
  const std::string what = std::string("depthwise_weight ") + Info<T>::name + " " + sh.str() + " k" +
                           std::to_string(cv.K) + "s" + std::to_string(s) + "d" + std::to_string(cv.d);
  launched(depthwise_weight(Info<T>::dtype, x.data(), gy.data(), partial.data(), g, chunks, nullptr), what);
  std::vector<Acc> total(want.size(), Acc(0));
  for (int64_t b = 0; b < chunks; ++b)
    for (size_t i = 0; i < want.size(); ++i) total[i] += partial[b * want.size() + i];
  // A sum of N*Ho*Wo products in the accumulator's precision.
  const double terms = double(sh.N * g.Ho * g.Wo);
  check(what, total.data(), want, (std::is_same_v<Acc, double> ? 1e-13 : 1e-6) * terms);
}

// grad_x of a stride-2 conv of an input of shape `sh`, against scattering each grad_y value along its taps.
template <typename T> void depthwise_transpose_case(Shape sh, Conv cv) {
  const int s = 2;
  const int64_t Ho = out_size(sh.H, cv.K, s, cv.p, cv.d), Wo = out_size(sh.W, cv.K, s, cv.p, cv.d);
  const auto gy = random_values<T>(sh.N * sh.C * Ho * Wo);
  const auto w = random_values<T>(sh.C * cv.K * cv.K);
  std::vector<double> want(sh.N * sh.C * sh.H * sh.W, 0.0);
  for (int64_t plane = 0; plane < sh.N * sh.C; ++plane)
    for (int64_t oh = 0; oh < Ho; ++oh)
      for (int64_t ow = 0; ow < Wo; ++ow)
        for (int kh = 0; kh < cv.K; ++kh)
          for (int kw = 0; kw < cv.K; ++kw) {
            const int64_t ih = oh * s - cv.p + kh * cv.d, iw = ow * s - cv.p + kw * cv.d;
            if (ih < 0 || ih >= sh.H || iw < 0 || iw >= sh.W) continue;
            want[(plane * sh.H + ih) * sh.W + iw] +=
                as_double(w[(plane % sh.C) * cv.K * cv.K + kh * cv.K + kw]) * as_double(gy[(plane * Ho + oh) * Wo + ow]);
          }
  std::vector<T> gx(want.size(), from_double<T>(NAN));
  const std::string what = std::string("depthwise_transpose ") + Info<T>::name + " " + sh.str() + " k" +
                           std::to_string(cv.K) + "p" + std::to_string(cv.p) + "d" + std::to_string(cv.d);
  const DepthwiseGeometry g{sh.N, sh.C, sh.H, sh.W, Ho, Wo, cv.K, s, cv.p, cv.d};
  launched(depthwise_transpose(Info<T>::dtype, gy.data(), w.data(), gx.data(), g, nullptr), what);
  check(what, gx.data(), want, Info<T>::tol);
}

template <typename T> void depthwise_stack_case(Shape sh, const std::vector<Conv>& convs, int M, int s) {
  const int Tn = int(convs.size());
  const Conv& first = convs[0];
  const int64_t Ho = out_size(sh.H, first.K, s, first.p, first.d), Wo = out_size(sh.W, first.K, s, first.p, first.d);
  const int64_t B = int64_t(Tn) * M;
  const auto x = random_values<T>(sh.N * sh.C * sh.H * sh.W);
  DepthwiseStackGeometry g{sh.N, sh.C, sh.H, sh.W, Ho, Wo, Tn, M, s, 0, {}, {}, {}};
  std::vector<std::vector<T>> ws;
  std::vector<const void*> ptrs;
  std::vector<double> want(sh.N * B * sh.C * Ho * Wo);
  for (int t = 0; t < Tn; ++t) {
    const Conv cv = convs[t];
    g.K[t] = cv.K, g.padding_of[t] = cv.p, g.dilation[t] = cv.d, g.padding = std::max(g.padding, cv.p);
    ws.push_back(random_values<T>(int64_t(M) * sh.C * cv.K * cv.K));
    ptrs.push_back(ws.back().data());
    for (int m = 0; m < M; ++m)
      for (int64_t n = 0; n < sh.N; ++n)
        for (int64_t c = 0; c < sh.C; ++c)
          conv_plane(x, sh.C, sh.H, sh.W, n, c, &ws.back()[(m * sh.C + c) * cv.K * cv.K], cv.K, s, cv.p, cv.d, false, want,
                     B * sh.C, (int64_t(t) * M + m) * sh.C + c, Ho, Wo);
  }
  std::vector<T> y(want.size(), from_double<T>(NAN));
  const std::string what = std::string("depthwise_stack_forward ") + Info<T>::name + " " + sh.str() + " T" +
                           std::to_string(Tn) + " M" + std::to_string(M) + " s" + std::to_string(s);
  launched(depthwise_stack_forward(Info<T>::dtype, x.data(), ptrs.data(), y.data(), g, nullptr), what);
  check(what, y.data(), want, Info<T>::tol);
}

template <typename T> void depthwise_family() {
  for (const Shape& sh : kShapes) {
    for (int s : {1, 2}) {
      for (const Conv& cv : kDarts) {
        depthwise_forward_case<T>(sh, cv, s);
        depthwise_weight_case<T>(sh, cv, s);
        if (s == 2) depthwise_transpose_case<T>(sh, cv);
      }
      for (int M : {1, 3}) depthwise_stack_case<T>(sh, kDarts, M, s);
    }
  }
}

template <typename T> void weighted_sum_case(int64_t n, int64_t numel, bool aligned) {
  // Unaligned: every pointer one element past a 16-byte boundary, for the scalar path.
  const int64_t shift = aligned ? 0 : 1;
  std::vector<std::vector<T>> xs;
  std::vector<const void*> ptrs;
  std::vector<T> out(numel + shift, from_double<T>(NAN));
  const auto g = random_values<T>(numel);
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  std::vector<Acc> w(n);
  std::vector<double> want_sum(numel, 0.0), want_dot(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    xs.push_back(random_values<T>(numel + shift));
    ptrs.push_back(xs.back().data() + shift);
    w[i] = Acc(uniform());
    for (int64_t j = 0; j < numel; ++j) {
      want_sum[j] += double(w[i]) * as_double(xs.back()[j + shift]);
      want_dot[i] += as_double(xs.back()[j + shift]) * as_double(g[j]);
    }
  }
  const std::string what = std::string(Info<T>::name) + " n" + std::to_string(n) + " numel" + std::to_string(numel) +
                           (aligned ? " aligned" : " unaligned");
  launched(weighted_sum(Info<T>::dtype, ptrs.data(), n, w.data(), out.data() + shift, numel, nullptr), "weighted_sum " + what);
  // n chunks of 64 inputs round to T between chunks.
  check("weighted_sum " + what, out.data() + shift, want_sum, Info<T>::tol * double((n + 63) / 64));
  if (!aligned) return;
  const int64_t chunks = batched_dot_chunks(numel);
  std::vector<Acc> partial(n * chunks, Acc(NAN)), dot(n, Acc(0));
  launched(batched_dot(Info<T>::dtype, ptrs.data(), n, g.data(), numel, partial.data(), chunks, nullptr), "batched_dot " + what);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < chunks; ++b) dot[i] += partial[i * chunks + b];
  check("batched_dot " + what, dot.data(), want_dot, (std::is_same_v<Acc, double> ? 1e-13 : 1e-6) * double(numel));
}

template <typename T> void weighted_sum_family() {
  for (int64_t numel : {1, 37, 1000, 4099}) {
    weighted_sum_case<T>(5, numel, true);
    weighted_sum_case<T>(5, numel, false);
  }
  weighted_sum_case<T>(70, 5000, true);  // more inputs than one launch takes, the dot in several chunks
}

}  // namespace

int main() {
  depthwise_family<float>();
  depthwise_family<double>();
  depthwise_family<__half>();
  depthwise_family<__nv_bfloat16>();
  for (const Shape& sh : {kShapes[0], kShapes[1]}) {
    for (int s : {1, 2}) {
      for (const Conv& cv : kDarts) {
        interval_depthwise_case<float>(sh, cv, s);
        interval_depthwise_case<double>(sh, cv, s);
      }
    }
  }
  // A dilation so large that even one output row's tile outgrows shared memory: narrower tiles.
  interval_depthwise_case<double>({1, 2, 30, 70}, {5, 24, 12}, 1);
  // Stride-2 input gradients at an odd padding with dilation 2 (the DARTS paddings are even there).
  depthwise_transpose_case<float>(kShapes[0], {3, 1, 2});
  depthwise_transpose_case<double>(kShapes[3], {5, 3, 2});
  // Geometries the stride-2 input gradient kernel is not compiled for are refused, not run.
  for (const auto& [stride, dilation] : {std::pair{1, 1}, std::pair{2, 3}}) {
    const DepthwiseGeometry g{1, 1, 8, 8, 8, 8, 3, stride, 1, dilation};
    const bool refused = !depthwise_transpose_supported(g) &&
                         depthwise_transpose(DType::kFloat32, nullptr, nullptr, nullptr, g, nullptr) == cudaErrorInvalidValue;
    failures += !refused;
    std::printf("%s depthwise_transpose refuses stride %d dilation %d\n", refused ? "ok  " : "FAIL", stride, dilation);
  }
  // The weight gradient over chunks that do not divide its 2*40*13 segments (3 of 347).
  depthwise_weight_case<float>({2, 2, 40, 50}, kDarts[0], 1);
  // The kernels for a stride or dilation other than 1 and 2 (read at run time, not compiled in).
  for (const auto& [cv, s] : {std::pair{Conv{3, 3, 3}, 1}, std::pair{Conv{5, 2, 1}, 3}}) {
    depthwise_forward_case<float>(kShapes[0], cv, s);
    depthwise_weight_case<double>(kShapes[0], cv, s);
  }
  // Convs whose paddings differ by other amounts than the DARTS ones, and one conv alone.
  depthwise_stack_case<double>({2, 3, 11, 6}, {{3, 0, 1}, {5, 1, 1}}, 2, 1);
  depthwise_stack_case<double>({2, 3, 11, 6}, {{5, 2, 1}}, 1, 2);
  weighted_sum_family<float>();
  weighted_sum_family<double>();
  weighted_sum_family<__half>();
  weighted_sum_family<__nv_bfloat16>();
  std::printf("%d failed\n", failures);
  return failures != 0;
}

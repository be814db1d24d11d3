// The one translation unit of dsrna._C that includes torch headers: op schemas (torch.library),
// argument checks, allocation, the CPU and CUDA implementations, which hand raw pointers to the
// plain C++ kernels in csrc/cpu/ and the CUDA launchers in csrc/cuda/, and the autograd formulas.
// Each formula is written with these same ops, called through the dispatcher, so every order of
// derivative runs on them. Fake (meta) kernels are registered from Python in dsrna/ops/.
//
// The formulas live here rather than in Python (torch.library.register_autograd) because a C++
// error raised below a Python formula crashed torch 2.11 (a segfault in OpOverload.redispatch) and
// because the Python wrapper costs microseconds on each of the ~2,000 depthwise calls of a step.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <type_traits>
#include <vector>

#include "cpu/depthwise.h"
#include "cpu/weighted_sum.h"

#ifdef DSRNA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.h"
#endif

namespace dsrna {
namespace {

using at::Tensor;

template <typename T> using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Elements per parallel task of the elementwise ops (amortises the task overhead).
constexpr int64_t kElementGrain = 1 << 15;

void check_same_tensors(at::TensorList xs, const char* op) {
  TORCH_CHECK(!xs.empty(), op, ": needs at least one tensor");
  const Tensor& x0 = xs[0];
  TORCH_CHECK(at::isFloatingType(x0.scalar_type()), op, ": tensors must be floating point, got ", x0.scalar_type());
  for (size_t i = 1; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].sizes() == x0.sizes(), op, ": all tensors must have the same shape, got ", x0.sizes(),
                " and ", xs[i].sizes(), " at index ", i);
    TORCH_CHECK(xs[i].scalar_type() == x0.scalar_type(), op, ": all tensors must have the same dtype, got ",
                x0.scalar_type(), " and ", xs[i].scalar_type(), " at index ", i);
    TORCH_CHECK(xs[i].device() == x0.device(), op, ": all tensors must be on the same device, got ", x0.device(),
                " and ", xs[i].device(), " at index ", i);
  }
}

void check_weights(at::TensorList xs, const Tensor& w, const char* op) {
  TORCH_CHECK(w.dim() == 1 && w.numel() == int64_t(xs.size()), op, ": w must be 1-D with one weight per tensor (",
              xs.size(), "), got shape ", w.sizes());
  TORCH_CHECK(at::isFloatingType(w.scalar_type()), op, ": w must be floating point, got ", w.scalar_type());
  TORCH_CHECK(w.device() == xs[0].device(), op, ": w is on ", w.device(), " but the tensors are on ", xs[0].device());
}

std::vector<Tensor> contiguous_all(at::TensorList xs) {
  std::vector<Tensor> out;
  out.reserve(xs.size());
  for (const Tensor& x : xs) out.push_back(x.contiguous());
  return out;
}

// Same-shape tensors as rows over dim 0, each contiguous within a row: the candidates of the batched
// cell are channel slices of one stacked tensor, read in place instead of copied. A tensor not of
// that form is copied.
struct Rows {
  std::vector<Tensor> tensors;
  std::vector<int64_t> strides;
  int64_t row_len = 1;
};

bool contiguous_rows(const Tensor& x) {
  int64_t expected = 1;
  for (int64_t d = x.dim() - 1; d >= 1; --d) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

Rows as_rows(at::TensorList xs) {
  Rows rows;
  const int64_t n0 = xs[0].dim() > 0 ? xs[0].size(0) : 1;
  rows.row_len = n0 > 0 ? std::max<int64_t>(1, xs[0].numel() / n0) : 1;
  for (const Tensor& x : xs) {
    const bool in_place = x.dim() > 0 && contiguous_rows(x);
    rows.tensors.push_back(in_place ? x : x.contiguous());
    rows.strides.push_back(in_place && x.size(0) > 1 ? x.stride(0) : rows.row_len);
  }
  return rows;
}

// --- geometry of the depthwise family -----------------------------------------------------------

cpu::DepthwiseGeometry depthwise_geometry(int64_t H, int64_t W, int64_t K, int64_t stride, int64_t padding,
                                          int64_t dilation, const char* op) {
  TORCH_CHECK(stride >= 1 && dilation >= 1 && padding >= 0, op, ": need stride >= 1, dilation >= 1, padding >= 0, got ",
              stride, ", ", dilation, ", ", padding);
  const int64_t Ho = (H + 2 * padding - dilation * (K - 1) - 1) / stride + 1;
  const int64_t Wo = (W + 2 * padding - dilation * (K - 1) - 1) / stride + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, op, ": the ", K, "x", K, " kernel (dilation ", dilation, ", padding ", padding,
              ") does not fit a ", H, "x", W, " input");
  return {H, W, Ho, Wo, K, stride, padding, dilation};
}

void check_depthwise_weight(const Tensor& x, const Tensor& weight, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": input must be [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              op, ": weight must be [C, 1, k, k] with C = ", x.size(1), ", got shape ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " differs from input dtype ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), " but the input is on ", x.device());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": tensors must be floating point, got ", x.scalar_type());
}

// Work per parallel task: enough planes for ~64k multiply-adds.
int64_t plane_grain(const cpu::DepthwiseGeometry& g) {
  return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, g.Ho * g.Wo * g.K * g.K));
}

// --- CPU implementations --------------------------------------------------------------------------

Tensor weighted_sum_cpu(at::TensorList xs, const Tensor& w) {
  const char* op = "dsrna::weighted_sum";
  check_same_tensors(xs, op);
  check_weights(xs, w, op);
  const Rows rows = as_rows(xs);
  Tensor out = at::empty(xs[0].sizes(), xs[0].options());
  const int64_t numel = out.numel(), n = int64_t(rows.tensors.size());
  if (numel == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "dsrna::weighted_sum", [&] {
    using Acc = acc_t<scalar_t>;
    const Tensor wc = w.to(acc_dtype(out.scalar_type())).contiguous();
    std::vector<const scalar_t*> ptrs(n);
    for (int64_t i = 0; i < n; ++i) ptrs[i] = rows.tensors[i].data_ptr<scalar_t>();
    const Acc* wp = wc.data_ptr<Acc>();
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kElementGrain, [&](int64_t begin, int64_t end) {
      cpu::weighted_sum<scalar_t, Acc>(ptrs.data(), rows.strides.data(), rows.row_len, wp, n, op_, begin, end);
    });
  });
  return out;
}

Tensor batched_dot_cpu(at::TensorList xs, const Tensor& g) {
  const char* op = "dsrna::batched_dot";
  check_same_tensors(xs, op);
  TORCH_CHECK(g.sizes() == xs[0].sizes() && g.scalar_type() == xs[0].scalar_type() && g.device() == xs[0].device(), op,
              ": g must match the tensors' shape, dtype and device");
  const Rows rows = as_rows(xs);
  const Tensor gc = g.contiguous();
  const int64_t numel = gc.numel(), n = int64_t(rows.tensors.size());
  // Fixed chunks (independent of the thread count) summed in a fixed order: deterministic.
  const int64_t chunks = std::max<int64_t>(1, (numel + kElementGrain - 1) / kElementGrain);
  Tensor partial = at::zeros({chunks, n}, gc.options().dtype(acc_dtype(gc.scalar_type())));
  if (numel == 0) return partial.sum(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "dsrna::batched_dot", [&] {
    using Acc = acc_t<scalar_t>;
    std::vector<const scalar_t*> ptrs(n);
    for (int64_t i = 0; i < n; ++i) ptrs[i] = rows.tensors[i].data_ptr<scalar_t>();
    const scalar_t* gp = gc.data_ptr<scalar_t>();
    Acc* pp = partial.data_ptr<Acc>();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        cpu::batched_dot<scalar_t, Acc>(ptrs.data(), rows.strides.data(), rows.row_len, gp, n, c * kElementGrain,
                                        std::min(numel, (c + 1) * kElementGrain), pp + c * n);
      }
    });
  });
  return partial.sum(0);
}

Tensor depthwise_conv2d_cpu(const Tensor& x_, const Tensor& weight, int64_t stride, int64_t padding, int64_t dilation) {
  const char* op = "dsrna::depthwise_conv2d";
  check_depthwise_weight(x_, weight, op);
  const Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto g = depthwise_geometry(x.size(2), x.size(3), weight.size(2), stride, padding, dilation, op);
  Tensor y = at::empty({N, C, g.Ho, g.Wo}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsrna::depthwise_conv2d", [&] {
    using Acc = acc_t<scalar_t>;
    const Tensor wc = weight.to(acc_dtype(x.scalar_type())).contiguous();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const Acc* wp = wc.data_ptr<Acc>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, plane_grain(g), [&](int64_t begin, int64_t end) {
      std::vector<Acc> scratch(cpu::plane_scratch(g));
      for (int64_t plane = begin; plane < end; ++plane) {
        cpu::depthwise_forward_plane(xp + plane * g.H * g.W, wp + (plane % C) * g.K * g.K, g, yp + plane * g.Ho * g.Wo,
                                     scratch.data());
      }
    });
  });
  return y;
}

std::tuple<Tensor, Tensor> interval_depthwise_conv2d_cpu(const Tensor& lower_, const Tensor& upper_, const Tensor& weight,
                                                         int64_t stride, int64_t padding, int64_t dilation) {
  const char* op = "dsrna::interval_depthwise_conv2d";
  check_depthwise_weight(lower_, weight, op);
  TORCH_CHECK(upper_.sizes() == lower_.sizes() && upper_.scalar_type() == lower_.scalar_type() &&
                  upper_.device() == lower_.device(),
              op, ": lower and upper must have the same shape, dtype and device");
  const Tensor lower = lower_.contiguous(), upper = upper_.contiguous();
  const int64_t N = lower.size(0), C = lower.size(1);
  const auto g = depthwise_geometry(lower.size(2), lower.size(3), weight.size(2), stride, padding, dilation, op);
  Tensor out_lower = at::empty({N, C, g.Ho, g.Wo}, lower.options());
  Tensor out_upper = at::empty_like(out_lower);
  if (out_lower.numel() == 0) return {out_lower, out_upper};
  AT_DISPATCH_FLOATING_TYPES(lower.scalar_type(), "dsrna::interval_depthwise_conv2d", [&] {
    using Acc = acc_t<scalar_t>;
    const Tensor wc = weight.contiguous(), wa = wc.abs();
    const scalar_t* lp = lower.data_ptr<scalar_t>();
    const scalar_t* up = upper.data_ptr<scalar_t>();
    const Acc* wp = wc.data_ptr<Acc>();
    const Acc* wap = wa.data_ptr<Acc>();
    scalar_t* olp = out_lower.data_ptr<scalar_t>();
    scalar_t* oup = out_upper.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, plane_grain(g), [&](int64_t begin, int64_t end) {
      std::vector<Acc> scratch(cpu::plane_scratch(g));
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t in = plane * g.H * g.W, out = plane * g.Ho * g.Wo, taps = (plane % C) * g.K * g.K;
        cpu::interval_depthwise_plane(lp + in, up + in, wp + taps, wap + taps, g, olp + out, oup + out,
                                      scratch.data());
      }
    });
  });
  return {out_lower, out_upper};
}

cpu::DepthwiseGeometry transpose_geometry(const Tensor& grad_y, const Tensor& weight, at::IntArrayRef input_hw,
                                          int64_t stride, int64_t padding, int64_t dilation, const char* op) {
  check_depthwise_weight(grad_y, weight, op);
  TORCH_CHECK(input_hw.size() == 2, op, ": input_hw must hold (H, W), got ", input_hw);
  const auto g = depthwise_geometry(input_hw[0], input_hw[1], weight.size(2), stride, padding, dilation, op);
  TORCH_CHECK(g.Ho == grad_y.size(2) && g.Wo == grad_y.size(3), op, ": an input of ", input_hw[0], "x", input_hw[1],
              " gives ", g.Ho, "x", g.Wo, " outputs, but grad_out is ", grad_y.size(2), "x", grad_y.size(3));
  return g;
}

Tensor depthwise_conv2d_transpose_cpu(const Tensor& grad_y_, const Tensor& weight, at::IntArrayRef input_hw,
                                      int64_t stride, int64_t padding, int64_t dilation) {
  const char* op = "dsrna::depthwise_conv2d_transpose";
  const auto g = transpose_geometry(grad_y_, weight, input_hw, stride, padding, dilation, op);
  const Tensor grad_y = grad_y_.contiguous();
  const int64_t N = grad_y.size(0), C = grad_y.size(1);
  Tensor grad_x = at::empty({N, C, g.H, g.W}, grad_y.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "dsrna::depthwise_conv2d_transpose", [&] {
    using Acc = acc_t<scalar_t>;
    const Tensor wc = weight.to(acc_dtype(grad_y.scalar_type())).contiguous();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const Acc* wp = wc.data_ptr<Acc>();
    scalar_t* xp = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, plane_grain(g), [&](int64_t begin, int64_t end) {
      std::vector<Acc> buf(cpu::plane_scratch(g));
      for (int64_t plane = begin; plane < end; ++plane) {
        cpu::depthwise_transpose_plane(gp + plane * g.Ho * g.Wo, wp + (plane % C) * g.K * g.K, g,
                                       xp + plane * g.H * g.W, buf.data());
      }
    });
  });
  return grad_x;
}

cpu::DepthwiseGeometry weight_grad_geometry(const Tensor& x, const Tensor& grad_y, int64_t kernel_size, int64_t stride,
                                            int64_t padding, int64_t dilation, const char* op) {
  TORCH_CHECK(x.dim() == 4 && grad_y.dim() == 4 && grad_y.size(0) == x.size(0) && grad_y.size(1) == x.size(1), op,
              ": input [N, C, H, W] and grad_out [N, C, Ho, Wo] must agree, got ", x.sizes(), " and ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(), op,
              ": input and grad_out must have the same dtype and device");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": tensors must be floating point, got ", x.scalar_type());
  TORCH_CHECK(kernel_size >= 1, op, ": kernel_size must be positive, got ", kernel_size);
  const auto g = depthwise_geometry(x.size(2), x.size(3), kernel_size, stride, padding, dilation, op);
  TORCH_CHECK(g.Ho == grad_y.size(2) && g.Wo == grad_y.size(3), op, ": an input of ", g.H, "x", g.W, " gives ", g.Ho,
              "x", g.Wo, " outputs, but grad_out is ", grad_y.size(2), "x", grad_y.size(3));
  return g;
}

Tensor depthwise_conv2d_weight_cpu(const Tensor& x_, const Tensor& grad_y_, int64_t kernel_size, int64_t stride,
                                   int64_t padding, int64_t dilation) {
  const char* op = "dsrna::depthwise_conv2d_weight";
  const auto g = weight_grad_geometry(x_, grad_y_, kernel_size, stride, padding, dilation, op);
  const Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous();
  const int64_t N = x.size(0), C = x.size(1), KK = g.K * g.K;
  // One partial per plane, summed over the batch in a fixed order: deterministic.
  Tensor partial = at::zeros({N, C, KK}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsrna::depthwise_conv2d_weight", [&] {
      using Acc = acc_t<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = grad_y.data_ptr<scalar_t>();
      Acc* pp = partial.data_ptr<Acc>();
      at::parallel_for(0, N * C, plane_grain(g), [&](int64_t begin, int64_t end) {
        std::vector<Acc> scratch(cpu::plane_scratch(g));
        for (int64_t plane = begin; plane < end; ++plane) {
          cpu::depthwise_weight_plane(xp + plane * g.H * g.W, gp + plane * g.Ho * g.Wo, g, pp + plane * KK,
                                      scratch.data());
        }
      });
    });
  }
  return partial.sum(0).to(x.scalar_type()).view({C, 1, g.K, g.K});
}

// --- the stacked family: several depthwise convs of one input, outputs channel-stacked ---------------
// weights[t] is [M, C, k_t, k_t]: M convs of kernel k_t (padding paddings[t], dilation dilations[t]) on
// the C channels of x [N, C, H, W]. The output [N, T*M*C, Ho, Wo] holds block b = t*M + m, channel c
// at channel b*C + c. Every conv has the same stride and must give the same Ho x Wo.

struct StackGeometry {
  std::vector<cpu::DepthwiseGeometry> convs;  // one per kernel
  int64_t M, C;

  int64_t blocks() const { return int64_t(convs.size()) * M; }
  int64_t scratch() const {
    int64_t most = 0;
    for (const auto& g : convs) most = std::max(most, cpu::plane_scratch(g));
    return most;
  }
  // Calls f(geometry, t, m, b) for conv m of kernel t, block b = t*M + m, in block order.
  template <typename F> void for_each_conv(F f) const {
    for (size_t t = 0; t < convs.size(); ++t) {
      for (int64_t m = 0; m < M; ++m) f(convs[t], int64_t(t), m, int64_t(t) * M + m);
    }
  }
  // Planes per parallel task, for ~64k multiply-adds over all the convs of a plane.
  int64_t grain() const {
    int64_t work = 0;
    for (const auto& g : convs) work += M * g.Ho * g.Wo * g.K * g.K;
    return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, work));
  }
};

StackGeometry stack_geometry(int64_t M, int64_t C, int64_t H, int64_t W, at::IntArrayRef kernel_sizes, int64_t stride,
                             at::IntArrayRef paddings, at::IntArrayRef dilations, const char* op) {
  const size_t T = kernel_sizes.size();
  TORCH_CHECK(T >= 1 && paddings.size() == T && dilations.size() == T, op,
              ": need one padding and one dilation per weight, got ", T, " weights, paddings ", paddings,
              ", dilations ", dilations);
  StackGeometry sg{{}, M, C};
  for (size_t t = 0; t < T; ++t) {
    sg.convs.push_back(depthwise_geometry(H, W, kernel_sizes[t], stride, paddings[t], dilations[t], op));
    TORCH_CHECK(sg.convs[t].Ho == sg.convs[0].Ho && sg.convs[t].Wo == sg.convs[0].Wo, op, ": conv ", t, " gives ",
                sg.convs[t].Ho, "x", sg.convs[t].Wo, " outputs but conv 0 gives ", sg.convs[0].Ho, "x", sg.convs[0].Wo);
  }
  return sg;
}

// The kernel sizes of `weights` ([M, C, k, k] each, one M and C, x's dtype and device).
std::vector<int64_t> check_stack_weights(const Tensor& x, at::TensorList weights, int64_t C, const char* op) {
  TORCH_CHECK(!weights.empty(), op, ": needs at least one weight");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": tensors must be floating point, got ", x.scalar_type());
  std::vector<int64_t> ks;
  for (size_t t = 0; t < weights.size(); ++t) {
    const Tensor& w = weights[t];
    TORCH_CHECK(w.dim() == 4 && w.size(0) == weights[0].size(0) && w.size(1) == C && w.size(2) == w.size(3) &&
                    w.size(0) >= 1,
                op, ": weight ", t, " must be [M, C, k, k] with C = ", C, " and the M of weight 0, got shape ",
                w.sizes());
    TORCH_CHECK(w.scalar_type() == x.scalar_type() && w.device() == x.device(), op, ": weight ", t,
                " must have the dtype and device of the input, got ", w.scalar_type(), " on ", w.device());
    ks.push_back(w.size(2));
  }
  return ks;
}

// The argument checks and geometry of each stacked op, shared by its CPU and CUDA implementations.
StackGeometry stack_forward_geometry(const Tensor& x, at::TensorList weights, int64_t stride, at::IntArrayRef paddings,
                                     at::IntArrayRef dilations, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": input must be [N, C, H, W], got shape ", x.sizes());
  const auto ks = check_stack_weights(x, weights, x.size(1), op);
  return stack_geometry(weights[0].size(0), x.size(1), x.size(2), x.size(3), ks, stride, paddings, dilations, op);
}

StackGeometry stack_transpose_geometry(const Tensor& grad_y, at::TensorList weights, at::IntArrayRef input_hw,
                                       int64_t stride, at::IntArrayRef paddings, at::IntArrayRef dilations,
                                       const char* op) {
  TORCH_CHECK(grad_y.dim() == 4, op, ": grad_out must be [N, B*C, Ho, Wo], got shape ", grad_y.sizes());
  TORCH_CHECK(input_hw.size() == 2, op, ": input_hw must hold (H, W), got ", input_hw);
  TORCH_CHECK(!weights.empty() && weights[0].dim() == 4, op, ": weights must be [M, C, k, k] tensors");
  const int64_t C = weights[0].size(1);
  const auto ks = check_stack_weights(grad_y, weights, C, op);
  const auto sg = stack_geometry(weights[0].size(0), C, input_hw[0], input_hw[1], ks, stride, paddings, dilations, op);
  const int64_t B = sg.blocks(), Ho = sg.convs[0].Ho, Wo = sg.convs[0].Wo;
  TORCH_CHECK(grad_y.size(1) == B * C && grad_y.size(2) == Ho && grad_y.size(3) == Wo, op, ": an input of ",
              input_hw[0], "x", input_hw[1], " gives [N, ", B * C, ", ", Ho, ", ", Wo, "] outputs, but grad_out is ",
              grad_y.sizes());
  return sg;
}

StackGeometry stack_weight_geometry(const Tensor& x, const Tensor& grad_y, at::IntArrayRef kernel_sizes, int64_t stride,
                                    at::IntArrayRef paddings, at::IntArrayRef dilations, const char* op) {
  TORCH_CHECK(x.dim() == 4 && grad_y.dim() == 4 && grad_y.size(0) == x.size(0), op,
              ": input [N, C, H, W] and grad_out [N, B*C, Ho, Wo] must agree, got ", x.sizes(), " and ", grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type() && grad_y.device() == x.device(), op,
              ": input and grad_out must have the same dtype and device");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": tensors must be floating point, got ", x.scalar_type());
  const int64_t C = x.size(1), T = int64_t(kernel_sizes.size());
  TORCH_CHECK(T >= 1 && C >= 1 && grad_y.size(1) % (T * C) == 0 && grad_y.size(1) > 0, op, ": grad_out has ",
              grad_y.size(1), " channels, not a positive multiple of ", T, " kernels x ", C, " channels");
  const auto sg = stack_geometry(grad_y.size(1) / (T * C), C, x.size(2), x.size(3), kernel_sizes, stride, paddings,
                                 dilations, op);
  TORCH_CHECK(grad_y.size(2) == sg.convs[0].Ho && grad_y.size(3) == sg.convs[0].Wo, op, ": an input of ", x.size(2),
              "x", x.size(3), " gives ", sg.convs[0].Ho, "x", sg.convs[0].Wo, " outputs, but grad_out is ",
              grad_y.size(2), "x", grad_y.size(3));
  return sg;
}

template <typename Acc> std::vector<Tensor> accumulator_weights(at::TensorList weights) {
  std::vector<Tensor> out;
  for (const Tensor& w : weights) out.push_back(w.to(c10::CppTypeToScalarType<Acc>::value).contiguous());
  return out;
}

Tensor depthwise_conv2d_stack_cpu(const Tensor& x_, at::TensorList weights, int64_t stride, at::IntArrayRef paddings,
                                  at::IntArrayRef dilations) {
  const auto sg = stack_forward_geometry(x_, weights, stride, paddings, dilations, "dsrna::depthwise_conv2d_stack");
  const Tensor x = x_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t Ho = sg.convs[0].Ho, Wo = sg.convs[0].Wo, B = sg.blocks();
  Tensor y = at::empty({N, B * C, Ho, Wo}, x.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsrna::depthwise_conv2d_stack", [&] {
    using Acc = acc_t<scalar_t>;
    const auto wc = accumulator_weights<Acc>(weights);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    at::parallel_for(0, N * C, sg.grain(), [&](int64_t begin, int64_t end) {
      std::vector<Acc> scratch(sg.scratch());
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        sg.for_each_conv([&](const cpu::DepthwiseGeometry& g, int64_t t, int64_t m, int64_t b) {
          cpu::depthwise_forward_plane(xp + plane * g.H * g.W, wc[t].data_ptr<Acc>() + (m * C + c) * g.K * g.K, g,
                                       yp + ((n * B + b) * C + c) * Ho * Wo, scratch.data());
        });
      }
    });
  });
  return y;
}

Tensor depthwise_conv2d_stack_transpose_cpu(const Tensor& grad_y_, at::TensorList weights, at::IntArrayRef input_hw,
                                            int64_t stride, at::IntArrayRef paddings, at::IntArrayRef dilations) {
  const auto sg = stack_transpose_geometry(grad_y_, weights, input_hw, stride, paddings, dilations,
                                           "dsrna::depthwise_conv2d_stack_transpose");
  const Tensor grad_y = grad_y_.contiguous();
  const int64_t N = grad_y.size(0), C = sg.C, B = sg.blocks(), Ho = sg.convs[0].Ho, Wo = sg.convs[0].Wo;
  Tensor grad_x = at::empty({N, C, input_hw[0], input_hw[1]}, grad_y.options());
  if (grad_x.numel() == 0) return grad_x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "dsrna::depthwise_conv2d_stack_transpose", [&] {
    using Acc = acc_t<scalar_t>;
    const auto wc = accumulator_weights<Acc>(weights);
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    scalar_t* xp = grad_x.data_ptr<scalar_t>();
    const int64_t HW = input_hw[0] * input_hw[1];
    at::parallel_for(0, N * C, sg.grain(), [&](int64_t begin, int64_t end) {
      std::vector<Acc> scratch(sg.scratch()), sum(HW);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / C, c = plane % C;
        // Block 0 writes the plane's sum, the others add to it.
        sg.for_each_conv([&](const cpu::DepthwiseGeometry& g, int64_t t, int64_t m, int64_t b) {
          cpu::depthwise_transpose_plane(gp + ((n * B + b) * C + c) * Ho * Wo,
                                         wc[t].data_ptr<Acc>() + (m * C + c) * g.K * g.K, g, sum.data(),
                                         scratch.data(), b > 0);
        });
        std::transform(sum.begin(), sum.end(), xp + plane * HW, [](Acc v) { return static_cast<scalar_t>(v); });
      }
    });
  });
  return grad_x;
}

std::vector<Tensor> depthwise_conv2d_stack_weight_cpu(const Tensor& x_, const Tensor& grad_y_, at::IntArrayRef kernel_sizes,
                                                      int64_t stride, at::IntArrayRef paddings, at::IntArrayRef dilations) {
  const auto sg = stack_weight_geometry(x_, grad_y_, kernel_sizes, stride, paddings, dilations,
                                        "dsrna::depthwise_conv2d_stack_weight");
  const int64_t N = x_.size(0), C = sg.C, T = int64_t(kernel_sizes.size());
  const int64_t B = sg.blocks(), Ho = sg.convs[0].Ho, Wo = sg.convs[0].Wo;
  const Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous();
  // One partial per plane and conv, summed over the batch in a fixed order: deterministic.
  std::vector<Tensor> partial;
  for (const auto& g : sg.convs)
    partial.push_back(at::zeros({N, sg.M, C, g.K * g.K}, x.options().dtype(acc_dtype(x.scalar_type()))));
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dsrna::depthwise_conv2d_stack_weight", [&] {
      using Acc = acc_t<scalar_t>;
      const scalar_t* xp = x.data_ptr<scalar_t>();
      const scalar_t* gp = grad_y.data_ptr<scalar_t>();
      at::parallel_for(0, N * C, sg.grain(), [&](int64_t begin, int64_t end) {
        std::vector<Acc> scratch(sg.scratch());
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t n = plane / C, c = plane % C;
          sg.for_each_conv([&](const cpu::DepthwiseGeometry& g, int64_t t, int64_t m, int64_t b) {
            cpu::depthwise_weight_plane(xp + plane * g.H * g.W, gp + ((n * B + b) * C + c) * Ho * Wo, g,
                                        partial[t].data_ptr<Acc>() + ((n * sg.M + m) * C + c) * g.K * g.K,
                                        scratch.data());
          });
        }
      });
    });
  }
  std::vector<Tensor> out;
  for (int64_t t = 0; t < T; ++t)
    out.push_back(partial[t].sum(0).to(x.scalar_type()).view({sg.M, C, kernel_sizes[t], kernel_sizes[t]}));
  return out;
}

// --- CROWN's backward step through ReLU -------------------------------------------------------------
// A [B, S, *shape] against the relaxation [B, *shape]: A_out = A+ * lower_slope + A- * upper_slope and
// bias[b, s] = sum A- * upper_intercept, in one pass over A (the reference makes nine).

std::tuple<Tensor, Tensor> crown_relu_backward_cpu(const Tensor& A_, const Tensor& lower_slope_,
                                                   const Tensor& upper_slope_, const Tensor& upper_intercept_) {
  const char* op = "dsrna::crown_relu_backward";
  TORCH_CHECK(A_.dim() >= 2, op, ": A must be [B, S, ...], got shape ", A_.sizes());
  std::vector<int64_t> layer{A_.size(0)};
  for (int64_t d = 2; d < A_.dim(); ++d) layer.push_back(A_.size(d));
  for (const Tensor* t : {&lower_slope_, &upper_slope_, &upper_intercept_}) {
    TORCH_CHECK(t->sizes() == at::IntArrayRef(layer), op, ": the relaxation must be [B, ...] = ", at::IntArrayRef(layer),
                ", got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == A_.scalar_type() && t->device() == A_.device(), op,
                ": the relaxation must have A's dtype and device");
  }
  TORCH_CHECK(A_.scalar_type() == at::kFloat || A_.scalar_type() == at::kDouble, op,
              ": bounds must be float32 or float64, got ", A_.scalar_type());
  const Tensor A = A_.contiguous(), ls = lower_slope_.contiguous(), us = upper_slope_.contiguous(),
               ui = upper_intercept_.contiguous();
  const int64_t B = A.size(0), S = A.size(1), N = S > 0 ? A.numel() / std::max<int64_t>(1, B * S) : 0;
  Tensor out = at::empty_like(A);
  Tensor bias = at::zeros({B, S}, A.options());
  if (A.numel() == 0) return {out, bias};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dsrna::crown_relu_backward", [&] {
    const scalar_t *ap = A.data_ptr<scalar_t>(), *lp = ls.data_ptr<scalar_t>(), *up = us.data_ptr<scalar_t>(),
                   *ip = ui.data_ptr<scalar_t>();
    scalar_t *op_ = out.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
    at::parallel_for(0, B * S, std::max<int64_t>(1, kElementGrain / std::max<int64_t>(1, N)), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t layer_row = (row / S) * N;
        const scalar_t* a = ap + row * N;
        scalar_t* o = op_ + row * N;
        scalar_t total = 0;
        for (int64_t j = 0; j < N; ++j) {
          const scalar_t v = a[j], positive = v > 0 ? v : scalar_t(0), negative = v < 0 ? v : scalar_t(0);
          o[j] = positive * lp[layer_row + j] + negative * up[layer_row + j];
          total += negative * ip[layer_row + j];
        }
        bp[row] = total;
      }
    });
  });
  return {out, bias};
}

// --- CUDA implementations -------------------------------------------------------------------------

#ifdef DSRNA_WITH_CUDA

gpu::DType gpu_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return gpu::DType::kFloat32;
    case at::kDouble: return gpu::DType::kFloat64;
    case at::kHalf: return gpu::DType::kFloat16;
    case at::kBFloat16: return gpu::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

gpu::DepthwiseGeometry gpu_geometry(int64_t N, int64_t C, const cpu::DepthwiseGeometry& g, const char* op) {
  TORCH_CHECK(gpu::depthwise_supports_kernel_size(g.K), op, ": the CUDA kernels support kernel sizes 3 and 5, got ", g.K);
  return {N, C, g.H, g.W, g.Ho, g.Wo, int(g.K), int(g.stride), int(g.padding), int(g.dilation)};
}

Tensor weighted_sum_cuda(at::TensorList xs, const Tensor& w) {
  const char* op = "dsrna::weighted_sum";
  check_same_tensors(xs, op);
  check_weights(xs, w, op);
  const c10::cuda::CUDAGuard guard(xs[0].device());
  const auto xc = contiguous_all(xs);
  Tensor out = at::empty(xs[0].sizes(), xs[0].options());
  if (out.numel() == 0) return out;
  const Tensor wc = w.to(acc_dtype(out.scalar_type())).contiguous();
  std::vector<const void*> ptrs;
  for (const Tensor& x : xc) ptrs.push_back(x.data_ptr());
  check_launch(gpu::weighted_sum(gpu_dtype(out.scalar_type(), op), ptrs.data(), int64_t(ptrs.size()), wc.data_ptr(),
                                 out.data_ptr(), out.numel(), c10::cuda::getCurrentCUDAStream()),
               op);
  return out;
}

Tensor batched_dot_cuda(at::TensorList xs, const Tensor& g) {
  const char* op = "dsrna::batched_dot";
  check_same_tensors(xs, op);
  TORCH_CHECK(g.sizes() == xs[0].sizes() && g.scalar_type() == xs[0].scalar_type() && g.device() == xs[0].device(), op,
              ": g must match the tensors' shape, dtype and device");
  const c10::cuda::CUDAGuard guard(g.device());
  const auto xc = contiguous_all(xs);
  const Tensor gc = g.contiguous();
  const int64_t n = int64_t(xc.size());
  const auto options = gc.options().dtype(acc_dtype(gc.scalar_type()));
  if (gc.numel() == 0) return at::zeros({n}, options);
  const int64_t chunks = gpu::batched_dot_chunks(gc.numel());
  Tensor partial = at::empty({n, chunks}, options);
  std::vector<const void*> ptrs;
  for (const Tensor& x : xc) ptrs.push_back(x.data_ptr());
  check_launch(gpu::batched_dot(gpu_dtype(gc.scalar_type(), op), ptrs.data(), n, gc.data_ptr(), gc.numel(),
                                partial.data_ptr(), chunks, c10::cuda::getCurrentCUDAStream()),
               op);
  return partial.sum(1);
}

Tensor depthwise_conv2d_cuda(const Tensor& x_, const Tensor& weight, int64_t stride, int64_t padding, int64_t dilation) {
  const char* op = "dsrna::depthwise_conv2d";
  check_depthwise_weight(x_, weight, op);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), wc = weight.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto g = gpu_geometry(N, C, depthwise_geometry(x.size(2), x.size(3), wc.size(2), stride, padding, dilation, op), op);
  Tensor y = at::empty({N, C, g.Ho, g.Wo}, x.options());
  if (y.numel() == 0) return y;
  check_launch(gpu::depthwise_forward(gpu_dtype(x.scalar_type(), op), x.data_ptr(), wc.data_ptr(), y.data_ptr(), g,
                                      c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

std::tuple<Tensor, Tensor> interval_depthwise_conv2d_cuda(const Tensor& lower_, const Tensor& upper_,
                                                          const Tensor& weight, int64_t stride, int64_t padding,
                                                          int64_t dilation) {
  const char* op = "dsrna::interval_depthwise_conv2d";
  check_depthwise_weight(lower_, weight, op);
  TORCH_CHECK(upper_.sizes() == lower_.sizes() && upper_.scalar_type() == lower_.scalar_type() &&
                  upper_.device() == lower_.device(),
              op, ": lower and upper must have the same shape, dtype and device");
  TORCH_CHECK(lower_.scalar_type() == at::kFloat || lower_.scalar_type() == at::kDouble, op,
              ": bounds must be float32 or float64, got ", lower_.scalar_type());
  const c10::cuda::CUDAGuard guard(lower_.device());
  const Tensor lower = lower_.contiguous(), upper = upper_.contiguous(), wc = weight.contiguous();
  const int64_t N = lower.size(0), C = lower.size(1);
  const auto g =
      gpu_geometry(N, C, depthwise_geometry(lower.size(2), lower.size(3), wc.size(2), stride, padding, dilation, op), op);
  Tensor out_lower = at::empty({N, C, g.Ho, g.Wo}, lower.options());
  Tensor out_upper = at::empty_like(out_lower);
  if (out_lower.numel() == 0) return {out_lower, out_upper};
  check_launch(gpu::interval_depthwise(gpu_dtype(lower.scalar_type(), op), lower.data_ptr(), upper.data_ptr(),
                                       wc.data_ptr(), out_lower.data_ptr(), out_upper.data_ptr(), g,
                                       c10::cuda::getCurrentCUDAStream()),
               op);
  return {out_lower, out_upper};
}

// The input gradient of a depthwise conv. At stride 1 it is the conv of grad_y with the kernel flipped
// and padding d(K-1) - p (the DARTS ops' "same" padding maps to itself): our forward kernel, which
// needs no input-sized scratch and, timed apart on an H100, took 40 us where ATen's input gradient
// took 68 (batch 256, C=16, 32x32, k=3). At stride 2 and dilations 1 and 2 (the DARTS ops) it is our
// gather kernel; elsewhere ATen's own input gradient (the kernel the reference path runs), which
// takes an input-shaped tensor for its shape only. The autograd formulas around it stay ours, so the
// double backward runs on our forward and weight kernels.
Tensor depthwise_conv2d_transpose_cuda(const Tensor& grad_y_, const Tensor& weight, at::IntArrayRef input_hw,
                                       int64_t stride, int64_t padding, int64_t dilation) {
  const char* op = "dsrna::depthwise_conv2d_transpose";
  const auto cg = transpose_geometry(grad_y_, weight, input_hw, stride, padding, dilation, op);
  const c10::cuda::CUDAGuard guard(grad_y_.device());
  const int64_t N = grad_y_.size(0), C = grad_y_.size(1);
  const auto g = gpu_geometry(N, C, cg, op);
  if (N * C * g.H * g.W == 0) return at::empty({N, C, g.H, g.W}, grad_y_.options());
  const int64_t flipped_padding = dilation * (g.K - 1) - padding;
  if (stride == 1 && flipped_padding >= 0)
    return depthwise_conv2d_cuda(grad_y_, weight.flip({2, 3}), 1, flipped_padding, dilation);
  const Tensor grad_y = grad_y_.contiguous();
  const Tensor wc = weight.contiguous();
  if (gpu::depthwise_transpose_supported(g)) {
    Tensor grad_x = at::empty({N, C, g.H, g.W}, grad_y.options());
    check_launch(gpu::depthwise_transpose(gpu_dtype(grad_y.scalar_type(), op), grad_y.data_ptr(), wc.data_ptr(),
                                          grad_x.data_ptr(), g, c10::cuda::getCurrentCUDAStream()),
                 op);
    return grad_x;
  }
  const Tensor input_shape = at::empty({N, C, g.H, g.W}, grad_y.options());
  return std::get<0>(at::convolution_backward(grad_y, input_shape, wc, std::nullopt,
                                              {stride, stride}, {padding, padding}, {dilation, dilation}, false,
                                              {0, 0}, C, {true, false, false}));
}

Tensor depthwise_conv2d_weight_cuda(const Tensor& x_, const Tensor& grad_y_, int64_t kernel_size, int64_t stride,
                                    int64_t padding, int64_t dilation) {
  const char* op = "dsrna::depthwise_conv2d_weight";
  const auto cg = weight_grad_geometry(x_, grad_y_, kernel_size, stride, padding, dilation, op);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous(), grad_y = grad_y_.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const auto g = gpu_geometry(N, C, cg, op);
  const auto options = x.options().dtype(acc_dtype(x.scalar_type()));
  if (N * C == 0) return at::zeros({C, 1, g.K, g.K}, x.options());
  const int64_t chunks = gpu::depthwise_weight_chunks(g);
  Tensor partial = at::empty({chunks, C, int64_t(g.K) * g.K}, options);
  check_launch(gpu::depthwise_weight(gpu_dtype(x.scalar_type(), op), x.data_ptr(), grad_y.data_ptr(),
                                     partial.data_ptr(), g, chunks, c10::cuda::getCurrentCUDAStream()),
               op);
  return partial.sum(0).to(x.scalar_type()).view({C, 1, g.K, g.K});
}

// The stacked family on the GPU. The forward is one fused kernel that stages each input tile once
// for all T*M convs; the transpose and the weight gradient are composed from the single-conv kernels
// above (verified on H100): the M copies of x as one input of M*C channels, one launch per kernel size.
Tensor depthwise_conv2d_stack_cuda(const Tensor& x_, at::TensorList weights, int64_t stride, at::IntArrayRef paddings,
                                   at::IntArrayRef dilations) {
  const char* op = "dsrna::depthwise_conv2d_stack";
  const auto sg = stack_forward_geometry(x_, weights, stride, paddings, dilations, op);
  const int64_t T = int64_t(weights.size());
  TORCH_CHECK(T <= gpu::kMaxStackConvs, op, ": the CUDA kernel takes at most ", gpu::kMaxStackConvs,
              " kernels per call, got ", T);
  const c10::cuda::CUDAGuard guard(x_.device());
  const Tensor x = x_.contiguous();
  gpu::DepthwiseStackGeometry g{x.size(0), sg.C, x.size(2), x.size(3), sg.convs[0].Ho, sg.convs[0].Wo,
                                int(T), int(sg.M), int(stride), 0, {}, {}, {}};
  std::vector<Tensor> wc;
  std::vector<const void*> ptrs;
  for (int64_t t = 0; t < T; ++t) {
    const auto& conv = sg.convs[t];
    TORCH_CHECK(gpu::depthwise_supports_kernel_size(conv.K), op, ": the CUDA kernels support kernel sizes 3 and 5, got ",
                conv.K);
    g.K[t] = int(conv.K);
    g.padding_of[t] = int(conv.padding);
    g.dilation[t] = int(conv.dilation);
    g.padding = std::max(g.padding, int(conv.padding));
    wc.push_back(weights[t].contiguous());
    ptrs.push_back(wc.back().data_ptr());
  }
  Tensor y = at::empty({g.N, sg.blocks() * g.C, g.Ho, g.Wo}, x.options());
  if (y.numel() == 0) return y;
  check_launch(gpu::depthwise_stack_forward(gpu_dtype(x.scalar_type(), op), x.data_ptr(), ptrs.data(), y.data_ptr(),
                                            g, c10::cuda::getCurrentCUDAStream()),
               op);
  return y;
}

Tensor depthwise_conv2d_stack_transpose_cuda(const Tensor& grad_y, at::TensorList weights, at::IntArrayRef input_hw,
                                             int64_t stride, at::IntArrayRef paddings, at::IntArrayRef dilations) {
  const auto sg = stack_transpose_geometry(grad_y, weights, input_hw, stride, paddings, dilations,
                                           "dsrna::depthwise_conv2d_stack_transpose");
  const int64_t M = sg.M, C = sg.C, T = int64_t(weights.size());
  Tensor sum;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t k = sg.convs[t].K;
    const Tensor part = depthwise_conv2d_transpose_cuda(grad_y.narrow(1, t * M * C, M * C),
                                                        weights[t].reshape({M * C, 1, k, k}), input_hw, stride,
                                                        paddings[t], dilations[t]);
    sum = t == 0 ? part : sum.add_(part);
  }
  return sum.view({grad_y.size(0), M, C, input_hw[0], input_hw[1]}).sum(1);
}

std::vector<Tensor> depthwise_conv2d_stack_weight_cuda(const Tensor& x, const Tensor& grad_y, at::IntArrayRef kernel_sizes,
                                                       int64_t stride, at::IntArrayRef paddings, at::IntArrayRef dilations) {
  const auto sg = stack_weight_geometry(x, grad_y, kernel_sizes, stride, paddings, dilations,
                                        "dsrna::depthwise_conv2d_stack_weight");
  const int64_t M = sg.M, C = sg.C, T = int64_t(kernel_sizes.size());
  const Tensor copies = M == 1 ? x : x.repeat({1, M, 1, 1});
  std::vector<Tensor> out;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t k = kernel_sizes[t];
    out.push_back(depthwise_conv2d_weight_cuda(copies, grad_y.narrow(1, t * M * C, M * C), k, stride, paddings[t],
                                               dilations[t])
                      .view({M, C, k, k}));
  }
  return out;
}

#endif  // DSRNA_WITH_CUDA

// --- autograd ----------------------------------------------------------------------------------------
// Calls through the dispatcher (not the kernels directly), so that a backward run with create_graph
// records these Functions again: double backward of the Jacobian step stays on the same ops.

namespace ops {

template <typename Sig> c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor weighted_sum(at::TensorList xs, const Tensor& w) {
  static const auto op = handle<Tensor(at::TensorList, const Tensor&)>("dsrna::weighted_sum");
  return op.call(xs, w);
}

Tensor batched_dot(at::TensorList xs, const Tensor& g) {
  static const auto op = handle<Tensor(at::TensorList, const Tensor&)>("dsrna::batched_dot");
  return op.call(xs, g);
}

Tensor depthwise(const Tensor& x, const Tensor& w, int64_t s, int64_t p, int64_t d) {
  static const auto op =
      handle<Tensor(const Tensor&, const Tensor&, int64_t, int64_t, int64_t)>("dsrna::depthwise_conv2d");
  return op.call(x, w, s, p, d);
}

Tensor depthwise_transpose(const Tensor& g, const Tensor& w, at::IntArrayRef hw, int64_t s, int64_t p, int64_t d) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, at::IntArrayRef, int64_t, int64_t, int64_t)>(
      "dsrna::depthwise_conv2d_transpose");
  return op.call(g, w, hw, s, p, d);
}

Tensor depthwise_weight(const Tensor& x, const Tensor& g, int64_t k, int64_t s, int64_t p, int64_t d) {
  static const auto op = handle<Tensor(const Tensor&, const Tensor&, int64_t, int64_t, int64_t, int64_t)>(
      "dsrna::depthwise_conv2d_weight");
  return op.call(x, g, k, s, p, d);
}

std::tuple<Tensor, Tensor> interval_depthwise(const Tensor& l, const Tensor& u, const Tensor& w, int64_t s, int64_t p,
                                              int64_t d) {
  static const auto op =
      handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t)>(
          "dsrna::interval_depthwise_conv2d");
  return op.call(l, u, w, s, p, d);
}

Tensor depthwise_stack(const Tensor& x, at::TensorList ws, int64_t s, at::IntArrayRef p, at::IntArrayRef d) {
  static const auto op = handle<Tensor(const Tensor&, at::TensorList, int64_t, at::IntArrayRef, at::IntArrayRef)>(
      "dsrna::depthwise_conv2d_stack");
  return op.call(x, ws, s, p, d);
}

Tensor depthwise_stack_transpose(const Tensor& g, at::TensorList ws, at::IntArrayRef hw, int64_t s, at::IntArrayRef p,
                                 at::IntArrayRef d) {
  static const auto op =
      handle<Tensor(const Tensor&, at::TensorList, at::IntArrayRef, int64_t, at::IntArrayRef, at::IntArrayRef)>(
          "dsrna::depthwise_conv2d_stack_transpose");
  return op.call(g, ws, hw, s, p, d);
}

std::vector<Tensor> depthwise_stack_weight(const Tensor& x, const Tensor& g, at::IntArrayRef ks, int64_t s,
                                           at::IntArrayRef p, at::IntArrayRef d) {
  static const auto op = handle<std::vector<Tensor>(const Tensor&, const Tensor&, at::IntArrayRef, int64_t,
                                                    at::IntArrayRef, at::IntArrayRef)>(
      "dsrna::depthwise_conv2d_stack_weight");
  return op.call(x, g, ks, s, p, d);
}

}  // namespace ops

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The geometry (stride, padding, dilation) every depthwise formula keeps.
void save_geometry(AutogradContext* ctx, int64_t s, int64_t p, int64_t d) {
  ctx->saved_data["s"] = s;
  ctx->saved_data["p"] = p;
  ctx->saved_data["d"] = d;
}

struct Geometry {
  int64_t s, p, d;
};

Geometry geometry(AutogradContext* ctx) {
  return {ctx->saved_data["s"].toInt(), ctx->saved_data["p"].toInt(), ctx->saved_data["d"].toInt()};
}

// The two list ops save their tensor list and one more tensor, and get them back apart.
void save_list_and(AutogradContext* ctx, at::TensorList xs, const Tensor& t) {
  variable_list saved(xs.begin(), xs.end());
  saved.push_back(t);
  ctx->save_for_backward(saved);
}

std::pair<variable_list, Tensor> saved_list_and(AutogradContext* ctx) {
  variable_list saved = ctx->get_saved_variables();
  const Tensor t = saved.back();
  saved.pop_back();
  return {saved, t};
}

// y = sum_i w[i] xs[i]: dxs[i] = w[i] g, dw = batched_dot(xs, g).
struct WeightedSumFunction : torch::autograd::Function<WeightedSumFunction> {
  static Tensor forward(AutogradContext* ctx, at::TensorList xs, const Tensor& w) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_list_and(ctx, xs, w);
    return ops::weighted_sum(xs, w);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [saved, w] = saved_list_and(ctx);
    const Tensor& g = grads[0];
    variable_list out;
    for (size_t i = 0; i < saved.size(); ++i) out.push_back(ctx->needs_input_grad(i) ? g * w[i] : Tensor());
    out.push_back(ctx->needs_input_grad(saved.size()) ? ops::batched_dot(saved, g).to(w.scalar_type()) : Tensor());
    return out;
  }
};

// d_i = <xs[i], g>: dxs[i] = grad[i] g, dg = weighted_sum(xs, grad).
struct BatchedDotFunction : torch::autograd::Function<BatchedDotFunction> {
  static Tensor forward(AutogradContext* ctx, at::TensorList xs, const Tensor& g) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_list_and(ctx, xs, g);
    return ops::batched_dot(xs, g);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [saved, g] = saved_list_and(ctx);
    const Tensor& grad = grads[0];
    variable_list out;
    for (size_t i = 0; i < saved.size(); ++i) out.push_back(ctx->needs_input_grad(i) ? g * grad[i] : Tensor());
    out.push_back(ctx->needs_input_grad(saved.size()) ? ops::weighted_sum(saved, grad) : Tensor());
    return out;
  }
};

// y = conv(x, W): dx = conv_transpose(dy, W), dW = weight_grad(x, dy).
struct DepthwiseFunction : torch::autograd::Function<DepthwiseFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, int64_t s, int64_t p, int64_t d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, w});
    save_geometry(ctx, s, p, d);
    return ops::depthwise(x, w, s, p, d);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &g = grads[0];
    const auto [s, p, d] = geometry(ctx);
    Tensor dx, dw;
    if (ctx->needs_input_grad(0)) dx = ops::depthwise_transpose(g, w, x.sizes().slice(2), s, p, d);
    if (ctx->needs_input_grad(1)) dw = ops::depthwise_weight(x, g, w.size(2), s, p, d);
    return {dx, dw, Tensor(), Tensor(), Tensor()};
  }
};

// z = conv_transpose(g, W): dg = conv(dz, W), dW = weight_grad(dz, g).
struct DepthwiseTransposeFunction : torch::autograd::Function<DepthwiseTransposeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& w, at::IntArrayRef hw, int64_t s,
                        int64_t p, int64_t d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({g, w});
    save_geometry(ctx, s, p, d);
    return ops::depthwise_transpose(g, w, hw, s, p, d);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &g = saved[0], &w = saved[1], &dz = grads[0];
    const auto [s, p, d] = geometry(ctx);
    Tensor dg, dw;
    if (ctx->needs_input_grad(0)) dg = ops::depthwise(dz, w, s, p, d);
    if (ctx->needs_input_grad(1)) dw = ops::depthwise_weight(dz, g, w.size(2), s, p, d);
    return {dg, dw, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// gW = weight_grad(x, g): dx = conv_transpose(g, dgW), dg = conv(x, dgW).
struct DepthwiseWeightFunction : torch::autograd::Function<DepthwiseWeightFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& g, int64_t k, int64_t s, int64_t p,
                        int64_t d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, g});
    save_geometry(ctx, s, p, d);
    return ops::depthwise_weight(x, g, k, s, p, d);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &g = saved[1], &dgw = grads[0];
    const auto [s, p, d] = geometry(ctx);
    Tensor dx, dg;
    if (ctx->needs_input_grad(0)) dx = ops::depthwise_transpose(g, dgw, x.sizes().slice(2), s, p, d);
    if (ctx->needs_input_grad(1)) dg = ops::depthwise(x, dgw, s, p, d);
    return {dx, dg, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// lower' = c - r, upper' = c + r with c = conv((l+u)/2, W), r = conv((u-l)/2, |W|).
struct IntervalDepthwiseFunction : torch::autograd::Function<IntervalDepthwiseFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& l, const Tensor& u, const Tensor& w, int64_t s,
                               int64_t p, int64_t d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({l, u, w});
    save_geometry(ctx, s, p, d);
    auto [lower, upper] = ops::interval_depthwise(l, u, w, s, p, d);
    return {lower, upper};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &l = saved[0], &u = saved[1], &w = saved[2];
    const auto [s, p, d] = geometry(ctx);
    const Tensor centre_grad = grads[0] + grads[1], radius_grad = grads[1] - grads[0];
    Tensor dl, du, dw;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      const auto hw = l.sizes().slice(2);
      const Tensor dc = ops::depthwise_transpose(centre_grad, w, hw, s, p, d);
      const Tensor dr = ops::depthwise_transpose(radius_grad, w.abs(), hw, s, p, d);
      dl = (dc - dr) / 2;
      du = (dc + dr) / 2;
    }
    if (ctx->needs_input_grad(2)) {
      const int64_t k = w.size(2);
      dw = ops::depthwise_weight((u + l) / 2, centre_grad, k, s, p, d) +
           w.sign() * ops::depthwise_weight((u - l) / 2, radius_grad, k, s, p, d);
    }
    return {dl, du, dw, Tensor(), Tensor(), Tensor()};
  }
};

// The stacked family keeps its stride and per-kernel paddings and dilations.
void save_stack_geometry(AutogradContext* ctx, int64_t s, at::IntArrayRef p, at::IntArrayRef d) {
  ctx->saved_data["s"] = s;
  ctx->saved_data["p"] = p.vec();
  ctx->saved_data["d"] = d.vec();
}

struct StackGeometryArgs {
  int64_t s;
  std::vector<int64_t> p, d;
};

StackGeometryArgs stack_geometry_args(AutogradContext* ctx) {
  return {ctx->saved_data["s"].toInt(), ctx->saved_data["p"].toIntVector(), ctx->saved_data["d"].toIntVector()};
}

std::vector<int64_t> kernel_sizes(at::TensorList ws) {
  std::vector<int64_t> ks;
  for (const Tensor& w : ws) ks.push_back(w.size(2));
  return ks;
}

// Appends the weights' gradients stack_weight(input, grad) to `out` when any weight (inputs 1..T of
// both stack Functions) needs one, else T undefined tensors.
void append_weight_grads(AutogradContext* ctx, variable_list& out, const Tensor& input, const Tensor& grad,
                         at::TensorList ws, const StackGeometryArgs& geo) {
  bool any_weight = false;
  for (size_t t = 0; t < ws.size(); ++t) any_weight |= ctx->needs_input_grad(1 + t);
  if (!any_weight) {
    out.resize(out.size() + ws.size());
    return;
  }
  for (const Tensor& dw : ops::depthwise_stack_weight(input, grad, kernel_sizes(ws), geo.s, geo.p, geo.d))
    out.push_back(dw);
}

// y = stack(x, Ws): dx = stack_transpose(dy, Ws), dWs = stack_weight(x, dy).
struct DepthwiseStackFunction : torch::autograd::Function<DepthwiseStackFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::TensorList ws, int64_t s, at::IntArrayRef p,
                        at::IntArrayRef d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_list_and(ctx, ws, x);
    save_stack_geometry(ctx, s, p, d);
    return ops::depthwise_stack(x, ws, s, p, d);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [ws, x] = saved_list_and(ctx);
    const auto geo = stack_geometry_args(ctx);
    const Tensor& g = grads[0];
    variable_list out{ctx->needs_input_grad(0)
                          ? ops::depthwise_stack_transpose(g, ws, x.sizes().slice(2), geo.s, geo.p, geo.d)
                          : Tensor()};
    append_weight_grads(ctx, out, x, g, ws, geo);
    out.resize(out.size() + 3);  // stride, paddings, dilations
    return out;
  }
};

// z = stack_transpose(g, Ws): dg = stack(dz, Ws), dWs = stack_weight(dz, g).
struct DepthwiseStackTransposeFunction : torch::autograd::Function<DepthwiseStackTransposeFunction> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, at::TensorList ws, at::IntArrayRef hw, int64_t s,
                        at::IntArrayRef p, at::IntArrayRef d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_list_and(ctx, ws, g);
    save_stack_geometry(ctx, s, p, d);
    return ops::depthwise_stack_transpose(g, ws, hw, s, p, d);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto [ws, g] = saved_list_and(ctx);
    const auto geo = stack_geometry_args(ctx);
    const Tensor& dz = grads[0];
    variable_list out{ctx->needs_input_grad(0) ? ops::depthwise_stack(dz, ws, geo.s, geo.p, geo.d) : Tensor()};
    append_weight_grads(ctx, out, dz, g, ws, geo);
    out.resize(out.size() + 4);  // input_hw, stride, paddings, dilations
    return out;
  }
};

// gWs = stack_weight(x, g): dx = stack_transpose(g, dgWs), dg = stack(x, dgWs).
struct DepthwiseStackWeightFunction : torch::autograd::Function<DepthwiseStackWeightFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& g, at::IntArrayRef ks, int64_t s,
                               at::IntArrayRef p, at::IntArrayRef d) {
    at::AutoDispatchBelowADInplaceOrView guard;
    save_stack_geometry(ctx, s, p, d);
    ctx->saved_data["k"] = ks.vec();
    ctx->save_for_backward({x, g});
    return ops::depthwise_stack_weight(x, g, ks, s, p, d);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &g = saved[1];
    const auto [s, p, d] = stack_geometry_args(ctx);
    // A weight gradient autograd passes none for counts as zero: [M, C, k, k], M from g's channels.
    const auto ks = ctx->saved_data["k"].toIntVector();
    const int64_t C = x.size(1), M = g.size(1) / (int64_t(ks.size()) * C);
    variable_list dgw;
    for (size_t t = 0; t < ks.size(); ++t)
      dgw.push_back(grads[t].defined() ? grads[t] : at::zeros({M, C, ks[t], ks[t]}, x.options()));
    Tensor dx, dg;
    if (ctx->needs_input_grad(0)) dx = ops::depthwise_stack_transpose(g, dgw, x.sizes().slice(2), s, p, d);
    if (ctx->needs_input_grad(1)) dg = ops::depthwise_stack(x, dgw, s, p, d);
    return {dx, dg, Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

// A_out = A+ * ls + A- * us, bias = sum(A- * ui) over the layer. Written with ATen ops, so that it is
// differentiable again; no gradient reaches A where A == 0, as in the reference.
struct CrownReluBackwardFunction : torch::autograd::Function<CrownReluBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& A, const Tensor& ls, const Tensor& us,
                               const Tensor& ui) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({A, ls, us, ui});
    static const auto op = ops::handle<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&)>("dsrna::crown_relu_backward");
    auto [out, bias] = op.call(A, ls, us, ui);
    return {out, bias};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &A = saved[0], &ls = saved[1], &us = saved[2], &ui = saved[3];
    const Tensor positive = at::where(A > 0, A, at::zeros({}, A.options()));
    const Tensor negative = at::where(A < 0, A, at::zeros({}, A.options()));
    // grads[0] is [B, S, ...]; grads[1] is [B, S], broadcast over the layer.
    std::vector<int64_t> bias_view{A.size(0), A.size(1)};
    bias_view.resize(A.dim(), 1);
    const Tensor g_out = grads[0].defined() ? grads[0] : at::zeros_like(A);
    const Tensor g_bias = grads[1].defined() ? grads[1].reshape(bias_view) : at::zeros(bias_view, A.options());
    Tensor dA, dls, dus, dui;
    if (ctx->needs_input_grad(0)) {
      const Tensor zero = at::zeros({}, A.options());
      dA = at::where(A > 0, g_out * ls.unsqueeze(1), zero) + at::where(A < 0, g_out * us.unsqueeze(1) + g_bias * ui.unsqueeze(1), zero);
    }
    if (ctx->needs_input_grad(1)) dls = (g_out * positive).sum(1);
    if (ctx->needs_input_grad(2)) dus = (g_out * negative).sum(1);
    if (ctx->needs_input_grad(3)) dui = (g_bias * negative).sum(1);
    return {dA, dls, dus, dui};
  }
};

std::tuple<Tensor, Tensor> crown_relu_backward_autograd(const Tensor& A, const Tensor& ls, const Tensor& us,
                                                        const Tensor& ui) {
  auto out = CrownReluBackwardFunction::apply(A, ls, us, ui);
  return {out[0], out[1]};
}

Tensor weighted_sum_autograd(at::TensorList xs, const Tensor& w) { return WeightedSumFunction::apply(xs, w); }

Tensor batched_dot_autograd(at::TensorList xs, const Tensor& g) { return BatchedDotFunction::apply(xs, g); }

Tensor depthwise_conv2d_autograd(const Tensor& x, const Tensor& w, int64_t s, int64_t p, int64_t d) {
  return DepthwiseFunction::apply(x, w, s, p, d);
}

Tensor depthwise_conv2d_transpose_autograd(const Tensor& g, const Tensor& w, at::IntArrayRef hw, int64_t s, int64_t p,
                                           int64_t d) {
  return DepthwiseTransposeFunction::apply(g, w, hw, s, p, d);
}

Tensor depthwise_conv2d_weight_autograd(const Tensor& x, const Tensor& g, int64_t k, int64_t s, int64_t p, int64_t d) {
  return DepthwiseWeightFunction::apply(x, g, k, s, p, d);
}

std::tuple<Tensor, Tensor> interval_depthwise_conv2d_autograd(const Tensor& l, const Tensor& u, const Tensor& w,
                                                              int64_t s, int64_t p, int64_t d) {
  auto out = IntervalDepthwiseFunction::apply(l, u, w, s, p, d);
  return {out[0], out[1]};
}

Tensor depthwise_conv2d_stack_autograd(const Tensor& x, at::TensorList ws, int64_t s, at::IntArrayRef p,
                                       at::IntArrayRef d) {
  return DepthwiseStackFunction::apply(x, ws, s, p, d);
}

Tensor depthwise_conv2d_stack_transpose_autograd(const Tensor& g, at::TensorList ws, at::IntArrayRef hw, int64_t s,
                                                 at::IntArrayRef p, at::IntArrayRef d) {
  return DepthwiseStackTransposeFunction::apply(g, ws, hw, s, p, d);
}

std::vector<Tensor> depthwise_conv2d_stack_weight_autograd(const Tensor& x, const Tensor& g, at::IntArrayRef ks,
                                                           int64_t s, at::IntArrayRef p, at::IntArrayRef d) {
  return DepthwiseStackWeightFunction::apply(x, g, ks, s, p, d);
}

}  // namespace
}  // namespace dsrna

// A fragment, not TORCH_LIBRARY: the Triton kernels may define their own ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(dsrna, m) {
  m.def("weighted_sum(Tensor[] xs, Tensor w) -> Tensor");
  m.def("batched_dot(Tensor[] xs, Tensor g) -> Tensor");
  m.def("depthwise_conv2d(Tensor x, Tensor weight, int stride, int padding, int dilation) -> Tensor");
  m.def("depthwise_conv2d_transpose(Tensor grad_out, Tensor weight, int[2] input_hw, int stride, int padding, "
        "int dilation) -> Tensor");
  m.def("depthwise_conv2d_weight(Tensor x, Tensor grad_out, int kernel_size, int stride, int padding, "
        "int dilation) -> Tensor");
  m.def("interval_depthwise_conv2d(Tensor lower, Tensor upper, Tensor weight, int stride, int padding, "
        "int dilation) -> (Tensor, Tensor)");
  m.def("depthwise_conv2d_stack(Tensor x, Tensor[] weights, int stride, int[] paddings, int[] dilations) -> Tensor");
  m.def("crown_relu_backward(Tensor A, Tensor lower_slope, Tensor upper_slope, Tensor upper_intercept) "
        "-> (Tensor, Tensor)");
  m.def("depthwise_conv2d_stack_transpose(Tensor grad_out, Tensor[] weights, int[2] input_hw, int stride, "
        "int[] paddings, int[] dilations) -> Tensor");
  m.def("depthwise_conv2d_stack_weight(Tensor x, Tensor grad_out, int[] kernel_sizes, int stride, int[] paddings, "
        "int[] dilations) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(dsrna, CPU, m) {
  m.impl("weighted_sum", &dsrna::weighted_sum_cpu);
  m.impl("batched_dot", &dsrna::batched_dot_cpu);
  m.impl("depthwise_conv2d", &dsrna::depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_transpose", &dsrna::depthwise_conv2d_transpose_cpu);
  m.impl("depthwise_conv2d_weight", &dsrna::depthwise_conv2d_weight_cpu);
  m.impl("interval_depthwise_conv2d", &dsrna::interval_depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_stack", &dsrna::depthwise_conv2d_stack_cpu);
  m.impl("depthwise_conv2d_stack_transpose", &dsrna::depthwise_conv2d_stack_transpose_cpu);
  m.impl("depthwise_conv2d_stack_weight", &dsrna::depthwise_conv2d_stack_weight_cpu);
  m.impl("crown_relu_backward", &dsrna::crown_relu_backward_cpu);
}

TORCH_LIBRARY_IMPL(dsrna, Autograd, m) {
  m.impl("weighted_sum", &dsrna::weighted_sum_autograd);
  m.impl("batched_dot", &dsrna::batched_dot_autograd);
  m.impl("depthwise_conv2d", &dsrna::depthwise_conv2d_autograd);
  m.impl("depthwise_conv2d_transpose", &dsrna::depthwise_conv2d_transpose_autograd);
  m.impl("depthwise_conv2d_weight", &dsrna::depthwise_conv2d_weight_autograd);
  m.impl("interval_depthwise_conv2d", &dsrna::interval_depthwise_conv2d_autograd);
  m.impl("depthwise_conv2d_stack", &dsrna::depthwise_conv2d_stack_autograd);
  m.impl("depthwise_conv2d_stack_transpose", &dsrna::depthwise_conv2d_stack_transpose_autograd);
  m.impl("depthwise_conv2d_stack_weight", &dsrna::depthwise_conv2d_stack_weight_autograd);
  m.impl("crown_relu_backward", &dsrna::crown_relu_backward_autograd);
}

#ifdef DSRNA_WITH_CUDA
TORCH_LIBRARY_IMPL(dsrna, CUDA, m) {
  m.impl("weighted_sum", &dsrna::weighted_sum_cuda);
  m.impl("batched_dot", &dsrna::batched_dot_cuda);
  m.impl("depthwise_conv2d", &dsrna::depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_transpose", &dsrna::depthwise_conv2d_transpose_cuda);
  m.impl("depthwise_conv2d_weight", &dsrna::depthwise_conv2d_weight_cuda);
  m.impl("interval_depthwise_conv2d", &dsrna::interval_depthwise_conv2d_cuda);
  m.impl("depthwise_conv2d_stack", &dsrna::depthwise_conv2d_stack_cuda);
  m.impl("depthwise_conv2d_stack_transpose", &dsrna::depthwise_conv2d_stack_transpose_cuda);
  m.impl("depthwise_conv2d_stack_weight", &dsrna::depthwise_conv2d_stack_weight_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "dsrna native kernels; the ops are registered as torch.ops.dsrna.*";
  module.def("built_with_cuda", [] {
#ifdef DSRNA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  // Without OpenMP, at::parallel_for runs every CPU kernel on the calling thread (see setup.py).
  module.def("built_with_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}

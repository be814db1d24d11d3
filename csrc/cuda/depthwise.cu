// CUDA kernels of the depthwise convolution family (kernel 3 and 5, any stride, padding, dilation).
//
// The input gradient at stride 1 is the forward kernel on the flipped filter (csrc/ops.cpp). At stride
// 2 a tiled gather kernel with one output per thread was 2-4x slower than ATen's depthwise backward on
// an H100 (benchmarks/results/2026-11-26_nvidia-h100_profile.md), and ATen's is itself far from the
// memory floor (64 us at batch 256, C=16, 32x32, k3 on an H200, where moving the tensors takes about
// 4.4): depthwise_transpose_s2_kernel gathers four adjacent outputs per thread, with each kernel row's
// weights loaded once and every index known at compile time.
//
// Forward and interval forward share one scheme: a block owns an output tile of
// (blockDim.x x blockDim.y * kRowsPerThread) pixels in each of blockDim.z planes (several small planes
// per block keep 8x8 feature maps from idling most threads), stages the input tile plus its halo in
// shared memory once, and every thread then computes kRowsPerThread vertically adjacent outputs from
// shared memory with the plane's K*K weights in registers. With one output per thread the kernel was
// as slow as ATen's on an H200 (39-41 us at batch 256, C=16, 32x32, k3: about 5x the time it takes
// to read and write the tensors), with one load in flight per thread and a staged halo of a third of
// the tile; several rows per thread give each thread several independent loads, let adjacent outputs
// share staged rows (where the stride and dilation are compiled in) and cut the halo and the number
// of blocks. The weight gradient reduces over the batch and the image, in deterministic partial sums;
// at the DARTS strides and dilations (1 and 2) each thread takes a segment of adjacent outputs of a
// row, whose K input rows it reads once into registers, where the general kernel reads K*K inputs
// per output.
#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace dsrna::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPlanesPerBlock = 32;
constexpr int kRowsPerThread = 4;  // outputs per thread of the (interval) forward, one column
constexpr int kSegment = 4;        // adjacent outputs of a row per thread: weight and stride-2 input gradients
constexpr size_t kMaxSharedBytes = 40 * 1024;

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

// Threads per block (x, y, z) and shared memory for output tiles of blockDim.x x (blockDim.y * rows)
// pixels, whose input footprint is ((tx-1)*stride + span) x ((ty*rows-1)*stride + span), `copies`
// arrays per plane.
struct TileConfig {
  dim3 block;
  int tiles_x, tiles_y;
  size_t shared_bytes;
};

// `out_h x out_w` is the output plane and every thread computes `rows` outputs of one column.
TileConfig tile_config(int64_t planes, int64_t out_h, int64_t out_w, int stride, int span, size_t elem_bytes,
                       int copies, int rows) {
  int tw = std::min(32, next_pow2(out_w));
  int th = std::min(kThreads / tw, next_pow2(ceil_div(out_h, rows)));
  int tz = int(std::min<int64_t>({kMaxPlanesPerBlock, kThreads / (tw * th), planes}));
  auto window = [&](int t) { return (t - 1) * stride + span; };
  auto bytes = [&]() { return size_t(tz) * window(tw) * window(th * rows) * elem_bytes * copies; };
  while (bytes() > kMaxSharedBytes && tz > 1) tz /= 2;
  while (bytes() > kMaxSharedBytes && th > 1) th /= 2;
  while (bytes() > kMaxSharedBytes && tw > 1) tw /= 2;  // large dilations; past this the launch fails
  TileConfig c;
  c.block = dim3(tw, th, tz);
  c.tiles_x = int(ceil_div(out_w, tw));
  c.tiles_y = int(ceil_div(out_h, th * rows));
  c.shared_bytes = bytes();
  return c;
}

// The thread's plane (blockIdx.x: groups of blockDim.z planes) and its block's output tile origin
// (blockIdx.y: tiles, tiles_x per row).
struct TileSlot {
  int64_t plane;
  bool live;  // plane < planes
  int oh0, ow0;
};

__device__ __forceinline__ TileSlot tile_slot(int64_t planes, int tiles_x, int rows) {
  const int64_t plane = int64_t(blockIdx.x) * blockDim.z + threadIdx.z;
  return {plane, plane < planes, int(blockIdx.y / tiles_x) * int(blockDim.y) * rows,
          int(blockIdx.y % tiles_x) * int(blockDim.x)};
}

// The threads of one plane stride over its staged input window (in_w wide, tile_elems in all, origin
// (ih0, iw0)); store(idx, inside, at) fills element idx from input offset `at` of an H x W plane,
// or with zero padding where !inside.
template <typename Store>
__device__ __forceinline__ void stage_window(int in_w, int tile_elems, int ih0, int iw0, int64_t H, int64_t W,
                                             Store store) {
#pragma unroll 4
  for (int idx = threadIdx.y * blockDim.x + threadIdx.x; idx < tile_elems; idx += blockDim.x * blockDim.y) {
    const int r = idx / in_w, c = idx - r * in_w;
    const int ih = ih0 + r, iw = iw0 + c;
    store(idx, ih >= 0 && ih < H && iw >= 0 && iw < W, int64_t(ih) * W + iw);
  }
}

// y = conv(x, w) or, with kInterval, the interval pair (x = lower, x2 = upper): centre through w
// and radius through |w| from one staged tile each, y = centre - radius and y2 = centre + radius.
// S and D are the stride and dilation where compiled for them (the DARTS ones, 1 and 2), else 0 (read
// from g): known, the taps of adjacent outputs that read the same staged element compile to one load
// (at S = D = 1, 18 shared loads per thread for K=3 where 36 are written out, 40 for K=5 against 100).
template <typename T, int K, bool kInterval, int S, int D>
__global__ void __launch_bounds__(kThreads)
depthwise_forward_kernel(const T* __restrict__ x, const T* __restrict__ x2, const T* __restrict__ w,
                         T* __restrict__ y, T* __restrict__ y2, DepthwiseGeometry g, int tiles_x) {
  using Acc = acc_t<T>;
  constexpr int R = kRowsPerThread;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int s = S > 0 ? S : g.stride, d = D > 0 ? D : g.dilation;
  const int tw = blockDim.x, rows = blockDim.y * R;
  const int in_w = (tw - 1) * s + (K - 1) * d + 1;
  const int in_h = (rows - 1) * s + (K - 1) * d + 1;
  const int tile_elems = in_w * in_h;
  Acc* tile = reinterpret_cast<Acc*>(shared_raw) + threadIdx.z * tile_elems * (kInterval ? 2 : 1);

  const TileSlot slot = tile_slot(g.N * g.C, tiles_x, R);
  if (slot.live) {
    const T* xp = x + slot.plane * g.H * g.W;
    const T* x2p = kInterval ? x2 + slot.plane * g.H * g.W : nullptr;
    stage_window(in_w, tile_elems, slot.oh0 * s - g.padding, slot.ow0 * s - g.padding, g.H, g.W,
                 [&](int idx, bool inside, int64_t at) {
                   if (kInterval) {
                     const Acc l = inside ? to_acc(xp[at]) : Acc(0), u = inside ? to_acc(x2p[at]) : Acc(0);
                     tile[idx] = Acc(0.5) * (l + u);
                     tile[tile_elems + idx] = Acc(0.5) * (u - l);
                   } else {
                     tile[idx] = inside ? to_acc(xp[at]) : Acc(0);
                   }
                 });
  }
  __syncthreads();
  const int oh0 = slot.oh0 + threadIdx.y * R, ow = slot.ow0 + threadIdx.x;
  if (!slot.live || oh0 >= g.Ho || ow >= g.Wo) return;

  const T* wp = w + (slot.plane % g.C) * K * K;
  Acc wr[K * K];
#pragma unroll
  for (int i = 0; i < K * K; ++i) wr[i] = to_acc(wp[i]);
  const Acc* src = tile + threadIdx.y * R * s * in_w + threadIdx.x * s;
  Acc acc[R], radius[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    acc[r] = 0;
    radius[r] = 0;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int off = (r * s + kh * d) * in_w + kw * d;
        acc[r] += wr[kh * K + kw] * src[off];
        if (kInterval) radius[r] += fabs(wr[kh * K + kw]) * src[tile_elems + off];
      }
    }
  }
  const int64_t out = (slot.plane * g.Ho + oh0) * g.Wo + ow;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    if (oh0 + r >= g.Ho) break;
    if (kInterval) {
      y[out + r * g.Wo] = from_acc<T>(acc[r] - radius[r]);
      y2[out + r * g.Wo] = from_acc<T>(acc[r] + radius[r]);
    } else {
      y[out + r * g.Wo] = from_acc<T>(acc[r]);
    }
  }
}

// The weight kernel's last step: the block's K*K sums into partial[chunk][c][k].
template <typename Acc, int K>
__device__ __forceinline__ void store_weight_partial(Acc (&acc)[K * K], Acc* scratch, Acc* __restrict__ partial,
                                                     int64_t C) {
  Acc* out = partial + (int64_t(blockIdx.y) * C + blockIdx.x) * K * K;
#pragma unroll
  for (int k = 0; k < K * K; ++k) {
    const Acc total = block_sum(acc[k], scratch);
    if (threadIdx.x == 0) out[k] = total;
  }
}

// partial[chunk][c][k] = sum over this chunk's share of (n, oh, ow) of grad_y * x at tap k.
template <typename T, int K>
__global__ void __launch_bounds__(kThreads)
depthwise_weight_kernel(const T* __restrict__ x, const T* __restrict__ gy, acc_t<T>* __restrict__ partial,
                        DepthwiseGeometry g) {
  using Acc = acc_t<T>;
  __shared__ Acc scratch[32];
  const int c = blockIdx.x;
  const int s = g.stride, d = g.dilation, p = g.padding;
  const int64_t plane_out = g.Ho * g.Wo;
  const int64_t positions = g.N * plane_out;
  const int64_t per_chunk = ceil_div(positions, gridDim.y);
  const int64_t begin = blockIdx.y * per_chunk;
  const int64_t end = begin + per_chunk < positions ? begin + per_chunk : positions;
  Acc acc[K * K];
#pragma unroll
  for (int k = 0; k < K * K; ++k) acc[k] = 0;
  for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) {
    const int64_t n = q / plane_out;
    const int rem = int(q - n * plane_out);
    const int oh = rem / g.Wo, ow = rem - oh * g.Wo;
    const int64_t plane = n * g.C + c;
    const Acc gv = to_acc(gy[plane * plane_out + rem]);
    const T* xp = x + plane * g.H * g.W;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int ih = oh * s - p + kh * d;
      if (ih < 0 || ih >= g.H) continue;
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
        const int iw = ow * s - p + kw * d;
        if (iw >= 0 && iw < g.W) acc[kh * K + kw] += gv * to_acc(xp[int64_t(ih) * g.W + iw]);
      }
    }
  }
  store_weight_partial<Acc, K>(acc, scratch, partial, g.C);
}

// As depthwise_weight_kernel at stride S and dilation D known at compile time: a thread's unit is a
// segment of kSegment adjacent outputs of one row, whose K*K taps read, per kernel row, one span of
// (kSegment-1)*S + (K-1)*D + 1 inputs: loaded once into registers, where the general kernel loads
// K*K inputs per output (25 for K=5 against 10 here at S=D=1).
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(kThreads)
depthwise_weight_segment_kernel(const T* __restrict__ x, const T* __restrict__ gy, acc_t<T>* __restrict__ partial,
                                DepthwiseGeometry g) {
  using Acc = acc_t<T>;
  constexpr int J = kSegment, kSpan = (J - 1) * S + (K - 1) * D + 1;
  __shared__ Acc scratch[32];
  const int c = blockIdx.x, p = g.padding;
  const int segments_per_row = int(ceil_div(g.Wo, J));
  const int64_t segments = g.N * g.Ho * segments_per_row;
  const int64_t per_chunk = ceil_div(segments, gridDim.y);
  const int64_t begin = blockIdx.y * per_chunk;
  const int64_t end = begin + per_chunk < segments ? begin + per_chunk : segments;
  Acc acc[K * K];
#pragma unroll
  for (int k = 0; k < K * K; ++k) acc[k] = 0;
  for (int64_t q = begin + threadIdx.x; q < end; q += blockDim.x) {
    const int64_t row = q / segments_per_row;  // n * Ho + oh
    const int ow0 = int(q - row * segments_per_row) * J;
    const int64_t n = row / g.Ho;
    const int oh = int(row - n * g.Ho);
    const int64_t plane = n * g.C + c;
    const T* gyp = gy + (plane * g.Ho + oh) * g.Wo + ow0;
    Acc gv[J];
#pragma unroll
    for (int j = 0; j < J; ++j) gv[j] = ow0 + j < g.Wo ? to_acc(gyp[j]) : Acc(0);
    const T* xp = x + plane * g.H * g.W;
    const int iw0 = ow0 * S - p;
#pragma unroll
    for (int kh = 0; kh < K; ++kh) {
      const int ih = oh * S - p + kh * D;
      if (ih < 0 || ih >= g.H) continue;
      const T* xr = xp + int64_t(ih) * g.W;
      Acc xv[kSpan];
#pragma unroll
      for (int i = 0; i < kSpan; ++i) xv[i] = iw0 + i >= 0 && iw0 + i < g.W ? to_acc(xr[iw0 + i]) : Acc(0);
#pragma unroll
      for (int kw = 0; kw < K; ++kw) {
#pragma unroll
        for (int j = 0; j < J; ++j) acc[kh * K + kw] += gv[j] * xv[j * S + kw * D];
      }
    }
  }
  store_weight_partial<Acc, K>(acc, scratch, partial, g.C);
}

// grad_x of a stride-2 depthwise conv: grad_x[ih][iw] sums w[kh][kw] * grad_y[oh][ow] over the taps
// with 2*oh = ih + p - kh*D and 2*ow = iw + p - kw*D. A thread takes kSegment adjacent pixels of a
// grad_x row from an even column iw0; with P the padding's parity, iw + p - kw*D is 2*base + (j + P -
// kw*D) for pixel j (base = (iw0 + p - P) / 2, i.e. (iw0 + p) / 2), so which (pixel, tap) pairs meet a
// grad_y column, and which of the row's columns they read, is known at compile time: each kernel
// row's columns are loaded once into registers.
template <typename T, int K, int D, int P>
__global__ void __launch_bounds__(kThreads)
depthwise_transpose_s2_kernel(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                              DepthwiseGeometry g) {
  using Acc = acc_t<T>;
  constexpr int J = kSegment;
  constexpr int kFirst = floor_div(P - (K - 1) * D, 2), kLast = floor_div(J - 1 + P, 2);  // column offsets from base
  constexpr int kColumns = kLast - kFirst + 1;
  const int segments_per_row = int(ceil_div(g.W, J));
  const int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (q >= g.N * g.C * g.H * segments_per_row) return;
  const int64_t row = q / segments_per_row;  // plane * H + ih
  const int iw0 = int(q - row * segments_per_row) * J;
  const int64_t plane = row / g.H;
  const int ih = int(row - plane * g.H);
  const T* wp = w + (plane % g.C) * K * K;
  const int base = (iw0 + g.padding) / 2;
  Acc acc[J];
#pragma unroll
  for (int j = 0; j < J; ++j) acc[j] = 0;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
    const int t = ih + g.padding - kh * D;
    if (t & 1) continue;  // this tap row falls between grad_y rows
    const int oh = t >> 1;
    if (oh < 0 || oh >= g.Ho) continue;
    const T* gyr = gy + (plane * g.Ho + oh) * g.Wo;
    Acc wr[K];  // this kernel row's weights: about half the rows fall between grad_y rows
#pragma unroll
    for (int kw = 0; kw < K; ++kw) wr[kw] = to_acc(wp[kh * K + kw]);
    Acc v[kColumns];
#pragma unroll
    for (int i = 0; i < kColumns; ++i) {
      const int ow = base + kFirst + i;
      v[i] = ow >= 0 && ow < g.Wo ? to_acc(gyr[ow]) : Acc(0);
    }
#pragma unroll
    for (int kw = 0; kw < K; ++kw) {
#pragma unroll
      for (int j = 0; j < J; ++j) {
        if ((j + P - kw * D) % 2 == 0) acc[j] += wr[kw] * v[(j + P - kw * D) / 2 - kFirst];
      }
    }
  }
  T* out = gx + row * g.W + iw0;
#pragma unroll
  for (int j = 0; j < J; ++j) {
    if (iw0 + j < g.W) out[j] = from_acc<T>(acc[j]);
  }
}

// The stacked family's forward: as depthwise_forward_kernel, but the staged tile is the union of the
// T convs' input footprints (origin at the largest padding; conv t starts `padding - padding_of[t]`
// further in), and every thread computes its pixel of all T*M outputs of its plane from it, so the
// input is read once for the whole first stage of a cell's conv candidates.
struct StackWeights {
  const void* ptr[kMaxStackConvs];
};

template <typename T, int K>
__device__ __forceinline__ acc_t<T> tap_sum(const acc_t<T>* src, int in_w, int d, const T* __restrict__ w) {
  acc_t<T> acc = 0;
#pragma unroll
  for (int kh = 0; kh < K; ++kh) {
#pragma unroll
    for (int kw = 0; kw < K; ++kw) acc += to_acc(w[kh * K + kw]) * src[kh * d * in_w + kw * d];
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
depthwise_stack_forward_kernel(const T* __restrict__ x, T* __restrict__ y, DepthwiseStackGeometry g, StackWeights w,
                               int reach, int tiles_x) {
  using Acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char shared_raw[];
  const int s = g.stride;
  const int tw = blockDim.x, th = blockDim.y;
  const int in_w = (tw - 1) * s + reach, in_h = (th - 1) * s + reach;
  const int tile_elems = in_w * in_h;
  Acc* tile = reinterpret_cast<Acc*>(shared_raw) + threadIdx.z * tile_elems;

  const TileSlot slot = tile_slot(g.N * g.C, tiles_x, 1);
  if (slot.live) {
    const T* xp = x + slot.plane * g.H * g.W;
    stage_window(in_w, tile_elems, slot.oh0 * s - g.padding, slot.ow0 * s - g.padding, g.H, g.W,
                 [&](int idx, bool inside, int64_t at) { tile[idx] = inside ? to_acc(xp[at]) : Acc(0); });
  }
  __syncthreads();
  const int oh = slot.oh0 + threadIdx.y, ow = slot.ow0 + threadIdx.x;
  if (!slot.live || oh >= g.Ho || ow >= g.Wo) return;

  const int64_t n = slot.plane / g.C, c = slot.plane - n * g.C;
  const int64_t out_plane = g.Ho * g.Wo;
  // Output channel (t*M + m)*C + c of example n: conv blocks are C planes apart.
  T* out = y + (n * g.T * g.M * g.C + c) * out_plane + int64_t(oh) * g.Wo + ow;
  const Acc* pixel = tile + threadIdx.y * s * in_w + threadIdx.x * s;
  for (int t = 0; t < g.T; ++t) {
    const int K = g.K[t], d = g.dilation[t], shift = g.padding - g.padding_of[t];
    const Acc* src = pixel + shift * in_w + shift;
    const T* wt = static_cast<const T*>(w.ptr[t]) + c * K * K;
    for (int m = 0; m < g.M; ++m) {
      const T* wm = wt + int64_t(m) * g.C * K * K;
      const Acc acc = K == 3 ? tap_sum<T, 3>(src, in_w, d, wm) : tap_sum<T, 5>(src, in_w, d, wm);
      out[(int64_t(t) * g.M + m) * g.C * out_plane] = from_acc<T>(acc);
    }
  }
}

// Calls f(std::integral_constant<int, K>) for the compiled kernel sizes.
template <typename F> cudaError_t dispatch_kernel_size(int K, F&& f) {
  switch (K) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 5: return f(std::integral_constant<int, 5>{});
  }
  return cudaErrorInvalidValue;
}

// Kernels templated on the stride and dilation are compiled for the DARTS ones.
bool compiled_geometry(const DepthwiseGeometry& g) {
  return (g.stride == 1 || g.stride == 2) && (g.dilation == 1 || g.dilation == 2);
}

// compiled(integral_constant S, integral_constant D) at the DARTS strides and dilations, else other().
template <typename Compiled, typename Other>
cudaError_t dispatch_geometry(const DepthwiseGeometry& g, Compiled&& compiled, Other&& other) {
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  if (!compiled_geometry(g)) return other();
  if (g.stride == 1) return g.dilation == 1 ? compiled(One{}, One{}) : compiled(One{}, Two{});
  return g.dilation == 1 ? compiled(Two{}, One{}) : compiled(Two{}, Two{});
}

}  // namespace

bool depthwise_supports_kernel_size(int64_t K) { return K == 3 || K == 5; }

cudaError_t depthwise_forward(DType dtype, const void* x, const void* w, void* y, const DepthwiseGeometry& g,
                              cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_kernel_size(g.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const TileConfig c =
          tile_config(g.N * g.C, g.Ho, g.Wo, g.stride, (K - 1) * g.dilation + 1, sizeof(acc_t<T>), 1, kRowsPerThread);
      const dim3 grid{unsigned(ceil_div(g.N * g.C, c.block.z)), unsigned(c.tiles_x * c.tiles_y)};
      auto launch = [&](auto kernel) {
        kernel<<<grid, c.block, c.shared_bytes, stream>>>(static_cast<const T*>(x), nullptr, static_cast<const T*>(w),
                                                          static_cast<T*>(y), nullptr, g, c.tiles_x);
        return cudaGetLastError();
      };
      return dispatch_geometry(
          g, [&](auto s, auto d) { return launch(depthwise_forward_kernel<T, K, false, s(), d()>); },
          [&] { return launch(depthwise_forward_kernel<T, K, false, 0, 0>); });
    });
  });
}

cudaError_t interval_depthwise(DType dtype, const void* lower, const void* upper, const void* w, void* out_lower,
                               void* out_upper, const DepthwiseGeometry& g, cudaStream_t stream) {
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    return dispatch_kernel_size(g.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const TileConfig c =
          tile_config(g.N * g.C, g.Ho, g.Wo, g.stride, (K - 1) * g.dilation + 1, sizeof(acc_t<T>), 2, kRowsPerThread);
      const dim3 grid{unsigned(ceil_div(g.N * g.C, c.block.z)), unsigned(c.tiles_x * c.tiles_y)};
      auto launch = [&](auto kernel) {
        kernel<<<grid, c.block, c.shared_bytes, stream>>>(static_cast<const T*>(lower), static_cast<const T*>(upper),
                                                          static_cast<const T*>(w), static_cast<T*>(out_lower),
                                                          static_cast<T*>(out_upper), g, c.tiles_x);
        return cudaGetLastError();
      };
      return dispatch_geometry(
          g, [&](auto s, auto d) { return launch(depthwise_forward_kernel<T, K, true, s(), d()>); },
          [&] { return launch(depthwise_forward_kernel<T, K, true, 0, 0>); });
    });
  };
  if (dtype == DType::kFloat32) return launch(float{});
  if (dtype == DType::kFloat64) return launch(double{});
  return cudaErrorInvalidValue;
}

int64_t depthwise_weight_chunks(const DepthwiseGeometry& g) {
  // Enough blocks to fill the GPU (C * chunks of a few hundred), each with ~1k units (outputs, or
  // segments of kSegment outputs), a few per thread: the block's closing K*K reductions cost about
  // as much as a couple of units per thread.
  const int64_t units = g.N * g.Ho * (compiled_geometry(g) ? ceil_div(g.Wo, kSegment) : g.Wo);
  return std::max<int64_t>(1, std::min(ceil_div(units, 1024), ceil_div(2048, std::max<int64_t>(g.C, 1))));
}

cudaError_t depthwise_weight(DType dtype, const void* x, const void* grad_y, void* partial, const DepthwiseGeometry& g,
                             int64_t chunks, cudaStream_t stream) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_kernel_size(g.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const dim3 grid{unsigned(g.C), unsigned(chunks)};
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(grad_y),
                                              static_cast<acc_t<T>*>(partial), g);
        return cudaGetLastError();
      };
      return dispatch_geometry(
          g, [&](auto s, auto d) { return launch(depthwise_weight_segment_kernel<T, K, s(), d()>); },
          [&] { return launch(depthwise_weight_kernel<T, K>); });
    });
  });
}

bool depthwise_transpose_supported(const DepthwiseGeometry& g) {
  return depthwise_supports_kernel_size(g.K) && g.stride == 2 && (g.dilation == 1 || g.dilation == 2);
}

cudaError_t depthwise_transpose(DType dtype, const void* grad_y, const void* w, void* grad_x,
                                const DepthwiseGeometry& g, cudaStream_t stream) {
  if (!depthwise_transpose_supported(g)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_kernel_size(g.K, [&](auto k) {
      constexpr int K = decltype(k)::value;
      const int64_t segments = g.N * g.C * g.H * ceil_div(g.W, kSegment);
      const dim3 grid{unsigned(ceil_div(segments, kThreads))};
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(grad_y), static_cast<const T*>(w),
                                              static_cast<T*>(grad_x), g);
        return cudaGetLastError();
      };
      const bool odd = g.padding % 2 != 0;
      if (g.dilation == 1) {
        return odd ? launch(depthwise_transpose_s2_kernel<T, K, 1, 1>) : launch(depthwise_transpose_s2_kernel<T, K, 1, 0>);
      }
      return odd ? launch(depthwise_transpose_s2_kernel<T, K, 2, 1>) : launch(depthwise_transpose_s2_kernel<T, K, 2, 0>);
    });
  });
}

cudaError_t depthwise_stack_forward(DType dtype, const void* x, const void* const* weights, void* y,
                                    const DepthwiseStackGeometry& g, cudaStream_t stream) {
  if (g.T < 1 || g.T > kMaxStackConvs) return cudaErrorInvalidValue;
  StackWeights w{};
  int reach = 0;  // the union footprint of one output pixel, per axis
  for (int t = 0; t < g.T; ++t) {
    if (!depthwise_supports_kernel_size(g.K[t]) || g.padding_of[t] > g.padding) return cudaErrorInvalidValue;
    w.ptr[t] = weights[t];
    reach = std::max(reach, g.padding - g.padding_of[t] + (g.K[t] - 1) * g.dilation[t] + 1);
  }
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const TileConfig c = tile_config(g.N * g.C, g.Ho, g.Wo, g.stride, reach, sizeof(acc_t<T>), 1, 1);
    const dim3 grid{unsigned(ceil_div(g.N * g.C, c.block.z)), unsigned(c.tiles_x * c.tiles_y)};
    depthwise_stack_forward_kernel<T><<<grid, c.block, c.shared_bytes, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(y), g, w, reach, c.tiles_x);
    return cudaGetLastError();
  });
}

}  // namespace dsrna::gpu

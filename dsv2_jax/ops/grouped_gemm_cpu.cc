// Grouped GEMMs for XLA:CPU (custom calls through the XLA FFI; built and registered by grouped_gemm_cpu.py).
//
// Rows arrive sorted by group (expert): group g owns rows [start_g, start_g + sizes[g]), start_g = Σ_{h<g} sizes[h].
// Each call walks the groups once and runs one register-blocked GEMM per group, so its cost is the active rows'
// FLOPs plus O(E) integers: no padding to tiles and none of a loop step's per-op dispatch in XLA:CPU, which is
// what made the blocked XLA loop's cost grow with the expert count (docs/benchmarks.md). fp32 only; the Python
// side casts. Rows past Σ sizes belong to no group and come out zero.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Mat = ffi::BufferR2<ffi::F32>;    // rows × columns
using Stack = ffi::BufferR3<ffi::F32>;  // one matrix per group
using Sizes = ffi::BufferR1<ffi::S32>;  // rows per group

namespace {

constexpr int64_t kMR = 6;     // rows of C per micro-tile: 6 × 2 accumulators + 2 B vectors fit 16 AVX registers
constexpr int64_t kLanes = 8;  // floats per vector: one AVX register (two SSE ones)
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(v)); return v; }

// C[r, :V·8] = Σ_p A(r, p) · B[p, :V·8] for r < M, p < depth, where A(r, p) = a[r·ars + p·aps]: the accumulators
// stay in registers for the whole depth.
template <int64_t M, int64_t V>
inline void Micro(int64_t depth, const float* a, int64_t ars, int64_t aps, const float* b, int64_t ldb,
                  float* c, int64_t ldc) {
  Vec acc[M][V] = {};
  for (int64_t p = 0; p < depth; ++p) {
    Vec bv[V];
    for (int64_t v = 0; v < V; ++v) bv[v] = Load(b + p * ldb + v * kLanes);
    for (int64_t r = 0; r < M; ++r) {
      const float av = a[r * ars + p * aps];
      for (int64_t v = 0; v < V; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int64_t r = 0; r < M; ++r) std::memcpy(c + r * ldc, acc[r], V * kLanes * sizeof(float));
}

// The last < 8 columns, scalar.
inline void MicroEdge(int64_t m, int64_t nc, int64_t depth, const float* a, int64_t ars, int64_t aps,
                      const float* b, int64_t ldb, float* c, int64_t ldc) {
  for (int64_t r = 0; r < m; ++r) {
    float acc[kLanes] = {};
    for (int64_t p = 0; p < depth; ++p)
      for (int64_t n = 0; n < nc; ++n) acc[n] += a[r * ars + p * aps] * b[p * ldb + n];
    std::memcpy(c + r * ldc, acc, nc * sizeof(float));
  }
}

// One column panel of V vectors over all m rows, kMR rows at a time.
template <int64_t V>
void Panel(int64_t m, int64_t depth, const float* a, int64_t ars, int64_t aps, const float* b, int64_t ldb,
           float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + kMR <= m; i += kMR) Micro<kMR, V>(depth, a + i * ars, ars, aps, b, ldb, c + i * ldc, ldc);
  const float* ai = a + i * ars;
  float* ci = c + i * ldc;
  switch (m - i) {
    case 5: Micro<5, V>(depth, ai, ars, aps, b, ldb, ci, ldc); break;
    case 4: Micro<4, V>(depth, ai, ars, aps, b, ldb, ci, ldc); break;
    case 3: Micro<3, V>(depth, ai, ars, aps, b, ldb, ci, ldc); break;
    case 2: Micro<2, V>(depth, ai, ars, aps, b, ldb, ci, ldc); break;
    case 1: Micro<1, V>(depth, ai, ars, aps, b, ldb, ci, ldc); break;
    default: break;
  }
}

// C [m, n] (row stride ldc) = A [m, depth] (element strides ars, aps) · B [depth, n] (row stride ldb).
void Gemm(int64_t m, int64_t n, int64_t depth, const float* a, int64_t ars, int64_t aps, const float* b,
          int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + 2 * kLanes <= n; j += 2 * kLanes) Panel<2>(m, depth, a, ars, aps, b + j, ldb, c + j, ldc);
  if (j + kLanes <= n) {
    Panel<1>(m, depth, a, ars, aps, b + j, ldb, c + j, ldc);
    j += kLanes;
  }
  if (j < n) MicroEdge(m, n - j, depth, a, ars, aps, b + j, ldb, c + j, ldc);
}

// Calls f(g, start, rows) for each group g with rows > 0, clamped to m rows; returns the rows covered.
template <typename F>
int64_t ForEachGroup(const Sizes& sizes, int64_t m, F f) {
  const int32_t* n = sizes.typed_data();
  int64_t start = 0;
  for (int64_t g = 0; g < static_cast<int64_t>(sizes.element_count()) && start < m; ++g) {
    const int64_t rows = std::min<int64_t>(std::max<int32_t>(n[g], 0), m - start);
    if (rows > 0) f(g, start, rows);
    start += rows;
  }
  return start;
}

// out [M, cols] = lhs [M, depth] · B_g per group g, where B_g is rhs[g] [K, N] (the forward: depth K, cols N)
// or, with kTransposeRhs, rhs[g]ᵀ (the gradient with respect to lhs: depth N, cols K).
template <bool kTransposeRhs>
ffi::Error GroupedGemm(Mat lhs, Stack rhs, Sizes sizes, ffi::Result<Mat> out) {
  const int64_t m = lhs.dimensions()[0], depth = lhs.dimensions()[1];
  const int64_t k = rhs.dimensions()[1], n = rhs.dimensions()[2], cols = kTransposeRhs ? k : n;
  const float* x = lhs.typed_data();
  const float* w = rhs.typed_data();
  float* y = out->typed_data();
  std::vector<float> wt(kTransposeRhs ? static_cast<size_t>(n * k) : 0);  // rhs[g]ᵀ: B rows stay contiguous
  const int64_t end = ForEachGroup(sizes, m, [&](int64_t g, int64_t start, int64_t rows) {
    const float* b = w + g * k * n;
    if constexpr (kTransposeRhs) {
      for (int64_t i = 0; i < k; ++i)
        for (int64_t j = 0; j < n; ++j) wt[j * k + i] = b[i * n + j];
      b = wt.data();
    }
    Gemm(rows, cols, depth, x + start * depth, depth, 1, b, cols, y + start * cols, cols);
  });
  std::fill(y + end * cols, y + m * cols, 0.0f);
  return ffi::Error::Success();
}

// out [E, K, N] = lhs[group g]ᵀ · dy[group g] per group (the gradient with respect to rhs); empty groups zero.
ffi::Error GroupedOuter(Mat lhs, Mat dy, Sizes sizes, ffi::Result<Stack> out) {
  const int64_t m = lhs.dimensions()[0], k = lhs.dimensions()[1], n = dy.dimensions()[1];
  const float* x = lhs.typed_data();
  const float* d = dy.typed_data();
  float* w = out->typed_data();
  std::fill(w, w + out->element_count(), 0.0f);
  ForEachGroup(sizes, m, [&](int64_t g, int64_t start, int64_t rows) {
    // A(r, p) = x[start + p, r]: the group's rows are the contraction.
    Gemm(k, n, rows, x + start * k, 1, k, d + start * n, n, w + g * k * n, n);
  });
  return ffi::Error::Success();
}

// Each handler takes (two fp32 arrays, the int32 group sizes) and returns one fp32 array; XLA checks the ranks.
template <typename A, typename B, typename R>
auto Binding() {
  return ffi::Ffi::Bind().Arg<A>().template Arg<B>().template Arg<Sizes>().template Ret<R>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DsvGroupedGemm, GroupedGemm<false>, (Binding<Mat, Stack, Mat>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsvGroupedGemmTransposed, GroupedGemm<true>, (Binding<Mat, Stack, Mat>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DsvGroupedOuter, GroupedOuter, (Binding<Mat, Mat, Stack>()));

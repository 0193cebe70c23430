// Permutohedral-lattice bilateral filter: per-element kernel bodies shared by the CPU and CUDA launchers.
// Each kernel is a functor with `HOST_DEVICE void operator()(int64_t i) const`; lattice_cpu.cpp runs it in a
// parallel loop over elements (or a plain loop, one image per thread), lattice_cuda.cu as a CUDA grid. CPU
// tests therefore execute exactly the code the GPU runs.
//
// Conventions (shared/spec/regloss.md; Adams et al. 2010 with Kraehenbuehl's dense-CRF constants):
// d = 5 features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) scaled by sqrt(2/3)(d+1) and per-axis
// 1/sqrt((i+1)(i+2)); splat to the d+1 simplex vertices with barycentric weights; blur along each of
// the d+1 lattice axes v <- v + 0.5 (v_left + v_right); slice with the same weights times
// alpha = 1 / (1 + 2^-d). The pixel's own contribution is kept.
//
// The feature dimension d is a template parameter D of every body that depends on it (the regularized loss uses
// d = 5 on image features; the dense CRF d = 2 and d = 5 on features given as a tensor). kD = 5 names the loss's.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#define LOCBE_INLINE __forceinline__
#else
#define HOST_DEVICE
#define LOCBE_INLINE inline __attribute__((always_inline))
#endif

namespace locbe {

constexpr int kD = 5;        // feature dimensions of the regularized loss's lattice (x, y, r, g, b)
constexpr int kV = kD + 1;   // its simplex vertices per pixel
constexpr int kEmpty = -1;   // empty hash slot
constexpr int kMaxD = 5;     // the largest feature dimension compiled (packed CPU keys hold 5 x 12 bits)

// ---------------------------------------------------------------------------- atomics
HOST_DEVICE inline int atomic_cas(int* addr, int expected, int desired) {
#ifdef __CUDA_ARCH__
  return atomicCAS(addr, expected, desired);
#else
  __atomic_compare_exchange_n(addr, &expected, desired, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  return expected;  // the value found: == the original expected on success
#endif
}

HOST_DEVICE inline int atomic_load(const int* addr) {
#ifdef __CUDA_ARCH__
  return *((volatile const int*)addr);
#else
  return __atomic_load_n(addr, __ATOMIC_ACQUIRE);
#endif
}

template <typename T>
HOST_DEVICE inline void atomic_add(T* addr, T v) {
#ifdef __CUDA_ARCH__
  atomicAdd(addr, v);
#else
#pragma omp atomic update
  *addr += v;
#endif
}

// ---------------------------------------------------------------------------- hashing
template <int D>
HOST_DEVICE inline uint32_t hash_key(const int16_t* key) {
  uint32_t h = 0;
  for (int i = 0; i < D; ++i) {
    h += static_cast<uint32_t>(static_cast<int32_t>(key[i]));
    h *= 2531011u;
  }
  return h;
}

template <int D>
HOST_DEVICE inline bool keys_equal(const int16_t* a, const int16_t* b) {
  for (int i = 0; i < D; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// Compact per-pixel key data: the d+1 simplex vertices of a pixel are rem0 + a canonical offset that depends
// on the coordinate's rank only, so a pixel stores rem0 (D int16) and the ranks (D x 3 bits in one int16)
// instead of (d+1) x D keys: 12 bytes per pixel instead of 60 at d = 5. A pixel's key data are D + 1 int16.
template <int D>
HOST_DEVICE inline void entry_key(const int16_t* pixel_keys, int64_t e, int16_t* key) {
  const int16_t* p = pixel_keys + (e / (D + 1)) * (D + 1);
  const int r = static_cast<int>(e % (D + 1));
  const int ranks = static_cast<uint16_t>(p[D]);
  for (int j = 0; j < D; ++j) {
    const int rank = (ranks >> (3 * j)) & 7;  // canonical simplex vertex r: +r where rank <= d-r, else r-(d+1)
    key[j] = static_cast<int16_t>(p[j] + ((rank <= D - r) ? r : r - (D + 1)));
  }
}

// After CompactKernel occupied slots hold lattice indices and point_keys[l] is point l's key. Returns the
// lattice index of `key`, or -1 when it is not a lattice point.
template <int D>
HOST_DEVICE inline int64_t find_point(const int* table, int64_t mask, const int16_t* point_keys, const int16_t* key) {
  int64_t s = hash_key<D>(key) & mask;
  while (true) {
    const int l = table[s];
    if (l == kEmpty) return -1;
    if (keys_equal<D>(point_keys + static_cast<int64_t>(l) * D, key)) return l;
    s = (s + 1) & mask;
  }
}

// One lane of the elevation: float and int, the GPU's and the parallel CPU kernels' types. The CPU whole-image
// schedule runs the same function on several pixels at once with vector lanes (lattice_serial.h), so every
// schedule computes the same floats from one source. A lane type names F (float lanes), I (int lanes), M (the
// result of comparing F or I lanes) and four operations on them.
struct OneLane {
  using F = float;
  using I = int;
  using M = bool;
  static HOST_DEVICE LOCBE_INLINE I ones(M m) { return m ? 1 : 0; }  // 1 where m holds, else 0
  static HOST_DEVICE LOCBE_INLINE F pick(M m, F a, F b) { return m ? a : b; }
  static HOST_DEVICE LOCBE_INLINE I trunc(F x) { return static_cast<int>(x); }
  static HOST_DEVICE LOCBE_INLINE F to_float(I x) { return static_cast<float>(x); }
};

// ---------------------------------------------------------------------------- 1. elevate
// One point (or one point per lane): the remainder-0 vertex rem0 (multiples of D+1), the ranks (a permutation of
// 0..D) and the d+1 barycentric weights (the math of Kraehenbuehl's permutohedral.cpp), without branches: the
// comparisons are unpredictable, and lanes need the same instructions.
// - roundf(x) for |x| < 2^23 without a libm call (baseline x86-64 has no rounding instruction): x - trunc(x) is
//   exact, so comparing it with +-0.5 decides exactly as roundf does (halves away from zero).
// - The weights: permutohedral.cpp adds v_j to b[D - rank_j] and subtracts it from b[D - rank_j + 1], j in order.
//   Each b[r], 0 < r <= D, gets one addition, a (the v of rank D - r), and one subtraction, c (rank D - r + 1), in
//   an order that depends on the ranks; (0 + a) - c and (0 - c) + a are the same float for every finite a and c
//   (signed zeros included), so picking a and c by rank gives its floats bit for bit.
template <int D, class L = OneLane>
HOST_DEVICE LOCBE_INLINE void elevate_point(const typename L::F* f, typename L::I* rem0, typename L::I* rank,
                                            typename L::F* bary) {
  using F = typename L::F;
  using I = typename L::I;
  const float inv_std = sqrtf(2.0f / 3.0f) * (D + 1);
  F elevated[D + 1];
  F sm{};
  for (int j = D; j > 0; --j) {
    const F cf = f[j - 1] * (1.0f / sqrtf(static_cast<float>((j + 1) * j)) * inv_std);
    elevated[j] = sm - static_cast<float>(j) * cf;
    sm += cf;
  }
  elevated[0] = sm;

  const float down = 1.0f / (D + 1);
  const float up = static_cast<float>(D + 1);
  I sum{};
  for (int j = 0; j <= D; ++j) {
    const F x = down * elevated[j];
    I rd = L::trunc(x);
    const F frac = x - L::to_float(rd);
    rd += L::ones(frac >= 0.5f) - L::ones(frac <= -0.5f);
    rem0[j] = L::trunc(L::to_float(rd) * up);
    sum += rd;
    rank[j] = I{};
  }
  F diff[D + 1];
  for (int j = 0; j <= D; ++j) diff[j] = elevated[j] - L::to_float(rem0[j]);
  for (int a = 0; a < D; ++a) {
    for (int b = a + 1; b <= D; ++b) {
      const I lt = L::ones(diff[a] < diff[b]);
      rank[a] += lt;
      rank[b] += 1 - lt;
    }
  }
  for (int j = 0; j <= D; ++j) {  // ranks outside 0..D wrap, and rem0 moves with them
    rank[j] += sum;
    const I shift = (L::ones(rank[j] < 0) - L::ones(rank[j] > D)) * (D + 1);
    rank[j] += shift;
    rem0[j] += shift;
  }
  F v[D + 1], by_rank[D + 1];  // by_rank[r]: the v of the coordinate whose rank is D - r
  for (int j = 0; j <= D; ++j) v[j] = (elevated[j] - L::to_float(rem0[j])) * down;
  for (int r = 0; r <= D; ++r) {
    F pick{};
    for (int j = 0; j <= D; ++j) pick = L::pick(rank[j] == D - r, v[j], pick);
    by_rank[r] = pick;
  }
  for (int r = 1; r <= D; ++r) bary[r] = (0.0f + by_rank[r]) - by_rank[r - 1];
  bary[0] = (0.0f + by_rank[0]) + (1.0f + (0.0f - by_rank[D]));
}

// Feature sources of the elevation: the loss's five image features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) computed
// from the image, or D features per pixel read from an (N, D) tensor (the dense CRF's, divided by their sigmas).
struct ImageFeatures {
  const float* image;  // (3, N) channel-first, 0..255
  int64_t n, width;
  float inv_sxy, inv_srgb;
  // pixel i at column x, row y
  HOST_DEVICE void at(int64_t i, int64_t x, int64_t y, float* f) const {
    f[0] = static_cast<float>(x) * inv_sxy;
    f[1] = static_cast<float>(y) * inv_sxy;
    for (int c = 0; c < 3; ++c) f[2 + c] = image[c * n + i] * inv_srgb;
  }
  HOST_DEVICE void operator()(int64_t i, float* f) const { at(i, i % width, i / width, f); }
  // Pixels i0 .. i0 + count - 1 feature by feature (feature j of pixel i0 + p at out[j * stride + p]); for the CPU
  // whole-image schedule, which walks the pixels in order (no division per pixel).
  void gather(int64_t i0, int64_t count, float* out, int64_t stride) const {
    int64_t y = i0 / width, x = i0 - y * width;
    for (int64_t p = 0; p < count; ++p) {
      float f[kD];
      at(i0 + p, x, y, f);
      for (int j = 0; j < kD; ++j) out[j * stride + p] = f[j];
      if (++x == width) {
        x = 0;
        ++y;
      }
    }
  }
};

template <int D>
struct TensorFeatures {
  const float* features;  // (N, D)
  HOST_DEVICE void operator()(int64_t i, float* f) const {
    for (int j = 0; j < D; ++j) f[j] = features[i * D + j];
  }
  void gather(int64_t i0, int64_t count, float* out, int64_t stride) const {
    for (int64_t p = 0; p < count; ++p)
      for (int j = 0; j < D; ++j) out[j * stride + p] = features[(i0 + p) * D + j];
  }
};

// One pixel: its compact key data and d+1 barycentric weights.
template <int D, typename scalar_t, class Features>
struct ElevateKernel {
  Features feat;
  int16_t* pixel_keys;  // (N, D + 1)
  scalar_t* weights;    // (N * (D + 1))

  HOST_DEVICE void operator()(int64_t i) const {
    float f[D];
    feat(i, f);
    int rem0[D + 1], rank[D + 1];
    float bary[D + 1];
    elevate_point<D>(f, rem0, rank, bary);

    int16_t* p = pixel_keys + i * (D + 1);
    int ranks = 0;
    for (int j = 0; j < D; ++j) {
      p[j] = static_cast<int16_t>(rem0[j]);
      ranks |= rank[j] << (3 * j);
    }
    p[D] = static_cast<int16_t>(static_cast<uint16_t>(ranks));
    for (int r = 0; r <= D; ++r) weights[i * (D + 1) + r] = static_cast<scalar_t>(bary[r]);
  }
};

// ---------------------------------------------------------------------------- 2. insert
// One pixel, its d+1 entries (pixel, vertex): claim a slot for each key with an atomic compare-and-swap (a slot
// keeps the first entry id that claimed it). The CPU whole-image schedule has its own serial table
// (lattice_serial.h).
template <int D>
struct InsertKernel {
  int* table;
  int64_t mask;
  const int16_t* pixel_keys;
  int32_t* entry_lattice;  // (N * kV) receives the slot; EntryLatticeKernel turns it into the lattice index

  HOST_DEVICE void operator()(int64_t pixel) const {
    const int64_t e0 = pixel * (D + 1);
    int16_t key[D], other[D];
    for (int r = 0; r <= D; ++r) {
      const int64_t e = e0 + r;
      entry_key<D>(pixel_keys, e, key);
      int64_t s = hash_key<D>(key) & mask;
      while (true) {
        const int found = atomic_cas(table + s, kEmpty, static_cast<int>(e));
        if (found == kEmpty) break;
        entry_key<D>(pixel_keys, found, other);
        if (keys_equal<D>(other, key)) break;
        s = (s + 1) & mask;
      }
      entry_lattice[e] = static_cast<int32_t>(s);
    }
  }
};

// ---------------------------------------------------------------------------- 3. compact
// One slot: occupied slots get their lattice index (occupied slots in slot order) and the point's key.
template <int D>
struct CompactKernel {
  int* table;
  const int32_t* slot_index;  // inclusive prefix count of occupied slots
  const int16_t* pixel_keys;
  int16_t* point_keys;        // (M, D)

  HOST_DEVICE void operator()(int64_t s) const {
    const int e = table[s];
    if (e == kEmpty) return;
    const int32_t l = slot_index[s] - 1;
    entry_key<D>(pixel_keys, e, point_keys + static_cast<int64_t>(l) * D);
    table[s] = l;
  }
};

// One entry: slot -> lattice index.
struct EntryLatticeKernel {
  const int* table;
  int32_t* entry_lattice;

  HOST_DEVICE void operator()(int64_t e) const { entry_lattice[e] = table[entry_lattice[e]]; }
};

// ---------------------------------------------------------------------------- 4. splat
// Scatter, one pixel: its K values go to its d+1 lattice points with atomic adds (the CUDA default; the order of
// float additions is not fixed).
template <int D, typename scalar_t>
struct SplatScatterKernel {
  const scalar_t* values_in;  // one image: value (c, pixel) at c * cs + pixel * ps ((K, N): cs = N, ps = 1)
  const scalar_t* weights;
  const int32_t* entry_lattice;
  int64_t cs, k;
  scalar_t* lattice;  // (M + 1, K)
  int64_t ps = 1;

  HOST_DEVICE void operator()(int64_t pixel) const {
    scalar_t w[D + 1];
    int64_t row[D + 1];
    for (int r = 0; r <= D; ++r) {
      w[r] = weights[pixel * (D + 1) + r];
      row[r] = static_cast<int64_t>(entry_lattice[pixel * (D + 1) + r]) * k;
    }
    for (int64_t c = 0; c < k; ++c) {
      const scalar_t v = values_in[c * cs + pixel * ps];
      for (int r = 0; r <= D; ++r) atomic_add(lattice + row[r] + c, w[r] * v);
    }
  }
};

// Gather in entry order (deterministic in parallel): entries sorted by lattice index, stable in entry id.
template <int D, typename scalar_t>
struct SplatGatherKernel {
  const scalar_t* values_in;
  const scalar_t* weights;
  const int64_t* sorted_entries;  // entries ordered by (lattice index, entry id)
  const int64_t* segment_end;     // inclusive cumsum of entry counts per lattice point
  int64_t cs, k;  // value (c, pixel) at c * cs + pixel * ps
  scalar_t* lattice;
  int64_t ps = 1;

  HOST_DEVICE void operator()(int64_t idx) const {  // idx = l * K + c
    int64_t l = idx / k, c = idx % k;
    int64_t begin = l == 0 ? 0 : segment_end[l - 1];
    scalar_t acc = 0;
    for (int64_t t = begin; t < segment_end[l]; ++t) {
      int64_t e = sorted_entries[t];
      acc += weights[e] * values_in[c * cs + (e / (D + 1)) * ps];
    }
    lattice[idx] = acc;
  }
};

// ---------------------------------------------------------------------------- 5. blur
// Neighbours along `axis`, looked up in the hash table once per image: (d+1) x M x 2 indices, missing = M.
template <int D>
struct NeighbourKernel {
  const int* table;
  int64_t mask;
  const int16_t* point_keys;
  int64_t m;
  int32_t* neighbours;  // (D + 1, M, 2)

  HOST_DEVICE void operator()(int64_t idx) const {  // idx = axis * M + l
    const int axis = static_cast<int>(idx / m);
    const int64_t l = idx % m;
    const int16_t* key = point_keys + l * D;
    int16_t n1[D], n2[D];
    for (int t = 0; t < D; ++t) {
      n1[t] = static_cast<int16_t>(key[t] - 1);
      n2[t] = static_cast<int16_t>(key[t] + 1);
    }
    if (axis < D) {
      n1[axis] = static_cast<int16_t>(key[axis] + D);
      n2[axis] = static_cast<int16_t>(key[axis] - D);
    }
    const int64_t p1 = find_point<D>(table, mask, point_keys, n1);
    const int64_t p2 = find_point<D>(table, mask, point_keys, n2);
    neighbours[2 * idx] = static_cast<int32_t>(p1 < 0 ? m : p1);
    neighbours[2 * idx + 1] = static_cast<int32_t>(p2 < 0 ? m : p2);
  }
};

// One lattice point, all channels of the chunk, along one axis: v <- v + 0.5 (v_left + v_right) from the
// pre-axis values. Missing neighbours are row M, which is zero.
template <typename scalar_t>
struct BlurKernel {
  const scalar_t* src;  // (M + 1, K)
  scalar_t* dst;
  const int32_t* neighbours;  // (M, 2) of this axis
  int64_t k;

  HOST_DEVICE LOCBE_INLINE void operator()(int64_t l) const {
    const scalar_t* left = src + static_cast<int64_t>(neighbours[2 * l]) * k;
    const scalar_t* right = src + static_cast<int64_t>(neighbours[2 * l + 1]) * k;
    const scalar_t* mid = src + l * k;
    scalar_t* o = dst + l * k;
    for (int64_t c = 0; c < k; ++c) o[c] = mid[c] + static_cast<scalar_t>(0.5) * (left[c] + right[c]);
  }
};

// ---------------------------------------------------------------------------- 6. slice
// One pixel, all channels of the chunk: rows of the lattice are contiguous in the channel.
template <int D, typename scalar_t>
struct SliceKernel {
  const scalar_t* lattice;
  const scalar_t* weights;
  const int32_t* entry_lattice;
  int64_t cs, k;
  scalar_t alpha;
  scalar_t* out;  // output (c, pixel) at c * cs + pixel * ps, as the values
  int64_t ps = 1;

  HOST_DEVICE void operator()(int64_t pixel) const {
    scalar_t w[D + 1];
    const scalar_t* row[D + 1];
    for (int r = 0; r <= D; ++r) {
      w[r] = weights[pixel * (D + 1) + r];
      row[r] = lattice + static_cast<int64_t>(entry_lattice[pixel * (D + 1) + r]) * k;
    }
    for (int64_t c = 0; c < k; ++c) {
      scalar_t acc = 0;
      for (int r = 0; r <= D; ++r) acc += w[r] * row[r][c];
      out[c * cs + pixel * ps] = alpha * acc;
    }
  }
};

}  // namespace locbe

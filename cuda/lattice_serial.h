// The CPU whole-image schedule: one thread filters one image from start to end (lattice_filter.h runs the batch as
// one parallel region, an image per thread). Nothing is shared between threads, so this path can do what the
// parallel kernels cannot:
// - elevation and lattice insertion fused in one pass over the pixels, into a growable hash table sized by the
//   lattice (thousands of points, in cache) rather than by a bound on it (hundreds of thousands of slots);
// - lattice keys packed in one uint64 (`pack` below), so hashing, comparing and stepping to a neighbour are a few
//   integer operations;
// - splat and slice over pixel tiles transposed to channel-contiguous rows, so the inner loops over channels run
//   on contiguous memory (the compiler vectorises them) while S stays (K, N);
// - a thread-local workspace that keeps its pages between calls (a page fault costs about as much here as the
//   arithmetic on the page).
// The build (build_image_whole: features -> barycentric weights, entry-to-point map, blur neighbours) and the
// application (apply_image_whole: splat / blur / slice of K channels) are separate, so that a lattice built once
// can be applied many times (the ops lattice_build / lattice_apply, the dense CRF); filter_image_whole is the two.
// Its results equal the parallel schedule's bitwise: every lattice point adds its contributions in pixel order,
// and the slice adds the d+1 rows in vertex order, as SplatGatherKernel and SliceKernel do.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "lattice_kernels.h"

namespace locbe {

// LOCBE_LATTICE_PROFILE=1: per-stage CPU times (this thread's, so other processes' load does not count) of each
// image filtered by the whole-image schedule, on stderr (docs/regloss.md)
struct StageClock {
  bool on;
  const char* isa = "";  // the instruction set the schedule ran with (set by build/apply_image_whole)
  double t = 0;
  char buf[512];
  int len = 0;
  static double now_ms() {
#ifdef __linux__
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
#else
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
#endif
  }
  explicit StageClock(bool enabled) : on(enabled) {
    if (on) t = now_ms();
  }
  void mark(const char* stage) {
    if (!on) return;
    const double now = now_ms();
    append(" %s %.2f", stage, now - t);
    t = now;
  }
  // printf into the line; a long line (many channel chunks) is cut, never written past the buffer
  template <class... Args>
  void append(const char* format, Args... args) {
    if (!on || len >= static_cast<int>(sizeof(buf)) - 1) return;
    len += std::snprintf(buf + len, sizeof(buf) - len, format, args...);
    len = std::min(len, static_cast<int>(sizeof(buf)) - 1);
  }
  ~StageClock() {  // on one line, the instruction set last
    if (on) std::fprintf(stderr, "lattice stages (ms):%s%s%s\n", buf, isa[0] ? " | isa " : "", isa);
  }
};

inline bool profile_stages() {
  static const bool on = [] {
    const char* v = std::getenv("LOCBE_LATTICE_PROFILE");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

// A large output that the allocator maps fresh (glibc maps blocks of 32 MiB and more on every call, e.g. K=81 at
// 224x224 and B=2) costs a page fault and a zeroed 4 KiB page per 4 KiB written, about as much as the slice itself.
// Asking for transparent huge pages on the whole 2 MiB regions inside it turns ~500 faults per region into one
// (where THP is enabled in "madvise" or "always" mode; elsewhere madvise does nothing). Memory already in use is
// not affected. Advisory only: results do not depend on it. Outputs under 4 MiB are left alone.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  if (bytes < 2 * static_cast<int64_t>(kHuge)) return;  // small outputs: the heap's reused pages
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

namespace serial {

// ---------------------------------------------------------------------------- packed keys
// All D coordinates of a lattice point are congruent to one remainder r (mod D+1): key[j] = (D+1) q_j + r. A key
// is packed as r in bits 0-2 and q_j + kBias in 12 bits each (bits 3-62 at D = 5). Moving to a vertex or a
// neighbour changes every q_j by at most 2, so |q_j| <= kMaxQ keeps every field inside its 12 bits:
// |rem0| <= (D+1) kMaxQ, i.e. features up to ~1380 at D = 5 (MAX_FEATURE = 1300 in locbe/lattice/checks.py).
// Larger inputs raise.
constexpr int kBits = 12;
constexpr int64_t kBias = int64_t{1} << (kBits - 1);
constexpr int kMaxQ = kBias - 3;
constexpr uint64_t field(int j) { return uint64_t{1} << (3 + kBits * j); }
template <int D>
constexpr uint64_t all_fields() {
  uint64_t s = 0;
  for (int j = 0; j < D; ++j) s += field(j);
  return s;
}
constexpr uint64_t kNoKey = ~uint64_t{0};
static_assert(3 + kBits * kMaxD <= 64, "packed keys: D fields of kBits and 3 bits of remainder");

// The left neighbour of point p along lattice axis `axis` (the key data of NeighbourKernel: every coordinate -1,
// the axis's +D), on packed keys; the right neighbour is the inverse step, so a point is its left neighbour's
// right neighbour.
template <int D>
inline uint64_t left_neighbour(uint64_t p, int axis) {
  const uint64_t ua = axis < D ? field(axis) : 0;
  return (p & 7) >= 1 ? p - 1 + ua : p + D - (all_fields<D>() - ua);
}

// ---------------------------------------------------------------------------- workspace
// Buffers grow and never shrink: a thread filtering image after image reuses pages that are already mapped. Held
// per thread for the life of the process: 48-96 bytes per pixel of the largest image filtered, plus about 76 bytes
// per lattice point (the peak of a cold call, output included, is measured in benchmarks/test_bench_regloss.py).
// `shared` holds the hash table while the lattice is built and its neighbours found, then the lattice values.
struct Workspace {
  std::vector<unsigned char> weights, entries, shared, neighbours, tile;
  std::vector<uint64_t> points;
  int64_t last_capacity = 0;

  // The contents are not kept when a buffer grows: the old one is freed before the new one is made, so growing
  // never holds both.
  template <typename T>
  static T* take(std::vector<unsigned char>& v, int64_t count) {
    const size_t bytes = static_cast<size_t>(count) * sizeof(T);
    if (v.size() < bytes) {
      std::vector<unsigned char>().swap(v);
      v.resize(bytes);
    }
    return reinterpret_cast<T*>(v.data());
  }
};

// `static`: each library (and each source file) that includes this header has its own workspaces. An inline
// function's thread_local would be one object per process (a GNU unique symbol), shared with any other build of
// this library loaded beside it (a benchmark's baseline, another checkout), whose Workspace may differ.
static Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

// ---------------------------------------------------------------------------- hash table
// Open addressing, linear probing, at most half full; grows by rehashing the point list (the points are numbered
// in insertion order, so the table holds nothing else).
class PointTable {
 public:
  PointTable(Workspace& ws, int64_t capacity) : ws_(ws) { reset(capacity); }

  LOCBE_INLINE int32_t find(uint64_t key) const {
    const uint64_t s = probe(key);
    return keys_[s] == key ? index_[s] : -1;
  }

  LOCBE_INLINE int32_t find_or_add(uint64_t key) {
    const uint64_t s = probe(key);
    if (keys_[s] == key) return index_[s];
    const int32_t l = static_cast<int32_t>(size_);
    if (static_cast<int64_t>(ws_.points.size()) <= size_) ws_.points.resize(2 * size_ + 1024);
    ws_.points[size_++] = key;
    if (2 * size_ > capacity_) {
      reset(2 * capacity_);  // reinserts every point, this one included
    } else {
      keys_[s] = key;
      index_[s] = l;
    }
    return l;
  }

  int64_t size() const { return size_; }
  int64_t capacity() const { return capacity_; }
  const uint64_t* points() const { return ws_.points.data(); }

 private:
  // the slot holding `key`, or the empty slot where it belongs
  LOCBE_INLINE uint64_t probe(uint64_t key) const {
    uint64_t s = (key * 0x9E3779B97F4A7C15ull) >> shift_;
    while (keys_[s] != key && keys_[s] != kNoKey) s = (s + 1) & mask_;
    return s;
  }

  void reset(int64_t capacity) {
    capacity_ = capacity;
    mask_ = static_cast<uint64_t>(capacity - 1);
    shift_ = 64;
    for (int64_t c = capacity; c > 1; c >>= 1) --shift_;
    keys_ = Workspace::take<uint64_t>(ws_.shared, capacity * (sizeof(uint64_t) + sizeof(int32_t)) / sizeof(uint64_t));
    index_ = reinterpret_cast<int32_t*>(keys_ + capacity);
    std::fill(keys_, keys_ + capacity, kNoKey);
    for (int64_t l = 0; l < size_; ++l) {
      const uint64_t s = probe(ws_.points[l]);  // points are distinct: an empty slot
      keys_[s] = ws_.points[l];
      index_[s] = static_cast<int32_t>(l);
    }
  }

  Workspace& ws_;
  uint64_t* keys_ = nullptr;
  int32_t* index_ = nullptr;
  int64_t size_ = 0, capacity_ = 0;
  uint64_t mask_ = 0;
  int shift_ = 64;
};

// ---------------------------------------------------------------------------- vectors and instruction sets
// The schedule's inner loops are written on GCC vector types: elevate_point on several pixels per call (lanes of
// float and int) and the splat / slice on vectors of a pixel's channels. It is compiled for two instruction sets
// (run_best_isa below): Baseline, vectors of 16 bytes (SSE2, every x86-64 has it), and Avx2, vectors of 32 bytes.
// Per lane the operations and their order are those of one lane (OneLane, the GPU's), so all give the same floats.
// Other compilers (clang too: its support of these vector operations differs by version) and nvcc's host pass
// take one lane.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && !defined(LOCBE_ONE_LANE)
#define LOCBE_GCC_VECTORS 1  // -DLOCBE_ONE_LANE builds the one-lane code (as other compilers get it)
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors only ever run inside AVX2 code, inlined
template <int Bytes>
struct VectorLanes;
#define LOCBE_VECTOR_LANES(BYTES)                                                            \
  template <>                                                                                \
  struct VectorLanes<BYTES> {                                                                \
    typedef float F __attribute__((vector_size(BYTES)));                                     \
    typedef int I __attribute__((vector_size(BYTES)));                                       \
    using M = I; /* -1 where a comparison holds, else 0 */                                   \
    static constexpr int kLanes = BYTES / 4;                                                 \
    LOCBE_INLINE static I ones(M m) { return -m; }                                           \
    LOCBE_INLINE static F pick(M m, F a, F b) { return m ? a : b; }                          \
    LOCBE_INLINE static I trunc(F x) { return __builtin_convertvector(x, I); }               \
    LOCBE_INLINE static F to_float(I x) { return __builtin_convertvector(x, F); }            \
  };
LOCBE_VECTOR_LANES(16)
LOCBE_VECTOR_LANES(32)
#undef LOCBE_VECTOR_LANES
template <typename scalar_t, int Bytes>
struct RowVec;
#define LOCBE_ROW_VEC(T, BYTES)                             \
  template <>                                               \
  struct RowVec<T, BYTES> {                                 \
    typedef T type __attribute__((vector_size(BYTES)));     \
  };
LOCBE_ROW_VEC(float, 16)
LOCBE_ROW_VEC(float, 32)
LOCBE_ROW_VEC(double, 16)
LOCBE_ROW_VEC(double, 32)
#undef LOCBE_ROW_VEC
struct Baseline {
  static constexpr const char* kName = "baseline";
  static constexpr int kBytes = 16;
  using Lanes = VectorLanes<16>;
};
struct Avx2 {
  static constexpr const char* kName = "avx2";
  static constexpr int kBytes = 32;
  using Lanes = VectorLanes<32>;
};
#else
template <typename scalar_t, int Bytes>
struct RowVec {
  using type = scalar_t;
};
struct Baseline {
  static constexpr const char* kName = "baseline";
  static constexpr int kBytes = 0;
  struct Lanes : OneLane {
    static constexpr int kLanes = 1;
  };
};
#endif

// ---------------------------------------------------------------------------- 1. elevate, several pixels at once
// Elevation of a tile of pixels held feature by feature: f[j][p] -> rem0[j][p], rank[j][p], bary[r][p]. Rows are
// kElevateTile long; lanes past `count` compute on whatever the row holds and are ignored.
constexpr int64_t kElevateTile = 64;

template <int D, class Isa>
LOCBE_INLINE void elevate_tile(const float (*f)[kElevateTile], int64_t count, int32_t (*rem0)[kElevateTile],
                               int32_t (*rank)[kElevateTile], float (*bary)[kElevateTile]) {
  using L = typename Isa::Lanes;
  using F = typename L::F;
  using I = typename L::I;
  static_assert(kElevateTile % L::kLanes == 0, "whole lanes per tile");
  constexpr int V = D + 1;
  for (int64_t p = 0; p < count; p += L::kLanes) {
    F fl[D], bl[V];
    I rl[V], kl[V];
    for (int j = 0; j < D; ++j) std::memcpy(&fl[j], &f[j][p], sizeof(F));
    elevate_point<D, L>(fl, rl, kl, bl);
    for (int j = 0; j < V; ++j) {
      std::memcpy(&rem0[j][p], &rl[j], sizeof(I));
      std::memcpy(&rank[j][p], &kl[j], sizeof(I));
      std::memcpy(&bary[j][p], &bl[j], sizeof(F));
    }
  }
}

// ---------------------------------------------------------------------------- 2. insert
// Returns false if a feature is not finite or too large for packed keys. Pixels in order, a tile at a time: the
// tile's features (Features::gather), their elevation (elevate_tile), then each pixel's lattice points; consecutive
// pixels of an image row often share their simplex.
template <int D, class Isa, typename scalar_t, class Features>
LOCBE_INLINE bool build_lattice(const Features& feat, int64_t n, PointTable& table, scalar_t* weights,
                                int32_t* entries) {
  constexpr int V = D + 1;
  constexpr int64_t T = kElevateTile;
  bool ok = true;
  int prev_rem0[D] = {0}, prev_ranks = -1;
  uint64_t prev_key[V];
  int32_t prev_index[V] = {0};
  std::fill(prev_key, prev_key + V, kNoKey);
  alignas(32) float f[D][T] = {};
  alignas(32) float bary[V][T];
  alignas(32) int32_t rem0[V][T], rank[V][T];
  for (int64_t i0 = 0; i0 < n; i0 += T) {
    const int64_t np = std::min(T, n - i0);
    feat.gather(i0, np, &f[0][0], T);
    for (int j = 0; j < D; ++j) {
      for (int64_t p = 0; p < np; ++p) {
        const bool finite = std::fabs(f[j][p]) <= 1e6f;  // false for NaN: the int conversions stay defined
        ok = ok && finite;
        if (!finite) f[j][p] = 0.0f;
      }
    }
    elevate_tile<D, Isa>(f, np, rem0, rank, bary);

    for (int64_t p = 0; p < np; ++p) {
      const int64_t i = i0 + p;
      for (int r = 0; r < V; ++r) weights[i * V + r] = static_cast<scalar_t>(bary[r][p]);
      int ranks = 0;
      bool same = true;
      for (int j = 0; j < D; ++j) {
        ranks |= rank[j][p] << (3 * j);
        same = same && rem0[j][p] == prev_rem0[j];
      }
      int32_t* out = entries + i * V;
      if (same && ranks == prev_ranks) {  // the previous pixel's simplex: its lattice points
        for (int r = 0; r < V; ++r) out[r] = prev_index[r];
        continue;
      }
      // vertex 0 is rem0; vertex r adds r to every coordinate and subtracts V from those of rank > D - r
      uint64_t key = 0, drop[V] = {0};
      for (int j = 0; j < D; ++j) {
        const int r0 = rem0[j][p];
        ok = ok && std::abs(r0) <= V * kMaxQ;
        key += static_cast<uint64_t>(r0 / V + kBias) * field(j);
        drop[rank[j][p]] = field(j);
        prev_rem0[j] = r0;
      }
      prev_ranks = ranks;
      if (!ok) key = 0;  // out-of-range fields would carry into each other; the caller raises
      for (int r = 0; r < V; ++r) {
        if (r > 0) key = key + 1 - drop[D - r + 1];
        if (key != prev_key[r]) {  // the same vertex of the previous pixel is often the same point
          prev_key[r] = key;
          prev_index[r] = table.find_or_add(key);
        }
        out[r] = prev_index[r];
      }
    }
  }
  return ok;
}

// ---------------------------------------------------------------------------- channel rows as vectors
// The splat's and slice's inner loops run over one pixel's channels, on vectors of Bytes bytes; the lattice rows
// and the pixel tiles are padded to whole vectors (`kp` channels, the pad zero), so the loops have no scalar tail
// there.
template <typename scalar_t, int Bytes>
constexpr int64_t row_lanes() {
  return sizeof(typename RowVec<scalar_t, Bytes>::type) / sizeof(scalar_t);
}
template <typename scalar_t, int Bytes>
LOCBE_INLINE int64_t padded_channels(int64_t k) {
  constexpr int64_t W = row_lanes<scalar_t, Bytes>();
  return (k + W - 1) / W * W;
}
template <typename T, typename scalar_t>
LOCBE_INLINE T load_vec(const scalar_t* p) {
  T x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
template <typename T, typename scalar_t>
LOCBE_INLINE void store_vec(scalar_t* p, T x) {
  std::memcpy(p, &x, sizeof x);
}

// row[c] += w v[c] for c < k (whole vectors, then one channel at a time)
template <int Bytes, typename scalar_t>
LOCBE_INLINE void add_scaled_row(scalar_t* __restrict__ row, scalar_t w, const scalar_t* __restrict__ v, int64_t k) {
  using Vec = typename RowVec<scalar_t, Bytes>::type;
  constexpr int64_t W = row_lanes<scalar_t, Bytes>();
  int64_t c = 0;
  for (; c + W <= k; c += W) store_vec(row + c, load_vec<Vec>(row + c) + w * load_vec<Vec>(v + c));
  for (; c < k; ++c) row[c] += w * v[c];
}

// out[c] = alpha (sum over r of w[r] rows[r][c], r in vertex order) for c < k
template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void weighted_rows(const scalar_t* const* rows, const scalar_t* w, scalar_t alpha, int64_t k,
                                scalar_t* __restrict__ out) {
  using Vec = typename RowVec<scalar_t, Bytes>::type;
  constexpr int64_t W = row_lanes<scalar_t, Bytes>();
  int64_t c = 0;
  for (; c + W <= k; c += W) {
    Vec acc{};
    for (int r = 0; r < V; ++r) acc = acc + w[r] * load_vec<Vec>(rows[r] + c);
    store_vec(out + c, alpha * acc);
  }
  for (; c < k; ++c) {
    scalar_t acc = 0;
    for (int r = 0; r < V; ++r) acc += w[r] * rows[r][c];
    out[c] = alpha * acc;
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols: the tiles' transpositions. Floats go in blocks of
// 4 x 4 through registers (GCC's __builtin_shuffle), the rest one at a time.
template <typename scalar_t>
LOCBE_INLINE void transpose_block(const scalar_t* __restrict__ src, int64_t lds, int64_t rows, int64_t cols,
                                  scalar_t* __restrict__ dst, int64_t ldd) {
  int64_t i0 = 0;
#ifdef LOCBE_GCC_VECTORS
  if constexpr (std::is_same_v<scalar_t, float>) {
    using V = VectorLanes<16>::F;
    using Mask = VectorLanes<16>::I;
    for (; i0 + 4 <= rows; i0 += 4) {
      int64_t j = 0;
      for (; j + 4 <= cols; j += 4) {
        const V a = load_vec<V>(src + i0 * lds + j), b = load_vec<V>(src + (i0 + 1) * lds + j);
        const V c = load_vec<V>(src + (i0 + 2) * lds + j), d = load_vec<V>(src + (i0 + 3) * lds + j);
        const V ab_lo = __builtin_shuffle(a, b, Mask{0, 4, 1, 5}), ab_hi = __builtin_shuffle(a, b, Mask{2, 6, 3, 7});
        const V cd_lo = __builtin_shuffle(c, d, Mask{0, 4, 1, 5}), cd_hi = __builtin_shuffle(c, d, Mask{2, 6, 3, 7});
        store_vec(dst + j * ldd + i0, __builtin_shuffle(ab_lo, cd_lo, Mask{0, 1, 4, 5}));
        store_vec(dst + (j + 1) * ldd + i0, __builtin_shuffle(ab_lo, cd_lo, Mask{2, 3, 6, 7}));
        store_vec(dst + (j + 2) * ldd + i0, __builtin_shuffle(ab_hi, cd_hi, Mask{0, 1, 4, 5}));
        store_vec(dst + (j + 3) * ldd + i0, __builtin_shuffle(ab_hi, cd_hi, Mask{2, 3, 6, 7}));
      }
      for (; j < cols; ++j)
        for (int64_t i = i0; i < i0 + 4; ++i) dst[j * ldd + i] = src[i * lds + j];
    }
  }
#endif
  for (int64_t i = i0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
}

// ---------------------------------------------------------------------------- 4. splat
// Pixel i adds w_r x its K values to its d+1 lattice rows (stride kp >= K), pixels in order, so every lattice point
// receives its contributions in pixel order. Values (K, N) go through tiles of kTile pixels transposed to rows
// of kp (pad zero); pixel-major values (pixel i's K at vin + i * ld) are read in place.
constexpr int64_t kTile = 64;

template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void splat_pixel(const scalar_t* v, const scalar_t* __restrict__ weights,
                              const int32_t* __restrict__ entries, int64_t i, int64_t k, int64_t kp,
                              scalar_t* __restrict__ lattice) {
  for (int r = 0; r < V; ++r)
    add_scaled_row<Bytes>(lattice + static_cast<int64_t>(entries[i * V + r]) * kp, weights[i * V + r], v, k);
}

template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void splat(const scalar_t* __restrict__ vin, const scalar_t* __restrict__ weights,
                        const int32_t* __restrict__ entries, int64_t n, int64_t k, int64_t kp,
                        scalar_t* __restrict__ lattice, scalar_t* __restrict__ tile) {
  std::fill(tile, tile + kTile * kp, scalar_t(0));  // the pad channels stay zero: the transpositions fill c < k
  for (int64_t p0 = 0; p0 < n; p0 += kTile) {
    const int64_t np = std::min(kTile, n - p0);
    transpose_block(vin + p0, n, k, np, tile, kp);
    for (int64_t p = 0; p < np; ++p)
      splat_pixel<V, Bytes>(tile + p * kp, weights, entries, p0 + p, kp, kp, lattice);
  }
}

template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void splat_rows(const scalar_t* __restrict__ vin, int64_t ld, const scalar_t* __restrict__ weights,
                             const int32_t* __restrict__ entries, int64_t n, int64_t k, int64_t kp,
                             scalar_t* __restrict__ lattice) {
  for (int64_t i = 0; i < n; ++i) splat_pixel<V, Bytes>(vin + i * ld, weights, entries, i, k, kp, lattice);
}

// ---------------------------------------------------------------------------- 6. slice
// alpha x (sum over r, in vertex order, of w_r x lattice row): per tile of pixels, transposed back to (K, N), or in
// place into pixel-major rows.
template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void slice_pixel(const scalar_t* __restrict__ lattice, const scalar_t* __restrict__ weights,
                              const int32_t* __restrict__ entries, int64_t i, int64_t k, int64_t kp, scalar_t alpha,
                              scalar_t* out) {
  const scalar_t* rows[V];
  for (int r = 0; r < V; ++r) rows[r] = lattice + static_cast<int64_t>(entries[i * V + r]) * kp;
  weighted_rows<V, Bytes>(rows, weights + i * V, alpha, k, out);
}

template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void slice(const scalar_t* __restrict__ lattice, const scalar_t* __restrict__ weights,
                        const int32_t* __restrict__ entries, int64_t n, int64_t k, int64_t kp, scalar_t alpha,
                        scalar_t* __restrict__ vout, scalar_t* __restrict__ tile) {
  for (int64_t p0 = 0; p0 < n; p0 += kTile) {
    const int64_t np = std::min(kTile, n - p0);
    for (int64_t p = 0; p < np; ++p)
      slice_pixel<V, Bytes>(lattice, weights, entries, p0 + p, kp, kp, alpha, tile + p * kp);
    transpose_block(tile, kp, np, k, vout + p0, n);
  }
}

template <int V, int Bytes, typename scalar_t>
LOCBE_INLINE void slice_rows(const scalar_t* __restrict__ lattice, const scalar_t* __restrict__ weights,
                             const int32_t* __restrict__ entries, int64_t n, int64_t k, int64_t kp, scalar_t alpha,
                             scalar_t* __restrict__ vout, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) slice_pixel<V, Bytes>(lattice, weights, entries, i, k, kp, alpha, vout + i * ld);
}

template <typename scalar_t>
LOCBE_INLINE bool all_finite(const scalar_t* v, int64_t count) {
  bool ok = true;
  for (int64_t i = 0; i < count; ++i) ok &= std::fabs(v[i]) <= std::numeric_limits<scalar_t>::max();
  return ok;
}

// ---------------------------------------------------------------------------- instruction set
// With GCC on x86-64 the whole-image schedule runs compiled for AVX2 where the CPU has it, else for the baseline
// (SSE2): its bodies are always-inline, so `with_avx2` compiles them a second time. FMA stays off (target "avx2"
// does not enable it), so every lane computes the baseline's floats bit for bit (tests/test_regloss.py runs both;
// LOCBE_LATTICE_ISA=baseline picks the baseline).
#if defined(LOCBE_GCC_VECTORS) && defined(__x86_64__)
#define LOCBE_AVX2_DISPATCH 1
#define LOCBE_INLINE_LAMBDA __attribute__((always_inline))
template <class Body>
__attribute__((target("avx2"), noinline)) void with_avx2(const Body& body) {
  body(Avx2{});
}
inline bool use_avx2() {
  static const bool on = [] {
    const char* isa = std::getenv("LOCBE_LATTICE_ISA");
    return __builtin_cpu_supports("avx2") && !(isa != nullptr && std::strcmp(isa, "baseline") == 0);
  }();
  return on;
}
#else
#define LOCBE_INLINE_LAMBDA
#endif

// Calls body(isa) compiled for the best instruction set the CPU has: Avx2{} or Baseline{} (the body's callees must
// be always-inline to be compiled for it).
template <class Body>
void run_best_isa(const Body& body) {
#ifdef LOCBE_AVX2_DISPATCH
  if (use_avx2()) return with_avx2(body);
#endif
  body(Baseline{});
}

// ---------------------------------------------------------------------------- build and apply of one image
// One image's lattice on the calling thread: weights and entries (N x (D+1)) written by the caller's pointers, the
// blur neighbours ((D+1) x M x 2, missing = M) left in the workspace (ws.neighbours); returns M.
template <int D, class Isa, typename scalar_t, class Features>
LOCBE_INLINE int64_t build_image_whole(const Features& feat, int64_t n, scalar_t* weights, int32_t* entries,
                                       Workspace& ws, StageClock& clock) {
  constexpr int V = D + 1;
  clock.isa = Isa::kName;
  PointTable table(ws, std::max<int64_t>(ws.last_capacity, 4096));
  const bool ok = build_lattice<D, Isa>(feat, n, table, weights, entries);
  TORCH_CHECK_VALUE(ok, "lattice_filter: image features must be finite and at most ~1300 in absolute value "
                    "(pixel / sigma_rgb, position / sigma_xy); increase sigma_xy/sigma_rgb");
  ws.last_capacity = table.capacity();
  const int64_t m = table.size();
  clock.mark("elevate+insert");

  int32_t* neighbours = Workspace::take<int32_t>(ws.neighbours, V * m * 2);
  const uint64_t* points = table.points();
  for (int axis = 0; axis < V; ++axis) {
    int32_t* nb = neighbours + static_cast<int64_t>(axis) * m * 2;
    for (int64_t l = 0; l < m; ++l) nb[2 * l + 1] = static_cast<int32_t>(m);
    for (int64_t l = 0; l < m; ++l) {  // a is l's left neighbour exactly when l is a's right one
      const int32_t a = table.find(left_neighbour<D>(points[l], axis));
      nb[2 * l] = a < 0 ? static_cast<int32_t>(m) : a;
      if (a >= 0) nb[2 * a + 1] = static_cast<int32_t>(l);
    }
  }
  clock.mark("neighbours");
  clock.append(" | M %lld, table %lld", static_cast<long long>(m), static_cast<long long>(table.capacity()));
  return m;
}

// W (or W^T with `reverse`) applied to K channels of one image on the calling thread: values (K, N) -> out (K, N),
// or, with `ld` > 0, pixel-major values and out (pixel i's K channels at i * ld, ld >= K).
// The lattice value buffers use the workspace's `shared` buffer (the hash table's, after a build).
template <int D, class Isa, typename scalar_t>
LOCBE_INLINE void apply_image_whole(const scalar_t* weights, const int32_t* entries, const int32_t* neighbours,
                                    int64_t m, int64_t n, const scalar_t* vin, scalar_t* vout, int64_t k, bool reverse,
                                    Workspace& ws, StageClock& clock, int64_t buffer_share = 2, int64_t ld = 0) {
  const int64_t cs = ld > 0 ? 1 : n;  // channel stride
  constexpr int V = D + 1;
  clock.isa = Isa::kName;
  // channels in chunks so that the two lattice value buffers, 2 (M + 1) x chunk, never exceed the image's share of
  // S (K x N) divided by `buffer_share`: the lattice can have more points than the image has pixels. The loss
  // keeps them within half its share (2); the CRF's applications (lattice_apply) take its whole share (1), so
  // that its d = 2 lattice (more points than pixels) needs fewer passes over the pixels.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(k, (k * n) / (2 * buffer_share * (m + 1))));
  const scalar_t alpha = static_cast<scalar_t>(1.0 / (1.0 + std::pow(2.0, -D)));
  const int64_t chunk_padded = padded_channels<scalar_t, Isa::kBytes>(chunk);
  scalar_t* tile = Workspace::take<scalar_t>(ws.tile, kTile * chunk_padded);
  scalar_t* lattice = Workspace::take<scalar_t>(ws.shared, 2 * (m + 1) * chunk_padded);
  scalar_t* other = lattice + (m + 1) * chunk_padded;
  for (int64_t c0 = 0; c0 < k; c0 += chunk) {
    const int64_t kc = std::min(chunk, k - c0);
    const int64_t kp = padded_channels<scalar_t, Isa::kBytes>(kc);  // the lattice's row stride
    std::fill(lattice, lattice + (m + 1) * kp, scalar_t(0));
    if (ld > 0) splat_rows<V, Isa::kBytes>(vin + c0 * cs, ld, weights, entries, n, kc, kp, lattice);
    else splat<V, Isa::kBytes>(vin + c0 * cs, weights, entries, n, kc, kp, lattice, tile);
    // a non-finite value reaches the lattice whatever its weight (inf x 0 is NaN): one check on M x K sums
    TORCH_CHECK_VALUE(all_finite(lattice, m * kp), "lattice_filter: values must be finite (found NaN or inf)");
    clock.mark("splat");
    std::fill(other + m * kp, other + (m + 1) * kp, scalar_t(0));  // row M: the missing neighbour
    for (int step = 0; step < V; ++step) {
      const int j = reverse ? D - step : step;  // reversed axis order = the exact transpose of W
      const BlurKernel<scalar_t> blur{lattice, other, neighbours + static_cast<int64_t>(j) * m * 2, kp};
      for (int64_t l = 0; l < m; ++l) blur(l);
      std::swap(lattice, other);
    }
    clock.mark("blur");
    if (ld > 0) slice_rows<V, Isa::kBytes>(lattice, weights, entries, n, kc, kp, alpha, vout + c0 * cs, ld);
    else slice<V, Isa::kBytes>(lattice, weights, entries, n, kc, kp, alpha, vout + c0 * cs, tile);
    clock.mark("slice");
  }
}

}  // namespace serial

// One image on the calling thread (the regularized loss's filter): image (3, N) float32, values (K, N), out (K, N).
template <typename scalar_t>
void filter_image_whole(const float* img, const scalar_t* vin, scalar_t* vout, int64_t k, int64_t h, int64_t w,
                        double sigma_xy, double sigma_rgb, bool reverse) {
  using namespace serial;
  const int64_t n = h * w;
  StageClock clock(profile_stages());
  Workspace& ws = workspace();
  scalar_t* weights = Workspace::take<scalar_t>(ws.weights, n * kV);
  int32_t* entries = Workspace::take<int32_t>(ws.entries, n * kV);
  const ImageFeatures feat{img, n, w, static_cast<float>(1.0 / sigma_xy), static_cast<float>(1.0 / sigma_rgb)};
  run_best_isa([&](auto isa) LOCBE_INLINE_LAMBDA {
    using Isa = decltype(isa);
    const int64_t m = build_image_whole<kD, Isa>(feat, n, weights, entries, ws, clock);
    apply_image_whole<kD, Isa>(weights, entries, Workspace::take<int32_t>(ws.neighbours, kV * m * 2), m, n, vin, vout,
                               k, reverse, ws, clock);
  });
}

}  // namespace locbe

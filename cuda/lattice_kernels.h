// Permutohedral-lattice bilateral filter: per-element kernel bodies shared by the CPU (OpenMP) and
// CUDA launchers. Each kernel is a functor with `HOST_DEVICE void operator()(int64_t i) const`;
// lattice_cpu.cpp runs it in an OpenMP loop, lattice_cuda.cu as a CUDA grid. CPU tests therefore
// execute exactly the code the GPU runs.
//
// Conventions (shared/spec/regloss.md; Adams et al. 2010 with Kraehenbuehl's dense-CRF constants):
// d = 5 features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) scaled by sqrt(2/3)(d+1) and per-axis
// 1/sqrt((i+1)(i+2)); splat to the d+1 simplex vertices with barycentric weights; blur along each of
// the d+1 lattice axes v <- v + 0.5 (v_left + v_right); slice with the same weights times
// alpha = 1 / (1 + 2^-d). The pixel's own contribution is kept.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define HOST_DEVICE __host__ __device__
#else
#define HOST_DEVICE
#endif

namespace locbe {

constexpr int kD = 5;        // feature dimensions
constexpr int kV = kD + 1;   // simplex vertices per pixel
constexpr int kEmpty = -1;   // empty hash slot

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
HOST_DEVICE inline uint32_t hash_key(const int16_t* key) {
  uint32_t h = 0;
  for (int i = 0; i < kD; ++i) {
    h += static_cast<uint32_t>(static_cast<int32_t>(key[i]));
    h *= 2531011u;
  }
  return h;
}

HOST_DEVICE inline bool keys_equal(const int16_t* a, const int16_t* b) {
  for (int i = 0; i < kD; ++i)
    if (a[i] != b[i]) return false;
  return true;
}

// After relabelling (RelabelKernel) occupied slots hold lattice indices, and lattice_rep[l] is an entry with
// the point's key. Returns the lattice index of `key`, or -1 when it is not a lattice point.
HOST_DEVICE inline int64_t find_point(const int* table, int64_t mask, const int16_t* entry_keys, const int* lattice_rep,
                                      const int16_t* key) {
  int64_t s = hash_key(key) & mask;
  while (true) {
    int l = table[s];
    if (l == kEmpty) return -1;
    if (keys_equal(entry_keys + static_cast<int64_t>(lattice_rep[l]) * kD, key)) return l;
    s = (s + 1) & mask;
  }
}

// ---------------------------------------------------------------------------- 1. elevate
// One pixel: its d+1 lattice keys and barycentric weights (the math of Kraehenbuehl's permutohedral.cpp).
template <typename scalar_t>
struct ElevateKernel {
  const float* image;  // (3, N) channel-first, 0..255
  int64_t n, width;
  float inv_sxy, inv_srgb;
  int16_t* entry_keys;   // (N * kV, kD)
  scalar_t* weights;     // (N * kV)

  HOST_DEVICE void operator()(int64_t i) const {
    float f[kD];
    f[0] = static_cast<float>(i % width) * inv_sxy;
    f[1] = static_cast<float>(i / width) * inv_sxy;
    for (int c = 0; c < 3; ++c) f[2 + c] = image[c * n + i] * inv_srgb;

    const float inv_std = sqrtf(2.0f / 3.0f) * (kD + 1);
    float elevated[kV];
    float sm = 0.0f;
    for (int j = kD; j > 0; --j) {
      float cf = f[j - 1] * (1.0f / sqrtf(static_cast<float>((j + 1) * j)) * inv_std);
      elevated[j] = sm - j * cf;
      sm += cf;
    }
    elevated[0] = sm;

    const float down = 1.0f / (kD + 1);
    const float up = static_cast<float>(kD + 1);
    int rem0[kV], rank[kV];
    int sum = 0;
    for (int j = 0; j <= kD; ++j) {
      int rd = static_cast<int>(roundf(down * elevated[j]));
      rem0[j] = static_cast<int>(rd * up);
      sum += rd;
      rank[j] = 0;
    }
    for (int a = 0; a < kD; ++a) {
      float da = elevated[a] - rem0[a];
      for (int b = a + 1; b <= kD; ++b) {
        if (da < elevated[b] - rem0[b]) rank[a]++;
        else rank[b]++;
      }
    }
    for (int j = 0; j <= kD; ++j) {
      rank[j] += sum;
      if (rank[j] < 0) { rank[j] += kD + 1; rem0[j] += kD + 1; }
      else if (rank[j] > kD) { rank[j] -= kD + 1; rem0[j] -= kD + 1; }
    }
    float bary[kV + 1];
    for (int j = 0; j <= kD + 1; ++j) bary[j] = 0.0f;
    for (int j = 0; j <= kD; ++j) {
      float v = (elevated[j] - rem0[j]) * down;
      bary[kD - rank[j]] += v;
      bary[kD - rank[j] + 1] -= v;
    }
    bary[0] += 1.0f + bary[kD + 1];

    for (int r = 0; r <= kD; ++r) {
      int16_t* key = entry_keys + (i * kV + r) * kD;
      for (int j = 0; j < kD; ++j) {
        // canonical simplex vertex r: coordinate r where rank < d+1-r, else r-(d+1)
        int canonical = (rank[j] <= kD - r) ? r : r - (kD + 1);
        key[j] = static_cast<int16_t>(rem0[j] + canonical);
      }
      weights[i * kV + r] = static_cast<scalar_t>(bary[r]);
    }
  }
};

// ---------------------------------------------------------------------------- 2. insert
struct InsertKernel {
  int* table;
  int64_t mask;
  const int16_t* entry_keys;
  int32_t* entry_slot;  // (N * kV)

  HOST_DEVICE void operator()(int64_t e) const {
    const int16_t* key = entry_keys + e * kD;
    int64_t s = hash_key(key) & mask;
    while (true) {
      int found = atomic_cas(table + s, kEmpty, static_cast<int>(e));
      if (found == kEmpty || keys_equal(entry_keys + static_cast<int64_t>(found) * kD, key)) {
        entry_slot[e] = static_cast<int32_t>(s);
        return;
      }
      s = (s + 1) & mask;
    }
  }
};

// ---------------------------------------------------------------------------- 3. lattice index per entry
struct EntryLatticeKernel {
  const int32_t* entry_slot;
  const int32_t* slot_index;  // inclusive prefix count of occupied slots: lattice index = slot_index - 1
  const int* table;
  int32_t* entry_lattice;     // (N * kV)
  int* lattice_rep;           // (M) an entry id holding the lattice point's key

  HOST_DEVICE void operator()(int64_t e) const {
    int64_t s = entry_slot[e];
    int32_t l = slot_index[s] - 1;
    entry_lattice[e] = l;
    if (table[s] == static_cast<int>(e)) lattice_rep[l] = static_cast<int>(e);
  }
};

// Occupied slots: entry id -> lattice index, so the slot -> index map can be freed before the blur.
struct RelabelKernel {
  int* table;
  const int32_t* slot_index;

  HOST_DEVICE void operator()(int64_t s) const {
    if (table[s] != kEmpty) table[s] = slot_index[s] - 1;
  }
};

// ---------------------------------------------------------------------------- 4. splat
// Scatter with atomics (fast, order of float additions not fixed).
template <typename scalar_t>
struct SplatAtomicKernel {
  const scalar_t* values_in;  // (K, N) one image
  const scalar_t* weights;
  const int32_t* entry_lattice;
  int64_t n, k;
  scalar_t* lattice;  // (M + 1, K)

  HOST_DEVICE void operator()(int64_t e) const {
    int64_t pixel = e / kV;
    scalar_t w = weights[e];
    scalar_t* row = lattice + static_cast<int64_t>(entry_lattice[e]) * k;
    for (int64_t c = 0; c < k; ++c) atomic_add(row + c, w * values_in[c * n + pixel]);
  }
};

// Gather in entry order (deterministic): entries sorted by lattice index, stable in entry id.
template <typename scalar_t>
struct SplatGatherKernel {
  const scalar_t* values_in;
  const scalar_t* weights;
  const int64_t* sorted_entries;  // entries ordered by (lattice index, entry id)
  const int64_t* segment_end;     // inclusive cumsum of entry counts per lattice point
  int64_t n, k;
  scalar_t* lattice;

  HOST_DEVICE void operator()(int64_t idx) const {  // idx = l * K + c
    int64_t l = idx / k, c = idx % k;
    int64_t begin = l == 0 ? 0 : segment_end[l - 1];
    scalar_t acc = 0;
    for (int64_t t = begin; t < segment_end[l]; ++t) {
      int64_t e = sorted_entries[t];
      acc += weights[e] * values_in[c * n + e / kV];
    }
    lattice[idx] = acc;
  }
};

// ---------------------------------------------------------------------------- 5. blur
// One lattice point per thread, all channels of the chunk: the two neighbours along `axis` are looked
// up in the hash table on the fly (no (d+1) x M x 2 neighbour table is kept: it was the op's largest
// buffer on textured images). Missing neighbours map to row M, which is zero.
template <typename scalar_t>
struct BlurKernel {
  const scalar_t* src;  // (M + 1, K), row M is zero
  scalar_t* dst;
  const int* table;
  int64_t mask;
  const int16_t* entry_keys;
  const int* lattice_rep;
  int64_t m, k;
  int axis;

  HOST_DEVICE void operator()(int64_t l) const {
    const int16_t* key = entry_keys + static_cast<int64_t>(lattice_rep[l]) * kD;
    int16_t n1[kD], n2[kD];
    for (int t = 0; t < kD; ++t) {
      n1[t] = static_cast<int16_t>(key[t] - 1);
      n2[t] = static_cast<int16_t>(key[t] + 1);
    }
    if (axis < kD) {
      n1[axis] = static_cast<int16_t>(key[axis] + kD);
      n2[axis] = static_cast<int16_t>(key[axis] - kD);
    }
    const int64_t p1 = find_point(table, mask, entry_keys, lattice_rep, n1);
    const int64_t p2 = find_point(table, mask, entry_keys, lattice_rep, n2);
    const int64_t left = p1 < 0 ? m : p1, right = p2 < 0 ? m : p2;
    for (int64_t c = 0; c < k; ++c)
      dst[l * k + c] = src[l * k + c] + static_cast<scalar_t>(0.5) * (src[left * k + c] + src[right * k + c]);
  }
};

// ---------------------------------------------------------------------------- 6. slice
template <typename scalar_t>
struct SliceKernel {
  const scalar_t* lattice;
  const scalar_t* weights;
  const int32_t* entry_lattice;
  int64_t n, k;
  scalar_t alpha;
  scalar_t* out;  // (K, N)

  HOST_DEVICE void operator()(int64_t idx) const {  // idx = c * N + pixel
    int64_t c = idx / n, pixel = idx % n;
    scalar_t acc = 0;
    for (int r = 0; r < kV; ++r) {
      int64_t e = pixel * kV + r;
      acc += weights[e] * lattice[static_cast<int64_t>(entry_lattice[e]) * k + c];
    }
    out[idx] = alpha * acc;
  }
};

}  // namespace locbe

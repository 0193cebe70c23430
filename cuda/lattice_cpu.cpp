// CPU backend: the kernels of lattice_kernels.h in parallel loops (or whole images per thread, lattice_serial.h),
// the plain serial reference (one channel at a time, std::map lattice, simple loops) used by the tests, and the
// registration of the custom ops `locbe::lattice_filter`, `locbe::lattice_filter_serial`, `locbe::lattice_build`
// and `locbe::lattice_apply` (TORCH_LIBRARY).
#include <torch/library.h>

#include <array>
#include <map>
#include <vector>

#include "lattice_filter.h"

namespace locbe {

struct CpuLaunch {
  static constexpr bool kCuda = false;
  template <class F>
  static void run(int64_t n, const F& f) {
    at::parallel_for(0, n, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  }
};

torch::Tensor lattice_filter_cpu(const torch::Tensor& image, const torch::Tensor& values, double sigma_xy,
                                 double sigma_rgb, bool reverse, bool atomic_splat) {
  TORCH_CHECK(values.device().is_cpu(), "lattice_filter_cpu got a tensor on ", values.device());
  return lattice_filter_impl<CpuLaunch>(image, values, sigma_xy, sigma_rgb, reverse, atomic_splat);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> lattice_build_cpu(const torch::Tensor& features) {
  TORCH_CHECK(features.device().is_cpu(), "lattice_build_cpu got a tensor on ", features.device());
  return lattice_build_impl<CpuLaunch>(features);
}

torch::Tensor lattice_apply_cpu(const torch::Tensor& weights, const torch::Tensor& entries,
                                const torch::Tensor& neighbours, const torch::Tensor& offsets,
                                const torch::Tensor& values, bool reverse) {
  TORCH_CHECK(values.device().is_cpu(), "lattice_apply_cpu got a tensor on ", values.device());
  return lattice_apply_impl<CpuLaunch>(weights, entries, neighbours, offsets, values, reverse);
}

void lattice_apply_out_cpu(const torch::Tensor& weights, const torch::Tensor& entries,
                           const torch::Tensor& neighbours, const torch::Tensor& offsets, const torch::Tensor& values,
                           bool reverse, torch::Tensor out) {
  TORCH_CHECK(values.device().is_cpu(), "lattice_apply_out_cpu got a tensor on ", values.device());
  lattice_apply_into<CpuLaunch>(weights, entries, neighbours, offsets, values, reverse, out);
}

// ---------------------------------------------------------------------------- serial reference
// Deliberately plain: its own elevation code written from the paper, a std::map from keys to lattice
// points, one value channel at a time, serial loops.
using Key = std::array<int, kD>;

static void elevate_serial(const float* f, std::array<Key, kV>& keys, std::array<float, kV>& bary_out) {
  const float inv_std = std::sqrt(2.0f / 3.0f) * (kD + 1);
  float el[kV];
  float sm = 0.0f;
  for (int j = kD; j > 0; --j) {
    float cf = f[j - 1] * (1.0f / std::sqrt(static_cast<float>((j + 1) * j)) * inv_std);
    el[j] = sm - j * cf;
    sm += cf;
  }
  el[0] = sm;
  int rem0[kV], rank[kV], sum = 0;
  for (int j = 0; j <= kD; ++j) {
    int rd = static_cast<int>(std::round((1.0f / (kD + 1)) * el[j]));
    rem0[j] = rd * (kD + 1);
    sum += rd;
    rank[j] = 0;
  }
  for (int a = 0; a < kD; ++a)
    for (int b = a + 1; b <= kD; ++b) {
      if (el[a] - rem0[a] < el[b] - rem0[b]) rank[a]++;
      else rank[b]++;
    }
  for (int j = 0; j <= kD; ++j) {
    rank[j] += sum;
    if (rank[j] < 0) { rank[j] += kD + 1; rem0[j] += kD + 1; }
    else if (rank[j] > kD) { rank[j] -= kD + 1; rem0[j] -= kD + 1; }
  }
  float bary[kV + 1] = {0};
  for (int j = 0; j <= kD; ++j) {
    float v = (el[j] - rem0[j]) * (1.0f / (kD + 1));
    bary[kD - rank[j]] += v;
    bary[kD - rank[j] + 1] -= v;
  }
  bary[0] += 1.0f + bary[kD + 1];
  for (int r = 0; r <= kD; ++r) {
    for (int j = 0; j < kD; ++j) keys[r][j] = rem0[j] + (rank[j] <= kD - r ? r : r - (kD + 1));
    bary_out[r] = bary[r];
  }
}

// (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) of pixel i, rounded to float exactly as ElevateKernel does
static void pixel_features(const float* img, int64_t i, int64_t n, int64_t w, double sigma_xy, double sigma_rgb,
                           float* f) {
  const float inv_xy = static_cast<float>(1.0 / sigma_xy), inv_rgb = static_cast<float>(1.0 / sigma_rgb);
  f[0] = static_cast<float>(i % w) * inv_xy;
  f[1] = static_cast<float>(i / w) * inv_xy;
  for (int c = 0; c < 3; ++c) f[2 + c] = img[c * n + i] * inv_rgb;
}

torch::Tensor lattice_filter_serial(const torch::Tensor& image_in, const torch::Tensor& values_in, double sigma_xy,
                                    double sigma_rgb, bool reverse) {
  TORCH_CHECK(values_in.device().is_cpu() && image_in.device().is_cpu(), "the serial reference runs on the CPU");
  auto image = image_in.contiguous().to(torch::kFloat32);
  auto values = values_in.contiguous().to(torch::kFloat64);
  const int64_t b = values.size(0), k = values.size(1), h = values.size(2), w = values.size(3), n = h * w;
  auto out = torch::zeros_like(values);
  const double alpha = 1.0 / (1.0 + std::pow(2.0, -kD));
  for (int64_t bi = 0; bi < b; ++bi) {
    const float* img = image[bi].data_ptr<float>();
    std::vector<std::array<int, kV>> vertex(n);
    std::vector<std::array<float, kV>> bary(n);
    std::map<Key, int> index;
    std::vector<Key> lattice_keys;
    for (int64_t i = 0; i < n; ++i) {
      float f[kD];
      pixel_features(img, i, n, w, sigma_xy, sigma_rgb, f);
      std::array<Key, kV> keys;
      elevate_serial(f, keys, bary[i]);
      for (int r = 0; r < kV; ++r) {
        auto it = index.find(keys[r]);
        if (it == index.end()) {
          it = index.emplace(keys[r], static_cast<int>(lattice_keys.size())).first;
          lattice_keys.push_back(keys[r]);
        }
        vertex[i][r] = it->second;
      }
    }
    const int64_t m = lattice_keys.size();
    for (int64_t c = 0; c < k; ++c) {  // one channel at a time
      const double* v = values[bi][c].data_ptr<double>();
      std::vector<double> lat(m, 0.0), tmp(m, 0.0);
      for (int64_t i = 0; i < n; ++i)
        for (int r = 0; r < kV; ++r) lat[vertex[i][r]] += bary[i][r] * v[i];
      for (int step = 0; step <= kD; ++step) {
        const int j = reverse ? kD - step : step;
        for (int64_t l = 0; l < m; ++l) {
          Key n1 = lattice_keys[l], n2 = lattice_keys[l];
          for (int t = 0; t < kD; ++t) { n1[t] -= 1; n2[t] += 1; }
          if (j < kD) { n1[j] = lattice_keys[l][j] + kD; n2[j] = lattice_keys[l][j] - kD; }
          auto a = index.find(n1), bb = index.find(n2);
          double left = a == index.end() ? 0.0 : lat[a->second];
          double right = bb == index.end() ? 0.0 : lat[bb->second];
          tmp[l] = lat[l] + 0.5 * (left + right);
        }
        std::swap(lat, tmp);
      }
      double* o = out[bi][c].data_ptr<double>();
      for (int64_t i = 0; i < n; ++i) {
        double acc = 0.0;
        for (int r = 0; r < kV; ++r) acc += bary[i][r] * lat[vertex[i][r]];
        o[i] = alpha * acc;
      }
    }
  }
  return out;
}

}  // namespace locbe

// The schema, the CPU kernels; lattice_cuda.cu adds the CUDA kernel of lattice_filter. The fake (meta) kernel
// and the autograd formula are registered from Python (locbe/lattice/op.py), as torch.library recommends.
TORCH_LIBRARY(locbe, m) {
  m.def("lattice_filter(Tensor image, Tensor values, float sigma_xy, float sigma_rgb, bool reverse=False, "
        "bool atomic_splat=False) -> Tensor");
  m.def("lattice_filter_serial(Tensor image, Tensor values, float sigma_xy, float sigma_rgb, bool reverse=False) "
        "-> Tensor");
  // a lattice built once from (B, N, D) features (D = 2 or 5, divided by their sigmas), applied many times
  m.def("lattice_build(Tensor features) -> (Tensor weights, Tensor entries, Tensor neighbours, Tensor offsets)");
  m.def("lattice_apply(Tensor weights, Tensor entries, Tensor neighbours, Tensor offsets, Tensor values, "
        "bool reverse=False) -> Tensor");
  m.def("lattice_apply_out(Tensor weights, Tensor entries, Tensor neighbours, Tensor offsets, Tensor values, "
        "bool reverse, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(locbe, CPU, m) {
  m.impl("lattice_filter", &locbe::lattice_filter_cpu);
  m.impl("lattice_filter_serial", &locbe::lattice_filter_serial);
  m.impl("lattice_build", &locbe::lattice_build_cpu);
  m.impl("lattice_apply", &locbe::lattice_apply_cpu);
  m.impl("lattice_apply_out", &locbe::lattice_apply_out_cpu);
}

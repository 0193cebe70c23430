// The filter driver, written once for both backends: allocates buffers with torch on the input's
// device (no host copies of data; one scalar, the lattice size, is read back) and runs the kernels
// of lattice_kernels.h through a launcher policy `Launch::run(n, functor)`.
#pragma once

#include <torch/extension.h>

#include <algorithm>

#include "lattice_kernels.h"

namespace locbe {

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

// image: (B, 3, H, W) float32 in 0..255; values: (B, K, H, W) float32/float64. Returns W * values, or W^T * values
// with `reverse` (the per-axis blurs are symmetric but do not commute, so W^T blurs the axes in reverse order).
// `atomic_splat` forces the scatter splat (the CUDA default) so CPU tests run that kernel body too.
template <class Launch>
torch::Tensor lattice_filter_impl(const torch::Tensor& image_in, const torch::Tensor& values_in, double sigma_xy,
                                  double sigma_rgb, bool deterministic, bool reverse, bool atomic_splat) {
  TORCH_CHECK(!(deterministic && atomic_splat), "the atomic splat is not deterministic");
  auto image = image_in.contiguous().to(torch::kFloat32);
  auto values = values_in.contiguous();
  const int64_t b = values.size(0), k = values.size(1), h = values.size(2), w = values.size(3);
  const int64_t n = h * w, entries = n * kV;
  auto out = torch::empty_like(values);
  auto opts = values.options();
  // per-image buffers, reused across the batch
  auto entry_keys = torch::empty({entries, kD}, opts.dtype(torch::kInt16));
  auto weights = torch::empty({entries}, opts);
  // 32-bit indices throughout (entries < 2^31 is checked): halves the index memory of the op
  TORCH_CHECK(entries < (int64_t{1} << 31) - 1, "image too large for the lattice filter (", n, " pixels)");
  auto i32 = opts.dtype(torch::kInt32);
  auto entry_lattice = torch::empty({entries}, i32);
  const int64_t capacity = next_pow2(entries + 1);
  auto table = torch::empty({capacity}, opts.dtype(torch::kInt32));
  const double alpha = 1.0 / (1.0 + std::pow(2.0, -kD));

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "lattice_filter", [&] {
    for (int64_t bi = 0; bi < b; ++bi) {
      const float* img = image[bi].data_ptr<float>();
      const scalar_t* vin = values[bi].data_ptr<scalar_t>();
      scalar_t* vout = out[bi].data_ptr<scalar_t>();
      Launch::run(n, ElevateKernel<scalar_t>{img, n, w, static_cast<float>(1.0 / sigma_xy),
                                             static_cast<float>(1.0 / sigma_rgb), entry_keys.data_ptr<int16_t>(),
                                             weights.data_ptr<scalar_t>()});
      table.fill_(kEmpty);
      auto entry_slot = torch::empty({entries}, i32);
      Launch::run(entries, InsertKernel{table.data_ptr<int>(), capacity - 1, entry_keys.data_ptr<int16_t>(),
                                        entry_slot.data_ptr<int32_t>()});
      auto slot_index = table.ne(kEmpty).cumsum(0, torch::kInt32);
      const int64_t m = slot_index[capacity - 1].item<int64_t>();
      auto lattice_rep = torch::empty({m}, opts.dtype(torch::kInt32));
      Launch::run(entries, EntryLatticeKernel{entry_slot.data_ptr<int32_t>(), slot_index.data_ptr<int32_t>(),
                                              table.data_ptr<int>(), entry_lattice.data_ptr<int32_t>(),
                                              lattice_rep.data_ptr<int>()});
      entry_slot = torch::Tensor();
      Launch::run(capacity, RelabelKernel{table.data_ptr<int>(), slot_index.data_ptr<int32_t>()});
      slot_index = torch::Tensor();  // buffers not needed any more are released before the lattice values exist
      const bool gather = !atomic_splat && (deterministic || !values.is_cuda());  // CPU default: gather is faster
      torch::Tensor order, seg_end;
      if (gather) {
        order = std::get<1>(entry_lattice.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
        seg_end = torch::bincount(entry_lattice, /*weights=*/{}, m).cumsum(0);
      }
      // Channels in chunks so that the two lattice value buffers, 2 (M + 1) x chunk, never exceed this
      // image's share of S (K x N): the lattice can have more points than the image has pixels.
      const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(k, (k * n) / (2 * (m + 1))));
      for (int64_t c0 = 0; c0 < k; c0 += chunk) {
        const int64_t kc = std::min(chunk, k - c0);
        const scalar_t* vin_c = vin + c0 * n;
        auto lattice = torch::zeros({m + 1, kc}, opts);  // row m stays zero: the missing neighbour
        if (gather) {
          Launch::run(m * kc, SplatGatherKernel<scalar_t>{vin_c, weights.data_ptr<scalar_t>(),
                                                          order.data_ptr<int64_t>(), seg_end.data_ptr<int64_t>(), n,
                                                          kc, lattice.data_ptr<scalar_t>()});
        } else {
          Launch::run(entries, SplatAtomicKernel<scalar_t>{vin_c, weights.data_ptr<scalar_t>(),
                                                           entry_lattice.data_ptr<int32_t>(), n, kc,
                                                           lattice.data_ptr<scalar_t>()});
        }
        if (c0 + kc >= k) {  // the last chunk is splatted: the sort is not needed any more
          order = torch::Tensor();
          seg_end = torch::Tensor();
        }
        auto other = torch::zeros_like(lattice);
        for (int step = 0; step <= kD; ++step) {
          const int j = reverse ? kD - step : step;  // reversed axis order = the exact transpose of W
          Launch::run(m, BlurKernel<scalar_t>{lattice.data_ptr<scalar_t>(), other.data_ptr<scalar_t>(),
                                              table.data_ptr<int>(), capacity - 1, entry_keys.data_ptr<int16_t>(),
                                              lattice_rep.data_ptr<int>(), m, kc, j});
          std::swap(lattice, other);
        }
        Launch::run(n * kc, SliceKernel<scalar_t>{lattice.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                                                  entry_lattice.data_ptr<int32_t>(), n, kc,
                                                  static_cast<scalar_t>(alpha), vout + c0 * n});
      }
    }
  });
  return out;
}

}  // namespace locbe

// The filter driver, written once for both backends: allocates buffers with torch on the input's
// device (no host copies of data; one scalar, the lattice size, is read back) and runs the kernels
// of lattice_kernels.h through a launcher policy `Launch::run(n, functor)`.
#pragma once

#include <torch/extension.h>

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
  auto iopts = opts.dtype(torch::kInt64);
  // per-image buffers, reused across the batch
  auto entry_keys = torch::empty({entries, kD}, opts.dtype(torch::kInt16));
  auto weights = torch::empty({entries}, opts);
  auto entry_slot = torch::empty({entries}, iopts);
  auto entry_lattice = torch::empty({entries}, iopts);
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
      Launch::run(entries, InsertKernel{table.data_ptr<int>(), capacity - 1, entry_keys.data_ptr<int16_t>(),
                                        entry_slot.data_ptr<int64_t>()});
      auto slot_index = table.ne(kEmpty).to(torch::kInt64).cumsum(0);
      const int64_t m = slot_index[capacity - 1].item<int64_t>();
      auto lattice_rep = torch::empty({m}, opts.dtype(torch::kInt32));
      Launch::run(entries, EntryLatticeKernel{entry_slot.data_ptr<int64_t>(), slot_index.data_ptr<int64_t>(),
                                              table.data_ptr<int>(), entry_lattice.data_ptr<int64_t>(),
                                              lattice_rep.data_ptr<int>()});
      auto lattice = torch::zeros({m + 1, k}, opts);  // row m stays zero: the missing neighbour
      if (!atomic_splat && (deterministic || !values.is_cuda())) {  // CPU default: the ordered gather is faster
        auto order = std::get<1>(entry_lattice.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
        auto seg_end = torch::bincount(entry_lattice, /*weights=*/{}, m).cumsum(0);
        Launch::run(m * k, SplatGatherKernel<scalar_t>{vin, weights.data_ptr<scalar_t>(), order.data_ptr<int64_t>(),
                                                       seg_end.data_ptr<int64_t>(), n, k,
                                                       lattice.data_ptr<scalar_t>()});
      } else {
        Launch::run(entries, SplatAtomicKernel<scalar_t>{vin, weights.data_ptr<scalar_t>(),
                                                         entry_lattice.data_ptr<int64_t>(), n, k,
                                                         lattice.data_ptr<scalar_t>()});
      }
      auto neighbours = torch::empty({kV, m, 2}, iopts);
      Launch::run(kV * m, BlurNeighboursKernel{table.data_ptr<int>(), capacity - 1, entry_keys.data_ptr<int16_t>(),
                                               lattice_rep.data_ptr<int>(), slot_index.data_ptr<int64_t>(), m,
                                               neighbours.data_ptr<int64_t>()});
      auto other = torch::zeros_like(lattice);
      for (int step = 0; step <= kD; ++step) {
        const int j = reverse ? kD - step : step;  // reversed axis order = the exact transpose of W
        Launch::run(m * k, BlurKernel<scalar_t>{lattice.data_ptr<scalar_t>(), other.data_ptr<scalar_t>(),
                                                neighbours[j].data_ptr<int64_t>(), k});
        std::swap(lattice, other);
      }
      Launch::run(n * k, SliceKernel<scalar_t>{lattice.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                                               entry_lattice.data_ptr<int64_t>(), n, k,
                                               static_cast<scalar_t>(alpha), vout});
    }
  });
  return out;
}

}  // namespace locbe

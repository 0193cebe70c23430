// The filter driver of the parallel schedules, written once for both backends: allocates buffers with torch on the
// input's device (no host copies of data; the lattice size and a finiteness flag are read back) and runs the
// kernels of lattice_kernels.h through a launcher policy `Launch::run(n, functor)`: CudaLaunch (a grid on the
// current stream) or CpuLaunch (a parallel loop over elements).
//
// On the CPU, when the batch has at least as many images as there are threads, each thread instead filters whole
// images (lattice_serial.h): one parallel region per call instead of one per kernel, so a thread that the
// scheduler delays (a busy neighbour process) holds up the call once, not at every kernel boundary.
#pragma once

#include <ATen/Parallel.h>
#include <torch/all.h>

#include <algorithm>
#include <cmath>

#include "lattice_kernels.h"
#include "lattice_serial.h"

namespace locbe {

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

enum class Splat { kScatterAtomic, kGather };

// One image: image (3, N) float32, values (K, N), out (K, N).
template <class Launch, typename scalar_t>
void filter_image(const float* img, const scalar_t* vin, scalar_t* vout, int64_t k, int64_t h, int64_t w,
                  double sigma_xy, double sigma_rgb, Splat splat, bool reverse, const torch::TensorOptions& opts) {
  const int64_t n = h * w, entries = n * kV;
  auto i32 = opts.dtype(torch::kInt32);
  auto pixel_keys = torch::empty({n, kPix}, opts.dtype(torch::kInt16));
  auto weights = torch::empty({entries}, opts);
  auto entry_lattice = torch::empty({entries}, i32);
  const double alpha = 1.0 / (1.0 + std::pow(2.0, -kD));
  Launch::run(n, ElevateKernel<scalar_t>{img, n, w, static_cast<float>(1.0 / sigma_xy),
                                         static_cast<float>(1.0 / sigma_rgb), pixel_keys.data_ptr<int16_t>(),
                                         weights.data_ptr<scalar_t>()});
  // Hash table size: a pixel whose key data equal the previous pixel's adds no new lattice point, so the points
  // number at most kV x (pixels that differ from the previous one, the first included). On photos that is a
  // fraction of all entries: a table several times smaller than one sized by N x kV (fewer cache misses, and the
  // capacity-long passes below shrink with it).
  int64_t fresh = 1;
  if (n > 1) fresh += pixel_keys.slice(0, 1).ne(pixel_keys.slice(0, 0, n - 1)).any(1).sum().item<int64_t>();
  const int64_t capacity = next_pow2(std::min(entries, fresh * kV) + 1);
  const int64_t mask = capacity - 1;
  auto table = torch::full({capacity}, kEmpty, i32);
  Launch::run(n, InsertKernel{table.data_ptr<int>(), mask, pixel_keys.data_ptr<int16_t>(),
                                                      entry_lattice.data_ptr<int32_t>()});
  auto slot_index = table.ne(kEmpty).cumsum(0, torch::kInt32);
  const int64_t m = slot_index[capacity - 1].item<int64_t>();
  auto point_keys = torch::empty({std::max<int64_t>(m, 1), kD}, opts.dtype(torch::kInt16));
  Launch::run(capacity, CompactKernel{table.data_ptr<int>(), slot_index.data_ptr<int32_t>(),
                                      pixel_keys.data_ptr<int16_t>(), point_keys.data_ptr<int16_t>()});
  slot_index = torch::Tensor();  // buffers not needed any more are released before the lattice values exist
  pixel_keys = torch::Tensor();
  Launch::run(entries, EntryLatticeKernel{table.data_ptr<int>(), entry_lattice.data_ptr<int32_t>()});
  // the blur's neighbours, once per image for all channel chunks and axes; then the hash table can go
  auto neighbours = torch::empty({kV, m, 2}, i32);
  Launch::run(kV * m, NeighbourKernel{table.data_ptr<int>(), mask, point_keys.data_ptr<int16_t>(), m,
                                      neighbours.data_ptr<int32_t>()});
  table = torch::Tensor();
  point_keys = torch::Tensor();

  torch::Tensor order, seg_end;
  if (splat == Splat::kGather) {
    order = std::get<1>(entry_lattice.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    seg_end = torch::bincount(entry_lattice, /*weights=*/{}, m).cumsum(0);
  }
  // Channels in chunks so that the two lattice value buffers, 2 (M + 1) x chunk, never exceed this image's
  // share of S (K x N): the lattice can have more points than the image has pixels.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(k, (k * n) / (2 * (m + 1))));
  torch::Tensor lattice, other;
  for (int64_t c0 = 0; c0 < k; c0 += chunk) {
    const int64_t kc = std::min(chunk, k - c0);
    const scalar_t* vin_c = vin + c0 * n;
    if (!lattice.defined() || lattice.size(1) != kc) {
      lattice = torch::empty({m + 1, kc}, opts);
      other = torch::empty({m + 1, kc}, opts);
    }
    switch (splat) {
      case Splat::kGather:
        Launch::run(m * kc, SplatGatherKernel<scalar_t>{vin_c, weights.data_ptr<scalar_t>(),
                                                        order.data_ptr<int64_t>(), seg_end.data_ptr<int64_t>(), n,
                                                        kc, lattice.data_ptr<scalar_t>()});
        break;
      case Splat::kScatterAtomic:
        lattice.zero_();
        Launch::run(n, SplatScatterKernel<scalar_t>{vin_c, weights.data_ptr<scalar_t>(),
                                                          entry_lattice.data_ptr<int32_t>(), n, kc,
                                                          lattice.data_ptr<scalar_t>()});
        break;
    }
    // a non-finite value reaches the lattice whatever its weight (inf x 0 is NaN): one check on M x K sums
    TORCH_CHECK_VALUE(lattice.narrow(0, 0, m).isfinite().all().item<bool>(),
                      "lattice_filter: values must be finite (found NaN or inf)");
    lattice[m].zero_();  // the missing neighbour
    other[m].zero_();
    for (int step = 0; step <= kD; ++step) {
      const int j = reverse ? kD - step : step;  // reversed axis order = the exact transpose of W
      Launch::run(m, BlurKernel<scalar_t>{lattice.data_ptr<scalar_t>(), other.data_ptr<scalar_t>(),
                                          neighbours.data_ptr<int32_t>() + static_cast<int64_t>(j) * m * 2, kc});
      std::swap(lattice, other);
    }
    Launch::run(n, SliceKernel<scalar_t>{lattice.data_ptr<scalar_t>(), weights.data_ptr<scalar_t>(),
                                         entry_lattice.data_ptr<int32_t>(), n, kc, static_cast<scalar_t>(alpha),
                                         vout + c0 * n});
  }
}

// image: (B, 3, H, W) in 0..255; values: (B, K, H, W) float32/float64. Returns W * values, or W^T * values with
// `reverse` (the per-axis blurs are symmetric but do not commute, so W^T blurs the axes in reverse order).
// `atomic_splat` forces the atomic scatter splat (the CUDA default) so that CPU tests run that kernel body too.
template <class Launch>
torch::Tensor lattice_filter_impl(const torch::Tensor& image_in, const torch::Tensor& values_in, double sigma_xy,
                                  double sigma_rgb, bool reverse, bool atomic_splat) {
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  TORCH_CHECK(!(deterministic && atomic_splat), "the atomic splat is not deterministic");
  TORCH_CHECK(image_in.dim() == 4 && image_in.size(1) == 3, "image must be (B, 3, H, W)");
  TORCH_CHECK(values_in.dim() == 4, "values must be (B, K, H, W)");
  TORCH_CHECK(image_in.size(0) == values_in.size(0) && image_in.size(2) == values_in.size(2) &&
                  image_in.size(3) == values_in.size(3),
              "image and values differ in batch or size");
  TORCH_CHECK(image_in.device() == values_in.device(), "image and values must be on the same device");
  TORCH_CHECK(values_in.scalar_type() == torch::kFloat32 || values_in.scalar_type() == torch::kFloat64,
              "values must be float32 or float64");
  auto image = image_in.to(torch::kFloat32).contiguous();
  auto values = values_in.contiguous();
  const int64_t b = values.size(0), k = values.size(1), h = values.size(2), w = values.size(3);
  const int64_t n = h * w;
  // 32-bit indices throughout: halves the index memory of the op
  TORCH_CHECK(n * kV < (int64_t{1} << 30), "image too large for the lattice filter (", n, " pixels)");
  auto out = torch::empty_like(values, torch::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  const auto opts = values.options();

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "lattice_filter", [&] {
    const float* img = image.data_ptr<float>();
    const scalar_t* vin = values.data_ptr<scalar_t>();
    scalar_t* vout = out.data_ptr<scalar_t>();
    auto one = [&](int64_t bi, auto launch, Splat splat) {
      using L = decltype(launch);
      filter_image<L, scalar_t>(img + bi * 3 * n, vin + bi * k * n, vout + bi * k * n, k, h, w, sigma_xy,
                                sigma_rgb, splat, reverse, opts);
    };
    if constexpr (Launch::kCuda) {
      for (int64_t bi = 0; bi < b; ++bi) one(bi, Launch{}, deterministic ? Splat::kGather : Splat::kScatterAtomic);
    } else {
      const int64_t threads = at::get_num_threads();
      if ((b >= threads || threads == 1) && !atomic_splat) {
        // whole images per thread (grain 0: the batch is split evenly into one range per thread)
        at::parallel_for(0, b, 0, [&](int64_t b0, int64_t b1) {
          for (int64_t bi = b0; bi < b1; ++bi)
            filter_image_whole<scalar_t>(img + bi * 3 * n, vin + bi * k * n, vout + bi * k * n, k, h, w, sigma_xy,
                                         sigma_rgb, reverse);
        });
      } else {
        const Splat splat = atomic_splat ? Splat::kScatterAtomic : Splat::kGather;
        for (int64_t bi = 0; bi < b; ++bi) one(bi, Launch{}, splat);
      }
    }
  });
  return out;
}

}  // namespace locbe

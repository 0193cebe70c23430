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
#include <tuple>
#include <vector>

#include "lattice_kernels.h"
#include "lattice_serial.h"

namespace locbe {

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

enum class Splat { kScatterAtomic, kGather };

// One image's lattice built by the parallel kernels: weights and entry -> point map (N x (D+1)), the blur
// neighbours ((D+1) x M x 2, missing = M) and M.
struct ImageLattice {
  torch::Tensor weights, entries, neighbours;
  int64_t m = 0;
};

template <class Launch, int D, typename scalar_t, class Features>
ImageLattice build_image_parallel(const Features& feat, int64_t n, const torch::TensorOptions& opts) {
  constexpr int V = D + 1;
  const int64_t entries = n * V;
  auto i32 = opts.dtype(torch::kInt32);
  auto pixel_keys = torch::empty({n, V}, opts.dtype(torch::kInt16));
  auto weights = torch::empty({entries}, opts);
  auto entry_lattice = torch::empty({entries}, i32);
  Launch::run(n, ElevateKernel<D, scalar_t, Features>{feat, pixel_keys.data_ptr<int16_t>(),
                                                      weights.data_ptr<scalar_t>()});
  // Hash table size: a pixel whose key data equal the previous pixel's adds no new lattice point, so the points
  // number at most (D+1) x (pixels that differ from the previous one, the first included). On photos that is a
  // fraction of all entries: a table several times smaller than one sized by N x (D+1) (fewer cache misses, and
  // the capacity-long passes below shrink with it).
  int64_t fresh = 1;
  if (n > 1) fresh += pixel_keys.slice(0, 1).ne(pixel_keys.slice(0, 0, n - 1)).any(1).sum().item<int64_t>();
  const int64_t capacity = next_pow2(std::min(entries, fresh * V) + 1);
  const int64_t mask = capacity - 1;
  auto table = torch::full({capacity}, kEmpty, i32);
  Launch::run(n, InsertKernel<D>{table.data_ptr<int>(), mask, pixel_keys.data_ptr<int16_t>(),
                                 entry_lattice.data_ptr<int32_t>()});
  auto slot_index = table.ne(kEmpty).cumsum(0, torch::kInt32);
  const int64_t m = slot_index[capacity - 1].item<int64_t>();
  auto point_keys = torch::empty({std::max<int64_t>(m, 1), D}, opts.dtype(torch::kInt16));
  Launch::run(capacity, CompactKernel<D>{table.data_ptr<int>(), slot_index.data_ptr<int32_t>(),
                                         pixel_keys.data_ptr<int16_t>(), point_keys.data_ptr<int16_t>()});
  slot_index = torch::Tensor();  // buffers not needed any more are released before the lattice values exist
  pixel_keys = torch::Tensor();
  Launch::run(entries, EntryLatticeKernel{table.data_ptr<int>(), entry_lattice.data_ptr<int32_t>()});
  // the blur's neighbours, once per image for all channel chunks and axes; then the hash table can go
  auto neighbours = torch::empty({V, m, 2}, i32);
  Launch::run(V * m, NeighbourKernel<D>{table.data_ptr<int>(), mask, point_keys.data_ptr<int16_t>(), m,
                                        neighbours.data_ptr<int32_t>()});
  return ImageLattice{weights, entry_lattice, neighbours, m};
}

// W (or W^T with `reverse`) of one image's lattice applied by the parallel kernels: values (K, N) -> out (K, N).
// `pixel_major`: values and out are (N, K) rows (value (c, pixel) at pixel * K + c) instead of (K, N).
template <class Launch, int D, typename scalar_t>
void apply_image_parallel(const scalar_t* weights, const int32_t* entry_lattice, const int32_t* neighbours,
                          int64_t m, int64_t n, const scalar_t* vin, scalar_t* vout, int64_t k, Splat splat,
                          bool reverse, const torch::TensorOptions& opts, bool pixel_major = false) {
  const int64_t cs = pixel_major ? 1 : n, ps = pixel_major ? k : 1;
  constexpr int V = D + 1;
  torch::Tensor order, seg_end;
  if (splat == Splat::kGather) {
    auto entries = torch::from_blob(const_cast<int32_t*>(entry_lattice), {n * V}, opts.dtype(torch::kInt32));
    order = std::get<1>(entries.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    seg_end = torch::bincount(entries, /*weights=*/{}, m).cumsum(0);
  }
  // Channels in chunks so that the two lattice value buffers, 2 (M + 1) x chunk, never exceed this image's
  // share of S (K x N): the lattice can have more points than the image has pixels.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(k, (k * n) / (2 * (m + 1))));
  const double alpha = 1.0 / (1.0 + std::pow(2.0, -D));
  torch::Tensor lattice, other;
  for (int64_t c0 = 0; c0 < k; c0 += chunk) {
    const int64_t kc = std::min(chunk, k - c0);
    const scalar_t* vin_c = vin + c0 * cs;
    if (!lattice.defined() || lattice.size(1) != kc) {
      lattice = torch::empty({m + 1, kc}, opts);
      other = torch::empty({m + 1, kc}, opts);
    }
    switch (splat) {
      case Splat::kGather:
        Launch::run(m * kc, SplatGatherKernel<D, scalar_t>{vin_c, weights, order.data_ptr<int64_t>(),
                                                           seg_end.data_ptr<int64_t>(), cs, kc,
                                                           lattice.data_ptr<scalar_t>(), ps});
        break;
      case Splat::kScatterAtomic:
        lattice.zero_();
        Launch::run(n, SplatScatterKernel<D, scalar_t>{vin_c, weights, entry_lattice, cs, kc,
                                                       lattice.data_ptr<scalar_t>(), ps});
        break;
    }
    // a non-finite value reaches the lattice whatever its weight (inf x 0 is NaN): one check on M x K sums
    TORCH_CHECK_VALUE(lattice.narrow(0, 0, m).isfinite().all().item<bool>(),
                      "lattice_filter: values must be finite (found NaN or inf)");
    lattice[m].zero_();  // the missing neighbour
    other[m].zero_();
    for (int step = 0; step < V; ++step) {
      const int j = reverse ? D - step : step;  // reversed axis order = the exact transpose of W
      Launch::run(m, BlurKernel<scalar_t>{lattice.data_ptr<scalar_t>(), other.data_ptr<scalar_t>(),
                                          neighbours + static_cast<int64_t>(j) * m * 2, kc});
      std::swap(lattice, other);
    }
    Launch::run(n, SliceKernel<D, scalar_t>{lattice.data_ptr<scalar_t>(), weights, entry_lattice, cs, kc,
                                            static_cast<scalar_t>(alpha), vout + c0 * cs, ps});
  }
}

// One image of the regularized loss's filter: image (3, N) float32, values (K, N), out (K, N).
template <class Launch, typename scalar_t>
void filter_image(const float* img, const scalar_t* vin, scalar_t* vout, int64_t k, int64_t h, int64_t w,
                  double sigma_xy, double sigma_rgb, Splat splat, bool reverse, const torch::TensorOptions& opts) {
  const int64_t n = h * w;
  const ImageFeatures feat{img, n, w, static_cast<float>(1.0 / sigma_xy), static_cast<float>(1.0 / sigma_rgb)};
  ImageLattice lat = build_image_parallel<Launch, kD, scalar_t>(feat, n, opts);
  apply_image_parallel<Launch, kD, scalar_t>(lat.weights.data_ptr<scalar_t>(), lat.entries.data_ptr<int32_t>(),
                                             lat.neighbours.data_ptr<int32_t>(), lat.m, n, vin, vout, k, splat,
                                             reverse, opts);
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
  if constexpr (!Launch::kCuda) advise_huge_pages(out.data_ptr(), out.numel() * out.element_size());
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

// ---------------------------------------------------------------------------- a lattice built once, applied many times
// The ops `lattice_build` and `lattice_apply` (the dense CRF applies each lattice 1 + 10 times). A batch's lattices
// are four tensors on the features' device: weights (B, N, D+1) of the features' dtype, entries (B, N, D+1) int32
// (each pixel's d+1 lattice points, numbered within its image), neighbours (sum of (D+1) x M_b x 2) int32 (image
// b's (D+1, M_b, 2) block at (D+1) x 2 x offsets[b]; a missing neighbour is M_b), offsets (B+1) int64 (the prefix
// sums of the images' M_b). lattice_filter is lattice_build + lattice_apply of the image's five features, by the
// same functions (build_image_* and apply_image_* above and in lattice_serial.h).
#define LOCBE_DISPATCH_DIM(d, NAME, ...)                                                           \
  [&] {                                                                                              \
    switch (d) {                                                                                     \
      case 2: { constexpr int NAME = 2; return __VA_ARGS__(); }                                      \
      case 5: { constexpr int NAME = 5; return __VA_ARGS__(); }                                      \
      default: TORCH_CHECK_VALUE(false, "lattice: feature dimension must be 2 or 5, got ", d);      \
    }                                                                                                \
  }()

// features: (B, N, D) float32/float64, already divided by their sigmas.
template <class Launch>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> lattice_build_impl(
    const torch::Tensor& features_in) {
  TORCH_CHECK_VALUE(features_in.dim() == 3, "lattice_build: features must be (B, N, D)");
  TORCH_CHECK_VALUE(features_in.scalar_type() == torch::kFloat32 || features_in.scalar_type() == torch::kFloat64,
                    "lattice_build: features must be float32 or float64");
  const int64_t b = features_in.size(0), n = features_in.size(1), d = features_in.size(2);
  TORCH_CHECK_VALUE(n * (d + 1) < (int64_t{1} << 30), "lattice_build: too many pixels (", n, ")");
  const auto opts = features_in.options();
  auto features = features_in.to(torch::kFloat32).contiguous();  // the elevation is float32 arithmetic
  auto offsets = torch::zeros({b + 1}, torch::TensorOptions().dtype(torch::kInt64));
  torch::Tensor weights, entries, neighbours;
  LOCBE_DISPATCH_DIM(d, D, [&] {
    constexpr int V = D + 1;
    weights = torch::empty({b, n, V}, opts);
    entries = torch::empty({b, n, V}, opts.dtype(torch::kInt32));
    AT_DISPATCH_FLOATING_TYPES(weights.scalar_type(), "lattice_build", [&] {
      const float* f = features.data_ptr<float>();
      if constexpr (Launch::kCuda) {
        std::vector<torch::Tensor> blocks;
        for (int64_t bi = 0; bi < b; ++bi) {
          ImageLattice lat = build_image_parallel<Launch, D, scalar_t>(TensorFeatures<D>{f + bi * n * D}, n, opts);
          weights[bi].view({-1}).copy_(lat.weights);
          entries[bi].view({-1}).copy_(lat.entries);
          blocks.push_back(lat.neighbours.view({-1}));
          offsets[bi + 1] = offsets[bi].item<int64_t>() + lat.m;
        }
        neighbours = torch::cat(blocks);
      } else {
        std::vector<std::vector<int32_t>> blocks(b);
        at::parallel_for(0, b, 0, [&](int64_t b0, int64_t b1) {
          for (int64_t bi = b0; bi < b1; ++bi) {
            serial::Workspace& ws = serial::workspace();
            StageClock clock(profile_stages());
            int64_t m = 0;
            scalar_t* w = weights.data_ptr<scalar_t>() + bi * n * V;
            int32_t* e = entries.data_ptr<int32_t>() + bi * n * V;
            serial::run_best_isa([&](auto isa) LOCBE_INLINE_LAMBDA {
              m = serial::build_image_whole<D, decltype(isa)>(TensorFeatures<D>{f + bi * n * D}, n, w, e, ws, clock);
            });
            const int32_t* nb = serial::Workspace::take<int32_t>(ws.neighbours, V * m * 2);
            blocks[bi].assign(nb, nb + V * m * 2);
          }
        });
        int64_t total = 0;
        for (int64_t bi = 0; bi < b; ++bi) {
          total += static_cast<int64_t>(blocks[bi].size()) / (2 * V);
          offsets[bi + 1] = total;
        }
        neighbours = torch::empty({total * 2 * V}, opts.dtype(torch::kInt32));
        int32_t* dst = neighbours.data_ptr<int32_t>();
        for (int64_t bi = 0; bi < b; ++bi) dst = std::copy(blocks[bi].begin(), blocks[bi].end(), dst);
      }
    });
  });
  return {weights, entries, neighbours, offsets.to(opts.device())};
}

// values (B, K, N...) whose memory is (B, N, K): channel stride 1, pixel stride K (a (B, N, K) tensor transposed)
inline bool pixel_major_layout(const torch::Tensor& t) {
  if (t.dim() != 3 || t.size(1) <= 1) return false;
  return t.stride(1) == 1 && t.stride(2) == t.size(1) && t.stride(0) == t.size(1) * t.size(2);
}

// W (or W^T with `reverse`) of each image's lattice applied to values (B, K, ...) with N pixels per channel, written
// to `out` (contiguous, values' shape and dtype; not overlapping values): lattice_apply allocates it,
// lattice_apply_out takes the caller's (the CRF's buffers, reused at every iteration).
template <class Launch>
void lattice_apply_into(const torch::Tensor& weights, const torch::Tensor& entries, const torch::Tensor& neighbours,
                        const torch::Tensor& offsets, const torch::Tensor& values_in, bool reverse,
                        torch::Tensor& out) {
  TORCH_CHECK_VALUE(weights.dim() == 3 && entries.sizes() == weights.sizes(),
                    "lattice_apply: weights and entries must be (B, N, D+1)");
  TORCH_CHECK_VALUE(entries.scalar_type() == torch::kInt32 && neighbours.scalar_type() == torch::kInt32 &&
                        offsets.scalar_type() == torch::kInt64 && offsets.dim() == 1 &&
                        offsets.size(0) == weights.size(0) + 1,
                    "lattice_apply: entries/neighbours int32, offsets int64 (B+1): pass what lattice_build returned");
  TORCH_CHECK_VALUE(values_in.dim() >= 2 && values_in.size(0) == weights.size(0),
                    "lattice_apply: values must be (B, K, ...) with the lattice's batch size");
  TORCH_CHECK_VALUE(values_in.scalar_type() == weights.scalar_type(),
                    "lattice_apply: values must have the lattice weights' dtype (the features')");
  TORCH_CHECK_VALUE(values_in.device() == weights.device() && entries.device() == weights.device() &&
                        neighbours.device() == weights.device(),
                    "lattice_apply: the lattice and the values must be on one device");
  const int64_t b = weights.size(0), n = weights.size(1), d = weights.size(2) - 1, k = values_in.size(1);
  TORCH_CHECK_VALUE(values_in.numel() == b * k * n, "lattice_apply: values have ", values_in.numel() / std::max<int64_t>(b * k, 1),
                    " pixels per channel, the lattice ", n);
  // (B, K, N) in memory, or pixel-major (B, N, K) memory seen as (B, K, N) (pixel_major_layout): taken as is
  const bool pixel_major = pixel_major_layout(values_in);
  auto values = pixel_major ? values_in : values_in.contiguous();
  TORCH_CHECK_VALUE(out.sizes() == values.sizes() && out.scalar_type() == values.scalar_type() &&
                        out.device() == values.device() &&
                        (pixel_major ? pixel_major_layout(out) : out.is_contiguous()),
                    "lattice_apply_out: out must have the values' shape, dtype, device and layout (contiguous, or "
                    "pixel-major when the values are)");
  TORCH_CHECK_VALUE(out.data_ptr() != values.data_ptr() || out.numel() == 0, "lattice_apply_out: out is the values");
  if (out.numel() == 0) return;
  auto w_c = weights.contiguous();
  auto e_c = entries.contiguous();
  auto nb_c = neighbours.contiguous();
  auto off = offsets.to(torch::kCPU);  // B+1 sizes read back; the data stay on the device
  const int64_t* o = off.data_ptr<int64_t>();
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  LOCBE_DISPATCH_DIM(d, D, [&] {
    constexpr int V = D + 1;
    AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "lattice_apply", [&] {
      const scalar_t* vin = values.data_ptr<scalar_t>();
      scalar_t* vout = out.data_ptr<scalar_t>();
      const scalar_t* wp = w_c.data_ptr<scalar_t>();
      const int32_t* ep = e_c.data_ptr<int32_t>();
      const int32_t* np = nb_c.data_ptr<int32_t>();
      if constexpr (Launch::kCuda) {
        const Splat splat = deterministic ? Splat::kGather : Splat::kScatterAtomic;
        for (int64_t bi = 0; bi < b; ++bi)
          apply_image_parallel<Launch, D, scalar_t>(wp + bi * n * V, ep + bi * n * V, np + o[bi] * V * 2,
                                                    o[bi + 1] - o[bi], n, vin + bi * k * n, vout + bi * k * n, k,
                                                    splat, reverse, values.options(), pixel_major);
      } else {
        // whole images per thread, an image's channels split between threads when there are fewer images than
        // threads (channels are independent: the result does not depend on the split)
        const int64_t threads = at::get_num_threads();
        const int64_t splits = std::min<int64_t>(k, std::max<int64_t>(1, (threads + b - 1) / b));
        at::parallel_for(0, b * splits, 0, [&](int64_t i0, int64_t i1) {
          for (int64_t item = i0; item < i1; ++item) {
            const int64_t bi = item / splits, s = item % splits;
            const int64_t c0 = k * s / splits, c1 = k * (s + 1) / splits;
            StageClock clock(profile_stages());
            const int64_t first = bi * k * n + c0 * (pixel_major ? 1 : n);  // channel c0 of image bi
            serial::run_best_isa([&](auto isa) LOCBE_INLINE_LAMBDA {
              serial::apply_image_whole<D, decltype(isa)>(wp + bi * n * V, ep + bi * n * V, np + o[bi] * V * 2,
                                                          o[bi + 1] - o[bi], n, vin + first, vout + first, c1 - c0,
                                                          reverse, serial::workspace(), clock, /*buffer_share=*/1,
                                                          /*ld=*/pixel_major ? k : 0);
            });
          }
        });
      }
    });
  });
}

template <class Launch>
torch::Tensor lattice_apply_impl(const torch::Tensor& weights, const torch::Tensor& entries,
                                 const torch::Tensor& neighbours, const torch::Tensor& offsets,
                                 const torch::Tensor& values, bool reverse) {
  auto out = pixel_major_layout(values) ? torch::empty_strided(values.sizes(), values.strides(), values.options())
                                         : torch::empty(values.sizes(), values.options());
  lattice_apply_into<Launch>(weights, entries, neighbours, offsets, values, reverse, out);
  return out;
}

}  // namespace locbe

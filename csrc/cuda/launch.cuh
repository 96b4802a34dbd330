// Launch helpers shared by the CUDA kernels: block sizes, the block-wide sum, the device guard.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../mythos_ops.h"

namespace mythos {

constexpr int kMaxThreads = 256;

// Threads for a block that walks one row of `dim` elements: a multiple of the warp size.
inline int row_threads(int64_t dim) {
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (dim + 31) / 32 * 32)));
}

// Blocks for a grid-stride loop over n elements.
inline int64_t grid_blocks(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kMaxThreads - 1) / kMaxThreads, int64_t{1} << 20));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t multiprocessor_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

// Sum of v over the block (blockDim.x a multiple of 32); every thread gets the result.
template <typename T>
__device__ inline T block_sum(T v) {
  __shared__ T warp_sums[kMaxThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  T total = T(0);
  for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) total += warp_sums[w];
  __syncthreads();  // warp_sums may be reused by the next call
  return total;
}

}  // namespace mythos

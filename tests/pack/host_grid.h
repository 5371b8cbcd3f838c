// What a csrc/ kernel needs to compile for the host, and a launch that runs its grid.
//
// The kernels use no shared memory and no block-wide synchronisation, so running every
// (block, thread) of the grid one after another computes exactly what the GPU does.
// Each shim includes this, then the kernel source, then defines its extern "C" launch.
#pragma once

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct PdxDim3 {
  unsigned int x, y, z;
};
static PdxDim3 blockIdx, threadIdx, blockDim, gridDim;

// Runs `thread()` once per (block, thread) of a (gx, gy) grid of bx-thread blocks.
template <class Thread>
static void pdx_run_grid(unsigned int gx, unsigned int gy, unsigned int bx, Thread thread) {
  gridDim = {gx, gy, 1};
  blockDim = {bx, 1, 1};
  for (unsigned int y = 0; y < gy; ++y) {
    for (unsigned int x = 0; x < gx; ++x) {
      for (unsigned int t = 0; t < bx; ++t) {
        blockIdx = {x, y, 0};
        threadIdx = {t, 0, 0};
        thread();
      }
    }
  }
}

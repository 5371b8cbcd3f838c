// Compiles csrc/devsum.cu for the host, so the kernel's own code runs on CPU.
//
// Each thread only reads its words and adds its sum to the chunk's accumulator with one
// atomicAdd, so running every (block, thread) of the grid one after another computes
// exactly what the GPU does. The test compiles this with g++
// (-DPDX_KERNEL_SOURCE=<path>) and calls pdx_host_devsum via ctypes.

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict

struct PdxDim3 {
  unsigned int x, y, z;
};
static PdxDim3 blockIdx, threadIdx, blockDim, gridDim;

static unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long old = *p;
  *p = old + v;
  return old;
}

#include PDX_KERNEL_SOURCE

extern "C" int pdx_host_devsum(unsigned int gx, unsigned int gy, unsigned int bx, const PdxSumSeg* segs) {
  gridDim = {gx, gy, 1};
  blockDim = {bx, 1, 1};
  for (unsigned int y = 0; y < gy; ++y) {
    for (unsigned int x = 0; x < gx; ++x) {
      for (unsigned int t = 0; t < bx; ++t) {
        blockIdx = {x, y, 0};
        threadIdx = {t, 0, 0};
        pdx_devsum(segs);
      }
    }
  }
  return 0;
}

// Compiles csrc/devsum.cu for the host, so the kernel's own code runs on CPU.
//
// Each thread only reads its words and adds its sum to the chunk's accumulator with one
// atomicAdd, so a sequential grid (host_grid.h) computes exactly what the GPU does. The
// test compiles this with g++ (-DPDX_KERNEL_SOURCE=<path>) and calls pdx_host_devsum via
// ctypes.

#include "host_grid.h"

static unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  unsigned long long old = *p;
  *p = old + v;
  return old;
}

#include PDX_KERNEL_SOURCE

extern "C" int pdx_host_devsum(unsigned int gx, unsigned int gy, unsigned int bx, const PdxSumSeg* segs) {
  pdx_run_grid(gx, gy, bx, [&] { pdx_devsum(segs); });
  return 0;
}

// Compiles csrc/kv_pack.cu for the host, so the kernels' index math runs on CPU.
//
// The kernels use no shared memory and no synchronisation, so running every (block,
// thread) of the grid one after another gives exactly what the GPU computes. The test
// compiles this with g++ (-DPDX_KERNEL_SOURCE=<path>) and calls pdx_host_launch via ctypes.

#define __global__
#define __device__
#define __restrict__ __restrict

struct PdxDim3 {
  unsigned int x, y, z;
};
static PdxDim3 blockIdx, threadIdx, blockDim, gridDim;

#include PDX_KERNEL_SOURCE

extern "C" int pdx_host_launch(int pack, unsigned int gx, unsigned int gy, unsigned int bx,
                               const PdxSeg* segs, const int* tables, unsigned char* buf) {
  gridDim = {gx, gy, 1};
  blockDim = {bx, 1, 1};
  for (unsigned int y = 0; y < gy; ++y) {
    for (unsigned int x = 0; x < gx; ++x) {
      for (unsigned int t = 0; t < bx; ++t) {
        blockIdx = {x, y, 0};
        threadIdx = {t, 0, 0};
        if (pack) {
          pdx_pack_kv(segs, tables, buf);
        } else {
          pdx_unpack_kv(segs, tables, buf);
        }
      }
    }
  }
  return 0;
}

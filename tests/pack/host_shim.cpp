// Compiles csrc/kv_pack.cu for the host, so the kernels' index math runs on CPU.
//
// The test compiles this with g++ (-DPDX_KERNEL_SOURCE=<path>) and calls pdx_host_launch
// via ctypes; host_grid.h says why a sequential grid gives the GPU's result.

#include "host_grid.h"

#include PDX_KERNEL_SOURCE

extern "C" int pdx_host_launch(int pack, unsigned int gx, unsigned int gy, unsigned int bx,
                               const PdxSeg* segs, const int* tables, unsigned char* buf) {
  pdx_run_grid(gx, gy, bx, [&] {
    if (pack) {
      pdx_pack_kv(segs, tables, buf);
    } else {
      pdx_unpack_kv(segs, tables, buf);
    }
  });
  return 0;
}

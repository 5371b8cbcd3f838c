// devsum64 of chunks in GPU memory: the checksum a VRAM->VRAM transfer carries per chunk.
//
// The algorithm is specified, with its numpy reference, in pdxfer/protocol/devsum.py:
// term_i = fmix64(w_i ^ ((i + 1) * GOLDEN)) over the chunk's little-endian 64-bit words
// (the last one zero-padded), summed mod 2^64. Because the sum is order-free, every
// thread adds its own words and one atomicAdd per thread combines them, whatever the
// grid. This kernel produces the sums only; the host applies the final mix with the
// length (devsum.finish), which is one multiply-xor and needs no launch.
//
// One launch covers many chunks: blockIdx.y picks the chunk's descriptor, the threads of
// the x dimension stride over its words. A chunk may start at any byte address: words
// are loaded whole when 8-byte aligned, byte by byte otherwise (and for the tail).
//
// Compiled at run time by NVRTC (through CuPy's RawModule), checked in CI by nvcc for
// sm_80 and sm_90, and compiled for the host by tests/pack/devsum_shim.cpp so the same
// code is tested against the reference on CPU. Hence: no #include, extern "C".

typedef unsigned long long pdx_u64;

struct PdxSumSeg {
  pdx_u64 addr;    // device address of the chunk's first byte
  pdx_u64 nbytes;  // its length
  pdx_u64 out;     // device address of the chunk's pdx_u64 accumulator (zeroed by the host)
};

#define PDX_GOLDEN 0x9E3779B97F4A7C15ULL
#define PDX_C1 0xFF51AFD7ED558CCDULL
#define PDX_C2 0xC4CEB9FE1A85EC53ULL

__device__ __forceinline__ pdx_u64 pdx_fmix64(pdx_u64 x) {
  x ^= x >> 33;
  x *= PDX_C1;
  x ^= x >> 33;
  x *= PDX_C2;
  x ^= x >> 33;
  return x;
}

__device__ __forceinline__ pdx_u64 pdx_load_word(const unsigned char* p, pdx_u64 i, pdx_u64 nbytes) {
  const unsigned char* q = p + 8 * i;
  pdx_u64 left = nbytes - 8 * i;
  if (left >= 8 && ((pdx_u64)q & 7) == 0) {
    return *(const pdx_u64*)q;
  }
  pdx_u64 w = 0;
  pdx_u64 k = left < 8 ? left : 8;
  for (pdx_u64 b = 0; b < k; ++b) {
    w |= (pdx_u64)q[b] << (8 * b);
  }
  return w;
}

extern "C" __global__ void pdx_devsum(const PdxSumSeg* __restrict__ segs) {
  const PdxSumSeg s = segs[blockIdx.y];
  const unsigned char* p = (const unsigned char*)s.addr;
  const pdx_u64 nwords = (s.nbytes + 7) / 8;
  const pdx_u64 stride = (pdx_u64)gridDim.x * blockDim.x;
  pdx_u64 acc = 0;
  for (pdx_u64 i = (pdx_u64)blockIdx.x * blockDim.x + threadIdx.x; i < nwords; i += stride) {
    acc += pdx_fmix64(pdx_load_word(p, i, s.nbytes) ^ ((i + 1) * PDX_GOLDEN));
  }
  if (acc != 0) {
    atomicAdd((pdx_u64*)s.out, acc);
  }
}

// Paged KV cache <-> packed contiguous buffer, for all layers and groups in one launch.
//
// Compiled at run time by NVRTC (through CuPy's RawModule), checked in CI by nvcc for
// sm_80 and sm_90, and compiled for the host by tests/pack/host_shim.cpp so the same
// index math runs, and is tested byte for byte against the torch reference, on CPU.
// Hence: no #include, extern "C" entry points, C++11-only features.
//
// Work is described by a table of segments, one per (group, layer, plane), built by
// pdxfer/pack/plan.py (SEG_FIELDS lists the fields in this order). blockIdx.y picks the
// segment; the threads of the x dimension stride over its `vec`-byte units. A unit is
// located as (entry e, head h, unit v of that head's row):
//   cache: cache_base + block(e) * stride_block + slot(e) * stride_slot
//          + (cache_head_start + h) * stride_head + v * vec
//   buf:   buf + buf_offset + ((e * buf_heads) + buf_head_start + h) * row_bytes + v * vec
// where block(e) = tables[table_offset + (first_slot + e) / block_size] and
// slot(e) = (first_slot + e) % block_size. Because the packed side is token-major and
// the cache side is addressed through its own strides and block table, the same kernel
// re-blocks (any block size on either side) and slices heads (tensor parallelism).
// `vec` is 16 when every address and stride of the segment allows 16-byte accesses, and
// falls back to 8, 4, 2 or 1 otherwise; the host picks it per segment.

typedef long long pdx_i64;
typedef unsigned int pdx_u32;

struct PdxSeg {
  pdx_i64 cache_base;
  pdx_i64 buf_offset;
  pdx_i64 stride_block;
  pdx_i64 stride_slot;
  pdx_i64 stride_head;
  pdx_i64 table_offset;
  pdx_i64 first_slot;
  pdx_i64 block_size;
  pdx_i64 n_entries;
  pdx_i64 n_heads;
  pdx_i64 cache_head_start;
  pdx_i64 buf_heads;
  pdx_i64 buf_head_start;
  pdx_i64 row_bytes;
  pdx_i64 vec;
  pdx_i64 pad_bytes;
};

struct alignas(16) PdxVec16 { unsigned long long a, b; };
struct alignas(8) PdxVec8 { unsigned long long a; };
struct alignas(4) PdxVec4 { unsigned int a; };
struct alignas(2) PdxVec2 { unsigned short a; };
struct PdxVec1 { unsigned char a; };

template <typename V, bool PACK>
__device__ void pdx_copy_segment(const PdxSeg& s, const int* __restrict__ tables,
                                 unsigned char* __restrict__ buf, pdx_u32 tid, pdx_u32 nthreads) {
  // Totals fit in 32 bits (plan.py refuses larger segments): 32-bit division is several
  // times cheaper than 64-bit on GPUs, and this loop is all index math and one copy.
  const pdx_u32 per_row = (pdx_u32)(s.row_bytes / (pdx_i64)sizeof(V));
  const pdx_u32 heads = (pdx_u32)s.n_heads;
  const pdx_u32 total = (pdx_u32)s.n_entries * heads * per_row;
  const pdx_u32 bsz = (pdx_u32)s.block_size;
  const pdx_u32 first = (pdx_u32)s.first_slot;
  unsigned char* const cache = (unsigned char*)s.cache_base;
  unsigned char* const packed = buf + s.buf_offset;
  for (pdx_u32 i = tid; i < total; i += nthreads) {
    const pdx_u32 v = i % per_row;
    const pdx_u32 r = i / per_row;
    const pdx_u32 h = r % heads;
    const pdx_u32 e = r / heads;
    const pdx_u32 j = first + e;
    const pdx_i64 blk = (pdx_i64)tables[s.table_offset + j / bsz];
    const pdx_i64 slot = (pdx_i64)(j % bsz);
    V* c = (V*)(cache + blk * s.stride_block + slot * s.stride_slot +
                (s.cache_head_start + (pdx_i64)h) * s.stride_head) + v;
    V* b = (V*)(packed + ((pdx_i64)e * s.buf_heads + s.buf_head_start + (pdx_i64)h) * s.row_bytes) + v;
    if (PACK) {
      *b = *c;
    } else {
      *c = *b;
    }
  }
}

template <bool PACK>
__device__ void pdx_run(const PdxSeg* __restrict__ segs, const int* __restrict__ tables,
                        unsigned char* __restrict__ buf) {
  const PdxSeg s = segs[blockIdx.y];
  const pdx_u32 tid = blockIdx.x * blockDim.x + threadIdx.x;
  const pdx_u32 nthreads = gridDim.x * blockDim.x;
  switch (s.vec) {
    case 16: pdx_copy_segment<PdxVec16, PACK>(s, tables, buf, tid, nthreads); break;
    case 8: pdx_copy_segment<PdxVec8, PACK>(s, tables, buf, tid, nthreads); break;
    case 4: pdx_copy_segment<PdxVec4, PACK>(s, tables, buf, tid, nthreads); break;
    case 2: pdx_copy_segment<PdxVec2, PACK>(s, tables, buf, tid, nthreads); break;
    default: pdx_copy_segment<PdxVec1, PACK>(s, tables, buf, tid, nthreads); break;
  }
  // Packing zero-fills the alignment padding after the segment, so that a packed
  // buffer (and its checksum) depends on the KV bytes only.
  if (PACK && tid < (pdx_u32)s.pad_bytes) {
    buf[s.buf_offset + s.n_entries * s.buf_heads * s.row_bytes + tid] = 0;
  }
}

// Gather: paged caches -> packed buffer. grid = (x, number of segments), block = (threads).
extern "C" __global__ void pdx_pack_kv(const PdxSeg* __restrict__ segs, const int* __restrict__ tables,
                                       unsigned char* __restrict__ buf) {
  pdx_run<true>(segs, tables, buf);
}

// Scatter: packed buffer -> paged caches (same descriptors, opposite direction).
extern "C" __global__ void pdx_unpack_kv(const PdxSeg* __restrict__ segs, const int* __restrict__ tables,
                                         unsigned char* __restrict__ buf) {
  pdx_run<false>(segs, tables, buf);
}

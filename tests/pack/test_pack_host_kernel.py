"""csrc/kv_pack.cu compiled for the host, against the torch reference, byte for byte.

Runs the real kernel source and the real launch planning (descriptor table, block
table, vector width, padding) on CPU memory, so index math and alignment fallbacks are
tested in CI without a GPU. The GPU tests repeat this on a device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdxfer.layout.heads import HeadMap
from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup
from pdxfer.pack import allocate, bind, pack_reference, plane_views, unpack_reference
from pdxfer.pack.plan import F
from pdxfer.pack.testing import blocks_needed, layouts, page_tables, peer_layouts, token_ranges

HostRun = Callable[..., Any]  # the `host_kernel` fixture of conftest.py

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def _gen(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _heads(data: st.DataObject, layout: KVLayout) -> list[HeadMap | None]:
    """A random head map per group: a sub-range, placed somewhere inside wider rows."""
    maps: list[HeadMap | None] = []
    for g in layout.groups:
        if not data.draw(st.booleans()):
            maps.append(None)
            continue
        start = data.draw(st.integers(0, g.num_kv_heads - 1))
        count = data.draw(st.integers(1, g.num_kv_heads - start))
        extra = data.draw(st.integers(0, 2))
        buf_start = data.draw(st.integers(0, extra))
        maps.append(HeadMap(start, count, buf_start, count + extra))
    return maps


def _offset_buffer(n: int, misalign: int, fill: int) -> torch.Tensor:
    """A buffer of n bytes starting `misalign` bytes past a 64-byte boundary."""
    raw = torch.full((n + 128,), fill, dtype=torch.uint8)
    skip = (-raw.data_ptr() % 64) + misalign
    return raw[skip : skip + n]


@SETTINGS
@given(st.data())
def test_host_kernel_pack_matches_reference(host_kernel: HostRun, data: st.DataObject) -> None:
    layout = data.draw(layouts())
    t0, t1 = data.draw(token_ranges())
    heads = _heads(data, layout)
    gen = _gen(data)
    nb = blocks_needed(layout, t1)
    bound = bind(layout, allocate(layout, nb, generator=gen))
    tables = page_tables(layout, t1, nb, gen)
    n = layout.packed_nbytes(t0, t1, heads)
    want = pack_reference(bound, tables, t0, t1, out=torch.full((n,), 0xA5, dtype=torch.uint8), heads=heads)
    got = _offset_buffer(n, data.draw(st.integers(0, 15), label="misalign"), 0xA5)
    host_kernel(bound, True, tables, t0, t1, got, heads)
    assert torch.equal(got, want)


@SETTINGS
@given(st.data())
def test_host_kernel_unpack_matches_reference(host_kernel: HostRun, data: st.DataObject) -> None:
    src = data.draw(layouts())
    dst = data.draw(peer_layouts(src))
    t0, t1 = data.draw(token_ranges())
    gen = _gen(data)
    snb, dnb = blocks_needed(src, t1), blocks_needed(dst, t1)
    sbound = bind(src, allocate(src, snb, generator=gen))
    buf = pack_reference(sbound, page_tables(src, t1, snb, gen), t0, t1)
    buf = _offset_buffer(buf.numel(), data.draw(st.integers(0, 15), label="misalign"), 0).copy_(buf)
    dcaches = allocate(dst, dnb, generator=gen)
    expected = {n: tuple(t.clone() for t in c) if isinstance(c, tuple) else c.clone() for n, c in dcaches.items()}
    dtables = page_tables(dst, t1, dnb, gen)
    unpack_reference(bind(dst, expected), dtables, t0, t1, buf)
    host_kernel(bind(dst, dcaches), False, dtables, t0, t1, buf)
    for g in dst.groups:
        for n in g.layers:
            for got, want in zip(plane_views(g, dcaches[n]), plane_views(g, expected[n])):
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), n


def test_vector_width_follows_alignment(host_kernel: HostRun) -> None:
    """16-byte accesses when rows and addresses allow; narrower, still correct, when not."""
    group = LayerGroup("a", CacheKind.KV_JOINT_HND, 16, 4, 64, "bfloat16", ("l0",))
    odd = LayerGroup("i", CacheKind.MLA, 4, 1, 33, "uint8", ("x0",))  # 33-byte rows
    layout = KVLayout((group, odd))
    gen = torch.Generator().manual_seed(3)
    bound = bind(layout, allocate(layout, [4, 12], generator=gen))
    tables = [[2, 0, 3], [5, 1, 7, 9, 11, 2, 0, 4, 3, 6, 8, 10]]
    n = layout.packed_nbytes(0, 40)
    want = pack_reference(bound, tables, 0, 40)
    for misalign, widths in ((0, [16, 16, 1]), (8, [8, 8, 1]), (4, [4, 4, 1]), (2, [2, 2, 1]), (1, [1, 1, 1])):
        got = _offset_buffer(n, misalign, 0xFF)
        plan = host_kernel(bound, True, tables, 0, 40, got)
        assert plan.segs[:, F["vec"]].tolist() == widths
        assert torch.equal(got, want), misalign


def test_pack_zeroes_padding(host_kernel: HostRun) -> None:
    layout = KVLayout((LayerGroup("i", CacheKind.MLA, 4, 1, 3, "uint8", ("x0", "x1")),))
    bound = bind(layout, allocate(layout, 4, generator=torch.Generator().manual_seed(4)))
    got = _offset_buffer(layout.packed_nbytes(0, 5), 0, 0xFF)
    host_kernel(bound, True, [[1, 2]], 0, 5, got)
    assert got.numel() == 32 and not got[15:16].any() and not got[31:].any()
    assert torch.equal(got, pack_reference(bound, [[1, 2]], 0, 5))


def test_host_kernel_vllm_hnd_stride_order(host_kernel: HostRun) -> None:
    """vLLM allocates HND by permuting strides under the logical NHD shape; both paths agree."""
    from pdxfer.pack import Packer

    gen = torch.Generator().manual_seed(6)
    raw = torch.randint(0, 256, (3, 2, 10, 8, 16, 64 * 2), dtype=torch.uint8, generator=gen)  # [L, 2, nb, h, bs, d]
    kv = {f"layers.{i}.attn": raw[i].view(torch.bfloat16).transpose(2, 3) for i in range(3)}  # [2, nb, bs, h, d]
    p = Packer.from_vllm(kv, groups=[(tuple(kv), 16)])
    assert p.layout.groups[0].kind is CacheKind.KV_JOINT_NHD and p.layout.groups[0].num_kv_heads == 8
    tables = [[7, 2, 5]]
    want = p.pack(tables, 3, 40)
    got = _offset_buffer(want.numel(), 0, 0)
    plan = host_kernel(p.bound, True, tables, 3, 40, got)
    assert torch.equal(got, want)
    assert set(plan.segs[:, F["vec"]].tolist()) == {16}
    layer0 = kv["layers.0.attn"]
    k_first = want[: 8 * 128].view(torch.bfloat16).view(8, 64)  # token 3, all heads, K
    assert torch.equal(k_first.view(torch.int16), layer0[0, 7, 3].view(torch.int16))


def test_cuda_launcher_plumbing_on_host(host_kernel: HostRun) -> None:
    """CudaLauncher.run (validation, plan, descriptor blob, pointer arguments) with the
    host-compiled kernel standing in for the device: only _upload and _launch differ."""
    import ctypes

    from pdxfer.pack.cuda import CudaLauncher

    launches: list[tuple[str, tuple[int, ...]]] = []
    fn = host_kernel.lib.pdx_host_launch  # type: ignore[attr-defined]

    class HostLauncher(CudaLauncher):
        def _upload(self, host):  # type: ignore[no-untyped-def]
            self.kept = torch.from_numpy(host.copy())
            return self.kept

        def _launch(self, kernel, grid, block, args):  # type: ignore[no-untyped-def]
            launches.append((kernel, grid))
            fn(int(kernel == "pack"), grid[0], grid[1], block[0], *(ctypes.c_void_p(int(a)) for a in args))

    layout = KVLayout((
        LayerGroup("a", CacheKind.KV_SPLIT, 4, 3, 16, "float16", ("a0", "a1")),
        LayerGroup("m", CacheKind.MLA, 2, 1, 12, "bfloat16", ("m0",), compress_ratio=2),
    ))
    gen = torch.Generator().manual_seed(8)
    src = bind(layout, allocate(layout, 12, generator=gen))
    dst_caches = allocate(layout, 12, fill="zero")
    dst = bind(layout, dst_caches)
    tables, dtables = [[3, 1, 4, 0, 9], [5, 6, 2, 8, 11]], [[7, 2, 1, 10, 5], [0, 1, 2, 3, 4]]
    heads = [HeadMap(1, 2), None]
    n = layout.packed_nbytes(2, 19, heads)
    got = torch.full((n,), 0xEE, dtype=torch.uint8)
    HostLauncher(src, kernels=("pack", "unpack")).run(True, tables, 2, 19, got, heads)
    assert torch.equal(got, pack_reference(src, tables, 2, 19, heads=heads))
    HostLauncher(dst, kernels=("pack", "unpack")).run(False, dtables, 2, 19, got, heads)
    assert torch.equal(pack_reference(dst, dtables, 2, 19, heads=heads), got)
    assert [k for k, _ in launches] == ["pack", "unpack"] and launches[0][1][1] == 2 * 2 + 1  # segments: 2 layers x (K, V) + 1 latent

"""CUDA kernels (through CuPy) against the torch reference, byte for byte. Needs a GPU.

Same properties as the host-kernel tests, plus engine-sized shapes, a non-default
stream and vLLM-style tensors. Skipped without CUDA or without CuPy.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdxfer.layout.heads import HeadMap
from pdxfer.layout.kv import CacheKind, KVLayout, LayerGroup
from pdxfer.pack import Packer, allocate, bind, pack_reference, plane_views, unpack_reference
from pdxfer.pack.testing import blocks_needed, layouts, page_tables, peer_layouts, token_ranges

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _cupy() -> None:
    pytest.importorskip("cupy", reason="CuPy compiles the kernels: install pdxfer[cuda12] or [cuda13]")


def _to(caches: dict[str, Any], device: str) -> dict[str, Any]:
    return {n: tuple(t.to(device) for t in c) if isinstance(c, tuple) else c.to(device) for n, c in caches.items()}


def _gen(data: st.DataObject) -> torch.Generator:
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))


def _same_caches(layout: KVLayout, a: dict[str, Any], b: dict[str, Any]) -> None:
    for g in layout.groups:
        for n in g.layers:
            for x, y in zip(plane_views(g, a[n]), plane_views(g, b[n])):
                assert torch.equal(x.view(torch.uint8).cpu(), y.view(torch.uint8).cpu()), n


@SETTINGS
@given(st.data())
def test_gpu_pack_matches_reference(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    t0, t1 = data.draw(token_ranges())
    gen = _gen(data)
    nb = blocks_needed(layout, t1)
    cpu = allocate(layout, nb, generator=gen)
    tables = page_tables(layout, t1, nb, gen)
    heads = [None if g.num_kv_heads == 1 or not data.draw(st.booleans())
             else HeadMap(1, g.num_kv_heads - 1, 1, g.num_kv_heads + 1) for g in layout.groups]
    n = layout.packed_nbytes(t0, t1, heads)
    want = pack_reference(bind(layout, cpu), tables, t0, t1, out=torch.full((n,), 7, dtype=torch.uint8), heads=heads)
    misalign = data.draw(st.integers(0, 15), label="misalign")
    raw = torch.full((n + 16,), 7, dtype=torch.uint8, device="cuda")
    got = Packer(layout, _to(cpu, "cuda")).pack(tables, t0, t1, out=raw[misalign : misalign + n], heads=heads)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)


@SETTINGS
@given(st.data())
def test_gpu_unpack_reblocks_like_reference(data: st.DataObject) -> None:
    src = data.draw(layouts())
    dst = data.draw(peer_layouts(src))
    t0, t1 = data.draw(token_ranges())
    gen = _gen(data)
    snb, dnb = blocks_needed(src, t1), blocks_needed(dst, t1)
    buf = pack_reference(bind(src, allocate(src, snb, generator=gen)), page_tables(src, t1, snb, gen), t0, t1)
    dcpu = allocate(dst, dnb, generator=gen)
    dgpu = _to(dcpu, "cuda")
    dtables = page_tables(dst, t1, dnb, gen)
    unpack_reference(bind(dst, dcpu), dtables, t0, t1, buf)
    Packer(dst, dgpu).unpack(dtables, t0, t1, buf.cuda())
    torch.cuda.synchronize()
    _same_caches(dst, dcpu, dgpu)


def _layers(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(n))


ENGINE_LAYOUTS = {
    "llama8b-nhd": KVLayout((LayerGroup("a", CacheKind.KV_JOINT_NHD, 16, 8, 128, "bfloat16", _layers("l", 32)),)),
    "llama8b-hnd-fp8": KVLayout((LayerGroup("a", CacheKind.KV_JOINT_HND, 16, 8, 128, "float8_e4m3fn", _layers("l", 32)),)),
    "deepseek-mla": KVLayout((LayerGroup("m", CacheKind.MLA, 64, 1, 576, "bfloat16", _layers("l", 8)),)),
    "hetero": KVLayout((
        LayerGroup("attn", CacheKind.KV_SPLIT, 16, 4, 128, "float16", _layers("a", 4)),
        LayerGroup("cmp", CacheKind.MLA, 4, 1, 512, "bfloat16", _layers("c", 4), compress_ratio=4),
        LayerGroup("idx", CacheKind.MLA, 1, 1, 132, "uint8", _layers("i", 4)),
    )),
}


@pytest.mark.parametrize("name", sorted(ENGINE_LAYOUTS))
def test_gpu_engine_shapes_round_trip_on_a_side_stream(name: str) -> None:
    layout = ENGINE_LAYOUTS[name]
    tokens = 1000
    gen = torch.Generator().manual_seed(5)
    nb = blocks_needed(layout, tokens, spare=16)
    cpu = allocate(layout, nb, generator=gen)
    tables = page_tables(layout, tokens, nb, gen)
    want = pack_reference(bind(layout, cpu), tables, 17, tokens)
    dst_layout = KVLayout(tuple(replace(g, block_size=max(1, g.block_size // 2)) for g in layout.groups))
    dnb = blocks_needed(dst_layout, tokens, spare=4)
    dtables = page_tables(dst_layout, tokens, dnb, gen)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        src = Packer(layout, _to(cpu, "cuda"))
        buf = src.pack(tables, 17, tokens)
        dst = Packer(dst_layout, allocate(dst_layout, dnb, device="cuda", fill="zero"))
        dst.unpack(dtables, 17, tokens, buf)
        again = dst.pack(dtables, 17, tokens)
    side.synchronize()
    assert torch.equal(buf.cpu(), want)
    assert torch.equal(again.cpu(), want)


def test_gpu_from_vllm_tensors() -> None:
    """vLLM FlashAttention caches with HND stride order: logical NHD shape, permuted memory."""
    raw = torch.randint(0, 256, (4, 2, 10, 8, 16, 128 * 2), dtype=torch.uint8, device="cuda")  # [L, 2, nb, h, bs, d]
    kv = {f"layers.{i}.attn": raw[i].view(torch.bfloat16).transpose(2, 3) for i in range(4)}
    p = Packer.from_vllm(kv, groups=[(tuple(kv), 16)])
    assert p.backend == "cuda" and p.layout.groups[0].kind is CacheKind.KV_JOINT_NHD
    tables = [[7, 2, 5]]
    got = p.pack(tables, 0, 40)
    want = Packer(p.layout, {n: t.cpu() for n, t in kv.items()}, backend="torch").pack(tables, 0, 40)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)

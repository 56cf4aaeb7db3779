"""Row-block ("two-pass") kernels give the whole-tensor functions' exact bits on tensors that
span several float64 dot-product chunks and many blocks of awkward sizes (issue 16)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from safemerge.methods._tensor import (  # noqa: E402
    ChunkedDots,
    StreamedKth,
    above,
    at_least,
    dot64,
    flat_indices_equal,
    multiply_by_mask,
    order_statistics,
    pack_mask,
    unpack_mask,
)
from safemerge.methods.arcee_fusion import arcee_fusion, arcee_fusion_two_pass  # noqa: E402
from safemerge.methods.blocks import TwoPassJob, row_blocks  # noqa: E402
from safemerge.methods.model_stock import model_stock, model_stock_two_pass  # noqa: E402
from safemerge.methods.multislerp import multislerp_fn, multislerp_two_pass  # noqa: E402
from safemerge.methods.ram import ram_two_pass, ramplus_tl_fn  # noqa: E402
from safemerge.methods.sce import sce, sce_two_pass  # noqa: E402
from safemerge.methods.slerp import nuslerp_fn, nuslerp_two_pass, slerp, slerp_two_pass  # noqa: E402
from safemerge.methods.task_arithmetic import _family_entry  # noqa: E402
from safemerge.methods.task_arithmetic_two_pass import family_kernel  # noqa: E402

SHAPE = (517, 389)  # 201,113 entries: three full 65,536-entry chunks and a tail


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    models = [base + 0.1 * torch.randn(SHAPE, generator=g) for _ in range(n)]
    return base, models


def _streamed(kernel, base, models, params, per_model=None, block_bytes=7 * 389 * 4 + 12,  # noqa: ANN001, ANN202
              generator=None):
    out = torch.full(SHAPE, float("nan"))
    emitted: list[tuple[int, int]] = []

    def emit(rows, part):  # noqa: ANN001, ANN202
        out[rows[0] : rows[1]] = part
        emitted.append(rows)

    done = kernel(TwoPassJob(lambda i, rows: (models[i] if rows is None else models[i][rows[0] : rows[1]]).clone(),
                             lambda rows: (base if rows is None else base[rows[0] : rows[1]]).clone(),
                             len(models), SHAPE, per_model or {}, params, block_bytes, emit, generator=generator))
    assert done
    assert len(emitted) > 10 and emitted[-1][1] == SHAPE[0]  # several blocks; the last one is partial
    return out


@pytest.mark.parametrize("block_rows", [1, 7, 168, 517])
def test_chunked_dots_equal_dot64(block_rows) -> None:
    base, (a,) = _inputs(1)
    acc = ChunkedDots([(0, 0), (1, 1), (0, 1)])
    for r0 in range(0, SHAPE[0], block_rows):
        acc.add([base[r0 : r0 + block_rows], a[r0 : r0 + block_rows]])
    assert [float(x) for x in acc.finish()] == [float(dot64(base, base)), float(dot64(a, a)), float(dot64(base, a))]


@pytest.mark.parametrize("t", [0.0, 0.3, 0.77])
def test_slerp_two_pass_is_bit_identical(t) -> None:
    base, models = _inputs(1)
    assert torch.equal(_streamed(slerp_two_pass, base, models, {"t": t}), slerp(t, base, models[0]))


def test_model_stock_two_pass_is_bit_identical() -> None:
    base, models = _inputs(3, seed=1)
    assert torch.equal(_streamed(model_stock_two_pass, base, models, {}), model_stock(base, models))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_filter_wise_in_row_blocks(filter_wise) -> None:
    base, models = _inputs(3, seed=9)
    whole = model_stock(base, models, filter_wise=filter_wise)
    assert torch.equal(_streamed(model_stock_two_pass, base, models, {"filter_wise": filter_wise}), whole)


@pytest.mark.parametrize("flatten", [True, False])
def test_nuslerp_two_pass_is_bit_identical(flatten) -> None:
    base, models = _inputs(2, seed=10)
    per_model, params = {"weight": [0.3, 0.8]}, {"nuslerp_flatten": flatten, "nuslerp_row_wise": False}
    whole = nuslerp_fn([m.clone() for m in models], base, per_model=per_model, params=params)
    assert torch.equal(_streamed(nuslerp_two_pass, base, models, params, per_model), whole)


def test_nuslerp_slices_along_dim_0_stay_whole() -> None:
    base, models = _inputs(2, seed=10)
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    assert not nuslerp_two_pass(TwoPassJob(lambda i, rows: models[i].clone(), lambda rows: base.clone(), 2, SHAPE,
                                           {"weight": [0.3, 0.8]}, params, 4096, lambda rows, part: None))


@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_two_pass_is_bit_identical(normalize) -> None:
    base, models = _inputs(3, seed=12)
    per_model, params = {"weight": [0.5, 0.2, 0.6]}, {"normalize_weights": normalize, "eps": 1e-8}
    whole = multislerp_fn([m.clone() for m in models], base, per_model=per_model, params=params)
    assert torch.equal(_streamed(multislerp_two_pass, base, models, params, per_model), whole)


def test_ramplus_two_pass_is_bit_identical() -> None:
    """Quantised task vectors: entries changed by no, one and several models in every block."""
    base, models = _inputs(3, seed=13)
    models = [base + (m - base).mul(8).round().div(8) for m in models]
    params = {"epsilon": 0.05, "r": 0.5, "alpha": 0.3}
    whole = ramplus_tl_fn([m.clone() for m in models], base, per_model={}, params=params)
    assert torch.equal(_streamed(ram_two_pass, base, models, params), whole)


@pytest.mark.parametrize("quantised", [False, True])
def test_arcee_fusion_two_pass_is_bit_identical(quantised) -> None:
    """Continuous and quantised task vectors (many tied importances at the quartiles)."""
    base, (other,) = _inputs(1, seed=14)
    if quantised:
        other = base + (other - base).mul(4).round().div(4)
    assert torch.equal(_streamed(arcee_fusion_two_pass, base, [other], {}), arcee_fusion(base, other))


FAMILY_PER_MODEL = {"weight": [0.5, 0.3, -0.2], "density": [0.5, 0.9, 0.2], "gamma": [0.05, 0.01, 0.3],
                    "epsilon": [0.1, 0.05, 0.15]}


def _family_both_ways(name: str, base, models, params, per_model=FAMILY_PER_MODEL, seed: int = 11):  # noqa: ANN001, ANN202
    """(whole-tensor output, row-block output, generator states after each) of family method ``name``."""
    g_whole, g_blocks = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    whole = _family_entry(name, [m.clone() for m in models], base, per_model=per_model, params=params,
                          generator=g_whole)
    blocks = _streamed(family_kernel(name), base, models, params, per_model, generator=g_blocks)
    return whole, blocks, (g_whole.get_state(), g_blocks.get_state())


FAMILY = ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


@pytest.mark.parametrize("rescale", [None, True, False])
@pytest.mark.parametrize("name", FAMILY)
def test_family_two_pass_is_bit_identical(name, rescale) -> None:
    """Every sparsifier with its default rescaling and with it forced on / off; exactly tied
    magnitudes straddle the cut-offs across block boundaries (quantised task vectors)."""
    base, models = _inputs(3, seed=2)
    models = [base + (m - base).mul(16).round().div(16) for m in models]
    params = {} if rescale is None else {"rescale": rescale}
    whole, blocks, (state_whole, state_blocks) = _family_both_ways(name, base, models, params)
    assert torch.equal(blocks, whole)
    assert torch.equal(state_whole, state_blocks)  # the tensor's generator is consumed as the whole path consumes it


@pytest.mark.parametrize("name", FAMILY)
def test_family_two_pass_edge_settings(name) -> None:
    """A model kept whole (density 1), λ and normalisation switched, continuous task vectors."""
    base, models = _inputs(3, seed=5)
    per_model = {**FAMILY_PER_MODEL, "density": [1.0, 0.6, 0.3]}
    params = {"lambda": 0.7, "normalize": name in ("dare_linear", "breadcrumbs", "della_linear")}
    whole, blocks, _ = _family_both_ways(name, base, models, params, per_model, seed=3)
    assert torch.equal(blocks, whole)


def test_breadcrumbs_window_of_ties_only() -> None:
    """A rank window that starts and ends inside one run of equal magnitudes (both cut-offs at the
    same value), and an empty window (density·n < 1), in row blocks."""
    base, models = _inputs(2, seed=6)
    models = [base + (m - base).sign() * 0.25 for m in models]  # every |δ| equal
    per_model = {"weight": [0.6, 0.4], "density": [0.5, 1e-6], "gamma": [0.2, 0.01]}
    whole, blocks, _ = _family_both_ways("breadcrumbs", base, models, {}, per_model)
    assert torch.equal(blocks, whole)


FUSED = ["ties", "breadcrumbs", "breadcrumbs_ties"]


def _with_specials(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inputs whose task vectors hold NaN, ±inf (an inf − inf entry too), ±0 and a −0 base entry, spread
    over the blocks, and magnitudes tied at the cuts."""
    base = base.clone()
    models = [base + (m - base).mul(8).round().div(8) for m in models]
    flat = [m.view(-1) for m in models]
    for k, pos in enumerate(range(0, base.numel(), 7919)):
        i = k % len(models)
        flat[i][pos] = (float("nan"), float("inf"), -float("inf"), base.view(-1)[pos].item())[k % 4]
        base.view(-1)[pos + 1] = -0.0
        flat[(i + 1) % len(models)][pos + 1] = (-0.0, 0.0)[k % 2]
    base.view(-1)[5] = float("inf")
    flat[0][5] = float("inf")  # inf − inf: NaN
    return base, models


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("params", [{}, {"rescale": True, "lambda": 0.7}, {"normalize": False}, {"normalize": True}])
def test_fused_pass_two_equals_the_eager_one_bit_for_bit(name, params, monkeypatch) -> None:
    """The fused loop (``_fused.merge_block``) gives the eager operations' bits, signed zeros and where
    NaN and ±inf appear included, for every model mode: windowed, kept whole (density 1), zeroed (density 0)."""
    import safemerge.methods.task_arithmetic_two_pass as two_pass

    base, models = _with_specials(*_inputs(3, seed=12))
    per_model = {**FAMILY_PER_MODEL, "density": [0.5, 1.0, 0.0] if name == "ties" else [0.5, 0.9, 0.2]}
    fused = _streamed(family_kernel(name), base, models, params, per_model)
    calls = {"n": 0}
    original = two_pass._fused_merge

    def counted(*args):  # noqa: ANN002, ANN202
        merge = original(*args)
        calls["n"] += merge is not None
        return merge

    monkeypatch.setattr(two_pass, "_fused_merge", counted)
    _streamed(family_kernel(name), base, models, params, per_model)
    assert calls["n"] == 1  # (the kernel above went through the fused path)
    monkeypatch.setattr(two_pass, "_fused_merge", lambda *args: None)
    eager = _streamed(family_kernel(name), base, models, params, per_model)
    assert bool(fused.isnan().any())  # (breadcrumbs drops the infinite outliers)
    nan = fused.isnan()
    assert torch.equal(nan, eager.isnan())  # (a NaN's payload is the compiler's choice: LLVM may commute operands)
    assert torch.equal(fused[~nan].view(torch.int32), eager[~nan].view(torch.int32))  # −0 and +0 told apart


def test_family_two_pass_when_the_sample_bracket_misses(monkeypatch) -> None:
    """The exact whole-tensor selection that replaces a missed bracket gives the same bits."""
    import safemerge.methods.task_arithmetic_two_pass as two_pass

    monkeypatch.setattr(two_pass.StreamedKth, "result", lambda self: None)
    base, models = _inputs(3, seed=7)
    for name in ("ties", "breadcrumbs_ties"):
        whole, blocks, _ = _family_both_ways(name, base, models, {"rescale": True})
        assert torch.equal(blocks, whole)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 2723, 65_536])
def test_packed_masks_round_trip(numel) -> None:
    g = torch.Generator().manual_seed(numel)
    mask = torch.full((numel,), 0.4).bernoulli_(generator=g)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-numel // 8)
    assert torch.equal(unpack_mask(packed, mask), mask)
    block = mask.reshape(1, numel)
    assert torch.equal(unpack_mask(pack_mask(block.bool()), block), block)  # any 0/1 dtype, the shape of ``like``


@pytest.mark.parametrize("name,draw", [("dare_ties", "dare_keep_mask"), ("della", "della_keep_mask")])
def test_random_masks_are_drawn_once(name, draw, monkeypatch) -> None:
    """With L1 rescaling, pass 2 reuses pass 1's masks (bit-packed) instead of drawing them again:
    one draw per block and model, as many as without rescaling, and the same bits as the whole tensor."""
    import safemerge.methods.sparsify as sp

    calls = {"blocks": 0}
    original = getattr(sp, draw)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["blocks"] += 1
        return original(*args, **kwargs)

    base, models = _inputs(3, seed=4)
    n_blocks = len(row_blocks(SHAPE, 7 * 389 * 4 + 12))
    for rescale in (True, False):
        g_whole, g_blocks = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        whole = _family_entry(name, [m.clone() for m in models], base, per_model=FAMILY_PER_MODEL,
                              params={"rescale": rescale}, generator=g_whole)
        monkeypatch.setattr(sp, draw, counted)
        calls["blocks"] = 0
        blocks = _streamed(family_kernel(name), base, models, {"rescale": rescale}, FAMILY_PER_MODEL,
                           generator=g_blocks)
        monkeypatch.setattr(sp, draw, original)
        assert torch.equal(blocks, whole)
        assert calls["blocks"] == 3 * n_blocks, (rescale, calls)


def test_stochastic_family_needs_a_cpu_generator() -> None:
    """Without the tensor's generator the random masks cannot be reproduced: whole-tensor fallback."""
    base, models = _inputs(2, seed=8)
    per_model = {"weight": [0.5, 0.5], "density": [0.5, 0.5]}
    job = TwoPassJob(lambda i, rows: models[i].clone(), lambda rows: base.clone(), 2, SHAPE, per_model, {}, 4096,
                     lambda rows, part: None, generator=None)
    done = family_kernel("dare_ties")(job)
    assert done is False


def test_row_blocks_cover_the_tensor() -> None:
    blocks = row_blocks(SHAPE, 4 * 389 * 10)
    assert blocks[0] == (0, 10) and blocks[-1][1] == SHAPE[0]
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


def _magnitudes(kind: str) -> torch.Tensor:
    """|values| of SHAPE with many exact ties: rounded, bf16 task vectors (as the engine computes them
    from bf16 checkpoints), or mostly zeros."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g)
    if kind == "rounded":
        return x.abs().mul_(64).round_()
    base = (x * 0.02).bfloat16()
    if kind == "bf16_deltas":
        return ((base.float() + 0.001 * torch.randn(SHAPE, generator=g)).bfloat16().float() - base.float()).abs_()
    assert kind == "mostly_zero"
    return x.abs().mul_((x.abs() > 2).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy's comparisons / torch's (no numpy bf16)
@pytest.mark.parametrize("kind", ["rounded", "bf16_deltas", "mostly_zero"])
@pytest.mark.parametrize("k", [1, 1000, 100_000, 200_000, 201_113])
def test_streamed_kth_is_exact(k, kind, dtype) -> None:
    x = _magnitudes(kind).to(dtype)
    sel = StreamedKth(x.numel(), k)
    sel.bracket(x[::13].reshape(-1))
    for r0 in range(0, SHAPE[0], 50):
        sel.scan(x[r0 : r0 + 50])
    found = sel.result()
    flat = x.reshape(-1)
    kth = torch.kthvalue(flat, k).values
    assert found is not None
    assert torch.equal(found[0], kth)
    assert found[1:] == (int((flat == kth).sum()), int((flat > kth).sum()))


@pytest.mark.parametrize("kind", ["rounded", "bf16_deltas", "mostly_zero"])
def test_order_statistics_equal_kthvalue(kind) -> None:
    """numpy's selection gives kthvalue's values: ties, zeros, k = 1 and k = n, float32 and bfloat16 (torch)."""
    for dtype in (torch.float32, torch.bfloat16):
        flat = _magnitudes(kind).to(dtype).reshape(-1)
        ks = [1, 2, 1000, 100_000, flat.numel() - 1, flat.numel()]
        got = order_statistics(flat, ks)
        assert all(g.dtype == dtype and g.dim() == 0 for g in got)
        assert all(torch.equal(g, torch.kthvalue(flat, k).values) for g, k in zip(got, ks))


@pytest.mark.parametrize("kind", ["rounded", "bf16_deltas", "mostly_zero"])
@pytest.mark.parametrize("k", [1, 100_000, 201_113])
def test_streamed_kth_counts_the_ties_of_each_block(kind, k) -> None:
    """ties_per_block: the entries equal to the answer in each scanned block, as counted in the blocks."""
    x = _magnitudes(kind)
    sel = StreamedKth(x.numel(), k)
    sel.bracket(x[::13].reshape(-1))
    blocks = [x[r0 : r0 + 50] for r0 in range(0, SHAPE[0], 50)]
    for block in blocks:
        sel.scan(block)
    kth = sel.result()[0]
    assert sel.ties_per_block(kth) == tuple(int((b == kth).sum()) for b in blocks)
    assert sel.block_sizes == [b.numel() for b in blocks]


def test_rank_window_with_block_tie_counts_equals_the_index_search() -> None:
    """A cut whose tied entries span many blocks masks the same entries whether pass 1's per-block tie
    counts are used (one comparison per block) or the tied entries are searched for in each block."""
    from safemerge.methods.task_arithmetic_two_pass import Cut, RankWindow

    a = _magnitudes("rounded")  # values 0, 1, 2, …: long runs of ties
    blocks = [a[r0 : r0 + 23] for r0 in range(0, SHAPE[0], 23)]
    flat = a.reshape(-1)
    for rank in (1, 50_000, 150_000, flat.numel() - 1):
        lo = torch.kthvalue(flat, rank + 1).values
        drop = rank - int((flat < lo).sum())
        ties = tuple(int((b == lo).sum()) for b in blocks)
        sizes = tuple(b.numel() for b in blocks)
        counted = RankWindow((rank, flat.numel()), (Cut(lo, drop, ties, sizes), None))
        searched = RankWindow((rank, flat.numel()), (Cut(lo, drop), None))
        got = torch.cat([counted.keep(b).reshape(-1) for b in blocks])
        want = torch.cat([searched.keep(b).reshape(-1) for b in blocks])
        assert torch.equal(got, want) and int(got.sum()) == flat.numel() - rank


def test_streamed_kth_reports_a_missed_bracket_or_nan() -> None:
    x = torch.arange(10_000, dtype=torch.float32)
    sel = StreamedKth(x.numel(), 5_000)
    sel.bracket(x[-100:])  # a sample of the largest values only: the bracket misses the median
    sel.scan(x)
    assert sel.result() is None
    y = x.clone()
    y[5] = float("nan")
    sel = StreamedKth(y.numel(), 500)
    sel.bracket(y[::7])
    sel.scan(y)
    assert sel.result() is None


@pytest.mark.parametrize("contiguous", [True, False])  # numpy on contiguous CPU blocks, torch otherwise
def test_block_masks_equal_the_float_mask_bits(contiguous) -> None:
    """at_least / flat_indices_equal / multiply_by_mask (the row-block rank windows) against torch's
    comparisons and a float 0/1 mask: the same entries and the same bits, NaN, ±inf and −0 included."""
    g = torch.Generator().manual_seed(9)
    d = torch.randn(64, 96, generator=g).mul_(8).round_().div_(8)  # exact ties
    d[0, :6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e-45])
    if not contiguous:
        d = d.t()
    a, v = d.abs(), torch.tensor(0.5)
    assert torch.equal(at_least(a, v), a >= v)
    assert torch.equal(above(a, v), a > v)
    assert torch.equal(flat_indices_equal(a, v), torch.nonzero(a.reshape(-1) == v).squeeze(1))
    keep = torch.rand(d.shape, generator=g) > 0.4
    expected = d * keep.float()
    got = multiply_by_mask(d.clone(), keep)
    assert torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("select_topk", [1.0, 0.37, 1e-9, 0.0])  # all, a cut (ties across blocks), k = 0, none
def test_sce_two_pass_is_bit_identical(select_topk, quantised) -> None:
    base, models = _inputs(3, seed=15)
    if quantised:
        models = [base + (m - base).mul(8).round().div(8) for m in models]
    whole = sce(base, [m.clone() for m in models], select_topk=select_topk)
    assert torch.equal(_streamed(sce_two_pass, base, models, {"select_topk": select_topk}), whole)


def test_sce_two_pass_when_the_sample_bracket_misses(monkeypatch) -> None:
    import safemerge.methods.sce as sce_module

    monkeypatch.setattr(sce_module.StreamedKth, "result", lambda self: None)
    base, models = _inputs(2, seed=16)
    whole = sce(base, [m.clone() for m in models], select_topk=0.5)
    assert torch.equal(_streamed(sce_two_pass, base, models, {"select_topk": 0.5}), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_all_finite_finds_every_nan_and_inf(dtype) -> None:
    """The one finiteness test (bfloat16 on the CPU: compiled, from the exponent bits) against ``isfinite``,
    for a non-finite entry anywhere, ±0, subnormals and the largest finite values."""
    from safemerge.io.checkpoint import all_finite

    info = torch.finfo(dtype)
    base = torch.tensor([0.0, -0.0, info.tiny / 4, -info.max, info.max, 1.5], dtype=dtype).repeat(700)
    assert all_finite(base)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in (0, 1_234, base.numel() - 1):
            t = base.clone()
            t[pos] = bad
            assert not all_finite(t) and not all_finite(t.reshape(70, -1))
    assert all_finite(base.reshape(70, -1)[:, ::2])  # (not contiguous: the general path)

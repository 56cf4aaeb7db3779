"""Row-block ("two-pass") kernels give the whole-tensor functions' exact bits on tensors that
span several float64 dot-product chunks and many blocks of awkward sizes (issue 16)."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from safemerge.methods._tensor import ChunkedDots, StreamedKth, dot64, row_blocks  # noqa: E402
from safemerge.methods.model_stock import model_stock, model_stock_two_pass  # noqa: E402
from safemerge.methods.slerp import slerp, slerp_two_pass  # noqa: E402
from safemerge.methods.task_arithmetic import _family_entry, ties_two_pass  # noqa: E402

SHAPE = (517, 389)  # 201,113 entries: three full 65,536-entry chunks and a tail


def _inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g)
    models = [base + 0.1 * torch.randn(SHAPE, generator=g) for _ in range(n)]
    return base, models


def _streamed(kernel, base, models, params, per_model=None, block_bytes=7 * 389 * 4 + 12):  # noqa: ANN001, ANN202
    out = torch.full(SHAPE, float("nan"))

    def emit(rows, part):  # noqa: ANN001, ANN202
        out[rows[0] : rows[1]] = part

    done = kernel(lambda i, rows: (models[i] if rows is None else models[i][rows[0] : rows[1]]).clone(),
                  lambda rows: (base if rows is None else base[rows[0] : rows[1]]).clone(),
                  len(models), SHAPE, per_model or {}, params, block_bytes, emit)
    assert done
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


@pytest.mark.parametrize("quantised", [False, True])
def test_ties_two_pass_is_bit_identical(quantised) -> None:
    base, models = _inputs(3, seed=2)
    if quantised:  # exactly tied magnitudes straddle the cut-offs, across block boundaries
        models = [base + (m - base).mul(16).round().div(16) for m in models]
    per_model = {"weight": [0.5, 0.3, -0.2], "density": [0.5, 0.9, 0.2]}
    whole = _family_entry("ties", [m.clone() for m in models], base, per_model=per_model, params={})
    assert torch.equal(_streamed(ties_two_pass, base, models, {}, per_model), whole)


def test_row_blocks_cover_the_tensor() -> None:
    blocks = row_blocks(SHAPE, 4 * 389 * 10)
    assert blocks[0] == (0, 10) and blocks[-1][1] == SHAPE[0]
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("k", [1, 1000, 100_000, 200_000, 201_113])
def test_streamed_kth_is_exact(k) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g).abs().mul_(64).round_()  # many exact ties
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

"""The CBP constraint in plain PyTorch: the specification every kernel is tested against.

Paper: CBP-QSNN, section 3.1 (shared/seeds/002_*.txt); details the paper leaves open follow
the CBP authors' public code (dooseokjeong/CBP, ``module.py``: ``Quantizetotal``,
``constraint``). Notation, per layer with scale s > 0 and sorted unscaled levels q_0 < ... < q_{K-1}:

    levels      l_j = s * q_j                          (rounded once in the compute dtype)
    midpoints   m_j = (l_j + l_{j+1}) / 2              j = 0 .. K-2
    widths      d_j = l_{j+1} - l_j,  half-window h_j = d_j / (2 g)

    Q(w)        the level l_k with k = #{j : w >= m_j}: thresholds at the midpoints, a tie
                (w == m_j exactly) goes to the UPPER level. (The authors' torch.sign returns
                the midpoint itself at a tie, which is no level; we keep Q on the levels.)
                Straight-through gradient dQ/dw = 1 (as the authors' backward).
    cs(w)       windowless: 2 * |w - Q(w)| = 2 * distance to the nearest level, i.e. the
                triangle d_j - 2|w - m_j| on [l_j, l_{j+1}] (0 at both levels, peak d_j at
                m_j) and 2 * distance to the end level outside [l_0, l_{K-1}].
    window      cs(w; g) = 0 where  m_j - h_j <= w < m_j + h_j  (edges rounded once; paper: ucs = 1 - sum_j
                H(d_j/(2g) - |w - m_j + eps|), eps -> 0+, i.e. the window [m_j - h_j, m_j + h_j)
                is closed on the left, open on the right). At g = 1 it covers [l_j, l_{j+1}).
    dcs/dw      the RIGHT derivative of cs(w; g) (the authors' backward: every interval is
                half-open [a, b)): 0 in a window, else +2 where w >= Q(w) (on a level, and
                above it) and -2 where w < Q(w). So on every level dcs/dw = +2 unless the level
                starts a window (g = 1: every level but the top one); at a window's left edge 0,
                at its right edge -2.

Where the authors' forward differs: it zeroes the triangle where it EXCEEDS d(1 - 1/g), which
leaves cs = d(1 - 1/g) exactly at the window's left edge while their backward already gives 0
there; we follow the paper's eps (and their backward): cs = 0 there too.

Arithmetic: float32 for float32/float16/bfloat16 weights (float64 for float64). NaN weights
give cs = NaN and +-Inf give cs = Inf, so the sums the pass returns are not finite (no extra
pass over the weights to check them; the caller checks the sums).

The multiplier step (``multiplier_step``): with grad = -cs(w; g) (gradient ASCENT on
sum(lambda * cs)), one step of torch.optim.Adam / AdamW(maximize=True, amsgrad=False) as its
single-tensor path computes it, in the compute dtype, every operation rounded once:

    grad = -cs(w; g) [+ wd * lam]           (Adam: L2 through the gradient, only when wd != 0)
    lam  = lam * (1 - lr * wd)              (AdamW: decoupled decay; x1 for Adam)
    m    = lerp(m, grad, 1 - beta1)         (m + w (grad - m) for w < 0.5, else grad - (grad - m)(1 - w))
    v    = v * beta2 + ((1 - beta2) * grad) * grad
    lam  = lam + (-lr / (1 - beta1^step) * m) / (sqrt(v) / sqrt(1 - beta2^step) + eps)

with the scalars computed on the host in double as torch does and rounded once (``adam_scalars``),
and a correctly rounded sqrt. torch's own CPU kernels differ in the last bits: its lerp,
addcmul and add(alpha) use FMAs, and its float32 sqrt is not always correctly rounded.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["level_table", "adam_scalars", "quantize", "cs", "cs_grad", "constraint_pass", "multiplier_step"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def level_table(levels: torch.Tensor, scales: torch.Tensor, g: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-layer constants ``[L, 4, K]`` in ``dtype``: row 0 the levels l_j = s*q_j, row 1 the
    midpoints m_j, rows 2-3 the window edges m_j - h_j and m_j + h_j with h_j = d_j/(2g), each
    rounded once (rows 1-3 hold K-1 values, padded with +inf: a padded midpoint never selects a
    level, a padded window holds nothing). Every backend compares w against this one table, so
    all agree bit for bit on thresholds and window edges."""
    q = levels.to(dtype).reshape(1, -1)
    lv = scales.to(dtype).reshape(-1, 1) * q                     # [L, K]
    lo, hi = lv[:, :-1], lv[:, 1:]
    mid = (lo + hi) * 0.5
    half = (hi - lo) / torch.tensor(2.0 * g, dtype=dtype)
    pad = lv.new_full((lv.shape[0], 1), float("inf"))
    rows = [torch.cat([r, pad], 1) for r in (mid, mid - half, mid + half)]
    return torch.stack([lv] + rows, 1)


def _select(w: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q(w), in-window mask) for one layer's table row [4, K]; w in the compute dtype."""
    lv, mid, w_lo, w_hi = row[0], row[1], row[2], row[3]
    q = torch.zeros_like(w) + lv[0]
    window = torch.zeros_like(w, dtype=torch.bool)
    for j in range(lv.numel() - 1):
        q = torch.where(w >= mid[j], lv[j + 1], q)
        window = window | ((w >= w_lo[j]) & (w < w_hi[j]))
    return q, window


def _pieces(w: torch.Tensor, row: torch.Tensor):
    """(windowed cs, windowless cs, dcs/dw) of w (compute dtype) for one table row."""
    q, window = _select(w, row)
    free = 2 * (w - q).abs()
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    slope = torch.where(w >= q, 2.0, -2.0).to(w.dtype)
    return torch.where(window, zero, free), free, torch.where(window, zero, slope)


def _row(levels: torch.Tensor, scale: torch.Tensor, g: float, dtype: torch.dtype) -> torch.Tensor:
    return level_table(levels.to(scale.device), scale.reshape(1), g, dtype)[0]


def quantize(w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Q(w) for a one-layer ``table`` ([1, 4, K]); same shape and dtype as w (no autograd here:
    the custom op in op.py adds the straight-through gradient)."""
    cdt = compute_dtype(w.dtype)
    q, _ = _select(w.to(cdt), table[0].to(cdt))
    return q.to(w.dtype)


def cs(w: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, g: float, windowed: bool = True) -> torch.Tensor:
    """Elementwise cs(w; g) (or windowless cs), in the compute dtype (float32, float64 for float64 w)."""
    cdt = compute_dtype(w.dtype)
    windowed_cs, free, _ = _pieces(w.to(cdt), _row(levels, torch.as_tensor(scale, device=w.device), g, cdt))
    return windowed_cs if windowed else free


def cs_grad(w: torch.Tensor, levels: torch.Tensor, scale: torch.Tensor, g: float) -> torch.Tensor:
    """Elementwise dcs/dw(w; g) (the right derivative, see the module doc), in the compute dtype."""
    cdt = compute_dtype(w.dtype)
    return _pieces(w.to(cdt), _row(levels, torch.as_tensor(scale, device=w.device), g, cdt))[2]


def constraint_pass(
    weights: Sequence[torch.Tensor],
    lambdas: Sequence[torch.Tensor],
    table: torch.Tensor,
    grads: Sequence[torch.Tensor],
    lambda_grads: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The fused pass, one layer at a time: returns ``[sum lambda*cs(w; g), sum cs(w)]`` (float64 [2]);
    ``grads[i] += lambdas[i] * dcs/dw`` and ``lambda_grads[i] = cs(w; g)`` in place when the lists
    are non-empty. Products are rounded in the compute dtype, then summed in float64."""
    cdt = compute_dtype(weights[0].dtype)
    table = table.to(cdt)
    sums = torch.zeros(2, dtype=torch.float64, device=weights[0].device)
    for i, (w, lam) in enumerate(zip(weights, lambdas)):
        windowed_cs, free, slope = _pieces(w.to(cdt), table[i])
        lam = lam.to(cdt)
        sums[0] += (lam * windowed_cs).double().sum()
        sums[1] += free.double().sum()
        if grads:
            grads[i].copy_(grads[i].to(cdt) + lam * slope)
        if lambda_grads:
            lambda_grads[i].copy_(windowed_cs)
    return sums


def adam_scalars(step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 decoupled: bool, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 8 scalars of one multiplier step in ``dtype`` (order: csrc/common/constraint_math.h,
    ``MultiplierScalar``): computed in double as torch.optim.Adam's single-tensor path does,
    ``step`` being its ``state["step"]`` after the increment, then rounded once."""
    beta1, beta2 = betas
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    values = [1 - beta1, beta2, 1 - beta2, bias_correction2**0.5, eps, -step_size,
              0.0 if decoupled else weight_decay, 1 - lr * weight_decay if decoupled else 1.0]
    return torch.tensor(values, dtype=dtype)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded sqrt of x >= 0 (torch's float32 and float64 CPU sqrt are not
    always): float64 for float32 x, then the float32 result moved by one ulp where x lies beyond
    the midpoint to its neighbour (midpoints squared are exact in float64)."""
    if x.dtype == torch.float64:
        return x.sqrt()
    s = x.double().sqrt().to(x.dtype)
    xd = x.double()
    for toward, beyond in ((float("inf"), torch.gt), (float("-inf"), torch.lt)):
        nb = torch.nextafter(s, torch.full_like(s, toward))
        mid = (s.double() + nb.double()) * 0.5
        s = torch.where(beyond(xd, mid * mid) & (s > 0), nb, s)
    return s


def multiplier_step(
    weights: Sequence[torch.Tensor],
    lambdas: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    table: torch.Tensor,
    scalars: torch.Tensor,
) -> None:
    """One gradient-ascent Adam / AdamW step of every ``lambdas[i]`` on cs(w_i; g) (module doc),
    one layer at a time: ``lambdas``, ``exp_avgs``, ``exp_avg_sqs`` updated in place (rounded
    once to their storage dtype). ``scalars`` from ``adam_scalars``."""
    cdt = compute_dtype(weights[0].dtype)
    table = table.to(cdt)
    lerp_w, beta2, one_minus_beta2, bias2_sqrt, eps, neg_step_size, l2, decay = scalars.to(cdt).unbind()
    for i, (w, lam, m, v) in enumerate(zip(weights, lambdas, exp_avgs, exp_avg_sqs)):
        windowed_cs = _pieces(w.to(cdt), table[i])[0]
        p, m_new, v_new = lam.to(cdt), m.to(cdt), v.to(cdt)
        grad = -windowed_cs
        if l2 != 0:
            grad = grad + l2 * p
        diff = grad - m_new
        m_new = m_new + lerp_w * diff if lerp_w < 0.5 else grad - diff * (1 - lerp_w)
        v_new = v_new * beta2 + (one_minus_beta2 * grad) * grad
        denom = _sqrt_rn(v_new) / bias2_sqrt + eps
        lam.copy_(p * decay + (neg_step_size * m_new) / denom)
        m.copy_(m_new)
        v.copy_(v_new)

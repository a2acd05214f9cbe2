"""
Backward linear bounds with exact weight absorption (THEORY.md §4b, the ``"linear"`` method; beyond the paper).

The margin specification ``C`` (rows ``e_y − e_i``) is propagated backward from the logits to the input, CROWN-style:
the state is a linear lower bound ``A·ĥ + c`` of the margins in terms of the input ``ĥ`` of the current layer, valid
for every weight perturbation in the ball and every ``ĥ`` in the interval box of §4. One rule per layer type
(:data:`BACKWARD_RULES`) maps the coefficients ``λ`` on a layer's output to coefficients on its input:

* affine ``ẑ = (W + Δ) ĥ + b + Δb``: ``λ·ẑ = (λW)·ĥ + λ·b + ⟨Δ, G⟩ + Δb·s`` with ``G`` the gradient of ``λ·ẑ`` in
  the weights (Linear: ``G = λ ĥᵀ``; convolution: ``G_r = Σ_p λ_{r,p} patch_p(ĥ)``, the kernel shared by all
  positions) and ``s_r = Σ_p λ_{r,p}``; the minimum over the ball is minus its support function at ``G``
  (:data:`WEIGHT_TERMS`). Box ``|Δ| ≤ δ`` (absolute or relative): ``−Σ δ ⊙ |G|``; on a Linear layer this is
  ``−(|λ|δ)·|ĥ|``, for ``ĥ ≥ 0`` (after a ReLU) the linear term folded into the coefficients, ``A ← λW − |λ|δ`` (exact
  absorption), for a signed ``ĥ`` bounded by the chord of ``|ĥ|``; on a convolution ``|G|`` is bounded by its chord
  over the box of ``G``. ``row_l1``: ``−Σ_r ε_r ‖G_r‖_∞``, ``l2``: ``−ε ‖G‖_F``, both bounded with
  ``|ĥ| ≤ m = max(|l|, |u|)`` (Linear: ``−|λ_r| ε_r max_c m_c`` and ``−ε ‖λ‖_2 ‖m‖_2``) or the box of ``G``. Bias
  balls are exact: ``−Σ_r β_r |s_r|`` (box) or ``−ε ‖s‖_2`` (``l2``).
* ReLU / LeakyReLU: CROWN's relaxation with the §4 pre-activation box (upper chord, lower slope chosen by
  ``u > −l``); sigmoid / tanh: lines through the box's end points with slope ``min(σ'(end), chord)``, tangents at the
  midpoint where the box lies in the convex or concave part.
* eval BatchNorm, AvgPool2d, Flatten: exact (linear maps; pooling through its adjoint). Dropout is removed by the
  reader.
* MaxPool2d: ``y ≥ h_{j*}`` for the window's input with the largest lower bound and ``y ≤ max_j u_j``; ``y = h_{j*}``
  exactly when that input dominates the window. With ``ceil_mode=True`` the backward pass stops there: the bound is
  concretized with the interval box of the pooling's output (sound, as tight as §4 from there on).

The input of the first affine layer is known (``x``): there the layer is evaluated forward and every ball's term is
exact. :func:`linear_margin_bounds` returns the element-wise maximum of this bound and the interval bound (both
sound), so it is never looser than ``"interval"``.

Everything is plain torch, batched over samples and specifications, on the input's device; float64 for certificates
(THEORY.md §5), differentiable in any dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from art_weightpert.balls import BALLS
from art_weightpert.budget import ParameterBall
from art_weightpert.certification.interval import (
    _by_name,
    _fill_label,
    interval_margin_bounds,
    interval_preactivation_bounds,
    margin_matrix,
)
from art_weightpert.network import (
    Activation,
    Affine,
    AvgPool,
    BatchNorm,
    Flatten,
    MaxPool,
    Network,
)


@dataclass
class _Context:
    """What the affine rule needs besides the layer: the (cast) parameters and the perturbed ones."""

    params: dict[str, torch.Tensor]
    param_balls: dict[str, ParameterBall]
    scale: torch.Tensor | None = None


def _flat(a: torch.Tensor) -> torch.Tensor:
    """``(N, K, ...)`` → ``(N·K, ...)``."""
    return a.reshape((-1,) + tuple(a.shape[2:]))


def _total(t: torch.Tensor) -> torch.Tensor:
    """Sum over every dimension after ``(N, K)``."""
    return t.flatten(2).sum(dim=2) if t.dim() > 2 else t


def _dot(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Σ_j a[n, k, j] v[n, j]`` over every feature dimension: ``(N, K, ...) × (N, ...) → (N, K)`` (one bmm)."""
    return torch.bmm(a.flatten(2), v.reshape(len(v), -1, 1)).squeeze(2)


def concretize(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``min_{ĥ ∈ [lo, hi]} A·ĥ`` for coefficients ``a`` ``(N, K, ...)`` and a box ``(N, ...)``: ``(N, K)``."""
    if lo is hi:
        return _dot(a, lo)
    return _dot(a, (lo + hi) / 2) - _dot(a.abs(), (hi - lo) / 2)


# ------------------------------------------------------------------------------------- weight perturbation terms
def _abs_chord(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` with ``|v| ≤ s v + t`` on ``[lo, hi]``: the chord of ``|·|`` (:func:`_abs_chord_centred`)."""
    return _abs_chord_centred((lo + hi) / 2, (hi - lo) / 2)


def _abs_chord_centred(centre: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chord of ``|·|`` on ``[c − r, c + r]``: ``s = clamp(c / r, −1, 1)``, ``t = r (1 − s²)``. It is ``v`` itself
    when the box is non-negative (``s = 1, t = 0``), ``−v`` when it is non-positive, and ``sign(c)·v`` on a point."""
    slope = (centre / radius.clamp_min(torch.finfo(radius.dtype).tiny)).clamp(-1.0, 1.0)
    return slope, radius * (1 - slope * slope)


def _uniform_box_term(layer: Affine, a, radius) -> torch.Tensor | None:
    """``|λ|δ`` for a Linear layer whose entries all have the same radius δ (absolute box budgets): ``δ Σ_r |λ_r|``,
    ``(N, K, 1)``, broadcasting over the inputs. ``None`` otherwise."""
    value = radius.reshape(-1)[0]
    if not bool((radius == value).all()):
        return None
    return value * a.abs().sum(dim=2, keepdim=True)


def _patches(layer: Affine, t: torch.Tensor) -> torch.Tensor:
    """The convolution's input patches ``(N, groups, C/groups·kh·kw, P)``."""
    mod = layer.module
    cols = F.unfold(t, mod.kernel_size, mod.dilation, layer.padding, mod.stride)
    return cols.reshape(len(t), mod.groups, -1, cols.shape[-1])


def _grouped(layer: Affine, a: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(N, K, rows, H', W')`` as ``(N, K, groups, rows/groups, P)``."""
    n, k, rows = a.shape[:3]
    return a.reshape(n, k, layer.module.groups, rows // layer.module.groups, -1)


def _kernel_gradient_box(layer: Affine, a, lo, hi) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and radius of a box of ``G = ∂(λ·conv(ĥ, W))/∂W``, ``G_r = Σ_p λ_{r,p} patch_p(ĥ)``, over
    ``ĥ ∈ [lo, hi]``: ``(N, K, groups, rows/groups, C/groups·kh·kw)`` each. ``λ·(Δ ⋆ ĥ) = ⟨Δ, G⟩`` with the kernel
    shared by all positions. The radius is 0 for a known ``ĥ`` (``lo is hi``)."""
    lam = _grouped(layer, a)
    if lo is hi:
        centre = torch.einsum("nkgrp,ngjp->nkgrj", lam, _patches(layer, lo))
        return centre, torch.zeros_like(centre)
    centre = torch.einsum("nkgrp,ngjp->nkgrj", lam, _patches(layer, (lo + hi) / 2))
    spread = torch.einsum("nkgrp,ngjp->nkgrj", lam.abs(), _patches(layer, (hi - lo) / 2))
    return centre, spread


def _box_term(layer: Affine, a, lo, hi, radius):
    """Box ball: ``min_Δ λ·Δĥ = −Σ δ ⊙ |G|`` (THEORY.md §4b).

    Linear: ``|G_rc| = |λ_r| |ĥ_c|``, so the term is ``−(|λ|δ)·|ĥ|``, linear in ``ĥ ≥ 0`` (exact absorption
    ``A ← λW − |λ|δ``) and bounded by the chord of ``|ĥ|`` otherwise (the constant ``−(|λ|δ)·|x|`` at the input).
    Convolution: ``|G|`` is bounded by its chord over its box (``G`` itself where its sign is fixed), which
    keeps the kernel shared across positions; the coefficients go back onto ``ĥ`` through the patches' adjoint."""
    if layer.is_conv:
        centre, spread = _kernel_gradient_box(layer, a, lo, hi)
        delta = radius.reshape(centre.shape[2:])
        if lo is hi:  # G known: the exact −Σ δ |G|
            return None, -(delta * centre.abs()).flatten(2).sum(dim=2)
        slope, offset = _abs_chord_centred(centre, spread)
        const = -(delta * offset).flatten(2).sum(dim=2)
        coef = torch.einsum("nkgrj,nkgrp->nkgjp", delta * slope, _grouped(layer, a))
        mod = layer.module
        n, k = a.shape[:2]
        cols = coef.reshape(n * k, -1, coef.shape[-1])
        folded = F.fold(cols, lo.shape[2:], mod.kernel_size, mod.dilation, layer.padding, mod.stride)
        return -folded.reshape(a.shape[:2] + lo.shape[1:]), const
    g = _uniform_box_term(layer, a, radius)
    if g is None:
        g = layer.apply_transposed(_flat(a.abs()), radius, lo.shape[1:]).reshape(a.shape[:2] + lo.shape[1:])
    if bool((lo >= 0).all()) and lo is not hi:  # after a ReLU: exact absorption A ← λW − |λ|δ
        return -g, None
    g = g.expand(a.shape[:2] + lo.shape[1:])
    if lo is hi:  # a known input: the exact constant −(|λ|δ)·|x|
        return None, -_dot(g, lo.abs())
    slope, offset = _abs_chord(lo, hi)
    return -g * slope.unsqueeze(1), -_dot(g, offset)


def _row_l1_term(layer: Affine, a, lo, hi, radius):
    """``row_l1`` ball: ``min_Δ λ·Δĥ = −Σ_r ε_r ‖G_r‖_∞`` (Hölder). Linear: ``‖G_r‖_∞ = |λ_r| ‖ĥ‖_∞ ≤ |λ_r|
    max_c m_c``; convolution: ``‖G_r‖_∞ ≤ max_j (|G_c| + G_r)_{rj}`` over the box ``G_c ± G_r`` of ``G``."""
    if not layer.is_conv:
        return _magnitude_term(BALLS["row_l1"], layer, a, lo, hi, radius)
    centre, spread = _kernel_gradient_box(layer, a, lo, hi)
    top = (centre.abs() + spread).amax(dim=-1).flatten(2)  # max |G| per entry, then per row: (N, K, rows)
    return None, -top @ radius


def _frobenius_term(layer: Affine, a, lo, hi, radius):
    """``l2`` ball of the whole layer: ``min_{‖Δ‖_F ≤ ε} ⟨Δ, G⟩ = −ε ‖G‖_F``. Linear: ``‖G‖_F = ‖λ‖_2 ‖ĥ‖_2 ≤ ‖λ‖_2
    ‖m‖_2``; convolution: ``|G| ≤ |G_c| + G_r`` entry-wise over the box ``G_c ± G_r`` of ``G``."""
    if not layer.is_conv:
        m = torch.maximum(lo.abs(), hi.abs())
        return None, -radius * a.norm(dim=2) * m.norm(dim=1, keepdim=True)
    centre, spread = _kernel_gradient_box(layer, a, lo, hi)
    return None, -radius * (centre.abs() + spread).flatten(2).norm(dim=2)


def _magnitude_term(ball, layer: Affine, a, lo, hi, radius):
    """Any ball: ``|Δĥ| ≤ P(m)`` per output unit (the ball's interval term, THEORY.md §4), so
    ``min_Δ λ·Δĥ ≥ −Σ |λ| ⊙ P(m)``; for ``row_l1`` on a Linear layer this is ``−|λ_r| ε_r max_c m_c`` (§4b)."""
    bound = ball.interval_term(layer, torch.maximum(lo.abs(), hi.abs()), radius)
    return None, -_total(a.abs() * bound.unsqueeze(1))


# The weight balls' terms, by ball name (others: the magnitude constant). A term returns the change of the input
# coefficients and a constant (either may be None), both linear in the radius.
WEIGHT_TERMS = {"inf": _box_term, "row_l1": _row_l1_term, "l2": _frobenius_term}


def _bias_term(target: ParameterBall, row_sums: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exact ``min_{Δb} Σ_r Δb_r s_r`` with ``s_r = Σ_p λ_{r,p}``: ``−ε‖s‖_2`` (``l2``) or ``−Σ_r β_r |s_r|``."""
    radius = target.radius.to(dtype)
    if target.ball.name == "l2":
        return -radius * row_sums.norm(dim=2)
    return -row_sums.abs() @ target.ball.entry_bound(radius, radius.shape)


def _affine_terms(target: ParameterBall, layer: Affine, a, lo, hi, radius):
    """The weight ball's term: its entry in :data:`WEIGHT_TERMS`, else the magnitude constant."""
    term = WEIGHT_TERMS.get(target.ball.name)
    if term is None:
        return _magnitude_term(target.ball, layer, a, lo, hi, radius)
    return term(layer, a, lo, hi, radius)


def _per_sample(scale: torch.Tensor | None, t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` ``(N, ...)`` times the per-sample radius factors (every perturbation term is linear in the radii)."""
    if scale is None or t is None:
        return t
    return t * scale.reshape((-1,) + (1,) * (t.dim() - 1))


# ------------------------------------------------------------------------------------------------ backward rules
def _affine_backward(layer: Affine, a, lo, hi, ctx: _Context):
    weight = ctx.params[layer.weight_name]
    a_in = layer.apply_transposed(_flat(a), weight, lo.shape[1:]).reshape(a.shape[:2] + lo.shape[1:])
    row_sums = a.flatten(3).sum(dim=3) if a.dim() > 3 else a  # (N, K, rows): λ summed over output positions
    const = row_sums @ ctx.params[layer.bias_name] if layer.bias_name else a.new_zeros(a.shape[:2])
    wt = ctx.param_balls.get(layer.weight_name)
    if wt is not None:
        change, pert = _affine_terms(wt, layer, a, lo, hi, wt.radius.to(a.dtype))
        if change is not None:
            a_in = a_in + _per_sample(ctx.scale, change)
        if pert is not None:
            const = const + _per_sample(ctx.scale, pert)
    bt = ctx.param_balls.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        const = const + _per_sample(ctx.scale, _bias_term(bt, row_sums, a.dtype))
    return a_in, const


def _affine_at_input(layer: Affine, a: torch.Tensor, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
    """``min λ·ẑ`` over the ball for the first affine layer, whose input ``h`` is known: ``λ·(W h + b)`` plus the
    ball's term at ``ĥ = h`` (exact for every ball: the minimum of ``⟨Δ, G⟩`` with ``G`` known)."""
    weight = ctx.params[layer.weight_name]
    bias = ctx.params[layer.bias_name] if layer.bias_name else None
    const = _dot(a, layer.apply(h, weight, bias))
    wt = ctx.param_balls.get(layer.weight_name)
    if wt is not None:
        _, pert = _affine_terms(wt, layer, a, h, h, wt.radius.to(a.dtype))
        const = const + _per_sample(ctx.scale, pert)
    bt = ctx.param_balls.get(layer.bias_name) if layer.bias_name else None
    if bt is not None:
        row_sums = a.flatten(3).sum(dim=3) if a.dim() > 3 else a
        const = const + _per_sample(ctx.scale, _bias_term(bt, row_sums, a.dtype))
    return const


def _kinked(lo, hi, slope: float):
    """ReLU (``slope = 0``) and LeakyReLU: ``f(z) = z`` for ``z ≥ 0``, ``slope·z`` below. Returns the (slope,
    intercept) of a lower and an upper line valid on ``[lo, hi]``: the chord on one side, a line through the origin
    with slope 1 or ``slope`` (1 when ``hi > −lo``, as CROWN) on the other."""
    active, inactive = lo >= 0, hi <= 0
    width = torch.where(active | inactive, torch.ones_like(hi), hi - lo)
    chord = (hi - slope * lo) / width
    chord_icpt = (slope - chord) * lo  # f(lo) − chord·lo with f(lo) = slope·lo for a crossing box
    one, leak = torch.ones_like(lo), torch.full_like(lo, slope)  # in lo's dtype: no float32 rounding of slope
    alpha = torch.where(hi > -lo, one, leak)
    if slope <= 1:  # convex: the chord is above, lines through 0 with slope in [slope, 1] below
        low, up = (alpha, torch.zeros_like(lo)), (chord, chord_icpt)
    else:  # concave
        low, up = (chord, chord_icpt), (alpha, torch.zeros_like(lo))
    fixed = torch.where(active, one, leak)  # exact on stable boxes

    def exact(line):
        stable = active | inactive
        return torch.where(stable, fixed, line[0]), torch.where(stable, 0.0, line[1])

    return exact(low), exact(up)


def _s_shaped(fn, dfn, lo, hi):
    """Sigmoid / tanh (convex below 0, concave above, ``σ'`` unimodal): ``σ(z) ≥ σ(lo) + k_l (z − lo)`` and
    ``σ(z) ≤ σ(hi) + k_u (z − hi)`` with ``k = min(σ'(end), chord)`` (the smallest mean slope on sub-intervals
    from that end); the tangent at the midpoint replaces the lower line where ``hi ≤ 0`` and the upper where
    ``lo ≥ 0``."""
    f_lo, f_hi = fn(lo), fn(hi)
    mid = (lo + hi) / 2
    width = hi - lo
    wide = width > 0
    chord = torch.where(wide, (f_hi - f_lo) / torch.where(wide, width, torch.ones_like(width)), dfn(mid))
    k_lo, k_hi = torch.minimum(dfn(lo), chord), torch.minimum(dfn(hi), chord)
    t_slope = dfn(mid)
    t_icpt = fn(mid) - t_slope * mid
    convex, concave = hi <= 0, lo >= 0
    low = torch.where(convex, t_slope, k_lo), torch.where(convex, t_icpt, f_lo - k_lo * lo)
    up = torch.where(concave, t_slope, k_hi), torch.where(concave, t_icpt, f_hi - k_hi * hi)
    return low, up


def _dsigmoid(z):
    s = torch.sigmoid(z)
    return s * (1 - s)


def _relaxation(layer: Activation, lo, hi):
    if layer.kind == "relu":
        return _kinked(lo, hi, 0.0)
    if layer.kind == "leaky_relu":
        return _kinked(lo, hi, layer.negative_slope)
    if layer.kind == "sigmoid":
        return _s_shaped(torch.sigmoid, _dsigmoid, lo, hi)
    return _s_shaped(torch.tanh, lambda z: 1 - torch.tanh(z) ** 2, lo, hi)


def _activation_backward(layer: Activation, a, lo, hi, ctx):
    (l_slope, l_icpt), (u_slope, u_icpt) = _relaxation(layer, lo, hi)
    pos = a.clamp_min(0)  # λ = λ⁺ + λ⁻: λ⁺ takes the lower line, λ⁻ the upper one
    a_in = a * u_slope.unsqueeze(1) + pos * (l_slope - u_slope).unsqueeze(1)
    return a_in, _dot(a, u_icpt) + _dot(pos, l_icpt - u_icpt)


def _batchnorm_backward(layer: BatchNorm, a, lo, hi, ctx):
    scale, shift = layer.shaped(layer.scale, lo), layer.shaped(layer.shift, lo)
    return a * scale.unsqueeze(1), _dot(a, shift.expand_as(lo))


def _avgpool_backward(layer: AvgPool, a, lo, hi, ctx):
    """The adjoint of the (linear, bias-free) pooling, by autograd."""
    flat = _flat(a)
    with torch.enable_grad():
        probe = flat.new_zeros((len(flat),) + tuple(lo.shape[1:]), requires_grad=True)
        (g,) = torch.autograd.grad(layer.apply(probe), probe, flat, create_graph=flat.requires_grad)
    return g.reshape(a.shape[:2] + lo.shape[1:]), a.new_zeros(a.shape[:2])


def _flatten_backward(layer: Flatten, a, lo, hi, ctx):
    return a.reshape(a.shape[:2] + lo.shape[1:]), a.new_zeros(a.shape[:2])


def _maxpool_backward(layer: MaxPool, a, lo, hi, ctx):
    mod = layer.module
    n, k = a.shape[:2]
    if mod.ceil_mode:  # stop here: concretize with the interval box of the output
        return a.new_zeros(a.shape[:2] + lo.shape[1:]), concretize(a, layer.apply(lo), layer.apply(hi))
    kernel, stride = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size)
    pad, dil = _pair(mod.padding), _pair(mod.dilation)
    channels, height, width = lo.shape[1:]
    border = (pad[1], pad[1], pad[0], pad[0])

    def windows(t):  # (N, C, kh·kw, P), padding at -inf as in max pooling
        t = F.pad(t, border, value=float("-inf"))
        return F.unfold(t, kernel, dil, 0, stride).reshape(n, channels, kernel[0] * kernel[1], -1)

    lw, uw = windows(lo), windows(hi)
    best = lw.argmax(dim=2, keepdim=True)  # j*: the input with the largest lower bound
    l_best = lw.gather(2, best).squeeze(2)
    others = uw.scatter(2, best, float("-inf")).amax(dim=2)
    dominant = (others <= l_best).unsqueeze(1)  # y = h_{j*} exactly
    lam = a.reshape(n, k, channels, -1)
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    selected = pos + torch.where(dominant, neg, 0.0)  # coefficient on h_{j*} (y ≥ h_{j*})
    const = _total(torch.where(dominant, 0.0, neg) * uw.amax(dim=2).unsqueeze(1))  # y ≤ max_j u_j
    spread = lam.new_zeros((n, k, channels, kernel[0] * kernel[1], lam.shape[-1]))
    spread = spread.scatter(3, best.unsqueeze(1).expand(n, k, -1, -1, -1), selected.unsqueeze(3))
    size = (height + 2 * pad[0], width + 2 * pad[1])
    folded = F.fold(spread.reshape(n * k, -1, lam.shape[-1]), size, kernel, dil, 0, stride)
    a_in = folded[:, :, pad[0] : pad[0] + height, pad[1] : pad[1] + width]
    return a_in.reshape(a.shape[:2] + lo.shape[1:]), const


# One rule per layer type: (layer, λ on the output, box of the input, context) -> (λ on the input, constant).
BACKWARD_RULES = {
    Affine: _affine_backward,
    Activation: _activation_backward,
    BatchNorm: _batchnorm_backward,
    AvgPool: _avgpool_backward,
    MaxPool: _maxpool_backward,
    Flatten: _flatten_backward,
}


# ------------------------------------------------------------------------------------------------------ bounds
def backward_margin_bounds(
    network: Network,
    param_balls: list[ParameterBall] | dict[str, ParameterBall],
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    boxes: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    The backward linear bound alone (THEORY.md §4b), without the maximum with the interval bound.

    Parameters and return value as :func:`linear_margin_bounds`.
    """
    param_balls = _by_name(param_balls)
    params = network.params(dtype=dtype)
    x = x.to(dtype)
    scale = _check_batch(x, labels, scale, dtype)
    if boxes is None:
        boxes = interval_preactivation_bounds(network, param_balls, x, params, scale)
    nb_classes = params[network.layers[-1].weight_name].shape[0]
    a = margin_matrix(labels, nb_classes, dtype)  # (N, K, K): coefficients on the logits
    const = a.new_zeros(a.shape[:2])
    ctx = _Context(params, param_balls, scale)
    first = next(i for i, layer in enumerate(network.layers) if isinstance(layer, Affine))
    for layer, (lo, hi) in zip(reversed(network.layers[first + 1 :]), reversed(boxes[first + 1 :])):
        a, c = BACKWARD_RULES[type(layer)](layer, a, lo, hi, ctx)
        const = const + c
    h = x  # the input of the first affine layer is known exactly: evaluate there
    for layer in network.layers[:first]:
        h = layer.apply(h)
    return _fill_label(const + _affine_at_input(network.layers[first], a, h, ctx), labels)


def linear_margin_bounds(
    network: Network,
    param_balls: list[ParameterBall] | dict[str, ParameterBall],
    x: torch.Tensor,
    labels: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    boxes: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Lower bounds of every pairwise margin ``f_y − f_i`` over the weight ball by backward linear propagation with
    exact weight absorption (THEORY.md §4b), never looser than the interval bound (§4).

    :param network: the model read by :func:`.read_network`.
    :param param_balls: the budget resolved on the model (:meth:`.PerturbationBudget.parameter_balls`).
    :param x: preprocessed inputs ``(N, ...)`` on the model's device.
    :param labels: classes ``y`` ``(N,)`` (int64, same device).
    :param dtype: float64 for certificates; the bound is differentiable in any dtype.
    :param boxes: precomputed :func:`.interval_preactivation_bounds` (in ``dtype``, with the same ``scale``), shared
        with the interval bound.
    :param scale: optional per-sample factors ``(N,)`` multiplying every radius of the budget (the certifier's
        vectorized bisection for the certified radius); ``None`` is a factor of 1.
    :return: ``(N, K)`` lower bounds, ``+inf`` at the label's own column: the element-wise maximum of the backward
        linear bound and the interval bound.
    """
    param_balls = _by_name(param_balls)
    x = x.to(dtype)
    scale = _check_batch(x, labels, scale, dtype)
    if boxes is None:
        boxes = interval_preactivation_bounds(network, param_balls, x, network.params(dtype=dtype), scale)
    backward = backward_margin_bounds(network, param_balls, x, labels, dtype, boxes, scale)
    interval = interval_margin_bounds(network, param_balls, x, labels, dtype, boxes=boxes, scale=scale)
    return torch.maximum(backward, interval)


def _check_batch(
    x: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor | None:
    """Check the labels (and per-sample factors) against the batch; return the factors in ``dtype``."""
    if labels.dim() != 1 or len(labels) != len(x):
        raise ValueError(f"`labels` must have shape ({len(x)},), got {tuple(labels.shape)}.")
    if scale is None:
        return None
    if scale.shape != (len(x),):
        raise ValueError(f"`scale` must have shape ({len(x)},), got {tuple(scale.shape)}.")
    return scale.to(dtype)

"""
The weight balls of docs/theory.md §2, one small class each (Foolbox-style: no norm branches in the consumers).

A ball acts on one parameter tensor ``delta`` whose first dimension indexes *rows* (output units or channels); its
radius is a tensor of a ball-specific shape:

* :class:`BoxBall` (``"inf"``): one radius per entry (same shape as the parameter);
* :class:`RowL1Ball` (``"row_l1"``): one radius per row, shape ``(rows,)``;
* :class:`L2Ball` (``"l2"``): one radius for the whole tensor, shape ``()``.

Every operation is vectorized over the tensor and keeps its device and dtype. A ball owns every norm-specific term of
the bounds: its interval term (docs/theory.md §4), its term of the backward linear bound (§4b, read from the
:class:`.AffineBackward` view of the layer and returned as a :class:`LinearTerm`), its support function and its
inclusions (§2). Adding a norm is adding one class here and one entry in :data:`BALLS`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from art_weightpert.operators.affine import Affine
from art_weightpert.operators.affine_view import AffineBackward
from art_weightpert.operators.tensors import abs_chord
from art_weightpert.rounding import norm_up


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View a parameter as a matrix (rows, fan-in); a 1-D tensor (bias) is a column of rows."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


class LinearTerm(NamedTuple):
    """A ball's term of the backward linear bound (docs/theory.md §4b), linear in the radius, each part ``None`` if
    absent: a change of the input coefficients, a constant ``(N, K)``, and a convolution's term ``ĥ ↦ ⟨coef·factor,
    G(ĥ)⟩`` as ``(coef, factor)`` (the affine rule joins it to the layer's adjoint:
    :meth:`.AffineBackward.add_to_kernel`)."""

    input_change: torch.Tensor | None
    constant: torch.Tensor | None
    kernel: tuple[torch.Tensor, torch.Tensor] | None = None


class Ball:
    """Interface of a weight ball. Subclasses implement every method that raises ``NotImplementedError``;
    :meth:`linear_term` and :meth:`abs_weight_factor` have sound defaults that a ball may sharpen."""

    name: str = ""
    label: str = ""
    """How reports and plots name the ball."""
    bias_norm: str = ""
    """The name of the ball a bias gets under this norm (``include_bias``; docs/theory.md §2)."""

    def radius(self, param: torch.Tensor, eps: float, relative: bool) -> torch.Tensor:
        """Radius tensor for ``param`` (absolute ``eps`` or ``eps`` times the parameter's own norm)."""
        raise NotImplementedError

    def norm(self, delta: torch.Tensor) -> torch.Tensor:
        """The ball's norm of ``delta`` (box: ``max|δ|``; row_l1: max row ℓ1; l2: Frobenius)."""
        raise NotImplementedError

    def excess(self, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Largest amount by which ``delta`` exceeds its radius (≤ 0 inside the ball)."""
        raise NotImplementedError

    def project(self, delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Exact Euclidean projection of ``delta`` onto the ball."""
        raise NotImplementedError

    def steepest_step(self, grad: torch.Tensor, radius: torch.Tensor, step: float) -> torch.Tensor:
        """Steepest-ascent step for this norm, of length ``step`` times the radius (a new tensor: callers may
        modify it)."""
        raise NotImplementedError

    def sample(self, radius: torch.Tensor, shape: torch.Size, distribution: str, gen: torch.Generator) -> torch.Tensor:
        """One random point: ``uniform`` in the ball, ``extreme`` points (vertices/sphere) or ``gaussian`` direction
        rescaled onto the boundary."""
        raise NotImplementedError

    def interval_term(self, layer: Affine, m: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """Bound on ``|Δ ĥ|`` at the output of the affine ``layer``, for every ``Δ`` in
        the ball and every ``|ĥ| ≤ m`` (docs/theory.md §4); ``radius`` as given or as :meth:`compact_radius` made it."""
        raise NotImplementedError

    def compact_radius(self, radius: torch.Tensor) -> torch.Tensor:
        """A cheaper equivalent of ``radius`` for :meth:`interval_term` (callers may memoize it per radius)."""
        return radius

    def linear_term(self, view: AffineBackward, radius: torch.Tensor) -> LinearTerm:
        """Lower bound of ``min_Δ λ·Δĥ`` over the ball, linear in ``ĥ`` on the layer's input box (docs/theory.md §4b).
        ``view`` is the layer at that step of the backward pass (read only); ``radius`` is the :meth:`compact_radius`.

        This default uses the interval term: ``|Δĥ| ≤ P(m)`` per output unit, so ``min_Δ λ·Δĥ ≥ −Σ |λ| ⊙ P(m)``."""
        return LinearTerm(None, view.magnitude_term(self.interval_term(view.layer, view.magnitude, radius)))

    def support(self, g: torch.Tensor, radius: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Support function ``max_{Δ in the ball} ⟨Δ, g⟩`` for a batch of ``g`` of shape ``(..., *shape)`` (``shape``:
        the parameter's), shape ``(...)``."""
        raise NotImplementedError

    def abs_weight_factor(self, radius: torch.Tensor, weight: torch.Tensor, eps: float) -> float | None:
        """``eps`` when the ball's interval term is ``eps·|W|`` applied to ``m`` (a box of radius ``eps·|W|``), so that
        interval propagation can share the ``|W|`` product; ``None`` otherwise."""
        return None

    def row_l1_radius(self, radius: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Per-row ℓ1 radius of a row_l1 ball that contains this ball (docs/theory.md §2 inclusions)."""
        raise NotImplementedError

    def entry_bound(self, radius: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Bound on ``|δ|`` per entry (shape ``shape``) implied by the ball: the box containing it."""
        raise NotImplementedError


def _uniform_value(radius: torch.Tensor) -> torch.Tensor | None:
    """The common value of every entry of ``radius``, or ``None`` when they differ."""
    value = radius.reshape(-1)[0]
    return value if bool((radius == value).all()) else None


def _weighted_sum(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ t ⊙ weight`` over every dimension after ``(N, K)``; ``weight`` 0-d or shaped like those dimensions."""
    return weight * t.flatten(2).sum(dim=2) if weight.dim() == 0 else t.flatten(2) @ weight.reshape(-1)


def _abs_weighted_sum(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``Σ |t| ⊙ weight`` over every dimension after ``(N, K)``: with a 0-d ``weight``, one pass over ``t`` (an ℓ1 norm,
    no ``|t|`` materialized)."""
    if weight.dim() == 0:
        return weight * torch.linalg.vector_norm(t.flatten(2), 1, dim=2)
    return _weighted_sum(t.abs(), weight)


def _support_rows(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``g`` ``(..., *shape)`` as ``(..., rows, fan-in)``."""
    return g.reshape(g.shape[: g.dim() - len(shape)] + (shape[0], -1))


def _uniform_sign(shape: torch.Size, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    bits = torch.randint(0, 2, shape, generator=gen, device=gen.device).to(like)
    return 2 * bits - 1


class BoxBall(Ball):
    """Entry-wise box ``|δ_rc| ≤ r_rc`` (``norm="inf"``)."""

    name = "inf"
    label = "box ℓ∞ ball"
    bias_norm = "inf"

    def radius(self, param, eps, relative):
        return eps * param.detach().abs() if relative else torch.full_like(param, eps)

    def norm(self, delta):
        return delta.abs().max() if delta.numel() else delta.new_zeros(())

    def excess(self, delta, radius):
        return (delta.abs() - radius).max() if delta.numel() else delta.new_zeros(())

    def project(self, delta, radius):
        return torch.maximum(torch.minimum(delta, radius), -radius)

    def steepest_step(self, grad, radius, step):
        return step * radius * grad.sign()

    def sample(self, radius, shape, distribution, gen):
        if distribution == "uniform":
            u = torch.rand(shape, generator=gen, device=gen.device).to(radius)
            return (2 * u - 1) * radius
        if distribution == "extreme":
            return _uniform_sign(shape, radius, gen) * radius
        g = torch.randn(shape, generator=gen, device=gen.device).to(radius)
        # Rescale so that the largest |g|/r over the entries with r > 0 is 1 (zero radii stay at 0).
        tiny = torch.finfo(radius.dtype).tiny
        positive = radius > 0
        ratio = torch.where(positive, g.abs() / radius.clamp_min(tiny), torch.zeros_like(g))
        scale = ratio.max().clamp_min(tiny) if ratio.numel() else ratio.new_ones(())
        return torch.where(positive, g / scale, torch.zeros_like(g))

    def interval_term(self, layer, m, radius):
        # Σ_c δ_rc m_c: the layer's map with the δ kernel; with one δ for every entry (a compact radius of absolute
        # budgets) δ Σ_c m_c over the row's receptive field, a sum instead of a matmul.
        if radius.dim() > 0:
            return layer.apply(m, radius)
        if layer.is_conv and layer.module.groups != 1:
            return layer.apply(m, radius.expand(layer.module.weight.shape))
        return radius * layer.patch_sum(m)

    def compact_radius(self, radius):
        # One value for every entry (absolute budgets): that value, 0-d.
        value = _uniform_value(radius) if radius.dim() >= 2 else None
        return radius if value is None else value

    def linear_term(self, view, radius):
        # −Σ δ ⊙ |G| (docs/theory.md §4b); ``radius`` may be compact (0-d). Linear: |G_rc| = |λ_r| |ĥ_c|, the term
        # −(|λ|δ)·|ĥ|. Convolution: |G| is bounded by its chord over the box of G (G where its sign is fixed); on a
        # large kernel (AffineBackward.large_kernel) by |G(c)| + |G(ĥ − c)| ≤ |G(c)| + Σ_p |λ_p| patch_p(ρ), whose
        # second part summed against δ is ⟨|λ|, P(ρ)⟩ with P the interval term: a constant.
        if view.layer.is_conv:
            if view.known_input or view.large_kernel:
                centre = view.centre_gradient()
                delta = radius if radius.dim() == 0 else radius.reshape(centre.shape[2:])
                term = -_abs_weighted_sum(centre, delta)  # G known: the exact −Σ δ |G|
                if not view.known_input:
                    term = term + view.magnitude_term(self.interval_term(view.layer, view.radius, radius))
                return LinearTerm(None, term)
            centre, spread = view.gradient_box()
            delta = radius if radius.dim() == 0 else radius.reshape(centre.shape[2:])
            slope, offset = abs_chord(centre, spread)
            return LinearTerm(None, -_weighted_sum(offset, delta), (slope, delta.neg()))
        a = view.coefficients
        value = radius if radius.dim() == 0 else _uniform_value(radius)
        g = (
            value * torch.linalg.vector_norm(a, 1, dim=2, keepdim=True)
            if value is not None
            else view.transposed(a.abs(), radius)
        )
        return LinearTerm(*view.minus_abs_input(g))

    def support(self, g, radius, shape):
        return g.abs().flatten(g.dim() - len(shape)) @ radius.reshape(-1)  # Σ r |g|

    def abs_weight_factor(self, radius, weight, eps):
        return eps if radius.shape == weight.shape and torch.equal(radius, eps * weight.abs()) else None

    def row_l1_radius(self, radius, shape):
        return _rows(radius).sum(dim=1)

    def entry_bound(self, radius, shape):
        return radius.expand(shape)


_MAX_NEWTON_STEPS = 64


def _l1_threshold(a: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Per-row θ, shape ``(rows, 1)``, of the projection onto ``{‖x_r‖_1 ≤ radius_r}``: the root of
    ``f(θ) = Σ_c max(a_rc − θ, 0) − r_r`` for ``a = |v| ≥ 0`` of shape ``(rows, n)``, and 0 for rows inside the ball.

    Sort-free, vectorized over rows: Newton's method on the convex, decreasing, piecewise-linear ``f``, started below
    the root, is Michelot's algorithm (see Condat 2016): each step ``θ ← θ + f(θ)/|{a > θ}|`` lands in ``[θ, θ*]``,
    the active set ``{a > θ}`` only shrinks (at most ``n`` steps, a handful in practice), and once its size stops
    changing ``θ`` is the exact root. Start ``θ_0 = max((Σa − r)/n, max a − r, 0) ≤ θ*``. A row is done when its
    active set is unchanged or its step is not positive: in exact arithmetic θ only increases until the root, so a
    step ≤ 0 means θ is at the root up to rounding (an entry equal to θ* would otherwise make the set alternate).
    Rows not done after ``_MAX_NEWTON_STEPS`` get the sort-based ``θ``.
    """
    r = radius.to(a.dtype).reshape(-1, 1)
    total = a.sum(dim=1, keepdim=True)
    theta = torch.maximum((total - r) / a.shape[1], a.amax(dim=1, keepdim=True) - r).clamp_min(0)
    count, gap = torch.full_like(theta, -1.0), torch.empty_like(a)  # one scratch matrix for every step
    done = total <= r  # inside the ball: θ = 0
    for _ in range(_MAX_NEWTON_STEPS):
        excess = torch.sub(a, theta, out=gap).clamp_min_(0).sum(dim=1, keepdim=True)
        new_count = gap.sign_().sum(dim=1, keepdim=True)  # |{a > θ}|: a − θ > 0 exactly when a > θ (IEEE)
        step = (excess - r) / new_count.clamp_min(1)
        done |= (new_count == count) | (step <= 0)  # threshold sets are nested: equal sizes mean equal sets
        if bool(done.all()):
            break
        theta = torch.where(done, theta, theta + step)
        count = new_count
    else:
        moving = (~done).squeeze(1).nonzero().squeeze(1)
        theta[moving] = _l1_threshold_sorted(a[moving], r[moving])
    return theta


def _l1_threshold_sorted(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The same ``θ`` (rows outside their ball) by sorting, Duchi et al. (2008): with ``μ`` the row sorted in
    decreasing order, ``ρ`` the last index with ``μ_ρ > (Σ_{j≤ρ} μ_j − r)/ρ`` and ``θ = (Σ_{j≤ρ} μ_j − r)/ρ``."""
    mu, _ = torch.sort(a, dim=1, descending=True)
    cums = mu.cumsum(dim=1) - r
    idx = torch.arange(1, a.shape[1] + 1, device=a.device, dtype=a.dtype)
    rho = (mu - cums / idx > 0).to(a.dtype).mul(idx).argmax(dim=1, keepdim=True)  # last index where it holds
    return (cums.gather(1, rho) / (rho + 1).to(a.dtype)).clamp_min(0)


class RowL1Ball(Ball):
    """Per-row ℓ1 ball ``‖δ_{r,:}‖_1 ≤ r_r`` (``norm="row_l1"``; max over rows = induced ℓ∞→ℓ∞ operator norm)."""

    name = "row_l1"
    label = "row ℓ1 ball"
    bias_norm = "inf"  # a per-entry box: the row ℓ1 ball of a bias (one entry per row)

    def radius(self, param, eps, relative):
        if relative:
            return eps * _rows(param.detach()).abs().sum(dim=1)
        return torch.full((param.shape[0],), float(eps), dtype=param.dtype, device=param.device)

    def norm(self, delta):
        return _rows(delta).abs().sum(dim=1).max() if delta.numel() else delta.new_zeros(())

    def excess(self, delta, radius):
        return (_rows(delta).abs().sum(dim=1) - radius).max() if delta.numel() else delta.new_zeros(())

    def project(self, delta, radius):
        # Soft thresholding at the per-row θ of _l1_threshold: sign(v)·max(|v| − θ, 0), computed as v − clamp(v, −θ, θ)
        # (the same rounding: v ∓ θ is ±(|v| − θ) rounded); θ = 0 (the identity) for rows already inside their ball.
        if delta.numel() == 0:
            return delta.clone()
        v = _rows(delta)
        a = v.abs()
        theta = _l1_threshold(a, radius)
        inside = torch.maximum(torch.minimum(v, theta, out=a), theta.neg(), out=a)  # a is free now: reuse it
        return torch.sub(v, inside, out=inside).reshape(delta.shape)

    def steepest_step(self, grad, radius, step):
        # Steepest ℓ1 ascent puts the step on the largest |g| coordinates of each row; spreading it over the top ~5%
        # (at least one) keeps sparse steps from stalling on wide rows.
        g = _rows(grad)
        k = max(1, int(math.ceil(0.05 * g.shape[1])))
        a = g.abs()
        top = a.topk(k, dim=1, sorted=False).indices  # the same set as sorted=True, without the final sort
        values = step * radius.unsqueeze(1) * (g.gather(1, top).sign() / k)  # (step r)·sign(g)/k on the top entries
        d = a.zero_() if a.dtype == values.dtype else a.new_zeros(a.shape, dtype=values.dtype)  # a is free: reuse it
        return d.scatter_(1, top, values).reshape(grad.shape)

    def sample(self, radius, shape, distribution, gen):
        rows = shape[0]
        n = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        like = radius
        if distribution == "uniform":
            # (E_1..E_n) / Σ_{i≤n+1} E_i with E ~ Exp(1) is uniform in the simplex; random signs fill the ℓ1 ball.
            # -log(1 - U) with U in [0, 1) is Exp(1) and finite (-log U is inf when U == 0).
            u = torch.rand((rows, n + 1), generator=gen, device=gen.device).to(like)
            e = -torch.log1p(-u)
            pts = e[:, :n] / e.sum(dim=1, keepdim=True).clamp_min(torch.finfo(like.dtype).tiny)
            pts = pts * _uniform_sign((rows, n), like, gen)
        elif distribution == "extreme":
            col = torch.randint(0, n, (rows, 1), generator=gen, device=gen.device)
            pts = torch.zeros((rows, n), dtype=like.dtype, device=like.device).scatter_(1, col, 1.0)
            pts = pts * _uniform_sign((rows, 1), like, gen)
        else:
            g = torch.randn((rows, n), generator=gen, device=gen.device).to(like)
            pts = g / g.abs().sum(dim=1, keepdim=True).clamp_min(1e-300)
        return (pts * radius.unsqueeze(1)).reshape(shape)

    def interval_term(self, layer, m, radius):
        return layer.rows_shape(radius) * layer.patch_max(m)  # ε_r ‖m‖_∞ over the row's receptive field

    def linear_term(self, view, radius):
        # −Σ_r ε_r ‖G_r‖_∞ (Hölder). Linear: ‖G_r‖_∞ = |λ_r| ‖ĥ‖_∞ ≤ |λ_r| max_c m_c, the interval term's bound;
        # convolution: ‖G_r‖_∞ ≤ max_j (|G_c| + G_r)_{rj} over the box G_c ± G_r of G.
        if not view.layer.is_conv:
            return super().linear_term(view, radius)
        centre, spread = view.gradient_box()
        top = (centre.abs() + spread).amax(dim=-1).flatten(2)  # max |G| per entry, then per row: (N, K, rows)
        return LinearTerm(None, -top @ radius)

    def support(self, g, radius, shape):
        return _support_rows(g.abs(), shape).amax(dim=-1) @ radius  # Σ_r ε_r ‖g_r‖_∞

    def row_l1_radius(self, radius, shape):
        return radius

    def entry_bound(self, radius, shape):
        return radius.reshape((-1,) + (1,) * (len(shape) - 1)).expand(shape)


class L2Ball(Ball):
    """Frobenius ball ``‖δ‖_F ≤ r`` over the whole tensor (``norm="l2"``, as in AWP/SAM)."""

    name = "l2"
    label = "Frobenius ℓ2 ball"
    bias_norm = "l2"

    def radius(self, param, eps, relative):
        if relative:
            return eps * param.detach().norm()
        return torch.tensor(float(eps), dtype=param.dtype, device=param.device)  # not via float32: exact in float64

    def norm(self, delta):
        return delta.norm()

    def excess(self, delta, radius):
        return delta.norm() - radius

    def project(self, delta, radius):
        n = delta.norm()
        return delta * torch.where(n > radius, radius / n.clamp_min(1e-300), torch.ones_like(n))

    def steepest_step(self, grad, radius, step):
        return step * radius * grad / grad.norm().clamp_min(1e-30)

    def sample(self, radius, shape, distribution, gen):
        g = torch.randn(shape, generator=gen, device=gen.device).to(radius)
        direction = g / g.norm().clamp_min(1e-300)
        if distribution == "uniform":
            u = torch.rand((), generator=gen, device=gen.device).to(radius)
            return direction * radius * u ** (1.0 / max(1, g.numel()))
        return direction * radius  # "extreme" and "gaussian": a Gaussian direction on the sphere

    def interval_term(self, layer, m, radius):
        return radius * layer.patch_norm2(m)  # |Δ_r·ĥ| ≤ ‖Δ_r‖_2 ‖m‖_2 ≤ ε ‖m‖_2 (Cauchy–Schwarz per row)

    def linear_term(self, view, radius):
        # −ε ‖G‖_F. Linear: ‖G‖_F = ‖λ‖_2 ‖ĥ‖_2 ≤ ‖λ‖_2 ‖m‖_2; convolution: |G| ≤ |G_c| + G_r entry-wise.
        if not view.layer.is_conv:
            coefficients, magnitude = norm_up(view.coefficients, 2), norm_up(view.magnitude, 1, keepdim=True)
            return LinearTerm(None, -radius * coefficients * magnitude)
        centre, spread = view.gradient_box()
        return LinearTerm(None, -radius * norm_up((centre.abs() + spread).flatten(2), 2))

    def support(self, g, radius, shape):
        return radius * norm_up(g.flatten(g.dim() - len(shape)), -1)  # ε ‖g‖_F (norm_up: squares that underflow)

    def row_l1_radius(self, radius, shape):
        fan_in = int(math.prod(shape[1:])) if len(shape) > 1 else 1
        return (math.sqrt(fan_in) * radius).expand(shape[0])

    def entry_bound(self, radius, shape):
        return radius.expand(shape)


BALLS: dict[str, Ball] = {"inf": BoxBall(), "row_l1": RowL1Ball(), "l2": L2Ball()}

"""The coupling layers' monotonic rational-quadratic spline, written for its one use.

:func:`rqs` is :class:`zuko.transforms.MonotonicRQSTransform` (Durkan et al., "Neural Spline Flows", NeurIPS 2019)
as :class:`flowvae.models.conditional_flow.CouplingFlow` uses it — K bins on [−B, B], the identity outside, zuko's
minimum slope 10⁻³ — with the same values, inverses, log|det|s and gradients up to floating-point rounding
(tests/models/test_spline.py checks it against zuko in float64 and float32). What differs is the work:

* the 3K − 1 logits of each value are laid out bins first, (3K − 1, values), so that every per-bin operation runs
  once over all of them along the values (logits on another axis, as zuko takes them, are moved there by one copy,
  and their gradient back); torch's softmax over a last axis of 8 is ~5× slower than exp and sum written out, and
  the soft clamp keeps every width and height logit within ±3.5, so exp needs no maximum subtracted;
* the cumulative sums of the widths and heights are one small matrix product, the bin search compares them with
  the value (no knot array is made), and only the bin's two knot-derivative logits go through exp;
* the inverse's log|det| is that of the bin it solved in (zuko's inverse evaluates the forward map again at the
  solution, searching the bins a second time), and where zuko's root of the quadratic cancels (b < 0, steep bins)
  the same root is taken in the form that does not: there, in float32, zuko's log|det| can be off by up to ~1 or
  NaN (a discriminant rounded below 0), ours stays at float32's rounding of the float64 value;
* the backward pass is written out (:class:`_RQS`): the implicit derivative of the inverse, and the gradient of the
  logits in closed form — the cumulative sum's and the softmax's backward passes reduce to per-value scalars, so
  nothing is scattered into or summed over the bins.

Without gradients, float32 values on a CPU take the same arithmetic compiled into one pass
(:mod:`flowvae.models.spline_compiled`, numba), which :func:`compiled_path` hands out; the torch code here serves
everything else.

A value exactly on a knot belongs to the bin on its left, as in zuko. Where rounding puts a knot on the other side
of a value than zuko's does, the values, the log|det| and the gradients of the values agree across it (the spline
is C¹ in x and in its knots); only the log|det|'s gradient is one-sided there.

Costs that shaped the code (torch 2.13 on a CPU, flowvae's settings): under ``torch.use_deterministic_algorithms``
torch fills every new empty tensor, and the output of some operations (``abs``, ``where``, a sum of booleans), with
NaN first, a pass of its own; a Python number in an operation costs five dispatches to become a tensor; and at a
training batch the ~100 operations' dispatch costs as much as their arithmetic.
"""

from __future__ import annotations

import logging
import math
import threading

import torch
from torch import Tensor

__all__ = ["MIN_SLOPE", "compiled_path", "rqs"]

log = logging.getLogger(__name__)

# zuko's default minimum slope: width and height logits are soft-clamped to ±|log MIN_SLOPE| / 2 (no bin narrower
# than MIN_SLOPE times another), the knot derivatives' to ±|log MIN_SLOPE| (each in [MIN_SLOPE, 1 / MIN_SLOPE]).
MIN_SLOPE = 1e-3


def rqs(x: Tensor, params: Tensor, bound: float, inverse: bool = False, real: Tensor | None = None, dim: int = -1
        ) -> tuple[Tensor, Tensor]:
    """The spline (or its inverse) applied to ``x``: (y, log|dy/dx|), both shaped as ``x``.

    ``params`` is ``x``'s shape with the 3K − 1 logits of each value inserted at ``dim``: K width logits, K height
    logits, K − 1 interior knot-derivative logits — ``dim=-1`` is zuko's ``MonotonicRQSTransform(params[..., :K],
    params[..., K:2K], params[..., 2K:], bound)``. A value outside (−B, B] (forward: the knots' range; inverse: the
    heights') is left alone with log|det| 0, and so is one where ``real`` (shaped as ``x``) is 0. With ``dim=0``
    and ``params`` contiguous nothing is copied.
    """
    dim = dim % params.dim()
    n_params = params.shape[dim]
    if params.shape[:dim] + params.shape[dim + 1:] != x.shape or n_params % 3 != 2 or n_params < 5:
        raise ValueError(f"params {tuple(params.shape)} must be x's shape {tuple(x.shape)} with 3K-1 (K >= 2) logits "
                         f"inserted at dim {dim}")
    bound, inverse = float(bound), bool(inverse)
    if _wants_gradient(x, params):
        return _RQS.apply(x, params, bound, inverse, real, dim)[:2]
    # no gradient (generation, evaluation): float32 on a CPU in one compiled pass (flowvae.models.spline_compiled),
    # otherwise the same numbers as with gradients without what the backward pass would need, and without the
    # autograd function's wrapping of its 21 outputs (at a generation batch, a third of the time)
    flat_x, flat_params = x.reshape(-1), _bins_first(params, dim)
    flat_real = None if real is None else real.reshape(-1)
    compiled = compiled_path(flat_x, flat_params, flat_real)
    if compiled is not None:
        out, ladj = compiled.rqs_no_grad(flat_x.contiguous(), flat_params.contiguous(), bound, inverse,
                                         None if flat_real is None else flat_real.contiguous(), MIN_SLOPE)
    else:
        out, ladj, _ = _forward(flat_x, flat_params, bound, inverse, flat_real, False)
    return out.view(x.shape), ladj.view(x.shape)


def _wants_gradient(*tensors: Tensor) -> bool:
    return torch._C._are_functorch_transforms_active() or (
        torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors))


COMPILED = True  # False: calls without gradients take the torch path too (the tests compare the two)
_COMPILED_MODULE: list = []  # flowvae.models.spline_compiled once imported, or None where numba is missing
_IMPORTING = threading.Lock()


def compiled_path(*tensors: Tensor | None):
    """:mod:`flowvae.models.spline_compiled` where it applies to ``tensors`` (None: absent) — no gradient wanted
    through them, all float32 on the CPU, numba installed and :data:`COMPILED` — else None."""
    present = [tensor for tensor in tensors if tensor is not None]
    if not COMPILED or _wants_gradient(*present) or any(
            tensor.device.type != "cpu" or tensor.dtype != torch.float32 for tensor in present):
        return None
    if not _COMPILED_MODULE:
        with _IMPORTING:  # once, though the first call may come from several threads' parts of a batch at once
            if not _COMPILED_MODULE:
                _COMPILED_MODULE.append(_import_compiled())
    return _COMPILED_MODULE[0]


def _import_compiled():
    try:
        from flowvae.models import spline_compiled
    except Exception as error:  # noqa: BLE001 - numba missing, or too old or new for this numpy, or no cache dir
        log.warning("the compiled spline is unavailable (%s: %s); generation and evaluation take the torch path, "
                    "the same numbers to rounding, about 1.4x slower. `pip install numba` (a flowvae dependency), "
                    "NUMBA_CACHE_DIR set to a writable folder or NUMBA_DISABLE_JIT unset restores it",
                    type(error).__name__, error)
        return None
    return spline_compiled


_CONSTANTS: dict[tuple, Tensor] = {}


def _constant(key: tuple, like: Tensor, make) -> Tensor:
    """A constant tensor for ``like``'s dtype and device, made once."""
    key = (*key, like.dtype, like.device)
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = make().to(dtype=like.dtype, device=like.device)
    return value


def _scalar(value: float, like: Tensor) -> Tensor:
    return _constant(("scalar", value), like, lambda: torch.tensor(value, dtype=torch.float64))


def _forward(x: Tensor, params: Tensor, bound: float, inverse: bool, real: Tensor | None, save: bool
             ) -> tuple[Tensor, Tensor, dict | None]:
    """The spline on values x (M,) with logits (3K − 1, M); with ``save``, what the backward pass needs."""
    k = (params.shape[0] + 1) // 3
    one, zero, two = _scalar(1.0, x), _scalar(0.0, x), _scalar(2.0, x)
    log_slope = abs(math.log(MIN_SLOPE))
    # widths and heights: zuko's soft clamp w / (1 + |2w / log s|), then exp, in place where it can be — at a
    # generation batch a pass over the logits costs more than its arithmetic
    logits = params[:2 * k]
    clamp = torch.copysign(logits, one)
    clamp = torch.add(one, clamp, alpha=2 / log_slope, out=clamp)
    exp = torch.div(logits, clamp, out=None if save else clamp).exp_()
    # Σ_{i<j} e_i for j = 0 … K, widths and heights at once, by one small matrix product (exactly 0 at j = 0)
    lower = _constant(("lower", k), x, lambda: torch.ones(k + 1, k).tril_(-1))
    cumulative = torch.matmul(lower, exp.view(2, k, -1))  # (2, K+1, M)
    sums = cumulative[:, k]  # the softmax's sums; knot j is B (2 c_j / c_K − 1)
    # each value's bin: knot j < x ⇔ c_j < (x + B) c_K / 2B = c_K / 2 + x c_K / 2B, counted in uint8 (a sum of
    # booleans would copy them to int64 first); a value on a knot is in the bin on its left, as in zuko
    side = 1 if inverse else 0
    threshold = torch.addcmul(torch.mul(sums[side], _scalar(0.5, x)), x, sums[side], value=0.5 / bound)
    bins = (cumulative[side, 1:k] < threshold).view(torch.uint8).sum(0, dtype=torch.uint8).long()  # (M,)
    inside = torch.gt(x, _scalar(-bound, x))
    inside &= torch.le(x, _scalar(bound, x))
    if real is not None:
        inside &= torch.gt(real, zero)
    inside = inside.to(x.dtype)  # 1 or 0: masks by product and lerp (exact at 0 and 1; torch.where is 15× slower)
    index = torch.stack([bins, bins + 1])  # (2, M)
    ends = torch.gather(cumulative, 1, index.expand(2, 2, -1))  # (side, end, M)
    ends = ends.mul_(torch.div(_scalar(2 * bound, x), sums).unsqueeze(1)).sub_(_scalar(bound, x))
    (x0, x1), (y0, y1) = ends
    # the bin's two knot derivatives exp(d / (1 + |d / log s|)) from their logits alone; 1 (logit 0) at ±B
    free = torch.ne(index, _constant(("ends", k), bins, lambda: torch.tensor([[0], [k]]))).to(x.dtype)
    derivative_logits = torch.gather(params[2 * k:], 0, index.sub_(1).clamp_(0, k - 2)).mul_(free)
    clamp_d = torch.copysign(derivative_logits, one)
    clamp_d = torch.add(one, clamp_d, alpha=1 / log_slope, out=clamp_d)
    derivatives = torch.div(derivative_logits, clamp_d).exp_()  # (2, M)
    d0, d1 = derivatives
    w, h = x1 - x0, y1 - y0
    s = h / w
    spread = torch.sub(d0 + d1, s, alpha=2)
    if inverse:  # the root of a z² + b z − c = 0 in [0, 1] (c = s y′) that zuko takes, 2c / (b + √(b² + 4ac)) …
        y_ = torch.sub(x, y0).clamp_min_(0).minimum(h).mul_(inside)  # in [0, h], as in zuko's consistent search
        a = torch.addcmul(h * (s - d0), y_, spread)
        b = torch.addcmul(h * d0, y_, spread, value=-1)
        c = s * y_
        root = torch.addcmul(b * b, a, c, value=4).clamp_min_(0).sqrt_()  # b² and −4ac can cancel below 0
        # … which cancels for b < 0 (steep bins, float32: off by up to 1 in the log|det|); there a > h s > 0 and the
        # same root is (√(b² + 4ac) − b) / 2a
        z = torch.where(b < 0, (root - b).div_(a).mul_(0.5), c.mul_(two).div_(root.add(b))).clamp_(0, 1)
        out = torch.lerp(x, torch.addcmul(x0, z, w), inside)
    else:  # z in [0, 1] also where rounding put x a hair outside its bin (the search and the ends round apart)
        z = torch.sub(x, x0).div_(w).clamp_(0, 1).mul_(inside)
    uz = torch.stack([torch.sub(one, z), z])  # (1 − z, z)
    u = uz[0]
    t = z * u
    num = torch.addcmul(s * z, d0, u).mul_(z)  # s z² + d0 z (1 − z)
    den = torch.addcmul(s, spread, t)
    if not inverse:
        out = torch.lerp(x, torch.addcdiv(y0, h * num, den), inside)
    jac = torch.addcmul(d0 * u * u, s, t, value=2).addcmul_(d1 * z, z)  # 2 s t + d0 (1 − z)² + d1 z²
    slope = s / den
    dy_dx = slope.mul_(slope).mul_(jac)  # s² jac / den², the forward map's slope
    ladj = torch.log(dy_dx).mul_(-inside if inverse else inside)
    if not save:
        return out, ladj, None
    # for the logits' gradient: e·f′ and d·f′, f′ = 1 / clamp² the soft clamp's derivative
    saved = {"inside": inside, "bins": bins, "index": index, "free": free, "slopes": exp.div_(clamp.square_()),
             "derivative_slopes": derivatives / clamp_d.square_(), "sums": sums, "uz": uz, "t": t, "w": w, "h": h,
             "s": s, "derivatives": derivatives, "spread": spread, "num": num, "den": den, "jac": jac,
             "dy_dx": dy_dx, "ends": ends}
    return out, ladj, saved


# what _forward saves for the backward pass, in the order _RQS's forward pass returns it
_SAVED = ("inside", "bins", "index", "free", "slopes", "derivative_slopes", "sums", "uz", "t", "w", "h", "s",
          "derivatives", "spread", "num", "den", "jac", "dy_dx", "ends")


def _bins_first(params: Tensor, dim: int) -> Tensor:
    """``params`` as (3K − 1, values): as is (a view) for ``dim=0``, else copied by a concatenation, which unlike
    ``contiguous()`` does not first fill its new tensor with NaN under deterministic algorithms."""
    if dim == 0:
        return params.reshape(params.shape[0], -1)
    return torch.cat([params.movedim(dim, 0)]).view(params.shape[dim], -1)


class _RQS(torch.autograd.Function):
    """The spline with its backward pass written out (see the module's docstring).

    In torch.func's style, so that it runs under ``torch.func.vmap`` (a stack of models, each with its own logits):
    the forward pass returns what the backward pass needs as further outputs, not differentiable, which
    :meth:`setup_context` saves and :func:`rqs` drops; :meth:`vmap` folds the mapped axis into the values."""

    @staticmethod
    def forward(x: Tensor, params: Tensor, bound: float, inverse: bool, real: Tensor | None, dim: int):
        out, ladj, saved = _forward(x.reshape(-1), _bins_first(params, dim), bound, inverse,
                                    None if real is None else real.reshape(-1), True)
        return out.view(x.shape), ladj.view(x.shape), *(saved[key] for key in _SAVED)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, params, bound, inverse, _, dim = inputs
        saved = output[2:]
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zeros for the saved outputs' gradients (y's or ladj's: made below)
        if any(ctx.needs_input_grad[:2]):
            ctx.save_for_backward(*saved)
            ctx.bound, ctx.inverse, ctx.dim, ctx.shape, ctx.x_shape = bound, inverse, dim, params.shape, x.shape

    @staticmethod
    def vmap(info, in_dims, x: Tensor, params: Tensor, bound: float, inverse: bool, real: Tensor | None, dim: int):
        """The mapped axis of x (and real) to the front, and params' to just before its values' (after the logits
        for ``dim=0``, else before them, which moves them to ``dim + 1``): one call over all the values."""
        def front(tensor: Tensor, in_dim: int | None, to: int) -> Tensor:
            if in_dim is None:
                return tensor.unsqueeze(to).expand(*tensor.shape[:to], info.batch_size, *tensor.shape[to:])
            return tensor.movedim(in_dim, to)

        x_dim, params_dim, _, _, real_dim, _ = in_dims
        x = front(x, x_dim, 0)
        params = front(params, params_dim, 1 if dim == 0 else 0)
        if real is not None:
            real = front(real, real_dim, 0)
        out, ladj, *saved = _RQS.apply(x, params, bound, inverse, real, 0 if dim == 0 else dim + 1)
        # what the backward pass needs is laid out (…, values), the mapped axis first among the values
        saved = [tensor.view(*tensor.shape[:-1], info.batch_size, -1) for tensor in saved]
        return (out, ladj, *saved), (0, 0, *[-2] * len(saved))

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_ladj: Tensor, *_):
        v = dict(zip(_SAVED, ctx.saved_tensors, strict=True))
        inside, uz, t, w, h, s, num, den, jac = (v[key] for key in (
            "inside", "uz", "t", "w", "h", "s", "num", "den", "jac"))
        if grad_out is None or grad_ladj is None:  # one of y and ladj unused
            grad_out, grad_ladj = (torch.zeros_like(ctx.saved_tensors[0]).view(ctx.x_shape) if grad is None else grad
                                   for grad in (grad_out, grad_ladj))
        shape = grad_out.shape
        grad_out, grad_ladj = grad_out.reshape(-1), grad_ladj.reshape(-1)
        u, z = uz
        d = v["derivatives"]  # (2, M): d₀, d₁
        g_out, g_ladj = grad_out * inside, grad_ladj * inside
        # y = y₀ + h r(z) with r = num/den, and Λ = log(s² jac / den²) the forward log|det|: their partial
        # derivatives in z, s and (d₀, d₁) (Λ's in z and s halved)
        r = num / den
        inv_den, inv_jac = den.reciprocal(), jac.reciprocal()
        t_den = t * inv_den
        r_s = torch.sub(z * z, r).mul_(inv_den).addcmul_(r, t_den, value=2)  # (z² − r (1 − 2t)) / den
        r_d = torch.sub(_constant(("unit",), z, lambda: torch.tensor([[1.0], [0.0]])), r)
        r_d = r_d.mul_(t_den)  # t (1 − r) / den, −t r / den
        l_d = torch.addcmul(t_den.mul(-2), uz * uz, inv_jac)  # (u², z²)/jac − 2t/den
        l_z = torch.addcmul((s - d[0]) * u, d[1] - s, z).mul_(inv_jac)  # (s (1 − 2z) − d₀ u + d₁ z) / jac
        l_z = l_z.addcmul_(v["spread"] * (u - z), inv_den, value=-1)  # … − spread (1 − 2z) / den
        l_s = torch.addcmul(s.reciprocal(), t, inv_jac).sub_(inv_den).add_(t_den, alpha=2)  # 1/s + t/jac − (1 − 2t)/den
        dy_dz = v["dy_dx"] * w
        if ctx.inverse:  # x = x₀ + z w, z solving y = y₀ + h r(z): dz = (dy − dy₀ − r dh − h ∂r) / (dy/dz)
            g_y = torch.addcmul(g_out * w, g_ladj, l_z, value=-2).div_(dy_dz)  # ladj = −Λ
            through = g_y * h
            g_s = torch.addcmul(through * r_s, g_ladj, l_s, value=2).neg_()
            g_d = torch.addcmul(through * r_d, g_ladj, l_d).neg_()
            s_w = g_s / w  # ∂L/∂h through s = h / w
            g_h = torch.addcmul(s_w, g_y, r, value=-1)
            g_w = torch.mul(g_out, z).addcmul_(s_w, s, value=-1)
            g_x0, g_y0 = g_out, -g_y  # at fixed w and h
            g_x = torch.lerp(grad_out, g_y, inside)
        else:  # y = y₀ + h r(z), z = (x − x₀) / w
            g_z = torch.addcmul(g_out * dy_dz, g_ladj, l_z, value=2)
            through = g_out * h
            g_s = torch.addcmul(through * r_s, g_ladj, l_s, value=2)
            g_d = torch.addcmul(through * r_d, g_ladj, l_d)
            s_w = g_s / w
            g_h = torch.addcmul(s_w, g_out, r)
            g_x0 = -g_z / w
            g_w = torch.addcmul(s_w * s, g_x0, z, value=-1).neg_()  # −(g_z z + g_s s) / w
            g_y0 = g_out
            g_x = torch.lerp(grad_out, g_z / w, inside)
        g_params = None
        if ctx.needs_input_grad[1]:
            g_params = _logits_backward(v, ctx.bound, (g_x0, g_w), (g_y0, g_h), g_d)
            g_params = g_params.view(ctx.shape) if ctx.dim == 0 else \
                torch.cat([g_params.view(ctx.shape[ctx.dim], *shape).movedim(0, ctx.dim)])
        return (g_x.view(shape) if ctx.needs_input_grad[0] else None), g_params, None, None, None, None


def _logits_backward(v: dict, bound: float, g_horizontal: tuple[Tensor, Tensor], g_vertical: tuple[Tensor, Tensor],
                     g_derivatives: Tensor) -> Tensor:
    """The logits' gradient (3K − 1, M) from those of each value's bin: with respect to its left knot at a fixed
    width and to its width, (g₀, g_w), horizontally and vertically, and to its two knot derivatives (2, M).

    A knot is X_j = B (2 Σ_{i<j} p_i − 1), p the softmax of the clamped logits, so with G_j = ∂L/∂X_j nonzero at
    j = k (the left knot: g₀ − g_w) and k + 1 (the right one: g_w), ∂L/∂p_i = 2B (G_k [i < k] + G_{k+1} [i ≤ k]),
    and the softmax's backward p_i (∂L/∂p_i − Σ_m p_m ∂L/∂p_m) needs Σ_m p_m ∂L/∂p_m = G_k (X_k + B) +
    G_{k+1} (X_{k+1} + B): no sum over the bins. With p_i = e_i / Σe the factor p_i f′_i is slopes_i / Σe.
    """
    bins, slopes = v["bins"], v["slopes"]
    k = slopes.shape[0] // 2
    per_sum = v["sums"].reciprocal()  # (2, M)
    right = torch.stack([g_horizontal[1], g_vertical[1]]).mul_(per_sum)
    left = torch.stack([g_horizontal[0], g_vertical[0]]).mul_(per_sum).sub_(right)
    knots = torch.add(v["ends"], _scalar(bound, per_sum))  # X + B at the bin's ends, (side, end, M)
    weighted = torch.addcmul(left * knots[:, 0], right, knots[:, 1]).neg_()
    # [i < k] and [i <= k] as numbers: k − i and k + 1 − i clamped to [0, 1]
    order = _constant(("order", k), per_sum, lambda: torch.arange(float(k)).view(k, 1))
    before = torch.sub(bins.to(slopes.dtype), order)  # (K, M)
    upto = torch.add(before, _scalar(1.0, before)).clamp_(0, 1)
    before.clamp_(0, 1)
    g_params = slopes.new_zeros(3 * k - 1, bins.shape[0])
    g_logits = g_params[:2 * k].view(2, k, -1)
    torch.addcmul(weighted.unsqueeze(1), before, left.unsqueeze(1), value=2 * bound, out=g_logits)
    g_logits.addcmul_(upto, right.unsqueeze(1), value=2 * bound).mul_(slopes.view(2, k, -1))
    # the bin's two knot-derivative logits, where they were gathered from (none for the fixed ones at ±B)
    g_params[2 * k:].scatter_add_(0, v["index"], g_derivatives.mul_(v["derivative_slopes"]).mul_(v["free"]))
    return g_params

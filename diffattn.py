"""diffattn: differential attention, ViT/DiffViT, and the tools to measure their sensitivity.

A reproducibility kit for "Understanding Sensitivity of Differential Attention through the Lens of
Adversarial Robustness" (ICLR 2026, arXiv 2510.00517), in one file that depends on torch alone. Read
top to bottom: attention (the paper's object) and Lemma 1's branch-gradient alignment -> ViT/DiffViT
-> CLIP/DiffCLIP and their loaders -> attacks (PGD, FGSM, CW-L2, AutoAttack, patch) -> metrics.

Conventions: images are float (B, C, H, W) in [0, 1] and models normalize inside (RobustBench's
convention), so attacks work in pixel space; state dicts use timm's ``VisionTransformer`` names;
``heads`` counts *standard* heads H: ``DiffAttention(dim, H)`` has H/2 differential heads and the
projection shapes of ``Attention(dim, H)`` (Ye et al.'s comparison; timm's ``DiffAttention`` counts H/2).
"""
from __future__ import annotations

import argparse
import math
import numbers
import os
import re
import zipfile
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Attention", "DiffAttention", "DiffAttentionV2", "AttnMaps", "attention_maps", "lambda_init_schedule",
           "Block", "ViT", "check_images", "check_labels", "TextTransformer", "CLIP", "tokenize", "zero_shot_weights",
           "ZeroShotClassifier", "clip_state_dict_to_kit", "load_clip", "AttackResult", "pgd", "fgsm", "cw_l2",
           "autoattack", "patch_attack", "predict", "clean_accuracy", "robust_accuracy", "attack_success_rate",
           "input_gradient_norm", "Alignment", "branch_gradient_alignment", "local_lipschitz", "sanity_checks"]


def _check(*rules: tuple) -> None:
    """Argument checks as data: the first rule (name, value, ok, expected) with ``ok`` false raises
    ``ValueError("name=value; expected <expected>")``. A public function makes one call."""
    for name, value, ok, expected in rules:
        if not ok:
            raise ValueError(f"{name}={value!r}; expected {expected}")


def _int(v, low: int) -> bool:  # numbers.Integral: numpy integers too
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _real(v, low: float = -math.inf) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= low


def _integer(name: str, v, low: int) -> tuple:
    return name, v, _int(v, low), f"an integer >= {low}"


def _positive(name: str, v) -> tuple:
    return name, v, _real(v) and v > 0, "a number > 0"


def _one_of(name: str, v, options: tuple, note: str = "") -> tuple:
    return name, v, v in options, ", ".join(map(repr, options[:-1])) + f" or {options[-1]!r}" + note


def _budget(eps, x, expected: str = "a finite number >= 0", strict: bool = False) -> tuple:
    """An attack's eps: a finite number >= 0 (> 0 if ``strict``) that stays finite in the images' dtype
    (1e39 is finite in Python but inf in float32)."""
    top = torch.finfo(x.dtype).max if torch.is_tensor(x) and x.is_floating_point() else math.inf
    ok = _real(eps, 0) and (eps > 0 or not strict) and eps <= top
    return "eps", eps, ok, expected + (f", at most {top:.3g} ({x.dtype})" if top < math.inf else "")


_NORMS, _LOSSES = ("inf", "2"), ("ce", "margin", "logit")


# -- Attention ---------------------------------------------------------------------------

@dataclass
class AttnMaps:
    """One attention layer's maps in one forward pass (in the graph), recorded by ``attention_maps``: A, the map
    that multiplies V (A.grad = G = dL/dA after a backward). ``DiffAttention``: A = A1 - lam A2, A1, A2 (B, H/2,
    N, N), ``lam`` a scalar; ``DiffAttentionV2``: A1, A2 (B, H, N, N), ``lam`` the per-token gate (B, H, N),
    A = A1 - lam[..., None] A2; ``Attention``: A (B, H, N, N), the rest None."""
    layer: str
    A: torch.Tensor
    A1: Optional[torch.Tensor] = None
    A2: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None


def lambda_init_schedule(layer_index: int) -> float:
    """The Differential Transformer's depth schedule: lambda_init = 0.8 - 0.6 exp(-0.3 l), l 0-based."""
    _check(_integer("layer_index", layer_index, 0))
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


def _masked(scores: torch.Tensor, causal: bool) -> torch.Tensor:
    """Causal mask (query i sees keys j <= i) on attention scores, for the CLIP text tower."""
    if not causal:
        return scores
    N = scores.shape[-1]
    return scores.masked_fill(torch.ones(N, N, dtype=torch.bool, device=scores.device).triu(1), float("-inf"))


def _float32_at_least(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, in float32 at least (also under bf16 autocast; the caller casts back)."""
    xf = _float32_at_least(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight


class _AttentionLayer(nn.Module):
    """What the three layers share: the checks of dim and heads (``even``: H/2 differential heads), ``qkv``, ``proj``.
    While ``_record`` is a list (inside ``attention_maps``), forward takes the explicit path and records."""
    _record: Optional[list] = None
    _name, _retain_grad = "", True

    def __init__(self, dim: int, heads: int, qkv_width: int, qkv_bias: bool, proj_bias: bool, causal: bool,
                 even: bool = False):
        super().__init__()
        layer = type(self).__name__
        _check(("(dim, heads)", (dim, heads), _int(dim, 1) and _int(heads, 1), "positive integers"))
        if even and heads % 2:
            raise ValueError(f"{layer}: heads={heads} is odd; heads counts standard heads H and the "
                             f"layer has H/2 differential heads, so pass an even number (e.g. {heads + 1})")
        if dim % heads:
            raise ValueError(f"{layer}: dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal  # H standard heads of size d
        self.qkv = nn.Linear(dim, qkv_width, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _store(self, **maps):
        if self._retain_grad and maps["A"].requires_grad:
            maps["A"].retain_grad()
        self._record.append(AttnMaps(layer=self._name, **maps))


class Attention(_AttentionLayer):
    """Standard multi-head self-attention (timm names: ``qkv``, ``proj``).

        A = softmax(Q K^T / sqrt(d)),  out = proj(concat_h(A_h V_h)),  d = dim / heads.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, proj_bias: bool = True, causal: bool = False):
        super().__init__(dim, heads, 3 * dim, qkv_bias, proj_bias, causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        if self._record is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, d)
        else:
            A = _masked(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, self.causal).softmax(-1)  # (B, H, N, N)
            self._store(A=A)
            out = A @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DiffAttention(_AttentionLayer):
    """Differential attention (Ye et al. 2024, "Differential Transformer", arXiv 2410.05258).

    With H standard heads, d = dim / H, and per differential head h = 0 .. H/2 - 1:

        A1 = softmax(Q1 K1^T / sqrt(d)),   A2 = softmax(Q2 K2^T / sqrt(d))      (a causal mask only if asked)
        lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init                   (shared by all heads)
        head_h = (1 - lambda_init) * RMSNorm((A1 - lambda A2) V_h)              (V_h of width 2d)
        out = proj(concat_h head_h)

    Q1, Q2 (K1, K2) of head h: the standard heads 2h, 2h+1 of ``qkv`` (timm's layout); V_h: their two value
    heads side by side. ``lambda_init``: a number (0.8, as in the paper and DiffCLIP) or ``"schedule"``
    (``lambda_init_schedule(layer_index)``, Ye et al.'s and timm's default). Two paths, one formula: fused (SDPA,
    [Q1; Q2] stacked on the batch axis; the default on CUDA) and explicit (the maps materialized; elsewhere, as
    CPU SDPA has no fused kernel for a value width 2d != d, and inside ``attention_maps``). Under bf16 autocast
    the subtraction and the norm run in float32, yet the cancellation still amplifies each branch's rounding:
    relative error against float32 on 10 random dim-384 layers (65 tokens, fused, CPU) 7.2e-3 (8.2e-3 with a bf16
    subtraction), ``Attention`` 3.9e-3. So attacks and metrics compare ViT and DiffViT in float32.
    """
    fused: Optional[bool] = None  # None: fused on CUDA, explicit elsewhere

    def __init__(self, dim: int, heads: int, lambda_init: Union[float, str] = 0.8,
                 layer_index: int = 0, qkv_bias: bool = True, proj_bias: bool = True, causal: bool = False):
        super().__init__(dim, heads, 3 * dim, qkv_bias, proj_bias, causal, even=True)
        if lambda_init == "schedule":
            lambda_init = lambda_init_schedule(layer_index)
        _check(("lambda_init", lambda_init, _real(lambda_init, 0) and lambda_init < 1,
                "a number in [0, 1) (the output is scaled by 1 - lambda_init), or 'schedule'"))
        self.lambda_init, d = float(lambda_init), self.head_dim
        self.lambda_q1 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_k1 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_q2 = nn.Parameter(torch.randn(d) * 0.1)
        self.lambda_k2 = nn.Parameter(torch.randn(d) * 0.1)
        self.sub_norm = nn.RMSNorm(2 * d, eps=1e-5)

    def lam(self) -> torch.Tensor:
        """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init (a 0-d tensor)."""
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, d = self.heads, self.head_dim
        qkv = self.qkv(x).view(B, N, 3, H, d)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, N, d): heads 2h, 2h+1 = Q1, Q2
        v = qkv[:, :, 2].reshape(B, N, H // 2, 2 * d).transpose(1, 2)       # (B, H/2, N, 2d)
        lam = self.lam()  # a 0-d tensor: it takes the dtype of what it multiplies
        fused = x.is_cuda if self.fused is None else self.fused
        if fused and self._record is None:
            o = F.scaled_dot_product_attention(torch.cat([q[:, 0::2], q[:, 1::2]]), torch.cat([k[:, 0::2], k[:, 1::2]]),
                                               torch.cat([v, v]), is_causal=self.causal)  # (2B, H/2, N, 2d)
            o = _float32_at_least(o[:B]) - lam * _float32_at_least(o[B:])                # A1 V - lambda A2 V
        else:
            P = _masked(q @ k.transpose(-2, -1) * d ** -0.5, self.causal).softmax(-1)    # (B, H, N, N)
            A1, A2 = P[:, 0::2], P[:, 1::2]                                                # (B, H/2, N, N) each
            A = A1 - lam * A2
            if self._record is not None:
                self._store(A=A, A1=A1, A2=A2, lam=lam)
            o = A @ v                                                                      # (B, H/2, N, 2d)
        o = _rms_norm(o, self.sub_norm.weight * (1 - self.lambda_init), self.sub_norm.eps).to(v.dtype)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


@contextmanager
def attention_maps(model: nn.Module, retain_grad: bool = True) -> Iterator[list]:
    """Record the maps of every attention layer of ``model``, one ``AttnMaps`` per layer and pass, in
    execution order::

        with attention_maps(model) as maps:
            F.cross_entropy(model(x), y).backward()
        G, A1, A2, lam = maps[0].A.grad, maps[0].A1, maps[0].A2, maps[0].lam   # G = dL/dA, A = A1 - lam A2

    ``retain_grad=False`` skips ``A.retain_grad()``, which torch.func transforms do not allow. Recordings nest:
    on exit every layer records as on entry (``branch_gradient_alignment`` inside one leaves it recording).
    """
    record: list = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _AttentionLayer)]
    outer = [(m._record, m._name, m._retain_grad) for _, m in layers]
    for name, m in layers:
        m._record, m._name, m._retain_grad = record, name, retain_grad
    try:
        yield record
    finally:
        for (_, m), state in zip(layers, outer):
            m._record, m._name, m._retain_grad = state


# -- Inputs: images in [0, 1], one int64 label per image ---------------------------------

def check_images(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless x holds finite float values in [0, 1]. One host sync: it runs where images
    enter (``predict``, every attack and metric); a model's forward checks shape and dtype only."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        what = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected float images in [0, 1], got {what}; divide uint8 images by 255")
    tol = 1e-4
    if ((~torch.isfinite(x)).any() | (x < -tol).any() | (x > 1 + tol).any()).item():
        if not torch.isfinite(x).all():
            raise ValueError(f"images contain {int((~torch.isfinite(x)).sum())} NaN/inf values")
        raise ValueError(f"images must lie in [0, 1] (the model normalizes inside), got range "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]; pass raw pixels / 255, "
                         f"not mean/std-normalized images")


def _check_shape(x: torch.Tensor, in_chans: int, img_size: int, dtype: torch.dtype) -> None:
    """Shape and dtype only: metadata, so no host sync and no graph break (a model's forward)."""
    if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != (in_chans, img_size, img_size):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected images of shape (B, {in_chans}, {img_size}, {img_size}), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    if x.dtype != dtype and (x.dtype == torch.float64 or not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"images are {x.dtype} but the model is {dtype}: pass x.to({dtype}) (or convert the model)")


def check_labels(y: torch.Tensor, n_images: int, num_classes: Optional[int] = None) -> None:
    """Raise ``ValueError`` unless y holds one int64 label per image; with ``num_classes``, also unless
    each lies in [0, num_classes) (one host sync)."""
    if not torch.is_tensor(y) or y.dtype != torch.int64 or tuple(y.shape) != (n_images,):
        what = f"{y.dtype} of shape {tuple(y.shape)}" if torch.is_tensor(y) else type(y).__name__
        raise ValueError(f"y: expected int64 labels of shape ({n_images},), one per image; got {what} (pass y.long())")
    if num_classes is not None and n_images:
        low, high = torch.stack(y.aminmax()).tolist()
        if low < 0 or high >= num_classes:
            raise ValueError(f"y: labels must lie in [0, {num_classes}) (the model has {num_classes} outputs); "
                             f"got [{low}, {high}]")


@contextmanager
def _eval_mode(model: nn.Module):
    """Run a block with ``model`` in eval mode; each submodule's own mode is restored after (a BatchNorm
    the caller froze in eval stays in eval)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was in modes:
            m.training = was


def _check_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *rules: tuple, amp: bool = False,
                 need: tuple = (0, "")) -> torch.Tensor:
    """The entry check of an attack or metric (the loops check nothing): images, labels, ``_check``'s rules, then
    the labels' range, read off the logits of a no-grad, eval-mode forward of x[:1] (no random numbers drawn),
    under bf16 autocast if ``amp``, as ``pgd``'s forwards. ``need``: (the fewest classes the caller
    works with, what to say otherwise; ``{}``: the model's count). Returns x detached: no result joins its graph."""
    check_images(x)
    check_labels(y, len(x))
    _check(*rules)
    if len(x):  # an empty batch has no label to range-check
        autocast = torch.autocast(x.device.type, torch.bfloat16, enabled=bool(amp))
        with _eval_mode(model), torch.no_grad(), autocast:
            try:
                num_classes = model(x[:1]).shape[1]
            except ValueError:  # the model's own input check: let it name the whole batch's shape
                model(x)
                raise
        check_labels(y, len(x), num_classes)
        if num_classes < need[0]:
            raise ValueError(need[1].format(num_classes))
    return x.detach()


# -- Branch-gradient alignment (the paper's Lemma 1) -------------------------------------

@dataclass
class Alignment:
    """Lemma 1's quantities for one attention layer, per example. With G = dL/dA held fixed, g1 =
    grad_x <A1(x), G> and g2 = grad_x <A2(x), G>: cos = cos(theta) = cos(g1, g2), rho = ||g2|| / ||g1||,
    kappa = sqrt(1 + lam^2 rho^2 - 2 lam rho cos) = ||g1 - lam g2|| / ||g1|| (the amplification).
    ``control``: a standard layer, (A1, A2) its head pairs (2h, 2h+1), each with its own G, lam = 1."""
    layer: str
    cos: torch.Tensor
    rho: torch.Tensor
    kappa: torch.Tensor
    g1_norm: torch.Tensor
    g2_norm: torch.Tensor
    lam: float
    control: bool

    @property
    def frac_negative(self) -> float:
        """Fraction of examples with cos(theta) < 0 (negative gradient alignment)."""
        return (self.cos < 0).float().mean().item()


def branch_gradient_alignment(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> list:
    """One ``Alignment`` per attention layer, in forward order (one forward, two backwards a layer). L: the
    batch-summed cross-entropy on the true label, or ``loss_fn(logits, y)``; the maps' share of grad_x L is
    g1 - lambda g2, so Lemma 1 holds exactly. Standard layers give the control. DA V2 (our extension): the
    gate, held fixed like G, goes into branch 2: g2 = grad_x <A2, diag(gate) G>, lambda = 1."""
    if loss_fn is None:  # the default loss takes class labels
        _check_batch(model, x, y)
    else:
        check_images(x)
    out = []
    with _eval_mode(model):
        x = x.detach().requires_grad_(True)
        with attention_maps(model, retain_grad=False) as maps:
            logits = model(x)
        if not maps:
            raise ValueError("branch_gradient_alignment: the model ran no attention layer (Attention, DiffAttention "
                             "or DiffAttentionV2; a depth-0 ViT has none), so there is nothing to measure")
        loss = (loss_fn or (lambda z, t: F.cross_entropy(z, t, reduction="sum")))(logits, y)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
            raise ValueError(f"loss_fn returned {shape}; expected a scalar tensor: sum its per-example losses")
        Gs = torch.autograd.grad(loss, [m.A for m in maps], retain_graph=True)
        for i, (m, G) in enumerate(zip(maps, Gs)):
            if m.A1 is not None and m.lam.dim():  # V2: the per-token gate, held fixed, goes into branch 2
                A1, A2, G1, G2, lam = m.A1, m.A2, G, G * m.lam.detach()[..., None], 1.0
            elif m.A1 is not None:
                A1, A2, G1, G2, lam = m.A1, m.A2, G, G, m.lam.item()
            elif m.A.shape[1] % 2:  # the control pairs heads (2h, 2h+1): undefined for an odd count
                raise ValueError(f"{m.layer} has {m.A.shape[1]} heads: the head-pair control needs an even "
                                 f"number of standard heads, so it is undefined for this layer")
            else:
                A1, A2, G1, G2, lam = m.A[:, 0::2], m.A[:, 1::2], G[:, 0::2], G[:, 1::2], 1.0
            g1, = torch.autograd.grad((A1 * G1).sum(), x, retain_graph=True)
            g2, = torch.autograd.grad((A2 * G2).sum(), x, retain_graph=i + 1 < len(maps))
            g1, g2 = g1.flatten(1), g2.flatten(1)
            n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
            cos = (g1 * g2).sum(1) / (n1 * n2).clamp_min(1e-30)
            rho = n2 / n1.clamp_min(1e-30)
            kappa = (1 + lam ** 2 * rho ** 2 - 2 * lam * rho * cos).clamp_min(0).sqrt()
            out.append(Alignment(m.layer, cos.detach(), rho.detach(), kappa.detach(), n1.detach(), n2.detach(),
                                 lam, m.A1 is None))
    return out


# -- Differential attention V2: the kit's extension; the paper studies V1 only -----------

class DiffAttentionV2(_AttentionLayer):
    """Differential attention V2 (Ye et al., January 2026; microsoft/unilm, Diff-Transformer-V2): ``attn="diff2"``
    asks whether V1's findings carry over. With H output heads, d = dim / H, and per head h two query heads
    sharing one key and one value head:

        A1 = softmax(Q_2h K_h^T / sqrt(d)),   A2 = softmax(Q_2h+1 K_h^T / sqrt(d))  (a causal mask only if asked)
        gate_t = sigmoid(w_h . x_t)                          (``lambda_proj``, no bias: per token t and head h)
        head_h = A1 V_h - gate * (A2 V_h) = (A1 - diag(gate) A2) V_h
        out = proj(concat_h head_h)

    Unlike V1: a per-token gate in (0, 1) for the scalar lambda, no per-head RMSNorm, no (1 - lambda_init);
    ``lambda_proj`` keeps PyTorch's ``nn.Linear`` init inside a ``ViT`` too, as released. Two paths as in
    ``DiffAttention`` (fused: SDPA with the query heads grouped on their key and value head).
    """
    fused: Optional[bool] = None  # None: fused on CUDA, explicit elsewhere

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, proj_bias: bool = True, causal: bool = False):
        super().__init__(dim, heads, 4 * dim, qkv_bias, proj_bias, causal)
        self.lambda_proj = nn.Linear(dim, heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        H, d = self.heads, self.head_dim
        q, k, v = self.qkv(x).split([2 * C, C, C], dim=-1)                  # q 2 dim wide, k and v dim wide
        q = q.view(B, N, 2 * H, d).transpose(1, 2)                            # (B, 2H, N, d): Q1, Q2 at 2h, 2h+1
        k, v = (t.view(B, N, H, d).transpose(1, 2) for t in (k, v))           # (B, H, N, d)
        gate = torch.sigmoid(self.lambda_proj(x)).transpose(1, 2)[..., None]   # (B, H, N, 1)
        fused = x.is_cuda if self.fused is None else self.fused
        if fused and self._record is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)  # (B, 2H, N, d)
            o = (_float32_at_least(o[:, 0::2]) - gate * _float32_at_least(o[:, 1::2])).to(v.dtype)  # A1 V - gate A2 V
        else:
            P = _masked(q @ k.repeat_interleave(2, 1).transpose(-2, -1) * d ** -0.5, self.causal).softmax(-1)
            A1, A2 = P[:, 0::2], P[:, 1::2]                                   # (B, H, N, N) each
            A = A1 - gate * A2
            if self._record is not None:
                self._store(A=A, A1=A1, A2=A2, lam=gate[..., 0])
            o = A @ v                                                         # (B, H, N, d)
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


# -- ViT / DiffViT -----------------------------------------------------------------------

class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (and DiffCLIP's text tower's)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). Keyword arguments only."""

    def __init__(self, *, dim: int, heads: int, mlp_ratio: float = 4.0, attn: str = "std",
                 lambda_init: Union[float, str] = 0.8, layer_index: int = 0, qkv_bias: bool = True,
                 proj_bias: bool = True, causal: bool = False, act: str = "gelu", norm_eps: float = 1e-6):
        super().__init__()
        _check(_positive("mlp_ratio", mlp_ratio),
               _one_of("attn", attn, ("std", "diff", "diff2"), " (differential attention V2)"),
               _one_of("act", act, ("gelu", "quick_gelu")))
        shared = dict(qkv_bias=qkv_bias, proj_bias=proj_bias, causal=causal)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = (Attention(dim, heads, **shared) if attn == "std" else
                     DiffAttention(dim, heads, lambda_init, layer_index, **shared) if attn == "diff"
                     else DiffAttentionV2(dim, heads, **shared))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(  # timm's Mlp names
            fc1=nn.Linear(dim, hidden), act=nn.GELU() if act == "gelu" else QuickGELU(), fc2=nn.Linear(hidden, dim)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, bias=bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


def _channels(v, in_chans: int, name: str) -> torch.Tensor:
    """A per-channel ``mean`` or ``std`` (one value, or one per channel) as a (1, in_chans, 1, 1) buffer."""
    values = torch.as_tensor(v, dtype=torch.float64, device="cpu").flatten().tolist()
    if len(values) not in (1, in_chans):
        raise ValueError(f"{name} has {len(values)} values; expected 1 or in_chans={in_chans}")
    _check((name, v, all(math.isfinite(u) and (u > 0 or name != "std") for u in values),
            "finite values" + (" > 0" if name == "std" else "")))
    return torch.tensor(values, dtype=torch.float32).expand(in_chans).reshape(1, in_chans, 1, 1).clone()


class ViT(nn.Module):
    """Vision Transformer (``attn="std"``) or DiffViT (``attn="diff"``; ``"diff2"``: DA V2) with timm's names.

    Images in [0, 1], normalized inside with ``mean``/``std`` (not in the state dict). timm's equivalent:
    ``VisionTransformer(img_size, patch_size, in_chans, num_classes, embed_dim=dim, depth, num_heads=H, mlp_ratio,
    qkv_bias=True)``; for DiffViT ``attn_layer="diff"``, ``num_heads=H // 2`` and each block's ``attn.lambda_init``
    set to match. ``pre_norm=True``: ``norm_pre`` (CLIP's ln_pre), no patch bias, as timm's CLIP towers;
    ``num_classes=0``: no head. Keyword arguments only.
    """

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, num_classes: int, dim: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, attn: str = "std",
                 lambda_init: Union[float, str] = 0.8, mean: Union[float, Sequence[float]] = 0.5,
                 std: Union[float, Sequence[float]] = 0.5, qkv_bias: bool = True, proj_bias: bool = True,
                 pre_norm: bool = False, act: str = "gelu", norm_eps: float = 1e-6):
        super().__init__()
        sizes = (img_size, patch_size, in_chans, dim, heads, depth, num_classes)
        _check(("(img_size, patch_size, in_chans, dim, heads, depth, num_classes)", sizes,
                all(_int(v, 1) for v in sizes[:5]) and _int(depth, 0) and _int(num_classes, 0),
                "positive integers (depth and num_classes may be 0)"))
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.img_size, self.in_chans, self.attn_type = img_size, in_chans, attn
        self.register_buffer("mean", _channels(mean, in_chans, "mean"), persistent=False)
        self.register_buffer("std", _channels(std, in_chans, "std"), persistent=False)
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim, bias=not pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch_size) ** 2 + 1, dim))  # patches + class
        self.norm_pre = nn.LayerNorm(dim, eps=norm_eps) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(
            Block(dim=dim, heads=heads, mlp_ratio=mlp_ratio, attn=attn, lambda_init=lambda_init, layer_index=i,
                  qkv_bias=qkv_bias, proj_bias=proj_bias, act=act, norm_eps=norm_eps) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        nn.init.trunc_normal_(self.pos_embed, std=0.02)  # timm's init; lambda vectors keep their N(0, 0.1^2) draw
        nn.init.normal_(self.cls_token, std=1e-6)
        gates = {m.lambda_proj for m in self.modules() if isinstance(m, DiffAttentionV2)}  # as released: torch's init
        for m in self.modules():
            if isinstance(m, nn.Linear) and m not in gates:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> final-norm tokens (B, N, dim), class token first."""
        _check_shape(x, self.in_chans, self.img_size, self.pos_embed.dtype)
        x = self.patch_embed((x - self.mean) / self.std)
        x = self.norm_pre(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, in_chans, img_size, img_size) -> logits (B, num_classes), or the
        final-norm class token (B, dim) when ``num_classes=0`` (a CLIP image tower)."""
        return self.head(self.forward_features(x)[:, 0])


# -- CLIP / DiffCLIP ---------------------------------------------------------------------

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class TextTransformer(nn.Module):
    """CLIP's text tower: token and position embeddings, causal pre-norm blocks, a final
    LayerNorm, and the features at the end-of-text token (the largest token id, as in CLIP)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int,
                 attn: str = "std", lambda_init: Union[float, str] = 0.8, act: str = "quick_gelu",
                 norm_eps: float = 1e-5, qkv_bias: bool = True, proj_bias: bool = True, mlp_ratio: float = 4.0):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.randn(context_length, width) * 0.01)
        self.blocks = nn.ModuleList(
            Block(dim=width, heads=heads, mlp_ratio=mlp_ratio, attn=attn, lambda_init=lambda_init, layer_index=i,
                  qkv_bias=qkv_bias, proj_bias=proj_bias, causal=True, act=act, norm_eps=norm_eps)
            for i in range(depth))
        self.norm = nn.LayerNorm(width, eps=norm_eps)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L <= context_length) -> end-of-text features (B, width)."""
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32) or tokens.shape[1] > self.context_length:
            raise ValueError(f"expected token ids of shape (B, L <= {self.context_length}) from tokenize(), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}")
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[torch.arange(len(x), device=x.device), tokens.argmax(-1)]


class CLIP(nn.Module):
    """CLIP (Radford et al. 2021) or DiffCLIP (Hammoud & Ghanem 2025): two towers, linear projections into
    a shared space, a learned logit scale. ``image``, ``text``: keyword arguments of ``ViT`` and ``TextTransformer``."""

    def __init__(self, embed_dim: int, image: dict, text: dict, logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.config = {"embed_dim": embed_dim, "image": dict(image), "text": dict(text)}
        self.visual = ViT(num_classes=0, **image)
        self.text = TextTransformer(**text)
        w_img, w_txt = image["dim"], text["width"]
        self.image_projection = nn.Parameter(torch.randn(w_img, embed_dim) * w_img ** -0.5)
        self.text_projection = nn.Parameter(torch.randn(w_txt, embed_dim) * w_txt ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        z = self.visual(images) @ self.image_projection
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        z = self.text(tokens) @ self.text_projection
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits (B_images, B_texts) = exp(logit_scale) * cosine similarity."""
        return self.logit_scale.exp() * self.encode_image(images, True) @ self.encode_text(tokens, True).T


def tokenize(texts, context_length: int = 77) -> torch.Tensor:
    """CLIP's byte-pair tokenizer, from open_clip (the ecosystem's standard): (len(texts), context_length) ids."""
    try:
        import open_clip
    except ImportError as e:
        raise ImportError("tokenize() uses open_clip's CLIP tokenizer: pip install open_clip_torch") from e
    return open_clip.tokenize([texts] if isinstance(texts, str) else list(texts), context_length=context_length)


@torch.no_grad()
def zero_shot_weights(model: CLIP, classnames: Sequence[str], templates: Sequence[str], tokenizer=tokenize,
                      batch_size: int = 256) -> torch.Tensor:
    """Per class, the mean of the normalized text embeddings of its prompts, normalized: (embed_dim, C)."""
    _check(("classnames", classnames, len(classnames) > 0, "one or more class names"),
           _integer("batch_size", batch_size, 1),
           ("templates", templates, len(templates) > 0 and all("{}" in t for t in templates),
            "one or more prompt templates, each with a {} for the class name"))
    weights = []
    with _eval_mode(model):
        for name in classnames:
            tokens = tokenizer([t.format(name) for t in templates]).to(model.logit_scale.device)
            z = torch.cat([model.encode_text(tb, normalize=True) for tb in tokens.split(batch_size)])
            weights.append(F.normalize(z.mean(0), dim=-1))
    return torch.stack(weights, 1)


class ZeroShotClassifier(nn.Module):
    """Images in [0, 1] -> logits = exp(logit_scale) cos(image embedding, class embedding); with one caption
    per "class", image-to-text retrieval. Attacks and metrics apply as to a ViT (``blocks``: the image tower's)."""

    def __init__(self, clip: CLIP, weights: torch.Tensor):
        super().__init__()
        d, dtype = clip.image_projection.shape[1], clip.image_projection.dtype
        _check(("weights.shape", tuple(getattr(weights, "shape", ())),
                torch.is_tensor(weights) and weights.dim() == 2 and weights.shape[0] == d,
                f"({d}, classes): one normalized text embedding per column"),
               ("weights.dtype", getattr(weights, "dtype", None), getattr(weights, "dtype", None) == dtype,
                f"the CLIP's {dtype}: pass weights.to({dtype})"))
        self.clip = clip
        self.register_buffer("weights", weights, persistent=False)
        self.blocks = clip.visual.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.logit_scale.exp() * self.clip.encode_image(images, normalize=True) @ self.weights


# Checkpoint names (OpenCLIP / OpenAI, and DiffCLIP / SLIP) -> the kit's (timm's), applied in order to every key.
_RENAMES = [(r"^visual\.conv1\.", "visual.patch_embed.proj."), (r"^visual\.class_embedding$", "visual.cls_token"),
            (r"^visual\.positional_embedding$", "visual.pos_embed"), (r"^visual\.ln_pre\.", "visual.norm_pre."),
            (r"^visual\.ln_post\.", "visual.norm."), (r"^visual\.proj$", "image_projection"),
            (r"^visual\.transformer\.resblocks\.", "visual.blocks."), (r"^transformer\.resblocks\.", "text.blocks."),
            (r"^token_embedding\.", "text.token_embedding."), (r"^positional_embedding$", "text.positional_embedding"),
            (r"^ln_final\.", "text.norm."), (r"\.ln_([12])\.", r".norm\1."), (r"\.mlp\.c_fc\.", ".mlp.fc1."),
            (r"\.mlp\.c_proj\.", ".mlp.fc2."), (r"\.attn\.in_proj_", ".attn.qkv."),
            (r"\.attn\.out_proj\.", ".attn.proj."), (r"\.attn\.diff_norm\.", ".attn.sub_norm.")]


def _tower_attn(sd: dict, prefix: str, heads: Optional[int]) -> dict:
    """Attention type, heads and biases of a tower, read off its first block (kit names). Standard
    attention does not show its head count in the weights: OpenCLIP's convention is 64-wide heads."""
    lam, width = sd.get(prefix + "attn.lambda_q1"), sd[prefix + "norm1.weight"].shape[0]
    cfg = {"attn": "std" if lam is None else "diff", "qkv_bias": prefix + "attn.qkv.bias" in sd,
           "proj_bias": prefix + "attn.proj.bias" in sd,
           "heads": heads or (max(1, width // 64) if lam is None else width // lam.numel())}
    return cfg if lam is None else {**cfg, "lambda_init": 0.8}  # DiffCLIP: 0.8 in every layer


def clip_state_dict_to_kit(src: dict, quick_gelu: Optional[bool] = None, image_heads: Optional[int] = None,
                           text_heads: Optional[int] = None) -> tuple:
    """An OpenCLIP / OpenAI or DiffCLIP (SLIP-style) state dict in the kit's names: returns (state dict,
    ``CLIP`` keyword arguments, layout name). ``load_clip`` checks that every key finds its place."""
    layout = ("openclip" if "visual.conv1.weight" in src else
              "diffclip" if "visual.patch_embed.proj.weight" in src else None)
    if layout is None:
        raise ValueError("not a CLIP state dict this kit knows: expected OpenCLIP/OpenAI keys (visual.conv1.weight, "
                         "visual.class_embedding, ...) or DiffCLIP/SLIP keys (visual.patch_embed.proj.weight, "
                         f"image_projection, ...); got e.g. {sorted(src)[:5]}")
    sd = {}
    for k, v in src.items():
        # OpenAI's mask buffers (the kit builds its own) and the sizes its TorchScript files keep beside the weights
        if k not in ("attn_mask", "visual.attn_mask", "input_resolution", "context_length", "vocab_size"):
            for pattern, new in _RENAMES:
                k = re.sub(pattern, new, k)
            sd[k] = v
    for k in [k for k in sd if ".attn.q_proj." in k]:  # separate q, k, v projections -> one qkv
        parts = [k.replace(".q_proj.", f".{p}_proj.") for p in "qkv"]
        if all(p in sd for p in parts):  # else load_clip lists what is there
            sd[k.replace(".q_proj.", ".qkv.")] = torch.cat([sd.pop(p) for p in parts])
    if layout == "openclip":  # timm's class and position embeddings carry leading batch axes
        sd["visual.cls_token"] = sd["visual.cls_token"].view(1, 1, -1)
        sd["visual.pos_embed"] = sd["visual.pos_embed"][None]
    depth = lambda tower: sum(k.startswith(tower + ".blocks.") and k.endswith(".norm1.weight") for k in sd)
    w = sd["visual.patch_embed.proj.weight"]  # (dim, in_chans, patch, patch)
    image = dict(img_size=w.shape[-1] * math.isqrt(sd["visual.pos_embed"].shape[1] - 1), patch_size=w.shape[-1],
                 in_chans=w.shape[1], dim=w.shape[0], depth=depth("visual"), pre_norm=layout == "openclip",
                 mlp_ratio=sd["visual.blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
                 **_tower_attn(sd, "visual.blocks.0.", image_heads))
    width = sd["text.norm.weight"].shape[0]
    text = dict(vocab_size=sd["text.token_embedding.weight"].shape[0], width=width, depth=depth("text"),
                context_length=sd["text.positional_embedding"].shape[0], norm_eps=1e-5,
                mlp_ratio=sd["text.blocks.0.mlp.fc1.weight"].shape[0] / width,
                **_tower_attn(sd, "text.blocks.0.", text_heads))
    if layout == "openclip":
        if quick_gelu is None:  # both activations share these keys, and the wrong one loads and quietly costs accuracy
            raise ValueError("an OpenCLIP/OpenAI-layout checkpoint does not say its activation: pass quick_gelu=True "
                             "for OpenAI's released CLIP weights (and OpenCLIP's '-quickgelu' models), "
                             "quick_gelu=False for OpenCLIP's own (LAION, DataComp: GELU)")
        image.update(act="quick_gelu" if quick_gelu else "gelu", norm_eps=1e-5, mean=OPENAI_MEAN, std=OPENAI_STD)
        text["act"] = image["act"]
    else:  # DiffCLIP (SLIP's code): a timm image tower, CLIP's QuickGELU text tower
        # DiffCLIP's DifferentialVisionTransformer builds its blocks and final norm with torch's nn.LayerNorm
        # (eps 1e-5); the standard-attention baseline is timm's vit_base_patch16_224 (eps 1e-6)
        eps = 1e-5 if image["attn"] == "diff" else 1e-6
        image.update(act="gelu", norm_eps=eps, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        text["act"] = "gelu" if quick_gelu is False else "quick_gelu"
    return sd, {"embed_dim": sd["text_projection"].shape[1], "image": image, "text": text}, layout


def _torch_load(path, trust_pickle: bool) -> dict:
    """A checkpoint's dict: a .safetensors file (with the ``safetensors`` package), a TorchScript archive's state dict
    (OpenAI's files; trusted only), or torch.load with weights_only=True, telling damage from a pickle to trust."""
    damaged = lambda e: ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                                   f"it may be truncated, or not a checkpoint: download or copy it again")
    if str(path).endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"{path} is a safetensors file: pip install safetensors") from e
        return load_file(path)
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        if not trust_pickle:  # torch.load refuses these with weights_only=True too
            raise ValueError(f"{path} is a TorchScript archive (as OpenAI's own CLIP files are), and loading one runs "
                             "its code: if you trust the file, pass trust_pickle=True")
        return torch.jit.load(path, map_location="cpu").state_dict()
    try:  # DiffCLIP's files pickle their argparse arguments beside the weights: safe to allow
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file
        if "Weights only load failed" not in str(e) and not trust_pickle:
            raise damaged(e) from e
        if not trust_pickle:
            why = [line for line in str(e).splitlines() if "GLOBAL" in line.upper()][:1] or [type(e).__name__]
            raise ValueError(f"{path} pickles Python objects besides tensors, which torch.load(weights_only=True) "
                             f"refuses ({why[0].strip()[:120]}). If you trust the file, pass trust_pickle=True to "
                             f"run its pickle.") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise damaged(e) from e


def _hub_file(repo: str, filename: str) -> str:
    """The local path of ``filename`` of a Hugging Face hub repo: from the local cache if it is there, else
    downloaded; ``FileNotFoundError`` within seconds (not after minutes of retries) when it cannot be had."""
    try:
        from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    except ImportError as e:
        raise ImportError(f"{repo!r} looks like a Hugging Face hub id: pip install huggingface_hub") from e
    fix = (f"fetch it once with a network (or copy the file here) and pass its path, or set HF_HUB_OFFLINE=1 to "
           f"read only the local cache ({constants.HF_HUB_CACHE})")
    try:
        return hf_hub_download(repo, filename, local_files_only=True)
    except Exception:  # not in the cache: download it, if the hub answers
        pass
    try:
        if constants.HF_HUB_OFFLINE:
            raise OSError("HF_HUB_OFFLINE is set")
        get_hf_file_metadata(hf_hub_url(repo, filename), timeout=10)  # one request, no retries: fails fast
        return hf_hub_download(repo, filename)
    except Exception as e:  # offline, unknown repo, no such file
        raise FileNotFoundError(f"cannot get {filename!r} of the Hugging Face hub id {repo!r} ({type(e).__name__}: "
                                f"{str(e)[:200]}); it is not in the local cache: {fix}") from e


def load_clip(source, quick_gelu: Optional[bool] = None, trust_pickle: bool = False,
              filename: str = "checkpoint_best.pt", image_heads: Optional[int] = None,
              text_heads: Optional[int] = None) -> CLIP:
    """A kit ``CLIP`` from a checkpoint: a state dict, a local file, or a Hugging Face hub id (owner/name; its
    ``filename``, read from the local hub cache when it is there, else downloaded).

    Layouts: OpenCLIP / OpenAI (``visual.conv1``, ``attn.in_proj_weight``, OpenAI mean/std; ``quick_gelu`` must be
    given: True for OpenAI's weights, False for OpenCLIP's LAION ones), and DiffCLIP (Hammoud & Ghanem 2025, e.g.
    ``hammh0a/DiffCLIP_ViTB16_CC12M``): SLIP-style, keys maybe under ``module.``, a timm ViT image tower with q/k/v
    projections, ``diff_norm`` and lambda vectors (lambda_init 0.8), a differential QuickGELU text tower, ImageNet
    mean/std; with standard attention, the matched CLIP baseline. Strict: unused, missing and mis-shaped keys raise,
    listed. Heads: from the lambda vectors' length (DA), else 64 wide (OpenCLIP's), unless given. Files load with
    weights_only=True (DiffCLIP's pickled argparse arguments allowed); other pickles and TorchScript archives
    (OpenAI's .pt) need ``trust_pickle=True``; .safetensors files need the ``safetensors`` package.
    """
    if isinstance(source, dict):
        src = source
    elif os.path.isfile(os.path.expanduser(str(source))):
        src = _torch_load(os.path.expanduser(str(source)), trust_pickle)
    elif (not isinstance(source, str) or source.startswith((".", "/", "~")) or source.count("/") != 1
          or source.endswith((".pt", ".pth", ".bin", ".safetensors"))):  # a path, not a hub id (owner/name)
        raise FileNotFoundError(f"no checkpoint file at {os.path.abspath(os.path.expanduser(str(source)))} (current "
                                f"directory {os.getcwd()}): check the path, or pass a hub id owner/name")
    else:
        src = _torch_load(_hub_file(source, filename), trust_pickle)
    for key in ("state_dict", "model"):
        if isinstance(src.get(key), dict):
            src = src[key]
    src = {k.removeprefix("module."): v for k, v in src.items()}
    sd, config, layout = clip_state_dict_to_kit(src, quick_gelu, image_heads, text_heads)
    model = CLIP(**config)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in set(own) & set(sd) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"the {layout} checkpoint does not match the CLIP it describes (keys in the kit's names): "
                         f"missing {missing[:20]}, without a place {unexpected[:20]}, shape mismatches {shapes[:20]}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


# -- Attacks -----------------------------------------------------------------------------

@dataclass
class AttackResult:
    """Adversarial inputs; per example, success (prediction != label; == target if targeted) and the
    size of x_adv - x in the attack's norm (inf where CW-L2 failed)."""
    x_adv: torch.Tensor
    success: torch.Tensor
    norm: Optional[torch.Tensor] = None


def _margin(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per example, how far from success (< 0: success): z_y - max_{j != y} z_j, or its negative if targeted."""
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - z_y if targeted else z_y - other


def _attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-example loss the attack ascends (sum-reduced by the caller, so batch size does not matter)."""
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    if loss == "margin":
        return -_margin(logits, y, targeted)
    z_y = logits.gather(1, y[:, None]).squeeze(1)  # "logit": lower (raise, if targeted) the cosine to prompt y
    return z_y if targeted else -z_y


def _per_example_norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    d = d.flatten(1)
    return d.abs().amax(1) if norm == "inf" else d.norm(dim=1) if norm == "2" else d.abs().sum(1)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-example vector (B,) shaped to broadcast over a batch like ``like`` (B, ...)."""
    return v.view(-1, *[1] * (like.dim() - 1))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto the eps-ball around x, then onto the image box [0, 1]."""
    delta = x_adv - x
    if norm == "inf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * _rows((eps / _per_example_norm(delta, "2").clamp_min(1e-12)).clamp(max=1.0), x)
    return (x + delta).clamp(0, 1)


def _ascend(model: nn.Module, iterate, move, y: torch.Tensor, best_margin: torch.Tensor, best_x: torch.Tensor,
            steps: int, loss: str, targeted: bool, early_stop: bool, amp: bool = False) -> None:
    """The loop of ``pgd`` and ``patch_attack``: ``steps`` gradient steps on ``loss`` (summed over the rows),
    ``iterate(rows)`` the current inputs of those rows and ``move(rows, xa, g)`` the step. Per example the
    strongest of the steps + 1 points (lowest margin) goes into ``best_margin``, ``best_x`` (in place);
    ``early_stop``: fooled rows leave the attack."""
    act = torch.arange(len(y), device=y.device)  # rows still attacked (all, unless early_stop)
    for step in range(steps + 1):
        last = step == steps
        xa = iterate(act).requires_grad_(not last)
        with torch.set_grad_enabled(not last), torch.autocast(xa.device.type, torch.bfloat16, enabled=amp):
            logits = model(xa)
        m = _margin(logits.detach().float(), y[act], targeted)
        better = m < best_margin[act]
        best_margin[act] = torch.where(better, m, best_margin[act])
        best_x[act] = torch.where(_rows(better, xa), xa.detach(), best_x[act])
        if last:
            break
        g, = torch.autograd.grad(_attack_loss(logits.float(), y[act], loss, targeted).sum(), xa)
        with torch.no_grad():
            move(act, xa, g)
        if early_stop:  # drop the rows already fooled at the point just evaluated
            act = act[best_margin[act] >= 0]
            if act.numel() == 0:
                break


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "inf", steps: int = 10,
        alpha: Optional[float] = None, random_start: bool = True, restarts: int = 1, loss: str = "ce",
        targeted: bool = False, amp: bool = False, early_stop: bool = False) -> AttackResult:
    """Projected gradient descent (Madry et al. 2018) in the Linf (``norm="inf"``) or L2 ball of radius eps.

    Step: Linf ``x + alpha sign(g)``, L2 ``x + alpha g / ||g||_2`` (alpha = 2.5 eps / steps by default), then
    projection onto the eps-ball and [0, 1]. Per example the strongest iterate over all steps and restarts is kept
    (lowest margin z_y - max_{j != y} z_j; y the target if ``targeted``); restarts attack only the examples not yet
    fooled. ``loss="logit"`` descends the true class's logit (on a ``ZeroShotClassifier``: the paper's CLIP attack).
    ``early_stop``: fooled examples leave the attack (the same success flags for fewer passes; x_adv the first
    fooled iterate). The model runs in eval mode, in float32 as RobustBench evaluates: ``amp=True`` takes bf16
    autocast steps, success decided in float32, and is refused with ``early_stop`` (bf16 keeps 8 bits: at CLIP's
    logit scale 100 a margin is off by up to ~0.1-0.25, and an image still correct could leave the attack). bf16
    also favours ViT over DiffViT: DA's subtraction amplifies rounding (``DiffAttention``).
    """
    x = _check_batch(model, x, y, _one_of("norm", norm, _NORMS), _budget(eps, x),
                     _integer("steps", steps, 0), _integer("restarts", restarts, 1),
                     ("alpha", alpha, alpha is None or _real(alpha, 0), "None or a number >= 0"),
                     _one_of("loss", loss, _LOSSES), _one_of("random_start", random_start, (True, False)),
                     _one_of("targeted", targeted, (True, False)), _one_of("early_stop", early_stop, (True, False)),
                     _one_of("amp", amp, (True, False)),
                     ("(amp, early_stop)", (amp, early_stop), not (amp and early_stop),
                      "not both True: early_stop decides success from each step's margin, which amp rounds to bf16; "
                      "use amp=False (float32, the default) or early_stop=False"), amp=amp)
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else alpha
    if eps == 0 or steps == 0:
        with _eval_mode(model), torch.no_grad():
            logits = model(x).float()
        return AttackResult(x.clone(), _margin(logits, y, targeted) < 0, x.new_zeros(len(x)))
    best_x, best_margin = x.clone(), torch.full((len(x),), float("inf"), device=x.device)  # float32, also for bf16
    with _eval_mode(model):
        for r in range(restarts):
            idx = (best_margin >= 0).nonzero().squeeze(1) if r else torch.arange(len(x), device=x.device)
            if idx.numel() == 0:
                break
            x0, y0, xa = x[idx], y[idx], x[idx]
            if random_start:  # uniform in the Linf ball; L2: a uniform direction at a uniform radius
                noise = torch.empty_like(x0).uniform_(-eps, eps) if norm == "inf" else torch.randn_like(x0)
                if norm == "2":
                    noise *= _rows(eps * torch.rand(len(x0), device=x.device) / _per_example_norm(noise, "2"), x)
                xa = _project(x0 + noise, x0, eps, norm)

            def move(rows, xr, g):
                step_dir = g.sign() if norm == "inf" else g / _rows(_per_example_norm(g, "2").clamp_min(1e-12), g)
                xa[rows] = _project(xr + alpha * step_dir, x0[rows], eps, norm)
            bm, bx = best_margin[idx], best_x[idx]
            _ascend(model, lambda rows: xa[rows], move, y0, bm, bx, steps, loss, targeted, early_stop, amp)
            if amp:  # the iterates were ranked in bf16; success is decided in float32
                with torch.no_grad():
                    bm = _margin(model(bx).float(), y0, targeted)
            best_margin[idx], best_x[idx] = bm, bx
    return AttackResult(best_x, best_margin < 0, _per_example_norm(best_x - x, norm))


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "inf", **kw) -> AttackResult:
    """Fast gradient sign method (Goodfellow et al. 2015): one PGD step of size eps, no random start."""
    return pgd(model, x, y, eps, norm=norm, steps=1, alpha=eps, random_start=False, **kw)


def patch_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, steps: int = 100,
                 step_size: float = 1 / 16, location: str = "random", loss: str = "ce",
                 early_stop: bool = False) -> AttackResult:
    """An adversarial patch: a ``size`` x ``size`` square of each image replaced by pixels free in [0, 1]
    (no norm bound), at one place per image (``location="random"``: uniform where it fits, from torch's
    global RNG; ``"center"``), from uniform noise by ``steps`` signed-gradient steps of ``step_size`` on
    ``loss``. The strongest iterate and ``early_stop`` as in ``pgd``; ``norm`` holds the patch side."""
    check_images(x)  # before x.shape is read
    B, C, H, W = x.shape
    x = _check_batch(model, x, y, ("size", size, _int(size, 1) and size <= min(H, W),
                                   f"an integer in [1, {min(H, W)}] (pixels)"),
                     _integer("steps", steps, 0), _positive("step_size", step_size),
                     _one_of("location", location, ("random", "center")), _one_of("loss", loss, _LOSSES),
                     _one_of("early_stop", early_stop, (True, False)))
    if location == "center":
        top, left = torch.full((B,), (H - size) // 2), torch.full((B,), (W - size) // 2)
    else:
        top, left = torch.randint(0, H - size + 1, (B,)), torch.randint(0, W - size + 1, (B,))
    inside = lambda start, n: ((torch.arange(n)[None] >= start[:, None])  # (B, n): in [start, start + size)
                               & (torch.arange(n)[None] < start[:, None] + size))
    mask = (inside(top, H)[:, :, None] & inside(left, W)[:, None, :])[:, None].to(x.device)  # (B, 1, H, W)
    patch = torch.rand_like(x)

    def move(rows, xa, g):
        patch[rows] = (patch[rows] + step_size * g.sign()).clamp(0, 1)
    best_x, best_margin = x.clone(), torch.full((B,), float("inf"), device=x.device)
    with _eval_mode(model):
        _ascend(model, lambda rows: torch.where(mask[rows], patch[rows], x[rows]), move, y, best_margin, best_x,
                steps, loss, False, early_stop)
    return AttackResult(best_x, best_margin < 0, x.new_full((B,), float(size)))


def cw_l2(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c_init: float = 1.0, search_steps: int = 6,
          steps: int = 100, lr: float = 0.01, kappa: float = 0.0, targeted: bool = False) -> AttackResult:
    """Carlini & Wagner (2017) L2 attack, with a per-example binary search over the constant c.

    Minimizes ||x' - x||_2^2 + c max(m(x'), -kappa) over x' = (tanh(w) + 1) / 2 with Adam, m the margin
    z_y - max_{j != y} z_j (reversed if ``targeted``). After each of ``search_steps`` runs of ``steps``
    iterations, c is bisected where an adversarial example was found and grows x10 (until bounded) where
    none was. x_adv: the smallest-L2 adversarial example seen; ``norm``: its L2 distortion (inf: failed).
    """
    x = _check_batch(model, x, y, _positive("c_init", c_init), _positive("lr", lr),
                     _integer("search_steps", search_steps, 1), _integer("steps", steps, 1),
                     ("kappa", kappa, _real(kappa, 0), "a number >= 0"))
    B = len(x)
    lo, hi = x.new_zeros(B), x.new_full((B,), float("inf"))
    c = x.new_full((B,), c_init)
    best_l2, best_x = x.new_full((B,), float("inf")), x.clone()
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    with _eval_mode(model):
        for _ in range(search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=lr)
            found = torch.zeros(B, dtype=torch.bool, device=x.device)
            for _ in range(steps):
                xa = (torch.tanh(w) + 1) / 2
                m = _margin(model(xa).float(), y, targeted)
                l2sq = (xa - x).flatten(1).pow(2).sum(1)
                w.grad, = torch.autograd.grad((l2sq + c * (m + kappa).clamp_min(0)).sum(), w)
                with torch.no_grad():  # judge the point the gradient was taken at
                    ok = m < 0
                    better = ok & (l2sq.sqrt() < best_l2)
                    best_l2 = torch.where(better, l2sq.sqrt(), best_l2)
                    best_x = torch.where(_rows(better, x), xa, best_x)
                    found |= ok
                opt.step()
            hi = torch.where(found, torch.minimum(hi, c), hi)
            lo = torch.where(found, lo, torch.maximum(lo, c))
            c = torch.where(torch.isinf(hi), c * 10, (lo + hi) / 2)
    return AttackResult(best_x, torch.isfinite(best_l2), best_l2)


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "inf",
               version: str = "standard", batch_size: int = 250, seed: int = 0) -> AttackResult:
    """AutoAttack (Croce & Hein 2020), the reference implementation (PyPI: ``pyautoattack``). ``"standard"``:
    APGD-CE, APGD-T, FAB-T and Square as on RobustBench (torchattacks' ``AutoAttack`` is not this). Its
    targeted attacks aim at the 9 most likely other classes, so "standard" and "plus" need >= 10 classes;
    "rand" (APGD-CE and APGD-DLR) needs 3."""
    need = 3 if version == "rand" else 10
    x = _check_batch(model, x, y, _one_of("norm", norm, _NORMS), _budget(eps, x, "a number > 0", strict=True),
                     _one_of("version", version, ("standard", "plus", "rand")), _integer("batch_size", batch_size, 1),
                     need=(need, f"autoattack version={version!r} needs a model with >= {need} classes, this one has "
                                 "{}: use version='rand' (>= 3 classes) or pgd(..., loss='margin', restarts=5)"))
    if not len(x):
        raise ValueError("autoattack: x holds no images; the reference AutoAttack needs one or more")
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise ImportError("autoattack() needs the reference AutoAttack: pip install pyautoattack") from e
    with _eval_mode(model):
        adversary = AutoAttack(model, norm="Linf" if norm == "inf" else "L2", eps=eps, version=version,
                               device=x.device, seed=seed)
        adversary.verbose = False
        x_adv, pred = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
    return AttackResult(x_adv, pred.to(y.device) != y, _per_example_norm(x_adv - x, norm))


# -- Metrics -----------------------------------------------------------------------------

@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels in eval mode (the mode is restored)."""
    check_images(x)
    _check(_integer("batch_size", batch_size, 1))
    with _eval_mode(model):
        return torch.cat([model(xb).argmax(1) for xb in x.split(batch_size)])


def _same_shape(y: torch.Tensor, *preds: torch.Tensor) -> None:
    _check(*(("predictions", tuple(getattr(p, "shape", ())), torch.is_tensor(p) and p.shape == y.shape,
              f"one per label, shape {tuple(y.shape)}") for p in preds))


def clean_accuracy(y: torch.Tensor, clean_pred: torch.Tensor) -> float:
    """Fraction of all points classified correctly without attack."""
    _same_shape(y, clean_pred)
    return (clean_pred == y).float().mean().item()


def _fooled(y: torch.Tensor, adv_preds) -> torch.Tensor:
    """Per example: misclassified under at least one of the attacks (the per-example worst case)."""
    if not adv_preds:
        raise ValueError("pass at least one tensor of adversarial predictions")
    _same_shape(y, *adv_preds)
    return torch.stack([p != y for p in adv_preds]).any(0)


def robust_accuracy(y: torch.Tensor, clean_pred: torch.Tensor, *adv_preds: torch.Tensor) -> float:
    """Fraction of ALL points correct on clean input and under every attack given (worst case per example)."""
    _same_shape(y, clean_pred)
    return ((clean_pred == y) & ~_fooled(y, adv_preds)).float().mean().item()


def attack_success_rate(y: torch.Tensor, clean_pred: torch.Tensor, *adv_preds: torch.Tensor) -> float:
    """ASR: of the points classified correctly on clean input (the denominator), the fraction some
    attack misclassifies (the per-example worst case over the attacks given)."""
    _same_shape(y, clean_pred)
    correct = clean_pred == y
    if not correct.any():
        return float("nan")
    return (_fooled(y, adv_preds) & correct).sum().item() / correct.sum().item()


def input_gradient_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str = "inf") -> torch.Tensor:
    """||grad_x L|| per example in the dual norm of the threat model: L1 for Linf ("inf"), L2 for L2 ("2").
    L is the batch-summed cross-entropy on the true label, so no gradient depends on its batch."""
    x = _check_batch(model, x, y, _one_of("norm", norm, _NORMS))
    with _eval_mode(model):
        x = x.requires_grad_(True)
        g, = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    return _per_example_norm(g, {"inf": "1", "2": "2"}[norm])


class _Stop(Exception):
    """Ends a forward pass at a module, carrying the module's output."""


def _output_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` in ``model(x)``; the layers after it never run."""
    def stop(_module, _inputs, output):
        raise _Stop(output)
    hook = module.register_forward_hook(stop)
    try:
        model(x)
    except _Stop as s:
        return s.args[0]
    finally:
        hook.remove()
    raise RuntimeError("local_lipschitz: the module was not called in the model's forward pass")


def local_lipschitz(model: nn.Module, x: torch.Tensor, eps: float, steps: int = 10, step_size: float = 0.003,
                    modules: Optional[Sequence[nn.Module]] = None) -> dict:
    """Local Lipschitz estimates around x (Yang et al. 2020): attained ratios, so lower bounds.

    ``"logits"``: max over the Linf eps-ball of ||f(x) - f(x')||_1 / ||x - x'||_inf by signed-gradient ascent
    on the ratio (``steps`` of ``step_size`` from x + 0.001 N(0, 1), projected onto the ball and [0, 1]), the
    largest seen per example. ``"layers"``: the same on ||h(x') - h(x)||_2 / ||x' - x||_2, h the output of
    each module in ``modules`` (default ``model.blocks``).
    """
    check_images(x)
    _check(_budget(eps, x, "a number > 0 (the radius of the Linf ball)", strict=True), _integer("steps", steps, 0),
           _positive("step_size", step_size),
           ("modules", modules, modules is not None or hasattr(model, "blocks"),
            "the modules to measure (the model has no .blocks)"))

    def ascend(ratio_fn):
        with torch.no_grad():
            xp = _project(x + 0.001 * torch.randn_like(x), x, eps, "inf")
        best = x.new_full((len(x),), 0.0)
        for step in range(steps + 1):
            xp.requires_grad_(True)
            r = ratio_fn(xp)
            best = torch.maximum(best, r.detach())
            if step == steps:
                break
            g, = torch.autograd.grad(r.sum(), xp)
            with torch.no_grad():
                xp = _project(xp + step_size * g.sign(), x, eps, "inf")
        return best

    x = x.detach()
    with _eval_mode(model):
        with torch.no_grad():
            fx = model(x)
        res = {"logits": ascend(lambda xp: (model(xp) - fx).flatten(1).norm(p=1, dim=1)
                                / _per_example_norm(xp - x, "inf").clamp_min(1e-12))}
        modules = list(model.blocks) if modules is None else list(modules)
        res["layers"] = []
        for mod in modules:
            with torch.no_grad():
                hx = _output_of(model, mod, x)
            res["layers"].append(ascend(lambda xp: (_output_of(model, mod, xp) - hx).flatten(1).norm(dim=1)
                                        / (xp - x).flatten(1).norm(dim=1).clamp_min(1e-12)))
    return res


def sanity_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float],
                  large_eps: float = 0.5, steps: int = 10, norm: str = "inf") -> dict:
    """Sanity checks of an evaluation (Carlini et al. 2019, "On Evaluating Adversarial Robustness"): ASR
    rises with eps and nears 100 % at ``large_eps``; doubling PGD's steps moves it <= 5 points; FGSM is no
    stronger than PGD; no input gradient is exactly zero (masking). Numbers, a boolean per check, ``ok``."""
    _check(("eps_list", eps_list, len(eps_list) > 0 and all(_real(e, 0) for e in eps_list),
            "one or more numbers >= 0"), _positive("large_eps", large_eps), _integer("steps", steps, 1))
    clean = predict(model, x)
    asr = lambda res: attack_success_rate(y, clean, predict(model, res.x_adv))
    r = {"eps": list(eps_list), "pgd_asr": [asr(pgd(model, x, y, e, norm, steps=steps)) for e in eps_list],
         "fgsm_asr": [asr(fgsm(model, x, y, e, norm)) for e in eps_list],
         "pgd_asr_doubled_steps": asr(pgd(model, x, y, max(eps_list), norm, steps=2 * steps)),
         "large_eps": large_eps, "asr_large_eps": asr(pgd(model, x, y, large_eps, norm, steps=steps)),
         "zero_gradient_examples": (input_gradient_norm(model, x, y, norm) == 0).nonzero().flatten().tolist()}
    r["checks"] = {"asr_rises_with_eps": all(b >= a - 1e-9 for a, b in zip(r["pgd_asr"], r["pgd_asr"][1:])),
                   "asr_near_100_at_large_eps": r["asr_large_eps"] >= 0.99,
                   "doubling_steps_changes_little": abs(r["pgd_asr_doubled_steps"] - r["pgd_asr"][-1]) <= 0.05,
                   "fgsm_not_stronger_than_pgd": all(f <= p + 1e-9 for f, p in zip(r["fgsm_asr"], r["pgd_asr"])),
                   "no_zero_gradients": not r["zero_gradient_examples"]}
    return {**r, "ok": all(r["checks"].values())}

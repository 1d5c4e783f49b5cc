"""diffattn: differential attention, ViT/DiffViT, and the tools to measure their sensitivity.

A reproducibility kit for "Understanding Sensitivity of Differential Attention through the
Lens of Adversarial Robustness" (ICLR 2026, arXiv 2510.00517). This one file depends on torch
alone and can be copied into another project.

Read top to bottom: attention (the paper's object) -> ViT/DiffViT.

Conventions
-----------
* Images are float tensors (B, C, H, W) in [0, 1]; models normalize inside with their own
  mean/std (the RobustBench / AutoAttack convention), so attacks work in pixel space.
* State dicts follow timm's ``VisionTransformer`` names, so checkpoints move between the two.
* ``heads`` always counts *standard* heads H. ``DiffAttention(dim, H)`` has H/2 differential
  heads, each with two query/key sub-heads of size d = dim/H and a value of width 2d, so it
  has the projection shapes of ``Attention(dim, H)`` (Ye et al.'s comparison). timm's
  ``DiffAttention`` counts ``num_heads`` in differential heads, i.e. H/2.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Attention", "DiffAttention", "AttnMaps", "attention_maps", "lambda_init_schedule",
    "Block", "ViT", "check_images",
]


# ----------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------

@dataclass
class AttnMaps:
    """What one attention layer saw in one forward pass (recorded inside ``attention_maps``).

    For ``DiffAttention``: ``A1 = softmax(Q1 K1^T / sqrt(d))`` and ``A2 = softmax(Q2 K2^T / sqrt(d))``,
    each (B, H/2, N, N); ``lam`` is the scalar lambda; ``A = A1 - lam * A2`` is the combined map
    that multiplies V. For standard ``Attention``: ``A`` is the (B, H, N, N) softmax map and
    ``A1 = A2 = lam = None``.

    ``A`` is a non-leaf tensor of the autograd graph with ``retain_grad()`` set whenever it
    requires grad, so after ``loss.backward()`` the gradient flowing into the map,
    G = dL/dA, is ``A.grad``. ``A1``, ``A2`` and ``lam`` stay in the graph too: a later
    ``torch.autograd.grad`` can differentiate them with respect to the input.
    """
    layer: str
    A: torch.Tensor
    A1: Optional[torch.Tensor] = None
    A2: Optional[torch.Tensor] = None
    lam: Optional[torch.Tensor] = None


def lambda_init_schedule(layer_index: int) -> float:
    """The Differential Transformer's depth schedule: lambda_init = 0.8 - 0.6 exp(-0.3 l), l 0-based."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_index)


class _Recordable(nn.Module):
    """Shared plumbing: while ``_record`` is a list, forward takes the explicit path and appends maps."""

    def __init__(self):
        super().__init__()
        self._record: Optional[list] = None
        self._name, self._retain_grad = "", True

    def _store(self, **maps):
        A = maps["A"]
        if self._retain_grad and A.requires_grad:
            A.retain_grad()
        self._record.append(AttnMaps(layer=self._name, **maps))


class Attention(_Recordable):
    """Standard multi-head self-attention (timm names: ``qkv``, ``proj``).

        A = softmax(Q K^T / sqrt(d)),  out = proj(concat_h(A_h V_h)),  d = dim / heads.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, d)
        if self._record is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        else:
            A = (q @ k.transpose(-2, -1) * self.head_dim ** -0.5).softmax(-1)  # (B, H, N, N)
            self._store(A=A)
            out = A @ v
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class DiffAttention(_Recordable):
    """Differential attention (Ye et al. 2024, "Differential Transformer", arXiv 2410.05258).

    With H standard heads, d = dim / H, and per differential head h = 0 .. H/2 - 1:

        A1 = softmax(Q1 K1^T / sqrt(d)),   A2 = softmax(Q2 K2^T / sqrt(d))      (no causal mask)
        lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init                   (shared by all heads)
        head_h = (1 - lambda_init) * RMSNorm((A1 - lambda A2) V_h)              (V_h of width 2d)
        out = proj(concat_h head_h)

    Q1/Q2 of head h are the standard heads 2h and 2h+1 of ``qkv`` (timm's layout), so the
    projections have the shapes of ``Attention(dim, H)``; on top come 4d lambda parameters and
    2d RMSNorm weights (one RMSNorm over the 2d channels, shared by the heads).

    ``lambda_init``: a number (0.8 by default, as in the paper studied here and in DiffCLIP), or
    ``"schedule"`` for 0.8 - 0.6 exp(-0.3 l) with l = ``layer_index`` (the Differential
    Transformer's default, and timm's).

    Two paths compute the same numbers: ``F.scaled_dot_product_attention`` (used on CUDA, or
    wherever ``fused=True``) and an explicit one that materializes A1, A2 (used on CPU, where
    it is the faster of the two because PyTorch's CPU SDPA falls back to its unfused kernel
    for a value width 2d != d, and always inside ``attention_maps``).
    """
    fused: Optional[bool] = None  # None: fused on CUDA, explicit elsewhere

    def __init__(self, dim: int, heads: int, lambda_init: Union[float, str] = 0.8,
                 layer_index: int = 0, qkv_bias: bool = True):
        super().__init__()
        if heads % 2:
            raise ValueError(f"DiffAttention: heads={heads} is odd; heads counts standard heads H and the "
                             f"layer has H/2 differential heads, so pass an even number (e.g. {heads + 1})")
        if dim % heads:
            raise ValueError(f"DiffAttention: dim={dim} must be divisible by heads={heads}")
        if lambda_init == "schedule":
            lambda_init = lambda_init_schedule(layer_index)
        elif isinstance(lambda_init, str):
            raise ValueError(f"DiffAttention: lambda_init={lambda_init!r}; expected a number or 'schedule'")
        self.lambda_init = float(lambda_init)
        self.heads, self.head_dim = heads, dim // heads  # H standard heads of size d
        d = self.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
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
        h, d = self.heads // 2, self.head_dim
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        v = v.view(B, N, h, 2 * d).transpose(1, 2)  # (B, H/2, N, 2d)
        lam = self.lam().to(v.dtype)
        fused = x.is_cuda if self.fused is None else self.fused
        if fused and self._record is None:
            # Both maps in one fused call: stack [Q1; Q2] (and [K1; K2]) on the batch axis, V shared.
            q = q.view(B, N, h, 2, d).permute(3, 0, 2, 1, 4).reshape(2 * B, h, N, d)
            k = k.view(B, N, h, 2, d).permute(3, 0, 2, 1, 4).reshape(2 * B, h, N, d)
            o = F.scaled_dot_product_attention(q, k, v.repeat(2, 1, 1, 1))  # (2B, H/2, N, 2d)
            out = o[:B] - lam * o[B:]                                        # A1 V - lam A2 V
        else:
            q = q.view(B, N, 2 * h, d).transpose(1, 2) * d ** -0.5  # (B, H, N, d); head 2i is Q1 of diff head i
            k = k.view(B, N, 2 * h, d).transpose(1, 2)              # (B, H, N, d)
            A12 = (q @ k.transpose(-2, -1)).softmax(-1).view(B, h, 2, N, N)  # [A1, A2] per diff head
            # A1 - lam A2 as one weighted sum (cheaper backward than two slices)
            A = (A12 * torch.stack([torch.ones_like(lam), -lam]).view(2, 1, 1)).sum(2)  # (B, H/2, N, N)
            if self._record is not None:
                self._store(A=A, A1=A12[:, :, 0], A2=A12[:, :, 1], lam=lam)
            out = A @ v                                                               # (B, H/2, N, 2d)
        out = _rms_norm(out, self.sub_norm.weight * (1 - self.lambda_init), self.sub_norm.eps)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, at least in float32 (2x faster than nn.RMSNorm's CPU backward here)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)


@contextmanager
def attention_maps(model: nn.Module, retain_grad: bool = True) -> Iterator[list]:
    """Record the attention maps of every ``Attention``/``DiffAttention`` layer of ``model``.

    Inside the block, forward passes take the explicit path (same numbers as the fused one)
    and append one ``AttnMaps`` per layer and pass, in execution order, to the yielded list::

        with attention_maps(model) as maps:
            loss = F.cross_entropy(model(x), y)
            loss.backward()
        G = maps[0].A.grad          # dL/dA of the first layer, A = A1 - lambda A2
        A1, A2, lam = maps[0].A1, maps[0].A2, maps[0].lam

    ``retain_grad=False`` skips ``A.retain_grad()``, which torch.func transforms (``jacrev``,
    ``vmap``) do not allow; the maps are still recorded.
    """
    record: list = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _Recordable)]
    for name, m in layers:
        m._record, m._name, m._retain_grad = record, name, retain_grad
    try:
        yield record
    finally:
        for _, m in layers:
            m._record = None


# ----------------------------------------------------------------------------------------
# ViT / DiffViT
# ----------------------------------------------------------------------------------------

def check_images(x: torch.Tensor, in_chans: int, img_size: int) -> None:
    """Raise ``ValueError`` unless x is a finite float batch (B, in_chans, img_size, img_size) in [0, 1]."""
    expected = f"(B, {in_chans}, {img_size}, {img_size})"
    if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != (in_chans, img_size, img_size):
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"expected images of shape {expected}, got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got dtype {x.dtype}; divide uint8 images by 255")
    tol = 1e-4
    bad = (~torch.isfinite(x)).any() | (x < -tol).any() | (x > 1 + tol).any()
    if bad:  # one host sync on the good path
        if not torch.isfinite(x).all():
            raise ValueError(f"images contain {int((~torch.isfinite(x)).sum())} NaN/inf values")
        raise ValueError(f"images must lie in [0, 1] (the model normalizes inside), got range "
                         f"[{x.min().item():.4g}, {x.max().item():.4g}]; pass raw pixels / 255, "
                         f"not mean/std-normalized images")


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type = nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attn: str = "std",
                 lambda_init: Union[float, str] = 0.8, layer_index: int = 0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if attn == "std":
            self.attn = Attention(dim, heads, qkv_bias)
        elif attn == "diff":
            self.attn = DiffAttention(dim, heads, lambda_init, layer_index, qkv_bias)
        else:
            raise ValueError(f"attn={attn!r}; expected 'std' or 'diff'")
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, dim)


def _channels(v, in_chans: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(in_chans)
    if t.numel() != in_chans:
        raise ValueError(f"{name} has {t.numel()} values; expected 1 or in_chans={in_chans}")
    return t.reshape(1, in_chans, 1, 1).clone()


class ViT(nn.Module):
    """Vision Transformer (``attn="std"``) or DiffViT (``attn="diff"``), timm-compatible state dict.

    Pre-norm blocks, class token, learned position embedding (class token included), GELU MLP,
    final LayerNorm, linear head on the class token. ``heads`` counts standard heads H for both
    variants. Takes images in [0, 1] and normalizes inside with ``mean``/``std`` (buffers that
    are not part of the state dict).

    timm equivalent: ``timm.models.vision_transformer.VisionTransformer(img_size, patch_size,
    in_chans, num_classes, embed_dim=dim, depth, num_heads=H, mlp_ratio, qkv_bias=True)``; for
    DiffViT add ``attn_layer="diff"`` and ``num_heads=H // 2``, and set each block's
    ``attn.lambda_init`` to match (timm uses the depth schedule).
    """

    def __init__(self, img_size: int, patch_size: int, in_chans: int, num_classes: int, dim: int,
                 depth: int, heads: int, mlp_ratio: float = 4.0, attn: str = "std",
                 lambda_init: Union[float, str] = 0.8, mean: Union[float, Sequence[float]] = 0.5,
                 std: Union[float, Sequence[float]] = 0.5, qkv_bias: bool = True):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} must be a multiple of patch_size={patch_size}")
        self.img_size, self.in_chans, self.attn_type = img_size, in_chans, attn
        self.register_buffer("mean", _channels(mean, in_chans, "mean"), persistent=False)
        self.register_buffer("std", _channels(std, in_chans, "std"), persistent=False)
        n_tokens = (img_size // patch_size) ** 2 + 1
        self.patch_embed = PatchEmbed(patch_size, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, attn, lambda_init, i, qkv_bias)
                                    for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self):  # timm's defaults; lambda vectors keep their N(0, 0.1^2) draw
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> final-norm tokens (B, N, dim), class token first."""
        check_images(x, self.in_chans, self.img_size)
        x = self.patch_embed((x - self.mean) / self.std)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1], (B, in_chans, img_size, img_size) -> logits (B, num_classes)."""
        return self.head(self.forward_features(x)[:, 0])


# ----------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------

@dataclass
class AttackResult:
    """Adversarial inputs and, per example, whether the attack succeeded on them.

    ``success``: untargeted, the prediction differs from the label; targeted, it equals the
    target. ``norm``: the size of x_adv - x in the attack's norm (inf where CW-L2 failed).
    """
    x_adv: torch.Tensor
    success: torch.Tensor
    norm: Optional[torch.Tensor] = None


@contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _margin(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Per example: how far the attack is from success (< 0 means success).

    Untargeted: z_y - max_{j != y} z_j. Targeted (y = target): max_{j != y} z_j - z_y.
    """
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
    raise ValueError(f"loss={loss!r}; expected 'ce' or 'margin'")


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


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "inf", steps: int = 10,
        alpha: Optional[float] = None, random_start: bool = True, restarts: int = 1, loss: str = "ce",
        targeted: bool = False, amp: Optional[bool] = None) -> AttackResult:
    """Projected gradient descent (Madry et al. 2018) in the Linf (``norm="inf"``) or L2 ball of radius eps.

    Step: Linf ``x + alpha * sign(g)``, L2 ``x + alpha * g / ||g||_2``; after every step the
    iterate is projected onto the eps-ball and [0, 1]. ``alpha`` defaults to 2.5 eps / steps.
    Per example, the strongest iterate over all steps and restarts is kept (lowest margin
    z_y - max_{j != y} z_j; for ``targeted``, y is the target), so success is never lost by a
    later, weaker step. Restarts after the first attack only the examples not yet fooled.
    Gradients are taken with respect to the input alone; the model runs in eval mode, and its
    mode is restored. ``amp`` (default: on for CUDA) runs the steps under bf16 autocast; the
    final success check is always in float32. Costs steps + 1 forward and steps backward
    passes per restart (one more forward with ``amp``).
    """
    if norm not in ("inf", "2"):
        raise ValueError(f"norm={norm!r}; expected 'inf' or '2'")
    if eps < 0:
        raise ValueError(f"eps={eps} must be >= 0")
    amp = x.is_cuda if amp is None else amp
    alpha = 2.5 * eps / max(steps, 1) if alpha is None else alpha
    if eps == 0 or steps == 0:
        with _eval_mode(model), torch.no_grad():
            return AttackResult(x.clone(), _margin(model(x).float(), y, targeted) < 0, x.new_zeros(len(x)))
    best_x, best_margin = x.clone(), x.new_full((len(x),), float("inf"))
    with _eval_mode(model):
        for r in range(restarts):
            idx = (best_margin >= 0).nonzero().squeeze(1) if r else torch.arange(len(x), device=x.device)
            if idx.numel() == 0:
                break
            x0, y0 = x[idx], y[idx]
            if random_start:
                if norm == "inf":
                    noise = torch.empty_like(x0).uniform_(-eps, eps)
                else:
                    noise = torch.randn_like(x0)
                    noise *= _rows(eps * torch.rand(len(x0), device=x.device) / _per_example_norm(noise, "2"), x)
                xa = _project(x0 + noise, x0, eps, norm)
            else:
                xa = x0.clone()
            bm, bx = best_margin[idx], best_x[idx]
            for step in range(steps + 1):
                last = step == steps
                xa.requires_grad_(not last)
                with torch.set_grad_enabled(not last), torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
                    logits = model(xa)
                m = _margin(logits.detach().float(), y0, targeted)
                better = m < bm
                bm, bx = torch.where(better, m, bm), torch.where(_rows(better, x), xa.detach(), bx)
                if last:
                    break
                g, = torch.autograd.grad(_attack_loss(logits.float(), y0, loss, targeted).sum(), xa)
                with torch.no_grad():
                    step_dir = g.sign() if norm == "inf" else g / _rows(_per_example_norm(g, "2").clamp_min(1e-12), x)
                    xa = _project(xa + alpha * step_dir, x0, eps, norm)
            if amp:  # the iterates were ranked in bf16; success is decided in float32
                with torch.no_grad():
                    bm = _margin(model(bx).float(), y0, targeted)
            best_margin[idx], best_x[idx] = bm, bx
    return AttackResult(best_x, best_margin < 0, _per_example_norm(best_x - x, norm))


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "inf", **kw) -> AttackResult:
    """Fast gradient sign method (Goodfellow et al. 2015): one PGD step of size eps, no random start."""
    return pgd(model, x, y, eps, norm=norm, steps=1, alpha=eps, random_start=False, **kw)

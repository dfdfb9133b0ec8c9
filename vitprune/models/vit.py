"""One Vision Transformer module that can hold any per-block pruned architecture.

Parameter names follow timm's ``VisionTransformer`` (``blocks.N.attn.qkv`` with q, k, v concatenated in that
order, ``blocks.N.mlp.fc1`` ...), so timm/DeiT state dicts load without renaming.

Each block may have its own heads / per-head QK width / per-head V width / MLP width. The fused ``qkv``
projection is laid out ``[q (heads*qk) | k (heads*qk) | v (heads*v)]``, head-major inside each part.

Optional *gates* (masks or learnable scales) let a full-size model behave exactly like a pruned one:

- ``attn.head_gate`` (heads,): scales each head's output before ``proj``;
- ``attn.qk_gate`` (qk,): scales query dim j in every head (aligned across heads);
- ``attn.v_gate`` (v,): scales value dim j in every head;
- ``mlp.gate`` (mlp,): scales hidden neuron j after the activation;
- ``block.branch_gate`` (2,): scales the attention / MLP branch outputs (0 removes the block);
- ``ViT.emb_mask`` (embed_dim,): a 0/1 mask of residual channels; LayerNorm statistics are computed over the
  kept channels only, so the masked model equals the physically narrower one.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitprune.models.config import BlockConfig, ViTConfig

GATE_NAMES = ("head_gate", "qk_gate", "v_gate", "gate", "branch_gate", "emb_mask")
# the one kind -> gate table: a structure kind of a block and the (submodule, buffer/parameter) gating it
KIND_GATES = {
    "heads": ("attn", "head_gate"),
    "qk": ("attn", "qk_gate"),
    "v": ("attn", "v_gate"),
    "mlp": ("mlp", "gate"),
}


def masked_layer_norm(x: Tensor, norm: nn.LayerNorm, mask: Tensor | None) -> Tensor:
    """LayerNorm over the channels where ``mask`` is 1 (all channels when ``mask`` is None)."""
    if mask is None:
        return norm(x)
    count = mask.sum()
    mean = (x * mask).sum(-1, keepdim=True) / count
    centred = (x - mean) * mask
    var = centred.pow(2).sum(-1, keepdim=True) / count
    out = centred * torch.rsqrt(var + norm.eps)
    return out * (norm.weight * mask) + norm.bias * mask


def _linear(fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    """``nn.Linear`` that tolerates a zero width (a fully pruned branch) without init warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return nn.Linear(fan_in, fan_out, bias=bias)


class DropPath(nn.Module):
    """Stochastic depth on the residual branch (per sample), active only in training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


PAD_TO_FUSED = True  # zero-pad unequal QK / V head widths on the CPU so the fused kernel runs (see attention)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """``softmax(q k^T * scale) v`` per head (q, k: ``(..., n, dq)``, v: ``(..., n, dv)``).

    PyTorch's fused CPU attention kernel needs one head width for q, k and v; a pruned block's QK and V widths
    differ and fall back to the unfused kernel (a whole NViT 0.7x model in eager: 0.898 of dense before, 0.682
    after; benchmarks/results/matched_latency.json ``latency_replaced``).
    So on the CPU the narrower side is zero-padded to the wider one: zero q / k dims add
    nothing to a score, and the zero v dims give output dims that are sliced off - the same values. Not while
    exporting to ONNX: ONNX Runtime runs unequal widths in its own kernels and a pad would only cost it time.
    """
    dq, dv = q.shape[-1], v.shape[-1]
    if dq == 0:  # no query/key dims left: scores are all zero, attention is uniform
        return v.mean(dim=-2, keepdim=True).expand(v.shape)
    if dq == dv or not PAD_TO_FUSED or q.device.type != "cpu" or torch.onnx.is_in_onnx_export():
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if dq < dv:
        q, k = F.pad(q, (0, dv - dq)), F.pad(k, (0, dv - dq))
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return F.scaled_dot_product_attention(q, k, F.pad(v, (0, dq - dv)), scale=scale)[..., :dv]


class Attention(nn.Module):
    """Multi-head self-attention with independent QK and V head widths and a stored scale."""

    def __init__(self, dim: int, cfg: BlockConfig, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads, self.qk_dim, self.v_dim = cfg.heads, cfg.qk_dim, cfg.v_dim
        self.scale = float(cfg.scale)
        inner_qk, inner_v = self.heads * self.qk_dim, self.heads * self.v_dim
        self.qkv = _linear(dim, 2 * inner_qk + inner_v, bias=qkv_bias)
        self.proj = _linear(inner_v, dim)
        self.register_buffer("head_gate", None)
        self.register_buffer("qk_gate", None)
        self.register_buffer("v_gate", None)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        if self.heads == 0 or self.v_dim == 0:
            return self.proj.bias.expand(b, n, -1).clone()  # a non-view result: safe under inference_mode
        h, dq, dv = self.heads, self.qk_dim, self.v_dim
        qkv = self.qkv(x)
        q, k, v = qkv.split([h * dq, h * dq, h * dv], dim=-1)
        q = q.reshape(b, n, h, dq).transpose(1, 2)
        k = k.reshape(b, n, h, dq).transpose(1, 2)
        v = v.reshape(b, n, h, dv).transpose(1, 2)
        if self.qk_gate is not None:
            q = q * self.qk_gate
        if self.v_gate is not None:
            v = v * self.v_gate
        out = attention(q, k, v, self.scale)
        if self.head_gate is not None:
            out = out * self.head_gate.view(1, h, 1, 1)
        out = out.transpose(1, 2).reshape(b, n, h * dv)
        return self.proj(out)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 with an optional gate on the hidden neurons."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.fc1 = _linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = _linear(hidden, dim)
        self.register_buffer("gate", None)

    def forward(self, x: Tensor) -> Tensor:
        if self.hidden == 0:
            return self.fc2.bias.expand(*x.shape[:-1], -1).clone()
        h = self.act(self.fc1(x))
        if self.gate is not None:
            h = h * self.gate
        return self.fc2(h)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN1(x))``, then ``x + mlp(LN2(x))``."""

    def __init__(self, dim: int, cfg: BlockConfig, eps: float, qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, cfg, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, cfg.mlp_dim)
        self.drop_path = DropPath(drop_path)
        self.register_buffer("branch_gate", None)

    def forward(self, x: Tensor, emb_mask: Tensor | None = None) -> Tensor:
        a = self.attn(masked_layer_norm(x, self.norm1, emb_mask))
        if self.branch_gate is not None:
            a = a * self.branch_gate[0]
        if emb_mask is not None:
            a = a * emb_mask
        x = x + self.drop_path(a)
        m = self.mlp(masked_layer_norm(x, self.norm2, emb_mask))
        if self.branch_gate is not None:
            m = m * self.branch_gate[1]
        if emb_mask is not None:
            m = m * emb_mask
        return x + self.drop_path(m)


class ViT(nn.Module):
    """Vision Transformer built from a :class:`ViTConfig`; see the module docstring for gates."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        d = c.embed_dim
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(c.in_chans, d, c.patch_size, c.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if c.class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d)) if c.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_prefix_tokens + c.pos_grid**2, d))
        depth = max(len(c.blocks), 1)
        rates = [c.drop_path_rate * i / max(depth - 1, 1) for i in range(len(c.blocks))]
        self.blocks = nn.ModuleList(
            Block(d, b, c.norm_eps, c.qkv_bias, r) for b, r in zip(c.blocks, rates, strict=True)
        )
        self.norm = nn.LayerNorm(d, eps=c.norm_eps)
        self.head = nn.Linear(d, c.num_classes) if c.num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(d, c.num_classes) if c.distilled and c.num_classes > 0 else None
        self.register_buffer("emb_mask", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal init as in timm/DeiT (used when training from scratch)."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for tok in (self.cls_token, self.dist_token):
            if tok is not None:
                nn.init.trunc_normal_(tok, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.numel() > 0:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def _pos_embed(self, grid_h: int, grid_w: int) -> Tensor:
        """Position embeddings for a ``grid_h x grid_w`` patch grid (bicubic interpolation if needed)."""
        p = self.config.num_prefix_tokens
        g = self.config.pos_grid
        if grid_h == g and grid_w == g:
            return self.pos_embed
        prefix, grid = self.pos_embed[:, :p], self.pos_embed[:, p:]
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([prefix, grid], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` -> normalised tokens ``(B, prefix + patches, embed_dim)``."""
        x = self.patch_embed.proj(x)
        b, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        x = torch.cat([*prefix, x], dim=1) + self._pos_embed(gh, gw)
        mask = self.emb_mask
        if mask is not None:
            x = x * mask
        for blk in self.blocks:
            x = blk(x, mask)
        return masked_layer_norm(x, self.norm, mask)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if self.config.global_pool == "avg":
            feats = x[:, self.config.num_prefix_tokens :].mean(dim=1)
            return feats if pre_logits else self.head(feats)
        if pre_logits:
            return x[:, 0]
        logits = self.head(x[:, 0])
        if self.head_dist is not None:
            dist = self.head_dist(x[:, 1])
            if self.training and getattr(self, "return_distill_pair", False):
                return logits, dist
            return (logits + dist) / 2
        return logits

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def carried_gates(model: nn.Module) -> list[str]:
    """Names of the gates (masks or learnable scales, :data:`GATE_NAMES`) on ``model``, and ``"parametrized"`` when
    a weight is parametrised (VTP's embedding gate): what must be folded or pruned before a new pruning run."""
    found = sorted(
        n
        for n, t in [*model.named_buffers(), *model.named_parameters()]
        if t is not None and n.rsplit(".", 1)[-1] in GATE_NAMES
    )
    if any("parametrizations" in n for n, _ in model.named_parameters()):
        found.append("parametrized")
    return found


def logits_of(output: Tensor | tuple[Tensor, ...]) -> Tensor:
    """Class logits of a model output: a distilled model in training mode returns ``(cls, dist)`` head logits,
    which are averaged (DeiT's inference rule); a plain tensor is returned as is."""
    if isinstance(output, tuple):
        return (output[0] + output[1]) / 2
    return output


def num_params(model: nn.Module) -> int:
    """Number of trainable-weight elements (gates registered as parameters are excluded)."""
    return sum(p.numel() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] not in GATE_NAMES)

"""Building blocks of the Unet.

Module and parameter names follow MinImagen's `layers.py`, so its state dicts load
strictly (e.g. a wrapped attention lives under `.fn`, `LayerNorm` keeps `gamma` and a
`beta` buffer). Everything here exports to ONNX with a symbolic batch.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Identity(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x, *args, **kwargs):
        return x


class LayerNorm(nn.Module):
    """LayerNorm with a learned gain and a fixed zero bias (a buffer, as in MinImagen)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class ChanLayerNorm(nn.Module):
    """LayerNorm over the channel axis of (b, c, h, w) feature maps."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        var = torch.var(x, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(x, dim=1, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.g


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        return self.fn(x, **kwargs) + x


class Parallel(nn.Module):
    """Sums the outputs of several modules applied to the same input."""

    def __init__(self, *fns: nn.Module):
        super().__init__()
        self.fns = nn.ModuleList(fns)

    def forward(self, x):
        return sum(fn(x) for fn in self.fns)


class ToTokens(nn.Module):
    """Runs a token module on a feature map: (b, c, h, w) -> (b, h*w, c) -> fn -> back."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, **kwargs):
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (b, h*w, c)
        out = self.fn(tokens, **kwargs)
        return out.transpose(1, 2).reshape(b, c, h, w)


class SinusoidalPosEmb(nn.Module):
    """Transformer position embedding of the (float) timestep, sin half then cos half."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x):  # (b,) -> (b, dim)
        half_dim = self.dim // 2
        scale = math.log(10000) / (half_dim - 1)
        freqs = torch.exp(torch.arange(half_dim, device=x.device, dtype=torch.float32) * -scale)
        emb = x.float()[:, None] * freqs[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


def _split_heads(t, heads: int):  # (b, n, h*d) -> (b, h, n, d)
    b, n, _ = t.shape
    return t.reshape(b, n, heads, -1).transpose(1, 2)


def _merge_heads(t):  # (b, h, n, d) -> (b, n, h*d)
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class Attention(nn.Module):
    """Multi-query self-attention (one shared key/value head) with a learned null key/value."""

    def __init__(self, dim: int, *, dim_head: int = 64, heads: int = 8, context_dim: int | None = None):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner_dim = dim_head * heads
        self.norm = LayerNorm(dim)
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, dim_head * 2, bias=False)
        self.to_context = (
            nn.Sequential(nn.LayerNorm(context_dim), nn.Linear(context_dim, dim_head * 2))
            if context_dim is not None
            else None
        )
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), LayerNorm(dim))

    def forward(self, x, context=None):  # x: (b, n, dim)
        b = x.shape[0]
        x = self.norm(x)
        q = _split_heads(self.to_q(x), self.heads) * self.scale  # (b, h, n, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (b, n, d) each
        null_k, null_v = (t.reshape(1, 1, -1).expand(b, 1, -1) for t in self.null_kv.unbind(dim=0))
        k, v = torch.cat((null_k, k), dim=1), torch.cat((null_v, v), dim=1)
        if context is not None:
            context_k, context_v = self.to_context(context).chunk(2, dim=-1)
            k, v = torch.cat((context_k, k), dim=1), torch.cat((context_v, v), dim=1)
        sim = torch.matmul(q, k[:, None].transpose(-1, -2))  # (b, h, n, j)
        attn = sim.softmax(dim=-1, dtype=torch.float32)
        out = torch.matmul(attn, v[:, None])  # (b, h, n, d)
        return self.to_out(_merge_heads(out))


class CrossAttention(nn.Module):
    """Attention from image tokens to conditioning tokens, with a learned null key/value."""

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        dim_head: int = 64,
        heads: int = 8,
        norm_context: bool = False,
    ):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner_dim = dim_head * heads
        context_dim = dim if context_dim is None else context_dim
        self.norm = LayerNorm(dim)
        self.norm_context = LayerNorm(context_dim) if norm_context else Identity()
        self.null_kv = nn.Parameter(torch.randn(2, dim_head))
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, inner_dim * 2, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), LayerNorm(dim))

    def forward(self, x, context):  # x: (b, n, dim), context: (b, m, context_dim)
        b = x.shape[0]
        x = self.norm(x)
        context = self.norm_context(context)
        q = _split_heads(self.to_q(x), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        null_k, null_v = (t.reshape(1, 1, 1, -1).expand(b, self.heads, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2)
        sim = torch.matmul(q * self.scale, k.transpose(-1, -2))  # (b, h, n, m+1)
        attn = sim.softmax(dim=-1, dtype=torch.float32)
        return self.to_out(_merge_heads(torch.matmul(attn, v)))


class Block(nn.Module):
    """GroupNorm, optional scale-shift from the time conditioning, SiLU, 3x3 conv."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8, norm: bool = True):
        super().__init__()
        self.groupnorm = nn.GroupNorm(groups, dim) if norm else Identity()
        self.activation = nn.SiLU()
        self.project = nn.Conv2d(dim, dim_out, 3, padding=1)

    def forward(self, x, scale_shift=None):
        x = self.groupnorm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.project(self.activation(x))


class ResnetBlock(nn.Module):
    """Two Blocks with a residual, time conditioning by scale-shift, optional cross-attention."""

    def __init__(
        self, dim: int, dim_out: int, *, cond_dim: int | None = None, time_cond_dim: int | None = None, groups: int = 8
    ):
        super().__init__()
        self.time_mlp = None
        if time_cond_dim is not None:
            self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_cond_dim, dim_out * 2))
        self.cross_attn = None
        if cond_dim is not None:
            self.cross_attn = ToTokens(CrossAttention(dim=dim_out, context_dim=cond_dim))
        self.block1 = Block(dim, dim_out, groups=groups)
        self.block2 = Block(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else Identity()

    def forward(self, x, time_emb=None, cond=None):
        scale_shift = None
        if self.time_mlp is not None and time_emb is not None:
            time_emb = self.time_mlp(time_emb)[:, :, None, None]
            scale_shift = time_emb.chunk(2, dim=1)
        h = self.block1(x)
        if self.cross_attn is not None:
            h = self.cross_attn(h, context=cond) + h
        h = self.block2(h, scale_shift=scale_shift)
        return h + self.res_conv(x)


def ChanFeedForward(dim: int, mult: int = 2) -> nn.Sequential:
    hidden_dim = int(dim * mult)
    return nn.Sequential(
        ChanLayerNorm(dim),
        nn.Conv2d(dim, hidden_dim, 1, bias=False),
        nn.GELU(),
        ChanLayerNorm(hidden_dim),
        nn.Conv2d(hidden_dim, dim, 1, bias=False),
    )


class TransformerBlock(nn.Module):
    """Self-attention over all pixels, then a 1x1-conv feed-forward, both residual."""

    def __init__(
        self, dim: int, *, heads: int = 8, dim_head: int = 32, ff_mult: int = 2, context_dim: int | None = None
    ):
        super().__init__()
        self.attn = ToTokens(Attention(dim=dim, heads=heads, dim_head=dim_head, context_dim=context_dim))
        self.ff = ChanFeedForward(dim=dim, mult=ff_mult)

    def forward(self, x, context=None):
        x = self.attn(x, context=context) + x
        return self.ff(x) + x


class CrossEmbedLayer(nn.Module):
    """Inception-like stem: convolutions of several kernel sizes, concatenated on channels."""

    def __init__(self, dim_in: int, kernel_sizes: tuple[int, ...], dim_out: int | None = None, stride: int = 2):
        super().__init__()
        dim_out = dim_in if dim_out is None else dim_out
        kernel_sizes = sorted(kernel_sizes)
        # Descending channel counts with kernel size, summing to dim_out.
        dim_scales = [int(dim_out / (2**i)) for i in range(1, len(kernel_sizes))]
        dim_scales = [*dim_scales, dim_out - sum(dim_scales)]
        self.convs = nn.ModuleList(
            nn.Conv2d(dim_in, dim_scale, kernel, stride=stride, padding=(kernel - stride) // 2)
            for kernel, dim_scale in zip(kernel_sizes, dim_scales)
        )

    def forward(self, x):
        return torch.cat([conv(x) for conv in self.convs], dim=1)


def Downsample(dim: int, dim_out: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(dim, dim if dim_out is None else dim_out, kernel_size=4, stride=2, padding=1)


def Upsample(dim: int, dim_out: int | None = None) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(dim, dim if dim_out is None else dim_out, 3, padding=1),
    )

"""The Unet of the cascade, as in MinImagen (a simplification of Imagen's Efficient U-Net).

Besides MinImagen's training-time `cond_drop_prob`, `forward` takes `text_keep`, a
per-sample boolean that selects text or null conditioning, so classifier-free guidance
runs as one batch of [cond; uncond] in an exported engine.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Attention as _Attention
from .layers import (
    CrossEmbedLayer,
    Downsample,
    Identity,
    Parallel,
    Residual,
    ResnetBlock,
    SinusoidalPosEmb,
    ToTokens,
    TransformerBlock,
    Upsample,
)

ATTN_DIM_HEAD = 64  # MinImagen's constants
NUM_TIME_TOKENS = 2
RESNET_GROUPS = 8


@dataclass
class UnetConfig:
    """Constructor parameters of a Unet, with MinImagen's names and meanings."""

    dim: int = 128
    dim_mults: tuple = (1, 2, 4)
    channels: int = 3
    channels_out: int | None = None
    cond_dim: int | None = None
    text_embed_dim: int = 512
    num_resnet_blocks: int | tuple = 1
    layer_attns: bool | tuple = True
    layer_cross_attns: bool | tuple = True
    attn_heads: int = 8
    lowres_cond: bool = False
    memory_efficient: bool = False
    attend_at_middle: bool = False
    max_text_len: int = 256  # MinImagen fixes 256; the null text tokens have this length

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UnetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Unet parameters {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, dict] = {
    # Imagen's base and super-resolution numbers, as MinImagen gives them.
    "Base": dict(
        dim=512,
        dim_mults=(1, 2, 3, 4),
        num_resnet_blocks=3,
        layer_attns=(False, True, True, True),
        layer_cross_attns=(False, True, True, True),
        memory_efficient=False,
    ),
    "Super": dict(
        dim=128,
        dim_mults=(1, 2, 4, 8),
        num_resnet_blocks=(2, 4, 8, 8),
        layer_attns=(False, False, False, True),
        layer_cross_attns=(False, False, False, True),
        memory_efficient=True,
    ),
    # Test sizes. Upstream merges Base/Super defaults into these by mistake; ours are their own.
    "BaseTest": dict(
        dim=8, dim_mults=(1, 2), num_resnet_blocks=1, layer_attns=False, layer_cross_attns=False, memory_efficient=False
    ),
    "SuperTest": dict(
        dim=8,
        dim_mults=(1, 2),
        num_resnet_blocks=(1, 2),
        layer_attns=False,
        layer_cross_attns=False,
        memory_efficient=True,
    ),
}


def _per_level(value, levels: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
    if len(values) != levels:
        raise ValueError(f"{name} has {len(values)} entries but dim_mults has {levels} levels")
    return values


class Unet(nn.Module):
    def __init__(self, config: UnetConfig | None = None, **kwargs):
        super().__init__()
        config = dataclasses.replace(config or UnetConfig(), **kwargs)
        self.config = config
        dim, lowres_cond = config.dim, config.lowres_cond
        cond_dim = dim if config.cond_dim is None else config.cond_dim
        # Super-resolution Unets double the time conditioning width (MinImagen).
        time_cond_dim = dim * 4 * (2 if lowres_cond else 1)
        # Modules are created in MinImagen's order (the random initialisation draws in that order).
        self._build_conditioning(config, cond_dim, time_cond_dim)
        self.channels = config.channels
        self.channels_out = config.channels if config.channels_out is None else config.channels_out
        self.init_conv = CrossEmbedLayer(
            self.channels * (2 if lowres_cond else 1), dim_out=dim, kernel_sizes=(3, 7, 15), stride=1
        )
        dims = [dim, *(dim * m for m in config.dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        levels = len(in_out)
        per_level = [
            _per_level(getattr(config, name), levels, name)
            for name in ("num_resnet_blocks", "layer_attns", "layer_cross_attns")
        ]
        self.skip_connect_scale = 2**-0.5
        skip_connect_dims = self._build_downs(config, in_out, per_level, cond_dim, time_cond_dim)
        self._build_middle(config, dims[-1], cond_dim, time_cond_dim)
        self._build_ups(config, in_out, per_level, skip_connect_dims, cond_dim, time_cond_dim)
        self.final_res_block = ResnetBlock(dim, dim, time_cond_dim=time_cond_dim, groups=RESNET_GROUPS)
        self.final_conv = nn.Conv2d(dim, self.channels_out, 3, padding=1)

    def _build_conditioning(self, config: UnetConfig, cond_dim: int, time_cond_dim: int) -> None:
        """Time (and low-res noise time) hiddens, conditioning and tokens; text projection and the
        learned null text for classifier-free guidance."""
        dim = config.dim
        self.to_time_hiddens = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_cond_dim), nn.SiLU())
        self.to_time_cond = nn.Sequential(nn.Linear(time_cond_dim, time_cond_dim))
        self.to_time_tokens = nn.Sequential(nn.Linear(time_cond_dim, cond_dim * NUM_TIME_TOKENS))
        self.lowres_cond = config.lowres_cond
        if config.lowres_cond:
            self.to_lowres_time_hiddens = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_cond_dim), nn.SiLU())
            self.to_lowres_time_cond = nn.Sequential(nn.Linear(time_cond_dim, time_cond_dim))
            self.to_lowres_time_tokens = nn.Sequential(nn.Linear(time_cond_dim, cond_dim * NUM_TIME_TOKENS))

        self.norm_cond = nn.LayerNorm(cond_dim)
        self.text_embed_dim = config.text_embed_dim
        self.text_to_cond = nn.Linear(config.text_embed_dim, cond_dim)
        self.max_text_len = config.max_text_len
        self.null_text_embed = nn.Parameter(torch.randn(1, config.max_text_len, cond_dim))
        self.null_text_hidden = nn.Parameter(torch.randn(1, time_cond_dim))
        self.to_text_non_attn_cond = nn.Sequential(
            nn.LayerNorm(cond_dim),
            nn.Linear(cond_dim, time_cond_dim),
            nn.SiLU(),
            nn.Linear(time_cond_dim, time_cond_dim),
        )

    def _transformer(self, config: UnetConfig, level_dim: int, use: bool) -> nn.Module:
        return TransformerBlock(level_dim, heads=config.attn_heads, dim_head=ATTN_DIM_HEAD) if use else Identity()

    def _build_downs(
        self, config: UnetConfig, in_out: list, per_level: list, cond_dim: int, time_cond_dim: int
    ) -> list[int]:
        """The downsampling path; returns the width of each level's skip connection."""
        groups, levels = RESNET_GROUPS, len(in_out)
        self.downs = nn.ModuleList()
        skip_connect_dims = []
        for ind, ((dim_in, dim_out), n_blocks, attn, cross) in enumerate(zip(in_out, *per_level)):
            is_last = ind == levels - 1
            current_dim = dim_in
            pre_downsample = None
            if config.memory_efficient:
                pre_downsample = Downsample(dim_in, dim_out)
                current_dim = dim_out
            skip_connect_dims.append(current_dim)
            post_downsample = None
            if not config.memory_efficient:
                post_downsample = (
                    Downsample(current_dim, dim_out)
                    if not is_last
                    else Parallel(nn.Conv2d(dim_in, dim_out, 3, padding=1), nn.Conv2d(dim_in, dim_out, 1))
                )
            self.downs.append(
                nn.ModuleList(
                    [
                        pre_downsample,
                        ResnetBlock(
                            current_dim,
                            current_dim,
                            cond_dim=cond_dim if cross else None,
                            time_cond_dim=time_cond_dim,
                            groups=groups,
                        ),
                        nn.ModuleList(
                            ResnetBlock(current_dim, current_dim, time_cond_dim=time_cond_dim, groups=groups)
                            for _ in range(n_blocks)
                        ),
                        self._transformer(config, current_dim, attn),
                        post_downsample,
                    ]
                )
            )
        return skip_connect_dims

    def _build_middle(self, config: UnetConfig, mid_dim: int, cond_dim: int, time_cond_dim: int) -> None:
        groups = RESNET_GROUPS
        self.mid_block1 = ResnetBlock(mid_dim, mid_dim, cond_dim=cond_dim, time_cond_dim=time_cond_dim, groups=groups)
        self.mid_attn = (
            ToTokens(Residual(_Attention(mid_dim, heads=config.attn_heads, dim_head=ATTN_DIM_HEAD)))
            if config.attend_at_middle
            else None
        )
        self.mid_block2 = ResnetBlock(mid_dim, mid_dim, cond_dim=cond_dim, time_cond_dim=time_cond_dim, groups=groups)

    def _build_ups(
        self,
        config: UnetConfig,
        in_out: list,
        per_level: list,
        skip_connect_dims: list[int],
        cond_dim: int,
        time_cond_dim: int,
    ) -> None:
        """The upsampling path, mirroring the downsampling one, with its skip connections."""
        groups, levels = RESNET_GROUPS, len(in_out)
        self.ups = nn.ModuleList()
        reversed_levels = zip(reversed(in_out), *(reversed(values) for values in per_level))
        for ind, ((dim_in, dim_out), n_blocks, attn, cross) in enumerate(reversed_levels):
            is_last = ind == levels - 1
            skip_dim = skip_connect_dims.pop()
            self.ups.append(
                nn.ModuleList(
                    [
                        ResnetBlock(
                            dim_out + skip_dim,
                            dim_out,
                            cond_dim=cond_dim if cross else None,
                            time_cond_dim=time_cond_dim,
                            groups=groups,
                        ),
                        nn.ModuleList(
                            ResnetBlock(dim_out + skip_dim, dim_out, time_cond_dim=time_cond_dim, groups=groups)
                            for _ in range(n_blocks)
                        ),
                        self._transformer(config, dim_out, attn),
                        Upsample(dim_out, dim_in) if not is_last or config.memory_efficient else Identity(),
                    ]
                )
            )

    def forward(
        self,
        x,
        time,
        *,
        text_embeds=None,
        text_mask=None,
        text_keep=None,
        lowres_cond_img=None,
        lowres_noise_times=None,
        cond_drop_prob: float = 0.0,
    ):
        """Predicts the noise in `x` (b, c, s, s) at `time` (b,).

        text_embeds (b, n, text_embed_dim), text_mask (b, n) bool, text_keep (b,) bool:
        rows with text_keep False use the learned null conditioning. Without text_keep,
        each row is kept with probability 1 - cond_drop_prob (training).
        """
        batch = x.shape[0]
        if self.lowres_cond and (lowres_cond_img is None or lowres_noise_times is None):
            raise ValueError("a super-resolution Unet needs lowres_cond_img and lowres_noise_times")
        t, time_tokens = self._time_condition(time, lowres_noise_times)
        if text_keep is None:
            text_keep = self._keep_mask(batch, cond_drop_prob, x.device)
        t, c = self._text_condition(text_embeds, text_mask, text_keep, t, time_tokens)

        if lowres_cond_img is not None:
            x = torch.cat((x, lowres_cond_img), dim=1)
        x = self.init_conv(x)

        hiddens = []
        for pre_downsample, init_block, resnet_blocks, attn_block, post_downsample in self.downs:
            if pre_downsample is not None:
                x = pre_downsample(x)
            x = init_block(x, t, c)
            for resnet_block in resnet_blocks:
                x = resnet_block(x, t)
                hiddens.append(x)
            x = attn_block(x)
            hiddens.append(x)
            if post_downsample is not None:
                x = post_downsample(x)

        x = self.mid_block1(x, t, c)
        if self.mid_attn is not None:
            x = self.mid_attn(x)
        x = self.mid_block2(x, t, c)

        def with_skip(x):
            return torch.cat((x, hiddens.pop() * self.skip_connect_scale), dim=1)

        for init_block, resnet_blocks, attn_block, upsample in self.ups:
            x = init_block(with_skip(x), t, c)
            for resnet_block in resnet_blocks:
                x = resnet_block(with_skip(x), t)
            x = upsample(attn_block(x))

        x = self.final_res_block(x, t)
        return self.final_conv(x)

    @staticmethod
    def _keep_mask(batch: int, cond_drop_prob: float, device) -> torch.Tensor:
        if cond_drop_prob <= 0:
            return torch.ones(batch, dtype=torch.bool, device=device)
        if cond_drop_prob >= 1:
            return torch.zeros(batch, dtype=torch.bool, device=device)
        return torch.rand(batch, device=device) >= cond_drop_prob

    def _time_condition(self, time, lowres_noise_times):
        """Returns t (b, time_cond_dim), added everywhere, and time tokens (b, r, cond_dim)."""
        time_hiddens = self.to_time_hiddens(time)
        t = self.to_time_cond(time_hiddens)
        time_tokens = self.to_time_tokens(time_hiddens).reshape(time.shape[0], NUM_TIME_TOKENS, -1)
        if self.lowres_cond:
            lowres_hiddens = self.to_lowres_time_hiddens(lowres_noise_times)
            t = t + self.to_lowres_time_cond(lowres_hiddens)
            lowres_tokens = self.to_lowres_time_tokens(lowres_hiddens).reshape(time.shape[0], NUM_TIME_TOKENS, -1)
            time_tokens = torch.cat((time_tokens, lowres_tokens), dim=-2)
        return t, time_tokens

    def _text_condition(self, text_embeds, text_mask, text_keep, t, time_tokens):
        """Projects the text to conditioning tokens; masked or dropped rows become null tokens."""
        if text_embeds is None:
            return t, self.norm_cond(time_tokens)
        text_tokens = self.text_to_cond(text_embeds)[:, : self.max_text_len]
        remainder = self.max_text_len - text_tokens.shape[1]
        if remainder > 0:
            text_tokens = nn.functional.pad(text_tokens, (0, 0, 0, remainder))
        keep = text_keep[:, None, None]  # (b, 1, 1)
        if text_mask is not None:
            text_mask = text_mask[:, : self.max_text_len].bool()
            if remainder > 0:
                text_mask = nn.functional.pad(text_mask, (0, remainder), value=False)
            keep = text_mask[:, :, None] & keep  # (b, max_text_len, 1)
        text_tokens = torch.where(keep, text_tokens, self.null_text_embed.to(text_tokens.dtype))
        # Pooled text added to the time conditioning (non-attention path).
        text_hiddens = self.to_text_non_attn_cond(text_tokens.mean(dim=-2))
        text_hiddens = torch.where(text_keep[:, None], text_hiddens, self.null_text_hidden.to(t.dtype))
        c = torch.cat((time_tokens, text_tokens), dim=-2)
        return t + text_hiddens, self.norm_cond(c)


def _preset_class(name: str):
    def __init__(self, config: UnetConfig | None = None, **kwargs):
        Unet.__init__(self, config, **{**PRESETS[name], **kwargs})

    return type(name, (Unet,), {"__init__": __init__, "__doc__": f"Unet with the `{name}` preset: {PRESETS[name]}"})


Base = _preset_class("Base")
Super = _preset_class("Super")
BaseTest = _preset_class("BaseTest")
SuperTest = _preset_class("SuperTest")


def preset_config(name: str, **overrides) -> UnetConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Unet preset {name!r}; choose one of {sorted(PRESETS)} or pass a JSON file")
    return UnetConfig(**{**PRESETS[name], **overrides})


__all__ = ["Unet", "UnetConfig", "PRESETS", "Base", "Super", "BaseTest", "SuperTest", "preset_config"]

"""Masked Autoencoder (He et al. 2021): mask most patches, encode the rest, reconstruct the masked pixels."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model.pos_embed import sincos_2d
from pipeline.presets import resolve_preset
from pipeline.model.vit import Block, Encoder, run_blocks


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in row-major order, pixels (row, col, channel) inside."""
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, channels: int) -> torch.Tensor:
    """(B, L, p*p*C) -> (B, C, H, W); the inverse of patchify for square images."""
    B, L, _ = x.shape
    h = w = int(round(L**0.5))
    assert h * w == L, f"{L} patches do not form a square grid"
    x = x.reshape(B, h, w, p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, h * p, w * p)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible per sample: round(L * (1 - r)), at least one."""
    return max(1, round(num_patches * (1 - mask_ratio)))


class MAE(nn.Module):
    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, decoder_embed_dim: int, decoder_depth: int, decoder_num_heads: int,
                 mlp_ratio: float = 4.0, norm_pix_loss: bool = True, mask_ratio: float = 0.75,
                 drop_path: float = 0.0):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        self.norm_pix_loss, self.mask_ratio = norm_pix_loss, mask_ratio
        self.encoder = Encoder(img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, drop_path)
        num_patches = self.encoder.patch_embed.num_patches

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(decoder_embed_dim, self.encoder.patch_embed.grid)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size * patch_size * in_chans)
        self.num_patches = num_patches
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The paper's init: xavier_uniform linears (patch conv as a linear), N(0, 0.02) tokens."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.encoder.patch_embed.proj.bias)
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, self.patch_size, self.in_chans)

    def random_masking(self, batch: int, mask_ratio: float, noise: torch.Tensor | None = None,
                       device: torch.device | None = None):
        """Per-sample random masking by argsort of noise.

        noise (B, L) in any order (uniform by default); the L_keep patches with the smallest noise stay.
        Returns ids_keep (B, L_keep), mask (B, L) with 1 = masked, ids_restore (B, L).
        """
        L = self.num_patches
        if noise is None:
            noise = torch.rand(batch, L, device=device)
        keep = num_kept(L, mask_ratio)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        mask = torch.ones(batch, L, device=noise.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return ids_keep, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """imgs (B, C, H, W) -> latent (B, 1 + L_keep, D), mask (B, L), ids_restore (B, L)."""
        ids_keep, mask, ids_restore = self.random_masking(imgs.shape[0], mask_ratio, noise, imgs.device)
        return self.encoder(imgs, ids_keep), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (B, 1 + L_keep, D) -> predicted pixels (B, L, p*p*C) for every patch."""
        x = self.decoder_embed(latent)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # visible then masked, in shuffled order
        x_ = torch.gather(x_, 1, ids_restore[..., None].expand(-1, -1, x.shape[-1]))  # patch order
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.encoder.grad_checkpointing)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C): the patches, normalized per patch when norm_pix_loss (eps 1e-6)."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only."""
        per_patch = ((pred - self.target(imgs)) ** 2).mean(dim=-1)  # (B, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """-> loss (scalar), pred (B, L, p*p*C), mask (B, L)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_mae(cfg: ModelConfig) -> MAE:
    cfg.check()
    p = resolve_preset(cfg.preset)
    return MAE(
        img_size=cfg.img_size, patch_size=cfg.patch_size or p.patch_size, in_chans=cfg.in_chans,
        embed_dim=p.embed_dim, depth=p.depth, num_heads=p.num_heads,
        decoder_embed_dim=cfg.decoder_embed_dim or p.decoder_embed_dim, decoder_depth=cfg.decoder_depth or p.decoder_depth,
        decoder_num_heads=p.decoder_num_heads, norm_pix_loss=cfg.norm_pix_loss,
        mask_ratio=cfg.mask_ratio, drop_path=cfg.drop_path,
    )

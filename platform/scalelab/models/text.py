"""Text tower: a pre-norm Transformer encoder over token ids, masked-mean pooled, then projected.

Token id 0 is padding. The tower returns the (unnormalised) projection; `DualEncoder.encode_text`
L2-normalises it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from scalelab.config import TextTowerConfig

__all__ = ["PAD_ID", "TextTower", "TransformerBlock"]

PAD_ID = 0


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention with a key-padding mask."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: [B, L, W]; keep: bool [B, 1, 1, L], True where a key may be attended to."""
        b, length, width = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        # dropout_p only in training: SDPA has no notion of module mode.
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, length, width))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout)
        self.drop_1 = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width)
        )
        self.drop_2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_1(self.attn(self.ln_1(x), keep))
        return x + self.drop_2(self.mlp(self.ln_2(x)))


class TextTower(nn.Module):
    """Token + learned position embeddings → pre-norm Transformer → LayerNorm → masked mean → Linear.

    Pooling is a MASKED MEAN over non-padding tokens rather than CLIP's "features at the EOS token":
    the encoder is bidirectional (no causal mask), so every position already sees the whole caption;
    the mean does not depend on any tokenizer's EOS id (the tokenizer is trained separately and may
    change), and it stays meaningful when a caption is truncated to the context length and loses
    its EOS token.

    A caption that is entirely padding yields the zero vector (hence a zero embedding after
    F.normalize, similarity 0 with everything) instead of NaN.
    """

    def __init__(self, cfg: TextTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=PAD_ID)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.emb_drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout) for _ in range(cfg.depth)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.grad_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """CLIP-like init: small normal embeddings and linears, projection scaled by width^-1/2."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.token_embedding.weight[PAD_ID].zero_()
        nn.init.normal_(self.positional_embedding, std=0.01)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.proj.weight, std=self.cfg.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: int64 [B, L] with L ≤ context_length, 0 = padding → [B, embed_dim] (not normalised)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(
                f"token length {length} exceeds the text tower's context_length {self.context_length}"
            )
        valid = tokens != PAD_ID  # [B, L]
        # A row with no valid token would mask every key, and softmax over all -inf is NaN; let such a
        # row attend everywhere instead (its output is discarded by the pooling below anyway).
        keep = valid | ~valid.any(dim=1, keepdim=True)
        keep = keep[:, None, None, :]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        x = self.emb_drop(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpoint stashes and restores the RNG state, so dropout in the
                # recomputation replays exactly the masks of the first forward.
                x = checkpoint(block, x, keep, use_reentrant=False)
            else:
                x = block(x, keep)
        x = self.ln_final(x)
        return self.proj(masked_mean(x, valid))


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, W] over positions where valid [B, L] is True; all-invalid rows give zeros."""
    weights = valid.to(x.dtype).unsqueeze(-1)
    # where(), not multiplication: a non-finite value at a padded position must not leak (NaN * 0).
    total = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(1)
    return total / weights.sum(1).clamp(min=1.0)

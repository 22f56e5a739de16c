"""Text tower: naive attention/pooling references, padding invariance, limits, dropout, checkpointing."""

import math

import pytest
import torch

import scalelab.models.text as text_mod
from scalelab.config import TextTowerConfig
from scalelab.models import TextTower
from scalelab.models.text import SelfAttention, masked_mean

CFG = TextTowerConfig(vocab_size=50, context_length=12, width=16, depth=2, heads=4)


def _tower(cfg: TextTowerConfig = CFG, seed: int = 0) -> TextTower:
    torch.manual_seed(seed)
    return TextTower(cfg, embed_dim=8).double()


def test_attention_matches_naive_masked_softmax():
    torch.manual_seed(0)
    attn = SelfAttention(width=8, heads=2, dropout=0.0).double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = attn(x, valid[:, None, None, :])
    q, k, v = attn.qkv(x).split(8, dim=-1)
    want = torch.empty_like(x)
    for b in range(3):
        heads = []
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            scores = q[b, :, sl] @ k[b, :, sl].T / math.sqrt(4)
            scores = scores.masked_fill(~valid[b], float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[b, :, sl])
        want[b] = attn.out(torch.cat(heads, dim=-1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_masked_mean_matches_loop_and_zero_for_empty_rows():
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    x[0, 3] = float("nan")  # a non-finite value at a padded position must not leak
    valid = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    got = masked_mean(x, valid)
    torch.testing.assert_close(got[0], x[0, :2].mean(0))
    torch.testing.assert_close(got[1], x[1].mean(0))
    assert torch.equal(got[2], torch.zeros(2, dtype=torch.float64))


def test_padding_invariance():
    tower = _tower(CFG.model_copy(update={"dropout": 0.3})).eval()
    caption = torch.tensor([5, 17, 3, 44, 9])
    outs = []
    for length in (5, 7, 12):
        tokens = torch.zeros(1, length, dtype=torch.long)
        tokens[0, :5] = caption
        outs.append(tower(tokens))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-12, atol=1e-12)


def test_rows_do_not_interact_and_all_padding_row_is_zero():
    tower = _tower().eval()
    tokens = torch.tensor([[3, 4, 5, 0], [0, 0, 0, 0], [7, 0, 0, 0]])
    batch = tower(tokens)
    assert torch.isfinite(batch).all()
    assert torch.equal(batch[1], torch.zeros_like(batch[1]))
    torch.testing.assert_close(batch[0], tower(tokens[:1])[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(batch[2], tower(tokens[2:, :1])[0], rtol=1e-12, atol=1e-12)


def test_all_padding_backward_is_finite():
    tower = _tower().train()
    tower(torch.zeros(2, 6, dtype=torch.long)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tower.parameters() if p.grad is not None)


def test_too_long_tokens_name_both_lengths():
    with pytest.raises(ValueError, match=r"13.*context_length 12"):
        _tower()(torch.ones(1, 13, dtype=torch.long))


def test_dropout_active_in_train_inactive_in_eval():
    tower = _tower(CFG.model_copy(update={"dropout": 0.3}))
    tokens = torch.randint(1, 50, (4, 12))
    tower.train()
    assert not torch.equal(tower(tokens), tower(tokens))
    tower.eval()
    assert torch.equal(tower(tokens), tower(tokens))
    no_dropout = _tower().eval()  # same seed → same weights; eval ignores the dropout rate
    torch.testing.assert_close(tower(tokens), no_dropout(tokens), rtol=0, atol=0)


def _grads(tower: TextTower, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    tower.zero_grad()
    (tower(tokens) ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


def test_checkpointing_gives_identical_gradients(monkeypatch):
    cfg = CFG.model_copy(update={"dropout": 0.2})
    tokens = torch.randint(1, 50, (3, 10))
    tokens[1, 6:] = 0
    plain = _tower(cfg).train()
    ckpt = _tower(cfg).train()
    ckpt.set_grad_checkpointing(True)
    calls = []
    real = text_mod.checkpoint
    monkeypatch.setattr(text_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    want, got = _grads(plain, tokens), _grads(ckpt, tokens)
    assert len(calls) == cfg.depth  # the checkpointed path really ran, once per block
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)


def test_rank_check():
    with pytest.raises(ValueError, match="batch, length"):
        _tower()(torch.ones(12, dtype=torch.long))

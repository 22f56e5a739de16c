"""Classification losses against naive float64 references: softmax CE on the first label, summed BCE."""

import math

import pytest
import torch

from scalelab.losses import classify_loss, multi_hot, top1_correct


def test_softmax_is_cross_entropy_of_the_label():
    logits = torch.randn(5, 4, dtype=torch.float64)
    labels = torch.tensor([[0], [3], [1], [2], [3]])
    want = [-(logits[i, labels[i, 0]] - torch.logsumexp(logits[i], 0)) for i in range(5)]
    torch.testing.assert_close(classify_loss(logits, labels, "softmax"), torch.stack(want))


def test_sigmoid_is_bce_summed_over_classes_with_padding_ignored():
    logits = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([[0, 4], [2, -1], [1, 3]])
    want = []
    for i in range(3):
        positives = {int(v) for v in labels[i] if v >= 0}
        total = 0.0
        for c in range(5):
            p = 1 / (1 + math.exp(-float(logits[i, c])))
            total -= math.log(p) if c in positives else math.log(1 - p)
        want.append(total)
    want = torch.tensor(want, dtype=torch.float64)
    torch.testing.assert_close(classify_loss(logits, labels, "sigmoid"), want)
    assert multi_hot(labels, 5).tolist()[1] == [0, 0, 1, 0, 0]


def test_bf16_logits_give_an_fp32_loss_and_top1_counts_any_label():
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]], dtype=torch.bfloat16)
    assert classify_loss(logits, torch.tensor([[1], [2]]), "softmax").dtype == torch.float32
    assert top1_correct(logits, torch.tensor([[1, -1], [2, 0]])).tolist() == [True, True]
    assert top1_correct(logits, torch.tensor([[0, 2], [1, -1]])).tolist() == [False, False]
    with pytest.raises(ValueError, match="head"):
        classify_loss(logits, torch.tensor([[1], [2]]), "focal")

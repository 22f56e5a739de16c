"""The cached step against a naive full-batch backward, in float64.

Reference: the same model encodes the batch micro-batch by micro-batch inside ONE autograd graph (so
dropout draws the same noise, in the same order, as the cache's first pass), the full-batch loss is
built from the concatenated embeddings, and backward is called once. With micro = B that is the plain
full-batch step. The cached step must reproduce every parameter's gradient, temperature included.
"""

import math
import warnings

import pytest
import torch

from scalelab.gradcache import (
    BatchNormCacheWarning,
    NonFiniteError,
    cached_step,
    micro_batch_slices,
)
from scalelab.losses import sigmoid_loss
from scalelab.models import create_model
from scalelab.verify import random_batch

DROPOUT = {"image": {"dropout": 0.1, "drop_path": 0.2}, "text": {"dropout": 0.2}}


def _batch(model, batch, seed=0):
    return random_batch(model.config, batch, seed=seed)


def _naive_grads(model, images, tokens, micro, text_micro=None, loss="softmax"):
    model.zero_grad(set_to_none=True)
    n = images.shape[0]
    img = torch.cat([model.encode_image(images[s]) for s in micro_batch_slices(n, micro)])
    txt = torch.cat([model.encode_text(tokens[s]) for s in micro_batch_slices(n, text_micro or micro)])
    # naive per-row softmax loss, written out rather than calling the code under test
    if loss == "softmax":
        logits = model.logit_scale.exp() * img @ txt.T
        rows = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)]).mean()
        cols = torch.stack([torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(n)]).mean()
        value = (rows + cols) / 2
    else:
        value = sigmoid_loss(img, txt, model.logit_scale.exp(), model.logit_bias)
    value.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.item(), grads


def _assert_same_grads(model, expected, tol=1e-10):
    names = {k for k, p in model.named_parameters() if p.grad is not None}
    assert names == set(expected), names ^ set(expected)
    assert "temperature.logit_scale" in names
    for name, param in model.named_parameters():
        if name in expected:
            ref = expected[name]
            err = (param.grad - ref).norm() / ref.norm().clamp_min(1e-30)
            assert err <= tol, f"{name}: relative error {err:.3g}"


def _cached_vs_naive(model, batch, micro, text_micro=None, loss="softmax", block_size=None, seed=0):
    images, tokens = _batch(model, batch, seed)
    torch.manual_seed(seed + 1)
    want_loss, expected = _naive_grads(model, images, tokens, micro, text_micro, loss)
    rng_after_reference = torch.get_rng_state()
    torch.manual_seed(seed + 1)
    result = cached_step(model, images, tokens, micro_batch_size=micro, text_micro_batch_size=text_micro,
                         loss=loss, block_size=block_size)
    assert result.loss == pytest.approx(want_loss, rel=1e-12)
    assert result.replay_max_abs_diff == 0.0  # RNG replay reproduces the cached forward bit for bit
    # the step consumed the RNG exactly as one (chunked) forward does
    assert torch.equal(torch.get_rng_state(), rng_after_reference)
    _assert_same_grads(model, expected)
    return result


@pytest.fixture(scope="module")
def micro_model():
    torch.manual_seed(0)
    return create_model("micro", **DROPOUT).double().train()


def test_dropout_is_really_active(micro_model):
    images, tokens = _batch(micro_model, 4)
    with torch.no_grad():
        assert not torch.equal(micro_model.encode_image(images), micro_model.encode_image(images))
        assert not torch.equal(micro_model.encode_text(tokens), micro_model.encode_text(tokens))


@pytest.mark.parametrize(("batch", "micro"), [(12, 1), (13, 3), (16, 16), (10, 4)])
def test_cached_equals_full_batch_with_dropout(micro_model, batch, micro):
    result = _cached_vs_naive(micro_model, batch, micro)
    assert result.image_micro_batches == -(-batch // micro)


def test_image_and_text_micro_batches_may_differ(micro_model):
    result = _cached_vs_naive(micro_model, 11, micro=4, text_micro=3)
    assert (result.image_micro_batches, result.text_micro_batches) == (3, 4)


def test_tiled_loss_inside_the_cache(micro_model):
    _cached_vs_naive(micro_model, 13, micro=5, block_size=4)


def test_sigmoid_loss_gets_bias_gradient_once():
    torch.manual_seed(1)
    model = create_model("micro", logit_bias=True, **DROPOUT).double().train()
    _cached_vs_naive(model, 9, micro=2, loss="sigmoid", block_size=4)
    assert model.logit_bias.grad is not None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_checkpointing_on_and_off(checkpointing):
    torch.manual_seed(2)
    model = create_model("micro", grad_checkpointing=checkpointing, **DROPOUT).double().train()
    _cached_vs_naive(model, 10, micro=3)


def test_temperature_gradient_is_not_multiplied_by_micro_batches(micro_model):
    # open_clip's accumulation gives logit_scale k times its gradient; here it is exact for any k.
    images, tokens = _batch(micro_model, 12)
    grads = []
    for micro in (12, 4, 1):
        micro_model.eval().zero_grad(set_to_none=True)
        cached_step(micro_model, images, tokens, micro_batch_size=micro)
        grads.append(micro_model.logit_scale.grad.item())
    micro_model.train()
    assert grads[1] == pytest.approx(grads[0], rel=1e-10)
    assert grads[2] == pytest.approx(grads[0], rel=1e-10)


def test_backward_callable_sees_each_micro_batch(micro_model):
    images, tokens = _batch(micro_model, 10)
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()

    micro_model.zero_grad(set_to_none=True)
    result = cached_step(micro_model, images, tokens, micro_batch_size=4, text_micro_batch_size=5,
                         backward=backward)
    # image micro-batch k and text micro-batch k share a call: max(3, 2) calls, not 3 + 2
    assert len(calls) == result.backward_calls == 3
    assert (result.image_micro_batches, result.text_micro_batches) == (3, 2)


def test_statistics(micro_model):
    images, tokens = _batch(micro_model, 16)
    micro_model.zero_grad(set_to_none=True)
    result = cached_step(micro_model, images, tokens, micro_batch_size=5)
    assert result.image_emb_norm == pytest.approx(1.0) and result.text_emb_norm == pytest.approx(1.0)
    assert 0.0 <= result.image_accuracy <= 1.0 and 0.0 <= result.text_accuracy <= 1.0
    assert result.logit_scale == pytest.approx(micro_model.logit_scale.item())
    assert set(result.timings) == {"cache_forward_s", "loss_s", "replay_backward_s"}


def test_accuracy_counts_matches():
    # identical towers output -> perfect in-batch matching; shuffled captions -> chance level
    from scalelab.gradcache import _matching_accuracy

    emb = torch.nn.functional.normalize(torch.randn(64, 8, dtype=torch.float64), dim=-1)
    assert _matching_accuracy(emb, emb, rows_per_chunk=64 * 5) == (1.0, 1.0)
    perm = torch.roll(torch.arange(64), 1)
    assert _matching_accuracy(emb, emb[perm], rows_per_chunk=64 * 3) == (0.0, 0.0)


# --------------------------------------------------------------------------- bad input
def _grads_snapshot(model):
    return {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()}


def _assert_unchanged(model, before):
    for k, p in model.named_parameters():
        if before[k] is None:
            assert p.grad is None, k
        else:
            assert torch.equal(p.grad, before[k]), k


@pytest.fixture
def primed(micro_model):
    """A model with some gradient already accumulated, to check nothing is added on error."""
    micro_model.zero_grad(set_to_none=True)
    images, tokens = _batch(micro_model, 6)
    cached_step(micro_model, images, tokens, micro_batch_size=3)
    return micro_model, _grads_snapshot(micro_model)


def test_batch_sizes_differ(primed):
    model, before = primed
    images, tokens = _batch(model, 6)
    with pytest.raises(ValueError, match="batch sizes differ: images has 6 samples, tokens has 5"):
        cached_step(model, images, tokens[:5], micro_batch_size=2)
    _assert_unchanged(model, before)


def test_empty_batch(primed):
    model, before = primed
    images, tokens = _batch(model, 6)
    with pytest.raises(ValueError, match="empty batch"):
        cached_step(model, images[:0], tokens[:0], micro_batch_size=2)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("micro", [0, -1])
def test_micro_batch_must_be_positive(primed, micro):
    model, before = primed
    images, tokens = _batch(model, 6)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        cached_step(model, images, tokens, micro_batch_size=micro)
    _assert_unchanged(model, before)


def test_non_finite_embeddings_accumulate_nothing(primed):
    model, before = primed
    images, tokens = _batch(model, 6)
    images[4, 0, 0, 0] = float("nan")
    expected = r"non-finite image embeddings in 1 of 6 samples \(first rows: \[4\]\)"
    with pytest.raises(NonFiniteError, match=expected):
        cached_step(model, images, tokens, micro_batch_size=2)
    _assert_unchanged(model, before)


def test_skip_mode_makes_no_backward_call_and_reports_the_loss(primed):
    model, before = primed
    images, tokens = _batch(model, 6)
    torch.manual_seed(7)
    cached_step(model, images, tokens, micro_batch_size=2)  # a good step, for its RNG use only
    rng_of_a_good_step = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    for name, grad in before.items():  # back to the primed gradients
        model.get_parameter(name).grad = None if grad is None else grad.clone()
    images[4, 0, 0, 0] = float("nan")
    calls = []
    torch.manual_seed(7)
    result = cached_step(model, images, tokens, micro_batch_size=2, backward=calls.append,
                         on_nonfinite="skip")
    assert result.skipped and calls == [] and result.backward_calls == 0
    assert result.nonfinite.startswith("non-finite image embeddings in 1 of 6 samples (first rows: [4])")
    assert math.isnan(result.loss) and result.image_accuracy is None
    assert result.logit_scale == pytest.approx(model.logit_scale.item())
    assert set(result.timings) == {"cache_forward_s", "loss_s", "replay_backward_s"}
    _assert_unchanged(model, before)
    # the cached forward ran and drew its dropout noise; the RNG moves on as after a good step
    assert torch.equal(torch.get_rng_state(), rng_of_a_good_step)


@pytest.mark.parametrize("mode", ["raise", "skip"])
def test_non_finite_loss_from_finite_embeddings(mode):
    torch.manual_seed(4)
    model = create_model("micro").double().train()
    with torch.no_grad():
        model.logit_scale.fill_(1e4)  # exp overflows: the embeddings are fine, the loss is not
    images, tokens = _batch(model, 6)
    if mode == "raise":
        with pytest.raises(NonFiniteError, match="the contrastive loss is (nan|inf)"):
            cached_step(model, images, tokens, micro_batch_size=3)
    else:
        result = cached_step(model, images, tokens, micro_batch_size=3, on_nonfinite="skip")
        assert result.skipped and result.nonfinite.startswith("the contrastive loss is")
        assert not math.isfinite(result.loss) and result.image_emb_norm == pytest.approx(1.0)
    assert all(p.grad is None for p in model.parameters())


def test_on_nonfinite_must_be_known(micro_model):
    images, tokens = _batch(micro_model, 4)
    with pytest.raises(ValueError, match="on_nonfinite must be one of raise, skip"):
        cached_step(micro_model, images, tokens, micro_batch_size=2, on_nonfinite="ignore")


def test_sigmoid_needs_a_bias(micro_model):
    images, tokens = _batch(micro_model, 4)
    with pytest.raises(ValueError, match="logit_bias=True"):
        cached_step(micro_model, images, tokens, micro_batch_size=2, loss="sigmoid")


# --------------------------------------------------------------------------- BatchNorm semantics
def _bn_model(norm):
    torch.manual_seed(3)
    image = {"timm_name": "resnet10t", "timm_kwargs": {}, "image_size": 32, "norm": norm}
    return create_model("micro", image=image).double().train()


def test_batchnorm_warns_and_matches_per_micro_batch_statistics():
    model = _bn_model("batch")
    images, tokens = _batch(model, 8)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    start = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked)) for m in bn]
    _, expected = _naive_grads(model, images, tokens, micro=4)
    after_reference = [(m.running_mean.clone(), m.running_var.clone()) for m in bn]
    for m, (mean, var, count) in zip(bn, start):  # rewind the reference's statistics updates
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.fill_(count)
    with pytest.warns(BatchNormCacheWarning, match="own statistics"):
        cached_step(model, images, tokens, micro_batch_size=4)
    _assert_same_grads(model, expected)
    # running statistics updated once per micro-batch (in the re-forward), as the reference did
    for m, (mean, var), (_, _, count) in zip(bn, after_reference, start):
        torch.testing.assert_close(m.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(m.num_batches_tracked) == count + 2


def test_group_norm_swap_is_exact_and_silent():
    model = _bn_model("group")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchNormCacheWarning)
        _cached_vs_naive(model, 8, micro=3)


# --------------------------------------------------------------------------- locked image tower (LiT)
def _locked_reference(model, images, tokens, text_micro):
    """The full-batch loss with the image embeddings of the frozen tower (computed without autograd)
    and the text tower encoded micro-batch by micro-batch in one graph; one backward."""
    model.zero_grad(set_to_none=True)
    n = images.shape[0]
    with torch.no_grad():
        img = model.encode_image(images)
    txt = torch.cat([model.encode_text(tokens[s]) for s in micro_batch_slices(n, text_micro)])
    logits = model.logit_scale.exp() * img @ txt.T
    rows = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)]).mean()
    cols = torch.stack([torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(n)]).mean()
    value = (rows + cols) / 2
    value.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return value.item(), grads


# frozen: the tower is locked for good (requires_grad False); else it unlocks later and keeps
# requires_grad, and the cached step must still leave it without a gradient.
@pytest.mark.parametrize(("batch", "micro", "text_micro", "frozen"),
                         [(12, 5, 4, True), (13, 13, 3, False), (10, 2, 10, True), (9, 4, 2, False)])
def test_locked_image_tower_gives_the_text_tower_the_full_batch_gradient(batch, micro, text_micro, frozen):
    torch.manual_seed(5)
    model = create_model("micro", **DROPOUT).double().train().lock_image_tower(True)
    if frozen:
        model.image_tower.requires_grad_(False)
    assert not model.image_tower.training and model.text_tower.training  # dropout off in the tower only
    images, tokens = _batch(model, batch, seed=1)
    torch.manual_seed(6)
    want_loss, expected = _locked_reference(model, images, tokens, text_micro)
    rng_after_reference = torch.get_rng_state()
    calls = []

    def backward(loss):
        calls.append(loss.detach())
        loss.backward()

    torch.manual_seed(6)
    result = cached_step(model, images, tokens, micro_batch_size=micro, text_micro_batch_size=text_micro,
                         backward=backward, lock_image=True)
    assert result.loss == pytest.approx(want_loss, rel=1e-12)
    assert result.replay_max_abs_diff == 0.0  # the text replay, dropout included
    assert torch.equal(torch.get_rng_state(), rng_after_reference)  # the locked tower drew no noise
    # one call per text micro-batch: the image tower is encoded once and never replayed
    assert len(calls) == result.backward_calls == math.ceil(batch / text_micro)
    assert result.image_micro_batches == math.ceil(batch / micro)
    assert all(p.grad is None for p in model.image_tower.parameters())
    assert all(name.startswith(("text_tower.", "temperature.")) for name in expected)
    _assert_same_grads(model, expected)

"""DualEncoder: embeddings, temperature module, clamp, overrides, checkpointing switch."""

import math

import pytest
import torch

from scalelab.config import MAX_LOGIT_SCALE
from scalelab.models import DualEncoder, create_model, get_spec


@pytest.fixture(scope="module")
def tiny() -> DualEncoder:
    torch.manual_seed(0)
    return create_model("tiny").eval()


def _batch(model: DualEncoder, n: int = 3):
    s, ctx = model.config.image_size, model.config.context_length
    tokens = torch.randint(1, model.config.vocab_size, (n, ctx))
    tokens[0, ctx // 2 :] = 0
    return torch.randn(n, 3, s, s), tokens


def test_config_fields(tiny):
    spec = get_spec("tiny")
    assert tiny.config == spec
    assert (tiny.config.image_size, tiny.config.vocab_size, tiny.config.context_length) == (32, 4096, 32)


def test_encoders_give_unit_embeddings(tiny):
    images, tokens = _batch(tiny)
    with torch.no_grad():
        img, txt = tiny.encode_image(images), tiny.encode_text(tokens)
        both = tiny(images, tokens)
    assert img.shape == txt.shape == (3, tiny.config.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert isinstance(both, tuple) and len(both) == 2
    torch.testing.assert_close(both[0], img, rtol=0, atol=0)
    torch.testing.assert_close(both[1], txt, rtol=0, atol=0)


def test_temperature_module(tiny):
    scale, bias = tiny.temperature()
    assert scale is tiny.logit_scale and bias is None and tiny.logit_bias is None
    assert scale.item() == pytest.approx(math.log(1 / 0.07))
    assert "temperature.logit_scale" in dict(tiny.named_parameters())
    with_bias = create_model("micro", logit_bias=True)
    scale, bias = with_bias.temperature()
    assert bias is with_bias.logit_bias and bias.item() == -10.0 and bias.requires_grad


def test_clamp():
    model = create_model("micro")
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    assert model.clamp_() is model
    assert model.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    assert model.logit_scale.requires_grad
    with torch.no_grad():
        model.logit_scale.fill_(1.0)
    model.clamp_()
    assert model.logit_scale.item() == 1.0


def test_overrides_reach_the_modules():
    model = create_model(
        "tiny", text={"dropout": 0.1}, image={"dropout": 0.1, "drop_path": 0.1},
        grad_checkpointing=True, logit_bias=True,
    )
    assert model.config.text.dropout == 0.1 and model.config.image.drop_path == 0.1
    assert model.config.image.timm_kwargs == get_spec("tiny").image.timm_kwargs  # merged, not replaced
    assert model.text_tower.grad_checkpointing and model.image_tower.backbone.grad_checkpointing
    assert model.logit_bias is not None
    model.set_grad_checkpointing(False)
    assert not model.text_tower.grad_checkpointing and not model.image_tower.backbone.grad_checkpointing


def test_changing_the_backbone_drops_the_old_timm_kwargs():
    spec = get_spec("micro", image={"timm_name": "resnet18"})
    assert spec.image.timm_kwargs == {} and spec.image.image_size == 32
    spec = get_spec("micro", image={"timm_name": "resnet18", "timm_kwargs": {"stem_width": 16}})
    assert spec.image.timm_kwargs == {"stem_width": 16}


def test_gradients_reach_both_towers():
    torch.manual_seed(0)
    model = create_model("micro").train()
    images, tokens = _batch(model)
    img, txt = model(images, tokens)
    (model.logit_scale.exp() * (img * txt).sum()).backward()
    for name, p in model.named_parameters():
        if name == "text_tower.token_embedding.weight":
            assert p.grad[0].abs().sum() == 0  # the padding row never moves
        assert p.grad is not None, name


def test_spec_round_trips_through_plain_dicts():
    # Ray and YAML turn the spec into JSON types (tuples become lists); the tower must still build.
    from scalelab.config import ModelSpec

    spec = ModelSpec.model_validate(get_spec("coat-tiny").to_dict())
    torch.manual_seed(0)
    model = DualEncoder(spec).eval()
    with torch.no_grad():
        assert model.encode_image(torch.randn(1, 3, 64, 64)).shape == (1, spec.embed_dim)


def test_a_locked_image_tower_stays_in_eval_mode():
    model = create_model("micro", image={"dropout": 0.5}).train()
    assert model.lock_image_tower(True) is model
    assert not model.image_tower.training and not model.image_tower.backbone.training
    model.train()
    assert model.training and model.text_tower.training and not model.image_tower.training
    model.eval().train()
    assert not any(m.training for m in model.image_tower.modules())
    model.lock_image_tower(False)
    assert all(m.training for m in model.image_tower.modules())  # back to the model's mode
    assert all(p.requires_grad for p in model.parameters())  # gradients are the trainer's business

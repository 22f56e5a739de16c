"""Weight-decay groups (expectations derived independently, by module type) and the optimizer factory."""

import pytest
import torch
from torch import nn

from scalelab.config import OptimConfig
from scalelab.models import create_model, get_spec
from scalelab.models.presets import build_model
from scalelab.train.optim import build_optimizer, param_groups

NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
MATRICES = (nn.Linear, nn.Conv2d, nn.Embedding)


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return create_model("micro")


def _names(model, params):
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for p in params]


def _expected(model):
    """(decay, no_decay) names from module types, not from the rule under test."""
    decay, no_decay = set(), set()
    for mname, module in model.named_modules():
        for attr, _ in module.named_parameters(recurse=False):
            name = f"{mname}.{attr}"
            if isinstance(module, NORMS) or attr == "bias" or mname == "temperature":
                no_decay.add(name)
            elif isinstance(module, MATRICES) and attr == "weight":
                decay.add(name)
    # the learned position tables (and ViT's class token, which timm exempts beside pos_embed)
    no_decay |= {"text_tower.positional_embedding", "image_tower.backbone.pos_embed",
                 "image_tower.backbone.cls_token"}
    return decay, no_decay


def test_every_parameter_in_exactly_one_group(micro):
    groups = param_groups(micro, 0.1)
    listed = [n for g in groups for n in _names(micro, g["params"])]
    assert len(listed) == len(set(listed))
    assert set(listed) == {n for n, p in micro.named_parameters() if p.requires_grad}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_no_decay_set_is_biases_norms_temperature_positions(micro):
    decay, no_decay = _expected(micro)
    assert decay.isdisjoint(no_decay)
    assert decay | no_decay == {n for n, _ in micro.named_parameters()}  # the expectation covers all
    groups = {g["name"]: set(_names(micro, g["params"])) for g in param_groups(micro, 0.1)}
    assert groups["no_decay"] == no_decay
    assert groups["decay"] == decay
    assert "text_tower.token_embedding.weight" in groups["decay"]


def test_logit_bias_and_batchnorm_groupnorm_are_exempt():
    model = build_model(get_spec("micro", logit_bias=True))
    model.extra = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.GroupNorm(2, 8))
    no_decay = set(_names(model, param_groups(model, 0.1)[1]["params"]))
    assert {"temperature.logit_bias", "temperature.logit_scale", "extra.0.bias", "extra.1.weight",
            "extra.1.bias", "extra.2.weight", "extra.2.bias"} <= no_decay
    assert "extra.0.weight" not in no_decay


def test_frozen_parameters_are_left_out_and_zero_decay_keeps_both_groups(micro):
    model = create_model("micro")
    model.text_tower.proj.weight.requires_grad_(False)
    groups = param_groups(model, 0.0)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert "text_tower.proj.weight" not in _names(model, [p for g in groups for p in g["params"]])


def test_adamw_decays_only_the_decay_group():
    model = create_model("micro")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=lr, weight_decay=wd))
    assert isinstance(opt, torch.optim.AdamW)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0/(0+eps) = 0: only the decay acts
    opt.step()
    decay, _ = _expected(model)
    for n, p in model.named_parameters():
        want = before[n] * (1 - lr * wd) if n in decay else before[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=n)
    assert not torch.equal(model.text_tower.proj.weight, before["text_tower.proj.weight"])


def test_adafactor_builds_and_steps():
    torch.manual_seed(0)
    model = create_model("micro")
    opt = build_optimizer(model, OptimConfig(name="adafactor", lr=1e-2, weight_decay=0.1))
    assert isinstance(opt, torch.optim.Adafactor)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    img = torch.randn(2, 3, 32, 32)
    tok = torch.randint(1, 100, (2, 8))
    i, t = model(img, tok)
    (model.logit_scale.exp() * (i @ t.T)).diagonal().sum().neg().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_a_module_with_an_lr_mult_gets_groups_of_its_own(micro):
    model = create_model("micro")
    plain = [(g["name"], len(g["params"])) for g in param_groups(model, 0.1)]
    model.image_tower.lr_mult = 0.5
    groups = param_groups(model, 0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay", "image_tower.decay", "image_tower.no_decay"]
    assert [g.get("lr_mult") for g in groups] == [None, None, 0.5, 0.5]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    by_group = {g["name"]: set(_names(model, g["params"])) for g in groups}
    image = {n for n, _ in model.named_parameters() if n.startswith("image_tower.")}
    assert by_group["image_tower.decay"] | by_group["image_tower.no_decay"] == image
    assert not image & (by_group["decay"] | by_group["no_decay"])
    # the decay rule is unchanged: a parameter decays in the tower's groups iff it did before
    decay, _ = _expected(model)
    assert by_group["decay"] | by_group["image_tower.decay"] == decay
    model.image_tower.lr_mult = None
    assert [(g["name"], len(g["params"])) for g in param_groups(model, 0.1)] == plain

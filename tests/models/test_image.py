"""Image towers: ViT / CoAtNet / ResNet build and encode, BatchNorm → GroupNorm swap, checkpointing."""

import pytest
import timm.models.vision_transformer as vit_mod
import torch
from timm.layers import BatchNormAct2d, GroupNormAct
from torch import nn

from scalelab.config import ConfigError, ImageTowerConfig
from scalelab.models import ImageTower, has_batchnorm, swap_batchnorm_for_groupnorm

VIT = ImageTowerConfig(
    timm_name="vit_tiny_patch16_224",
    timm_kwargs={"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    image_size=32,
)
# coatnet_pico_rw_224's code (C-C-T-T, BatchNorm in the conv stages), slimmed so it builds instantly.
COAT = ImageTowerConfig(
    timm_name="coatnet_pico_rw_224",
    timm_kwargs={"embed_dim": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "stem_width": [16, 32]},
    image_size=64,
)
RESNET = ImageTowerConfig(timm_name="resnet18", image_size=32)


def _tower(cfg: ImageTowerConfig, seed: int = 0, **update) -> ImageTower:
    torch.manual_seed(seed)
    return ImageTower(cfg.model_copy(update=update), embed_dim=16)


@pytest.mark.parametrize("cfg", [VIT, COAT, RESNET], ids=["vit", "coatnet", "resnet"])
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_towers_build_and_encode(cfg, norm):
    tower = _tower(cfg, norm=norm).train()
    out = tower(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (2, 16) and torch.isfinite(out).all()
    out.sum().backward()
    assert tower.proj.weight.grad is not None and tower.proj.bias is None
    expect_bn = norm == "batch" and cfg is not VIT
    assert has_batchnorm(tower) is expect_bn


def test_img_size_is_passed_only_where_taken():
    assert tuple(_tower(VIT).backbone.patch_embed.img_size) == (32, 32)
    assert tuple(_tower(COAT).backbone.img_size) == (64, 64)
    _tower(RESNET)  # ResNet rejects img_size; the tower retries without it


def test_groupnorm_swap_keeps_affine_parameters_activation_and_drop():
    torch.manual_seed(0)
    bn_act = BatchNormAct2d(48, act_layer=nn.GELU, drop_layer=nn.Dropout)
    model = nn.Sequential(nn.Conv2d(3, 48, 1), bn_act, nn.Sequential(nn.BatchNorm2d(20)))
    for bn in (model[1], model[2][0]):
        nn.init.normal_(bn.weight)
        nn.init.normal_(bn.bias)
    weights = [model[1].weight.clone(), model[2][0].weight.clone()]
    act, drop = bn_act.act, bn_act.drop
    swap_batchnorm_for_groupnorm(model)
    assert not has_batchnorm(model)
    gn_act, gn = model[1], model[2][0]
    assert isinstance(gn_act, GroupNormAct) and gn_act.num_groups == 16  # gcd(32, 48)
    assert gn_act.act is act and gn_act.drop is drop
    assert type(gn) is nn.GroupNorm and gn.num_groups == 4  # gcd(32, 20)
    assert torch.equal(gn_act.weight, weights[0]) and torch.equal(gn.weight, weights[1])


def test_groupnorm_is_per_sample():
    tower = _tower(RESNET, norm="group").double().train()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(tower(x)[:1], tower(x[:1]), rtol=1e-10, atol=1e-12)


def test_batchnorm1d_is_refused():
    with pytest.raises(ValueError, match="BatchNorm1d"):
        swap_batchnorm_for_groupnorm(nn.Sequential(nn.BatchNorm1d(4)))


@pytest.mark.parametrize("key", ["img_size", "pretrained", "num_classes"])
def test_reserved_timm_kwargs_are_refused(key):
    with pytest.raises(ConfigError, match=f"image.timm_kwargs: {key}"):
        _tower(VIT.model_copy(update={"timm_kwargs": {**VIT.timm_kwargs, key: 1}}))


def test_unknown_timm_name_is_a_config_error():
    with pytest.raises(ConfigError, match="image.timm_name"):
        _tower(VIT, timm_name="no_such_model_anywhere")


def _grads(tower: ImageTower, x: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    tower.zero_grad()
    (tower(x) ** 2).sum().backward()
    return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


def test_vit_checkpointing_gives_identical_gradients(monkeypatch):
    # drop_path and head dropout draw random numbers inside the blocks: checkpointing must replay them.
    kwargs = {**VIT.timm_kwargs, "proj_drop_rate": 0.1, "attn_drop_rate": 0.1}
    cfg = VIT.model_copy(update={"timm_kwargs": kwargs, "dropout": 0.2, "drop_path": 0.2})
    plain = _tower(cfg).double().train()
    ckpt = _tower(cfg).double().train()
    ckpt.set_grad_checkpointing(True)
    assert ckpt.backbone.grad_checkpointing and not plain.backbone.grad_checkpointing
    calls = []
    real = vit_mod.checkpoint_seq
    monkeypatch.setattr(vit_mod, "checkpoint_seq", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    want, got = _grads(plain, x), _grads(ckpt, x)
    assert calls == [1]  # only the checkpointed tower went through timm's checkpoint_seq
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=1e-14, msg=name)
    with torch.no_grad():  # dropout is really active: two draws differ
        assert not torch.equal(plain(x), plain(x))

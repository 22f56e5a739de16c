"""Pretrained image-tower weights: files written from a timm model or a DualEncoder, read with timm's
helper and matched by key; anything that does not fit is refused with the offending keys named."""

from __future__ import annotations

import pytest
import safetensors.torch
import timm
import torch

from scalelab.models import create_model, load_image_weights, match_image_weights, read_weights_file

MICRO_TRUNK = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # the micro preset's ViT


def _timm_state(num_classes: int = 10, **changes) -> dict[str, torch.Tensor]:
    """A timm ViT's state dict as someone would have saved it (a 10-class head by default)."""
    torch.manual_seed(11)
    kwargs = {**MICRO_TRUNK, **changes}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                              **kwargs)
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def _tower():
    torch.manual_seed(0)
    return create_model("micro").image_tower


def _write(path, state, kind: str = "plain"):
    """`state` written as safetensors, a plain torch file, a training checkpoint's {"state_dict": ...}
    wrapper, or with DDP's "module." prefixes (the wrappers timm's reader unwraps)."""
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, str(path))
    elif kind == "wrapped":
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif kind == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize(("name", "kind"), [("trunk.safetensors", "plain"), ("trunk.pth", "plain"),
                                            ("trunk.pt", "wrapped"), ("trunk.bin", "ddp")])
def test_a_timm_trunk_file_loads_into_the_backbone(tmp_path, name, kind):
    state = _timm_state()
    tower = _tower()
    proj = tower.proj.weight.detach().clone()
    loaded = load_image_weights(tower, read_weights_file(_write(tmp_path / name, state, kind)))
    assert loaded is tower.backbone
    got = tower.backbone.state_dict()
    assert sorted(got) == sorted(k for k in state if not k.startswith("head."))  # the classifier dropped
    assert all(torch.equal(got[k], state[k]) for k in got)
    assert torch.equal(tower.proj.weight, proj)  # the projection keeps its initialisation


def test_scalelab_keys_load_the_whole_tower_and_ignore_the_rest(tmp_path):
    torch.manual_seed(5)
    source = create_model("micro")
    path = _write(tmp_path / "model.pt", source.state_dict())  # what `scalelab export` writes
    tower = _tower()
    assert load_image_weights(tower, read_weights_file(path)) is tower
    want = source.image_tower.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in tower.state_dict().items())


def test_a_meta_device_tower_is_checked_by_shape_alone():
    with torch.device("meta"):
        tower = create_model("micro").image_tower
    target, mapped = match_image_weights(tower, _timm_state())
    assert target is tower.backbone and "head.weight" not in mapped


def test_wrong_shapes_are_refused_with_the_keys_named():
    state = _timm_state(embed_dim=48)  # a wider ViT: every tensor but a few has another shape
    with pytest.raises(ValueError) as error:
        match_image_weights(_tower(), state)
    text = str(error.value)
    assert text.startswith("timm trunk weights do not fit the image tower (vit_tiny_patch16_224, 32 px)")
    assert ": 30 key(s) with another shape: blocks.0.attn.proj.bias (file (48,), tower (32,)), " in text
    assert text.endswith(" and 27 more") and "missing" not in text and "unexpected" not in text


def test_missing_and_unexpected_keys_are_counted(tmp_path):
    state = {f"image_tower.{k}": v for k, v in _tower().state_dict().items()}
    for key in ("image_tower.proj.weight", "image_tower.backbone.norm.bias"):
        del state[key]
    state["image_tower.backbone.extra.weight"] = torch.zeros(2)
    with pytest.raises(ValueError) as error:
        match_image_weights(_tower(), state)
    text = str(error.value)
    assert "scalelab image-tower weights do not fit" in text
    assert "2 missing key(s): image_tower.backbone.norm.bias, image_tower.proj.weight" in text
    assert "1 unexpected key(s): image_tower.backbone.extra.weight" in text


def test_another_architecture_is_refused():
    torch.manual_seed(0)
    resnet = timm.create_model("resnet10t", pretrained=False, num_classes=0).state_dict()
    with pytest.raises(ValueError, match=r"missing key\(s\): .* unexpected key\(s\): "):
        match_image_weights(_tower(), resnet)


def test_files_that_are_not_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_weights_file(tmp_path / "absent.safetensors")
    npz = tmp_path / "weights.npz"
    npz.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown weights format '.npz'; allowed: .safetensors, .pt"):
        read_weights_file(npz)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="broken.pt could not be read as weights"):
        read_weights_file(broken)
    torch.save({"lr": 0.1}, tmp_path / "hparams.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        read_weights_file(tmp_path / "hparams.pt")

"""ImageClassifier: logits, the head's init, and the `image_tower.*` keys a same-preset DualEncoder loads."""

import math

import torch

from scalelab.config import ExperimentConfig, validate
from scalelab.models import ImageClassifier, create_classifier, create_model, model_for


def test_logits_shape_and_uniform_start():
    torch.manual_seed(0)
    model = create_classifier("micro", 23).eval()
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, 23)
    assert float(logits.std()) < 0.5  # a small head: no class is favoured much at first
    sigmoid = create_classifier("micro", 23, head="sigmoid")
    torch.testing.assert_close(torch.sigmoid(sigmoid.head.bias), torch.full((23,), 1 / 23))


def test_image_tower_keys_load_into_a_dual_encoder_of_the_same_preset():
    torch.manual_seed(1)
    classifier = create_classifier("coat-tiny", 10)
    tower = {k: v for k, v in classifier.state_dict().items() if k.startswith("image_tower.")}
    rest = {k for k in classifier.state_dict() if not k.startswith("image_tower.")}
    assert rest == {"head.weight", "head.bias"}
    torch.manual_seed(2)
    dual = create_model("coat-tiny")
    assert set(tower) == {k for k in dual.state_dict() if k.startswith("image_tower.")}
    missing, unexpected = dual.load_state_dict(tower, strict=False)
    assert not unexpected and all(not k.startswith("image_tower.") for k in missing)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        classifier.eval(), dual.eval()
        torch.testing.assert_close(dual.image_tower(images), classifier.image_tower(images))


def test_model_for_follows_the_task():
    cfg = validate(ExperimentConfig, {"task": "classify", "model": {"preset": "micro"},
                                      "data": {"labels": {"num_classes": 7}}})
    model = model_for(cfg)
    assert isinstance(model, ImageClassifier) and model.num_classes == 7
    assert math.isclose(float(model.head.bias.abs().sum()), 0.0)  # softmax: no prior needed

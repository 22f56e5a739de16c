"""Zero-shot eval: prompt ensembles, top-k and per-class recall against naive references, ImageFolder sets."""

import io
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from scalelab.eval import datasets as ds
from scalelab.eval.zeroshot import class_embeddings, eval_mode, evaluate_sets, zeroshot_classify


class FakeTokenizer:
    """Gives each distinct string an id (first column); the fake model looks the string back up."""

    def __init__(self):
        self.texts: list[str] = []

    def encode_batch(self, texts, context_length):
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, t in enumerate(texts):
            if t not in self.texts:
                self.texts.append(t)
            out[row, 0] = self.texts.index(t) + 1
        return out


class FakeModel(nn.Module):
    """encode_text = text_fn(string); encode_image = first D values of the flattened image (float64)."""

    def __init__(self, tokenizer, text_fn, dim):
        super().__init__()
        self.config = SimpleNamespace(context_length=4, image_size=4)
        self.tok, self.text_fn, self.dim = tokenizer, text_fn, dim
        self.head = nn.Dropout(0.5)  # a submodule whose mode we can check
        self.seen_training: list[bool] = []

    def encode_text(self, tokens):
        self.seen_training.append(self.training)
        return torch.stack([self.text_fn(self.tok.texts[int(i) - 1]) for i in tokens[:, 0]])

    def encode_image(self, images):
        self.seen_training.append(self.training)
        return images.flatten(1)[:, : self.dim]


def _random_text_fn(dim, seed=0):
    def fn(text):
        rng = np.random.default_rng([seed, *text.encode()])
        return torch.from_numpy(rng.normal(size=dim))

    return fn


def _images(emb):
    """[N, D] float64 embeddings → [N, 3, 4, 4] images whose first D flattened values are emb."""
    out = torch.zeros(len(emb), 3 * 16, dtype=torch.float64)
    out[:, : emb.shape[1]] = emb
    return out.reshape(len(emb), 3, 4, 4)


def _class_fn(classnames, dim, noise=0.05):
    """Every prompt of class c ≈ e_c (small per-prompt noise, so the ensemble is non-trivial)."""
    noisy = _random_text_fn(dim, seed=1)

    def fn(text):
        c = next(i for i, name in enumerate(classnames) if f"<{name}>" in text)
        return torch.nn.functional.one_hot(torch.tensor(c), dim).double() + noise * noisy(text)

    return fn


def test_prompt_ensemble_equals_naive_average():
    tok, names = FakeTokenizer(), ["cat", "dog", "red fox"]
    templates = ["a {c}.", "the {c}", "{c}!", "x {c} y"]
    model = FakeModel(tok, _random_text_fn(6), 6)
    got = class_embeddings(model, tok, names, templates, batch_size=5)  # batches straddle classes
    fn = _random_text_fn(6)
    for c, name in enumerate(names):
        vecs = [fn(t.replace("{c}", name)) for t in templates]
        mean = sum(v / v.norm() for v in vecs) / len(vecs)
        torch.testing.assert_close(got[c], mean / mean.norm(), rtol=0, atol=1e-12)


def test_exact_class_vectors_give_perfect_scores_and_restore_mode():
    names = ["a", "b", "c", "d", "e", "f", "g"]
    tok = FakeTokenizer()
    model = FakeModel(tok, _class_fn(names, 8), 8)
    model.train()
    model.head.eval()  # a mixed-mode model must come back exactly as it was
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 2, 0])
    images = _images(torch.nn.functional.one_hot(labels, 8).double())
    got = zeroshot_classify(model, tok, images, labels, names, ["<{c}>", "photo <{c}>"], batch_size=3)
    assert got == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    assert model.training and not model.head.training
    assert model.seen_training and not any(model.seen_training)


def test_permuted_classes_give_the_exact_fraction():
    names = [str(i) for i in range(6)]
    perm = torch.tensor([0, 1, 3, 2, 5, 4])  # classes 0, 1 right, the rest swapped
    labels = torch.arange(6).repeat(3)
    tok = FakeTokenizer()
    model = FakeModel(tok, _class_fn(names, 6, noise=0.0), 6)
    images = _images(torch.nn.functional.one_hot(perm[labels], 6).double())
    got = zeroshot_classify(model, tok, images, labels, names, ["<{c}>"])
    assert got["top1"] == pytest.approx(2 / 6) and got["mean_per_class_recall"] == pytest.approx(2 / 6)
    # Only the predicted class scores 1, the rest tie at 0: ties count against the true class.
    assert got["top5"] == pytest.approx(2 / 6)


def _naive(scores, labels, c):
    order = np.argsort(-scores, axis=1)
    pos = np.array([list(order[i]).index(labels[i]) for i in range(len(labels))])
    per_class = [np.mean(pos[labels == k] < 1) for k in range(c) if np.any(labels == k)]
    return {"top1": np.mean(pos < 1), "top5": np.mean(pos < min(5, c)),
            "mean_per_class_recall": np.mean(per_class)}


@pytest.mark.parametrize("n_classes", [3, 9])
def test_random_embeddings_match_naive_topk(n_classes):
    rng = np.random.default_rng(n_classes)
    names, templates = [f"k{i}" for i in range(n_classes)], ["<{c}>", "a <{c}>"]
    tok = FakeTokenizer()
    model = FakeModel(tok, _random_text_fn(5, seed=3), 5)
    labels = torch.from_numpy(rng.integers(0, n_classes - 1, size=23))  # last class has no images
    img = torch.from_numpy(rng.normal(size=(23, 5)))
    got = zeroshot_classify(model, tok, _images(img), labels, names, templates, batch_size=4)
    cls = class_embeddings(model, tok, names, templates).numpy()
    img_n = img.numpy() / np.linalg.norm(img.numpy(), axis=1, keepdims=True)
    want = _naive(img_n @ cls.T, labels.numpy(), n_classes)
    assert got == pytest.approx(want, abs=1e-12)
    assert got["top5"] >= got["top1"]
    if n_classes <= 5:
        assert got["top5"] == 1.0


def test_mean_per_class_recall_differs_from_top1_on_imbalanced_sets():
    names = ["a", "b"]
    tok = FakeTokenizer()
    model = FakeModel(tok, _class_fn(names, 2, noise=0.0), 2)
    labels = torch.tensor([0] * 8 + [1] * 2)
    pred = torch.tensor([0] * 8 + [0, 1])  # class 0: 8/8, class 1: 1/2
    images = _images(torch.nn.functional.one_hot(pred, 2).double())
    got = zeroshot_classify(model, tok, images, labels, names, ["<{c}>"])
    assert got["top1"] == pytest.approx(9 / 10)
    assert got["mean_per_class_recall"] == pytest.approx((1.0 + 0.5) / 2)


def test_eval_mode_restores_after_an_error():
    model = FakeModel(FakeTokenizer(), _random_text_fn(2), 2).train()
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not model.training and not torch.is_grad_enabled()
        raise RuntimeError
    assert model.training and model.head.training and torch.is_grad_enabled()


# --------------------------------------------------------------------------- ImageFolder loading
def _folder(root, classes=("b_cls", "a_cls"), names="alpha\nbeta\n", templates="a {c}.\n"):
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(k + 1):
            Image.new("RGB", (10, 6), (40 * k, 10 * j, 200)).save(root / cls / f"{j}.png")
    if names is not None:
        (root / "classnames.txt").write_text(names)
    if templates is not None:
        (root / "templates.txt").write_text(templates)
    return root


def test_load_image_folder_labels_in_sorted_folder_order(tmp_path):
    data = ds.load_image_folder(_folder(tmp_path / "set"), 4)
    assert data.images.shape == (3, 3, 4, 4) and data.images.dtype == torch.float32
    assert data.labels.tolist() == [0, 0, 1]  # a_cls (2 images) first, then b_cls (1)
    assert data.classnames == ["alpha", "beta"] and data.templates == ["a {c}."]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"templates": None}, FileNotFoundError, "templates.txt"),
        ({"templates": "a photo.\n"}, ValueError, "no placeholder"),
        ({"templates": "a {} or a {c}.\n"}, ValueError, "2 placeholders"),
        ({"names": "only one\n"}, ValueError, "1 class names for 2 class folders"),
    ],
)
def test_bad_image_folders_give_clear_errors(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match.replace("{", r"\{").replace("}", r"\}")):
        ds.load_image_folder(_folder(tmp_path / "set", **kwargs), 4)


def test_class_names_default_to_the_folder_names(tmp_path):
    data = ds.load_image_folder(_folder(tmp_path / "set", names=None, templates="a photo of a {}.\n"), 4)
    assert data.classnames == ["a cls", "b cls"] and data.templates == ["a photo of a {c}."]


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval set directory not found"):
        ds.load_image_folder(tmp_path / "nope", 4)


def test_preprocessing_matches_the_training_pipeline():
    pipeline = pytest.importorskip("scalelab.data.pipeline")  # imports Ray: only the test may
    assert ds.CLIP_MEAN == pipeline.CLIP_MEAN and ds.CLIP_STD == pipeline.CLIP_STD
    # The pipeline's eval branch (no RowAugment), without building its tokenizer-loading decoder.
    decode = object.__new__(pipeline._Decode)
    decode.size, decode.augment = 8, None
    rgb = np.random.default_rng(0).integers(0, 256, size=(13, 21, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    want = decode._image(buf.getvalue(), 0)
    got = ds.preprocess_eval(Image.open(io.BytesIO(buf.getvalue())), 8)
    assert got.dtype == np.float32 and got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from scalelab.data.synth import generate_world
    from scalelab.data.tokenizer import load_tokenizer, train_tokenizer
    from scalelab.models import create_model

    root = tmp_path_factory.mktemp("world")
    generate_world(root, n_pairs=60, eval_per_class=2, retrieval_pairs=20, progress=False)
    train_tokenizer([root], vocab_size=200)
    torch.manual_seed(0)
    return root, load_tokenizer(root), create_model("micro")


def test_end_to_end_on_a_synthetic_world(world):
    from scalelab.eval.retrieval import evaluate_retrieval

    root, tok, model = world
    model.train()
    names = sorted(p.name for p in (root / "eval").iterdir() if (p / "classnames.txt").is_file())
    shifted = ["sketch", "texture", "hard"]
    got = evaluate_sets(model, tok, {n: root / "eval" / n for n in names}, shifted=shifted, batch_size=64)
    got.update(evaluate_retrieval(model, tok, root / "eval" / "retrieval", batch_size=8))
    want = {f"eval/zeroshot/{n}/{m}" for n in names for m in ("top1", "top5", "mean_per_class_recall")}
    want |= {"eval/zeroshot/robustness_avg/top1"}
    want |= {f"eval/retrieval/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert set(got) == want
    assert all(0.0 <= v <= 1.0 and math.isfinite(v) for v in got.values())
    avg = np.mean([got[f"eval/zeroshot/{s}/top1"] for s in shifted])
    assert got["eval/zeroshot/robustness_avg/top1"] == pytest.approx(avg)
    assert model.training


def test_evaluate_sets_rejects_unknown_shifted_sets(world):
    root, tok, model = world
    with pytest.raises(ValueError, match="not among the evaluated sets"):
        evaluate_sets(model, tok, {"test": root / "eval" / "test"}, shifted=["hard"])


def test_eval_loads_no_framework():
    code = ("import sys, scalelab.eval\n"
            "print(','.join(m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""

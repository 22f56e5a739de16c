"""`DataStream` (train/stream.py), the training loop's batches, on local Ray Data: with `data.cache` it
gives the Ray Data stream's batches bit for bit across epoch switches, and a stream rebuilt from its
`state()` mid-epoch (what a resumed run does) continues with the very batches the first one would have
given. (The Ray Data and cached epochs themselves: tests/data/pipeline; a whole run with the cache:
tests/test_own_data.py.)"""

from __future__ import annotations

import pytest
import torch

from scalelab.train.checkpoint import RankState
from scalelab.train.stream import DataStream

pytestmark = pytest.mark.slow

STEPS, RESUME_AT = 10, 6  # 4 batches per epoch and rank: three epoch switches, a resume mid-epoch 1


def _batches(stream: DataStream, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The next `n` batches; the stream is closed after them (mid-epoch: its Ray Data execution ends)."""
    try:
        return [(b.images, b.tokens) for b in (stream.next() for _ in range(n))]
    finally:
        stream.close()


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for i, ((images, tokens), (images_ref, tokens_ref)) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(images, images_ref) and torch.equal(tokens, tokens_ref), f"batch {i}"


@pytest.mark.parametrize("rank", [0, 1])
def test_cached_stream_equals_the_ray_data_stream_and_resumes_alike(smoke_config, tmp_path, local_ray, rank):
    def config(cache: bool):
        return smoke_config(tmp_path, {"data": {"n_pairs": 256, "augment": False, "cache": cache}})

    streamed = DataStream(config(False), rank, 2, RankState())
    want = _batches(streamed, STEPS)
    assert streamed.epoch == 2 and len({t.sum().item() for _, t in want}) == STEPS  # distinct batches

    cached = DataStream(config(True), rank, 2, RankState())
    first = [(b.images, b.tokens) for b in (cached.next() for _ in range(RESUME_AT))]
    _assert_same(first, want[:RESUME_AT])
    state = cached.state()
    cached.close()
    assert (state.epoch, state.epoch_samples) == (1, (RESUME_AT - 4) * 32)
    for cache in (True, False):
        resumed = DataStream(config(cache), rank, 2, state)
        _assert_same(_batches(resumed, STEPS - RESUME_AT), want[RESUME_AT:])

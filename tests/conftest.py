"""Shared fixtures. Nothing here touches the GPU at import or collection time: the `gpu` marker
is evaluated when a test is set up, and skips with the reason the registry would give."""

from __future__ import annotations

import pytest
import torch

from kernels.testing import triton_test_device


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (GPU lane, `make test-gpu`)")
    config.addinivalue_line("markers", "slow: long-running; still part of `make test`")


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("no CUDA device: torch.cuda.is_available() is False")


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Fixed seed, and one intra-op thread: test shapes are tiny, and on shared 2-core CI machines
    more threads only add contention (a tiny training step ran 25x slower with two)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def triton_device() -> str:
    """'cuda' on a GPU machine, 'cpu' under TRITON_INTERPRET=1, otherwise the test is skipped."""
    device, reason = triton_test_device()
    if device is None:
        pytest.skip(reason)
    return device


def save_tiny_clip_tokenizer(folder) -> None:
    """A character-level CLIP BPE tokenizer (no merges, vocabulary of 54 like the tiny CLIP
    models of the tests) built offline and saved into ``folder``."""
    import inspect
    import json
    import string
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5
        tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
            (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
            tokenizer = CLIPTokenizer(vocab_file=str(Path(tmp) / "vocab.json"),
                                      merges_file=str(Path(tmp) / "merges.txt"))
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def clip_tokenizer_saver():
    """``clip_tokenizer_saver(folder)``: :func:`save_tiny_clip_tokenizer`."""
    return save_tiny_clip_tokenizer

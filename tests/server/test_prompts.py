"""Prompts through a real (tiny, random) Gemma-2 text encoder loaded from a local folder by the server."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pidserve.client import Client
from pidserve.engines import DecodeBatch, open_engine
from pidserve.model import PiDConfig, PiDNet, save_checkpoint

pytest.importorskip("transformers")
from pidserve.model.text import TextEncoder
from tests.model.test_text import HIDDEN, _build_model, _build_tokenizer

from .conftest import live_server


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A tiny PiD checkpoint with text conditioning, and a Gemma-2 folder for its prompts."""
    folder = tmp_path_factory.mktemp("text")
    tokenizer = _build_tokenizer()
    tokenizer.save_pretrained(folder / "gemma")
    _build_model(tokenizer).save_pretrained(folder / "gemma")
    cfg = dataclasses.replace(PiDConfig.preset("tiny_v1"), text_dim=HIDDEN)
    torch.manual_seed(0)
    net = PiDNet(cfg).eval()
    save_checkpoint(net, folder / "tiny.safetensors")
    return folder, net


def test_prompt_and_empty_prompt_match_the_encoder(text_model) -> None:
    folder, net = text_model
    encoder = TextEncoder.from_pretrained(str(folder / "gemma"), max_tokens=net.cfg.text_max_length)
    engine = open_engine("torch", net=net, max_batch=1)
    x = torch.randn(1, net.cfg.latent_channels, 2, 2, generator=torch.Generator().manual_seed(1))

    def expected(text: torch.Tensor) -> np.ndarray:
        return engine.decode(DecodeBatch(x, torch.zeros(1), torch.tensor([3]), text.float())).images.numpy()

    with (
        live_server(checkpoint=str(folder / "tiny.safetensors"), text_encoder=str(folder / "gemma")) as live,
        Client(live.url) as client,
    ):
        assert client.models()["models"][0]["prompts"] is True
        # warm-up already ran the shape every request will have: the network's text length (16 here)
        warm = live.engine.seen_text[0]
        assert warm is not None and warm.shape == (1, 16, HIDDEN)
        cat = client.decode(x, seed=3, prompt="a cat", format="raw").images()
        cat_again = client.decode(x, seed=3, prompt="a cat", format="raw").images()  # from the LRU cache
        dog = client.decode(x, seed=3, prompt="a dog", format="raw").images()
        none = client.decode(x, seed=3, format="raw").images()
        texts = live.engine.seen_text[-4:]
    np.testing.assert_array_equal(cat, expected(encoder.encode(["a cat"])))
    np.testing.assert_array_equal(cat_again, cat)
    np.testing.assert_array_equal(dog, expected(encoder.encode(["a dog"])))
    np.testing.assert_array_equal(none, expected(encoder.empty()))
    # what reached the engine: the network's text length (16 here), exactly the encoder's features
    for text, prompt in zip(texts, ["a cat", "a cat", "a dog", None], strict=True):
        want = encoder.encode([prompt]) if prompt else encoder.empty()
        assert text is not None and text.shape == (1, 16, HIDDEN)
        torch.testing.assert_close(text, want.float(), rtol=0, atol=0)


def test_a_pinned_attention_kernel_keeps_the_text_encoder_off_sdpa(text_model, monkeypatch) -> None:
    # The pin is process-wide (engines/attention.py): prompts encoded on another thread mid-decode would
    # see it. With a pinned kernel the server loads the encoder with eager attention; with auto, as is.
    folder, net = text_model
    x = torch.randn(1, net.cfg.latent_channels, 2, 2, generator=torch.Generator().manual_seed(1))
    asked: list[str | None] = []
    real_load = TextEncoder.from_pretrained.__func__

    def recording_load(cls, *args, **kwargs):
        asked.append(kwargs.get("attn_implementation"))
        return real_load(cls, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "from_pretrained", classmethod(recording_load))
    for choice in ("auto", "math"):
        with (
            live_server(
                checkpoint=str(folder / "tiny.safetensors"),
                text_encoder=str(folder / "gemma"),
                attention_backend=choice,
            ) as live,
            Client(live.url) as client,
        ):
            encoder = live.loader.prompts.encoder
            if choice == "math":
                assert encoder._model.config._attn_implementation == "eager"
            assert client.decode(x, seed=3, prompt="a cat", format="raw").images().shape == (1, 64, 64, 3)
    assert asked == [None, "eager"]

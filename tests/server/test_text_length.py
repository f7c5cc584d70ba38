"""An engine built for a fixed text length (ONNX, TensorRT: `--text-tokens`) gets exactly that text.

The engine is a small stand-in: its capabilities declare one text length, and its decode refuses any
other through EngineCapabilities.check, as the built backends do. A stand-in text encoder gives the
prompt embeddings (no Gemma-2 needed); the network is the embedded default (text length 16).
"""

from __future__ import annotations

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors

from pidserve.engines import DecodeBatch, DecodeResult, Engine, EngineCapabilities, EngineConfigError
from pidserve.server.loader import request_text_tokens
from pidserve.server.prompts import PromptEncoder

from .conftest import MODEL, latent, live_server

ST = {"Content-Type": "application/x-safetensors"}


class FixedTextEngine(Engine):
    """Grey images; every batch must carry exactly `tokens` text tokens."""

    backend = "fixed-text"

    def __init__(self, net, tokens: int) -> None:
        cfg = net.cfg
        self._caps = EngineCapabilities(
            backend=self.backend,
            device="cpu",
            precision="fp32",
            latent_channels=cfg.latent_channels,
            latent_space=cfg.latent_space,
            text_dim=cfg.text_dim,
            output_scale=cfg.output_scale,
            max_batch=2,
            text_tokens=(tokens,),
        )
        self.texts: list[torch.Tensor | None] = []  # the text of every batch decoded, warm-up first

    @property
    def capabilities(self) -> EngineCapabilities:
        return self._caps

    def decode(self, batch: DecodeBatch) -> DecodeResult:
        self._caps.check(batch)
        self.texts.append(batch.text)
        height, width = self._caps.image_size(batch.latents.shape[-2:])
        return DecodeResult(torch.full((batch.size, height, width, 3), 128, dtype=torch.uint8))


class StandInTextEncoder:
    """model.text.TextEncoder's two calls; a prompt's embedding holds its length in characters."""

    def __init__(self, tokens: int, dim: int) -> None:
        self.tokens, self.dim = tokens, dim

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.stack([torch.full((self.tokens, self.dim), float(len(p))) for p in prompts])

    def empty(self) -> torch.Tensor:
        return torch.zeros(1, self.tokens, self.dim)


def _factory(engines: list[FixedTextEngine]):
    """Opens a FixedTextEngine built for the network's own text length (what --text-tokens would be)."""

    def open_engine(settings, net) -> Engine:
        engines.append(FixedTextEngine(net, net.cfg.text_max_length))
        return engines[-1]

    return open_engine


def _post(url: str, **params) -> httpx.Response:
    body = save_safetensors({"latent": latent()})
    return httpx.post(
        f"{url}/v1/decode", params={"format": "raw", **params}, content=body, headers=ST, timeout=60
    )


def test_requests_carry_the_text_length_the_engine_was_built_for(monkeypatch) -> None:
    engines: list[FixedTextEngine] = []

    def load(cls, source, *, max_tokens: int, model_name: str, **_) -> PromptEncoder:
        return cls(StandInTextEncoder(max_tokens, engines[-1].capabilities.text_dim), model_name=model_name)

    monkeypatch.setattr(PromptEncoder, "load", classmethod(load))
    settings = {"text_encoder": "a Gemma-2 stand-in", "png_encoder": "pillow", "encode_workers": 1}
    with live_server(engine_factory=_factory(engines), **settings) as live:
        engine = engines[-1]
        (tokens,), dim = engine.capabilities.text_tokens, engine.capabilities.text_dim
        assert tokens == 16
        # the warm-up ran every served batch size with the requests' text shape
        assert [tuple(t.shape) for t in engine.texts] == [(1, tokens, dim), (2, tokens, dim)]
        warmed = len(engine.texts)
        with_prompt = _post(live.url, prompt="a cat", seed=1)
        without = _post(live.url, seed=2)
        latent_input = {"name": "latent", "shape": [1, 16, 2, 2], "datatype": "FP32", "data": [0.0] * 64}
        infer = httpx.post(
            f"{live.url}/v2/models/{MODEL}/infer",
            json={"inputs": [latent_input], "parameters": {"prompt": "a tabby cat"}},
            timeout=60,
        )
        texts = engine.texts[warmed:]
    for response in (with_prompt, without, infer):
        assert response.status_code == 200, response.text[:300]
    assert infer.json()["outputs"][0]["shape"] == [1, 64, 64, 3]
    expected = [
        torch.full((1, tokens, dim), 5.0),
        torch.zeros(1, tokens, dim),
        torch.full((1, tokens, dim), 11.0),
    ]
    assert len(texts) == len(expected)
    for text, want in zip(texts, expected, strict=True):
        assert text is not None
        torch.testing.assert_close(text, want, rtol=0, atol=0)


def test_without_a_text_encoder_the_load_fails_and_names_the_fix() -> None:
    engines: list[FixedTextEngine] = []
    settings = {"png_encoder": "pillow", "encode_workers": 1}
    with live_server(wait_ready=False, engine_factory=_factory(engines), **settings) as live:
        assert not live.loader.wait_loaded(timeout=60)
        failure = live.loader.failure
        assert "--text-encoder" in failure and "--text-tokens 0" in failure, failure
        assert httpx.get(f"{live.url}/v2/health/live").status_code == 503
        response = _post(live.url)
        assert response.status_code == 503 and "--text-encoder" in response.json()["error"]["message"]
    assert engines[-1].texts == []  # refused before the warm-up


def _caps(text_tokens: tuple[int, ...] | None) -> EngineCapabilities:
    return EngineCapabilities(
        backend="onnxruntime", device="cpu", precision="fp32", latent_channels=16, latent_space="tiny-ae",
        text_dim=32, output_scale=32, max_batch=1, text_tokens=text_tokens,
    )  # fmt: skip


def test_request_text_tokens() -> None:
    assert request_text_tokens(_caps(None), 16, prompts=True) == 16  # torch: any length
    assert request_text_tokens(_caps(None), 16, prompts=False) == 0
    assert request_text_tokens(_caps((16,)), 16, prompts=True) == 16
    assert request_text_tokens(_caps((0,)), 16, prompts=False) == 0
    with pytest.raises(EngineConfigError, match="rebuild it with --text-tokens 16"):
        request_text_tokens(_caps((0,)), 16, prompts=True)
    with pytest.raises(EngineConfigError, match="--text-encoder"):
        request_text_tokens(_caps((16,)), 16, prompts=False)

"""Prompts -> text embeddings for models with text conditioning.

With a text encoder configured (`PIDSERVE_TEXT_ENCODER`: a Gemma-2 directory or hub id), a prompt is encoded
through model.text.TextEncoder, whose LRU cache keeps recent prompts, and a request without a prompt uses
the cached empty-prompt embedding, as the official pipeline does. Without one, the network runs with no
text tokens, and a request with a prompt is refused (422) rather than silently decoded without it.
"""

from __future__ import annotations

import logging
import threading

import torch

from .errors import unprocessable

log = logging.getLogger(__name__)


class PromptEncoder:
    def __init__(self, encoder=None, *, model_name: str = "the model") -> None:
        self.encoder = encoder  # a pidserve.model.text.TextEncoder, or None
        self.model_name = model_name
        self._lock = threading.Lock()  # the encoder and its cache are not thread-safe

    @classmethod
    def load(
        cls,
        source: str | None,
        *,
        device: str,
        cache_size: int,
        max_tokens: int,
        model_name: str,
        attn_implementation: str | None = None,
    ) -> PromptEncoder:
        """`max_tokens`: the network's text length (the official models: 300). `attn_implementation`:
        the transformers attention of the encoder (None: its default)."""
        if source is None:
            return cls(None, model_name=model_name)
        from pidserve.model import TextEncoder

        log.info(
            "loading text encoder %s on %s (attention: %s)", source, device, attn_implementation or "default"
        )
        encoder = TextEncoder.from_pretrained(
            source,
            device=device,
            cache_size=cache_size,
            max_tokens=max_tokens,
            attn_implementation=attn_implementation,
        )
        return cls(encoder, model_name=model_name)

    @property
    def enabled(self) -> bool:
        return self.encoder is not None

    def check(self, prompt: str | None) -> None:
        """Refuse a prompt the server cannot honour (before any work is queued)."""
        if prompt and not self.enabled:
            raise unprocessable(
                f"{self.model_name} is served without a text encoder, so it cannot take a prompt; "
                "omit 'prompt' (or start the server with --text-encoder)"
            )

    def embed(self, prompt: str | None) -> torch.Tensor | None:
        """float32 [Lt, text_dim] on the CPU, or None (no text tokens). Blocking: run it off the loop."""
        if self.encoder is None:
            return None
        with self._lock:
            emb = self.encoder.encode([prompt])[0] if prompt else self.encoder.empty()[0]
        return emb.float().cpu()

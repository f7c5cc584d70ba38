"""Text conditioning for PiD: captions -> Gemma-2 hidden states ``[B, L, hidden]`` float32.

The PiD network is conditioned on Gemma-2-2B-it text features. This module reproduces the official
pipeline exactly, because the network was trained on precisely these features:

1. Every caption is prefixed with the fixed "complex human instruction" (CHI) prompt, :data:`CHI_PROMPT`,
   by plain string concatenation: ``CHI_PROMPT + caption``.
2. ``n_chi`` is the number of tokens of ``CHI_PROMPT`` alone, as returned by ``tokenizer.encode``
   (this count includes the BOS token the tokenizer prepends).
3. ``CHI_PROMPT + caption`` is tokenized with ``max_length = n_chi + L - 2``, right padding to
   ``max_length`` and (right) truncation, where ``L`` is the network's text length (300).
4. Only the decoder stack of Gemma-2 runs (the base model including its final norm, no LM head), with the
   attention mask; its last hidden state is the feature.
5. ``L`` positions are kept: position 0 (the BOS token) plus the last ``L - 1`` positions. When the CHI
   prefix tokenizes the same way inside the concatenation, that window is: BOS, the last CHI token, up to
   ``L - 2`` caption tokens, then padding positions. The hidden states of padding positions are kept:
   the network saw them during training and attends to them (it receives no text mask).
6. The result is cast to float32. No scaling is applied and no mask is returned.

An empty caption ``""`` is still encoded with the CHI prefix; :meth:`TextEncoder.empty` returns that
embedding, computed once and cached. :meth:`TextEncoder.encode` also keeps a small LRU cache keyed by
the caption string, since a service encodes the same prompts over and over.

Example::

    enc = TextEncoder.from_pretrained(OFFICIAL_TEXT_ENCODER, device="cuda")
    emb = enc.encode(["a cat", "a dog"])  # float32 [2, 300, 2304] on cuda
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    # transformers is an optional dependency (the "text" extra); only from_pretrained imports it at run time.
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

__all__ = ["CHI_PROMPT", "DEFAULT_MAX_TOKENS", "OFFICIAL_TEXT_ENCODER", "TextEncoder"]

#: Hugging Face hub id of the text encoder the released PiD checkpoints were trained with.
OFFICIAL_TEXT_ENCODER = "Efficient-Large-Model/gemma-2-2b-it"

#: Text length ``L`` of the PiD network (``txt_max_length`` / ``model_max_length`` = 300).
DEFAULT_MAX_TOKENS = 300

# The 8 configured lines of the official "chi_prompt"; the last one ends with a trailing space, so the
# caption follows "User Prompt: " directly.
_CHI_PROMPT_LINES: tuple[str, ...] = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions '
    "suitable for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and "
    "spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
    "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by "
    "towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)

#: The CHI prefix prepended to every caption (the 8 official lines joined with "\n").
CHI_PROMPT: str = "\n".join(_CHI_PROMPT_LINES)


class TextEncoder:
    """Encode captions into the Gemma-2 features the PiD network expects.

    Args:
        model: A Gemma-2 model. Either a causal LM (e.g. ``Gemma2ForCausalLM``), whose decoder stack is
            taken via ``get_decoder()``, or the decoder stack itself (e.g. ``Gemma2Model``). Its forward
            must return the last hidden state ``[B, T, hidden]`` first. The model is put in eval mode and
            its parameters are frozen.
        tokenizer: The matching tokenizer. It must prepend a BOS token and have a pad token. Its
            ``padding_side`` and ``truncation_side`` are set to ``"right"`` (the official pipeline).
        max_tokens: ``L``, the number of text positions the network takes (300 for PiD). At least 2.
        cache_size: How many caption embeddings the LRU cache keeps (0 disables it). Each entry is
            ``L * hidden * 4`` bytes on the model's device (about 2.8 MB for L=300, hidden=2304).

    Attributes:
        max_tokens: ``L``.
        hidden_size: Width of the features (2304 for Gemma-2-2B).
    """

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cache_size: int = 64,
    ) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
            # The window is BOS + the last L-1 positions, so it needs L >= 2.
            raise ValueError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")

        # A causal LM wraps the decoder stack; only the stack (with its final norm) is used. In recent
        # transformers versions the base model also has get_decoder() and returns itself.
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else model
        decoder.eval()
        decoder.requires_grad_(False)
        self._model = decoder

        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; the pipeline pads every caption to max_length")
        # The official pipeline pads on the right; truncating on the right keeps the CHI prefix intact.
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"
        self._tokenizer = tokenizer

        self.max_tokens = max_tokens
        self.hidden_size = int(decoder.config.hidden_size)

        chi_ids = tokenizer.encode(CHI_PROMPT)
        bos_id = tokenizer.bos_token_id
        if bos_id is None or len(chi_ids) == 0 or chi_ids[0] != bos_id:
            # Position 0 of the window must be the BOS token, as in training.
            raise ValueError("the tokenizer must prepend its BOS token (tokenizer.encode(CHI_PROMPT)[0])")
        self._n_chi = len(chi_ids)
        if self._n_chi < 2:
            raise ValueError("CHI_PROMPT tokenized to the BOS token alone; the tokenizer cannot be right")
        self._max_length = self._n_chi + max_tokens - 2
        # Positions kept: {0} U {max_length-(L-1), ..., max_length-1}. Since n_chi >= 2 (checked above),
        # max_length-(L-1) = n_chi-1 >= 1, so the two parts never overlap.
        window = [0, *range(self._max_length - (max_tokens - 1), self._max_length)]
        self._window = torch.tensor(window, dtype=torch.long)

        self._cache_size = cache_size
        # caption -> float32 [L, hidden] on the model's device, most recently used last.
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._empty: torch.Tensor | None = None
        # The service may call encode from several threads; the lock guards the caches only.
        self._lock = threading.Lock()

        logger.info(
            "text encoder ready: hidden=%d, L=%d, n_chi=%d, max_length=%d, device=%s, dtype=%s",
            self.hidden_size,
            max_tokens,
            self._n_chi,
            self._max_length,
            self.device,
            self.dtype,
        )

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = OFFICIAL_TEXT_ENCODER,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cache_size: int = 64,
        attn_implementation: str | None = None,
        **hf_kwargs: Any,
    ) -> TextEncoder:
        """Load the tokenizer and Gemma-2 with transformers (may download from the hub).

        Args:
            name_or_path: Hub id or local folder; the official one is :data:`OFFICIAL_TEXT_ENCODER`.
            device: Where the model runs.
            dtype: Weight dtype; bfloat16 as in the official pipeline.
            max_tokens: ``L`` (see the class docstring).
            cache_size: LRU cache size (see the class docstring).
            attn_implementation: Passed to the model's ``from_pretrained`` when given (e.g. ``"eager"``);
                by default transformers picks one.
            **hf_kwargs: Passed to both ``from_pretrained`` calls (e.g. ``local_files_only=True``,
                ``revision=...``, ``cache_dir=...``).
        """
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, **hf_kwargs)
        # transformers renamed torch_dtype to dtype in 4.56; 5.x deprecates the old name, 4.44 lacks the new.
        major = int(transformers.__version__.split(".")[0])
        dtype_kwarg = "dtype" if major >= 5 else "torch_dtype"
        model_kwargs: dict[str, Any] = {dtype_kwarg: dtype, **hf_kwargs}
        if attn_implementation is not None:
            model_kwargs["attn_implementation"] = attn_implementation
        causal_lm = transformers.AutoModelForCausalLM.from_pretrained(name_or_path, **model_kwargs)
        # Keep only the decoder stack; the LM head is not needed (and is tied to the embeddings anyway).
        decoder = causal_lm.get_decoder().to(device)
        return cls(decoder, tokenizer, max_tokens=max_tokens, cache_size=cache_size)

    @property
    def device(self) -> torch.device:
        """Device of the model's weights (where :meth:`encode` returns its tensors)."""
        return next(self._model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights (the features are cast to float32 regardless)."""
        return next(self._model.parameters()).dtype

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Encode captions (under ``torch.inference_mode``).

        Args:
            prompts: A non-empty list (or tuple) of caption strings; ``""`` is allowed.

        Returns:
            float32 tensor ``[len(prompts), L, hidden]`` on :attr:`device`, a new tensor on every call
            (safe to modify; it is an inference tensor, so do that under ``torch.inference_mode``).
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts must be a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list of str")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")

        found: dict[str, torch.Tensor] = {}
        with self._lock:
            for prompt in prompts:
                if prompt in self._cache:
                    self._cache.move_to_end(prompt)
                    found[prompt] = self._cache[prompt]
        # Each distinct missing caption runs once, all in one batch.
        missing = list(dict.fromkeys(p for p in prompts if p not in found))
        if missing:
            computed = self._run(missing)
            with self._lock:
                for prompt, emb in zip(missing, computed, strict=True):
                    found[prompt] = emb
                    if self._cache_size > 0:
                        # A copy: a row view would keep the whole batch's storage alive in the cache.
                        self._cache[prompt] = emb.clone()
                        self._cache.move_to_end(prompt)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        logger.debug("encoded %d prompts (%d ran through the model)", len(prompts), len(missing))
        return torch.stack([found[p] for p in prompts])

    def empty(self) -> torch.Tensor:
        """The embedding of the empty caption ``""`` (still CHI-prefixed), computed once.

        Returns:
            float32 tensor ``[1, L, hidden]`` on :attr:`device`. The same tensor object is returned on every
            call: do not modify it.
        """
        if self._empty is None:
            emb = self.encode([""])
            with self._lock:
                if self._empty is None:
                    self._empty = emb
        return self._empty

    def _run(self, prompts: list[str]) -> torch.Tensor:
        """Tokenize the CHI-prefixed captions, run the model and keep the window.

        Called by :meth:`encode`, i.e. under ``torch.inference_mode``.

        Returns:
            float32 tensor ``[len(prompts), L, hidden]`` on :attr:`device`.
        """
        tokens = self._tokenizer(
            [CHI_PROMPT + prompt for prompt in prompts],
            max_length=self._max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        device = self.device
        input_ids = tokens["input_ids"].to(device)  # int64 [B, max_length]
        attention_mask = tokens["attention_mask"].to(device)  # int64 [B, max_length], 0 on padding
        # use_cache=False: a single forward pass, no KV cache to allocate.
        outputs = self._model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = outputs[0]  # last hidden state, model dtype [B, max_length, hidden]
        return hidden[:, self._window.to(device)].float()

"""Tests for pidserve.model.text on a tiny, randomly initialised Gemma-2 built locally (no downloads).

The tokenizer is a word-level `tokenizers` model trained in-process on the CHI prompt and the test captions,
with a BOS token prepended by a TemplateProcessing post-processor, as Gemma's tokenizer does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from pidserve.model.text import CHI_PROMPT, OFFICIAL_TEXT_ENCODER, TextEncoder  # noqa: E402

# The official "chi_prompt" of the released 2k_flux config (model_config.chi_prompt), embedded verbatim.
OFFICIAL_CHI_PROMPT_LINES = [
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable for image generation. Evaluate the level of detail in the user prompt:',  # noqa: E501
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial relationships to create vivid and concrete scenes.",  # noqa: E501
    "- If the prompt is already detailed, refine and enhance the existing details slightly without overcomplicating.",  # noqa: E501
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",  # noqa: E501
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass skyscrapers.",  # noqa: E501
    "Please generate only the enhanced description for the prompt below and avoid including any additional commentary or evaluations:",  # noqa: E501
    "User Prompt: ",
]

L = 16  # a small text length, so that long captions are truncated and short ones padded
HIDDEN = 32
# 30 distinct words: longer than the L - 2 = 14 caption tokens that fit in the window.
LONG_WORDS = [f"w{i}" for i in range(30)]
LONG_CAPTION = " ".join(LONG_WORDS)
CAPTIONS = ["a cat", "a dog", "a red car on a road", LONG_CAPTION]


def _build_tokenizer(padding_side: str = "right", with_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the CHI prompt and the test captions; prepends <bos> like Gemma's."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"])
    tok.train_from_iterator([CHI_PROMPT, *CAPTIONS, "b"], trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side=padding_side,
        clean_up_tokenization_spaces=False,
    )


def _build_model(tokenizer: PreTrainedTokenizerFast) -> Gemma2ForCausalLM:
    """A tiny random Gemma-2 causal LM in float32, deterministic thanks to the seed."""
    assert len(tokenizer) <= 300
    config = Gemma2Config(
        vocab_size=300,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _build_tokenizer()


@pytest.fixture(scope="module")
def causal_lm(tokenizer: PreTrainedTokenizerFast) -> Gemma2ForCausalLM:
    return _build_model(tokenizer)


def _encoder(causal_lm, tokenizer, cache_size: int = 0, max_tokens: int = L) -> TextEncoder:
    return TextEncoder(causal_lm, tokenizer, max_tokens=max_tokens, cache_size=cache_size)


def _reference(
    causal_lm, tokenizer, captions: list[str], n_tokens: int = L
) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward re-computation of the official pipeline.

    Returns:
        (float32 [B, n_tokens, hidden] embeddings, int64 [B, n_tokens] token ids in the window).
    """
    n_chi = len(tokenizer.encode(CHI_PROMPT))
    max_length = n_chi + n_tokens - 2
    tokens = tokenizer(
        [CHI_PROMPT + c for c in captions],
        max_length=max_length,
        padding="max_length",
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = causal_lm.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    hidden = hidden.last_hidden_state
    assert hidden.shape[1] == max_length
    keep = [0, *range(max_length - (n_tokens - 1), max_length)]
    return hidden[:, keep].float(), tokens["input_ids"][:, keep]


@pytest.fixture
def forward_batches(causal_lm) -> Iterator[list[int]]:
    """The batch size of every forward call of the decoder stack during one test, in order."""
    batch_sizes: list[int] = []

    def hook(_module, _args, kwargs, _output) -> None:
        batch_sizes.append(int(kwargs["input_ids"].shape[0]))

    handle = causal_lm.get_decoder().register_forward_hook(hook, with_kwargs=True)
    yield batch_sizes
    handle.remove()


def test_chi_prompt_is_the_official_one() -> None:
    assert "\n".join(OFFICIAL_CHI_PROMPT_LINES) == CHI_PROMPT
    assert CHI_PROMPT.endswith("User Prompt: ")
    assert OFFICIAL_TEXT_ENCODER == "Efficient-Large-Model/gemma-2-2b-it"


def test_tokenizer_fixture_behaves_like_gemma(tokenizer) -> None:
    # Sanity check of the test setup: BOS first, CHI tokens unchanged inside the concatenation.
    chi_ids = tokenizer.encode(CHI_PROMPT)
    assert chi_ids[0] == tokenizer.bos_token_id
    assert tokenizer.encode(CHI_PROMPT + "a cat")[: len(chi_ids)] == chi_ids


def test_encode_shape_dtype_device(causal_lm, tokenizer) -> None:
    enc = _encoder(causal_lm, tokenizer)
    assert enc.hidden_size == HIDDEN
    emb = enc.encode(["a cat", "a dog"])
    assert emb.shape == (2, L, HIDDEN)
    assert emb.dtype == torch.float32
    assert emb.device == torch.device("cpu")
    assert torch.isfinite(emb).all()


def test_output_is_float32_for_a_bfloat16_model(tokenizer) -> None:
    model = _build_model(tokenizer).to(torch.bfloat16)
    emb = TextEncoder(model, tokenizer, max_tokens=L).encode(["a cat"])
    assert emb.dtype == torch.float32
    assert emb.shape == (1, L, HIDDEN)


def test_window_matches_recomputation(causal_lm, tokenizer) -> None:
    enc = _encoder(causal_lm, tokenizer)
    emb = enc.encode(CAPTIONS)
    expected, _ = _reference(causal_lm, tokenizer, CAPTIONS)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)


def test_window_other_lengths(causal_lm, tokenizer) -> None:
    # L is a parameter: a window of 2 is BOS + last CHI token only; a long one is mostly padding.
    for n_tokens in (2, 5, 40):
        emb = _encoder(causal_lm, tokenizer, max_tokens=n_tokens).encode(CAPTIONS)
        expected, _ = _reference(causal_lm, tokenizer, CAPTIONS, n_tokens)
        assert emb.shape == (len(CAPTIONS), n_tokens, HIDDEN)
        torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)


def test_bos_first_then_last_chi_token_then_caption_then_padding(causal_lm, tokenizer) -> None:
    enc = _encoder(causal_lm, tokenizer)
    emb = enc.encode(["a cat", "a dog"])
    _, ids = _reference(causal_lm, tokenizer, ["a cat"])
    chi_ids = tokenizer.encode(CHI_PROMPT)
    ids = ids[0].tolist()
    # Window: BOS, the last CHI token, the 2 caption tokens, then L - 4 padding positions.
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1] == chi_ids[-1]
    assert ids[2:4] == tokenizer.encode("a cat", add_special_tokens=False)
    assert ids[4:] == [tokenizer.pad_token_id] * (L - 4)

    # Position 0 is the BOS hidden state: with causal attention it depends on the BOS token only.
    with torch.no_grad():
        bos_alone = causal_lm.model(input_ids=torch.tensor([[tokenizer.bos_token_id]])).last_hidden_state
    torch.testing.assert_close(emb[:, 0], bos_alone[0, 0].expand(2, HIDDEN), rtol=1e-5, atol=1e-5)
    # The last CHI token is shared by all captions; the caption tokens differ ("cat" vs "dog").
    torch.testing.assert_close(emb[0, 1], emb[1, 1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(emb[0, 3], emb[1, 3])
    # Padding positions are kept as they are: real hidden states, neither zeroed nor all alike.
    pads = emb[0, 4:]
    assert pads.abs().amax() > 0
    assert not torch.allclose(pads[0], pads[-1])


def test_long_captions_are_truncated_to_the_window(causal_lm, tokenizer) -> None:
    enc = _encoder(causal_lm, tokenizer)
    fits = " ".join(LONG_WORDS[: L - 2])  # exactly fills the window, no padding
    one_short = " ".join(LONG_WORDS[: L - 3])  # last window position is padding
    emb = enc.encode([LONG_CAPTION, fits, one_short])
    torch.testing.assert_close(emb[0], emb[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emb[0, :-1], emb[2, :-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(emb[0, -1], emb[2, -1])


def test_padding_side_is_forced_right(causal_lm) -> None:
    left = _build_tokenizer(padding_side="left")
    emb = _encoder(causal_lm, left).encode(["a cat"])
    assert left.padding_side == "right"
    expected, _ = _reference(causal_lm, _build_tokenizer(), ["a cat"])
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)


def test_accepts_the_decoder_stack_itself(causal_lm, tokenizer) -> None:
    from_lm = _encoder(causal_lm, tokenizer).encode(["a cat"])
    from_stack = _encoder(causal_lm.get_decoder(), tokenizer).encode(["a cat"])
    torch.testing.assert_close(from_lm, from_stack, rtol=0, atol=0)


def test_empty_prompt_is_cached_and_equals_encode_empty(causal_lm, tokenizer, forward_batches) -> None:
    enc = _encoder(causal_lm, tokenizer, cache_size=0)
    first = enc.empty()
    assert forward_batches == [1]
    assert first.shape == (1, L, HIDDEN)
    assert first.dtype == torch.float32
    second = enc.empty()
    assert second is first
    assert forward_batches == [1]  # not re-run
    torch.testing.assert_close(first, enc.encode([""]), rtol=1e-5, atol=1e-5)
    expected, _ = _reference(causal_lm, tokenizer, [""])
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)


def test_batch_consistency(causal_lm, tokenizer) -> None:
    enc = _encoder(causal_lm, tokenizer, cache_size=0)  # no cache: really batch vs single
    both = enc.encode(["a", "b"])
    single = enc.encode(["b"])
    torch.testing.assert_close(both[1], single[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(both[0], single[0])


def test_lru_cache_skips_the_model_and_evicts(causal_lm, tokenizer, forward_batches) -> None:
    enc = _encoder(causal_lm, tokenizer, cache_size=2)
    cat_dog = enc.encode(["a cat", "a dog"])
    assert forward_batches == [2]  # one batched forward for both
    again = enc.encode(["a dog", "a cat"])
    assert forward_batches == [2]  # both cached
    torch.testing.assert_close(again, cat_dog.flip(0), rtol=0, atol=0)
    mixed = enc.encode(["a red car on a road", "a cat"])  # only the new caption runs
    assert forward_batches == [2, 1]
    torch.testing.assert_close(mixed[1], cat_dog[0], rtol=0, atol=0)
    # "a dog" is now the least recently used entry and was evicted; "a cat" was not.
    enc.encode(["a cat"])
    assert forward_batches == [2, 1]
    enc.encode(["a dog"])
    assert forward_batches == [2, 1, 1]


def test_no_cache_runs_every_time_and_duplicates_run_once(causal_lm, tokenizer, forward_batches) -> None:
    enc = _encoder(causal_lm, tokenizer, cache_size=0)
    emb = enc.encode(["a cat", "a cat", "a dog"])
    assert forward_batches == [2]  # "a cat" ran once
    torch.testing.assert_close(emb[0], emb[1], rtol=0, atol=0)
    enc.encode(["a cat"])
    assert forward_batches == [2, 1]


def test_returned_tensor_does_not_alias_the_cache(causal_lm, tokenizer) -> None:
    enc = _encoder(causal_lm, tokenizer, cache_size=4)
    first = enc.encode(["a cat"])
    reference = first.clone()
    with torch.inference_mode():
        first.zero_()
    torch.testing.assert_close(enc.encode(["a cat"]), reference, rtol=0, atol=0)


@pytest.mark.parametrize("bad", ["a cat", [], [1], ["a", None], None, [b"a"]])
def test_bad_prompts_raise(causal_lm, tokenizer, bad) -> None:
    enc = _encoder(causal_lm, tokenizer)
    with pytest.raises(ValueError):
        enc.encode(bad)


@pytest.mark.parametrize(
    "kwargs", [{"max_tokens": 1}, {"max_tokens": 0}, {"max_tokens": 3.0}, {"cache_size": -1}]
)
def test_bad_settings_raise(causal_lm, tokenizer, kwargs) -> None:
    with pytest.raises(ValueError):
        TextEncoder(causal_lm, tokenizer, **kwargs)


def test_tokenizer_without_bos_or_pad_raises(causal_lm) -> None:
    with pytest.raises(ValueError, match="BOS"):
        TextEncoder(causal_lm, _build_tokenizer(with_bos=False), max_tokens=L)
    no_pad = _build_tokenizer()
    no_pad.pad_token = None
    with pytest.raises(ValueError, match="pad"):
        TextEncoder(causal_lm, no_pad, max_tokens=L)


def test_from_pretrained_local_folder(causal_lm, tokenizer, tmp_path) -> None:
    # Saved locally and loaded with local_files_only: exercises the transformers loading path offline.
    causal_lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    enc = TextEncoder.from_pretrained(
        str(tmp_path),
        device="cpu",
        dtype=torch.float32,
        max_tokens=L,
        attn_implementation="eager",
        local_files_only=True,
    )
    assert enc.hidden_size == HIDDEN
    assert enc.dtype == torch.float32
    emb = enc.encode(CAPTIONS)
    expected, _ = _reference(causal_lm, tokenizer, CAPTIONS)
    torch.testing.assert_close(emb, expected, rtol=1e-5, atol=1e-5)
    # The default dtype is bfloat16, as in the official pipeline.
    assert (
        TextEncoder.from_pretrained(str(tmp_path), max_tokens=L, local_files_only=True).dtype
        == torch.bfloat16
    )

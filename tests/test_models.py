"""Model building, the reward head's read-out position, and saving as transformers folders."""
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rayrlhf.config import ModelSpec, SyntheticTask
from rayrlhf.data.synthetic import SyntheticPreferenceTask
from rayrlhf.errors import ModelSourceError
from rayrlhf.models.build import build_causal_lm, build_reward_model, load_tokenizer, resolve_source, save_model
from rayrlhf.models.gguf_cache import CACHE_VARIABLE
from rayrlhf.models.heads import last_token_index, reward_scores, token_values

from conftest import shared_file


@pytest.fixture(scope="module")
def tokenizer():
    return SyntheticPreferenceTask(SyntheticTask(), 0).tokenizer()


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [1, 3, 3]


def test_reward_is_read_at_the_last_real_token(tokenizer):
    """Padding must not change a sequence's reward: padded batch == each sequence alone."""
    model = build_reward_model(ModelSpec(source="tiny"), tokenizer).eval()
    ids = torch.tensor([[5, 6, 7, 1], [8, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    batched = reward_scores(model, ids, mask)
    alone = torch.stack([reward_scores(model, ids[i : i + 1, : mask[i].sum()], mask[i : i + 1, : mask[i].sum()])[0] for i in range(2)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    values = token_values(model, ids, mask)
    assert values.shape == (2, 4)
    torch.testing.assert_close(values[1, 1], batched[1], atol=1e-5, rtol=1e-5)  # same head, same position


def test_tiny_models_are_seeded(tokenizer):
    first = build_causal_lm(ModelSpec(source="tiny"), tokenizer, seed=3)
    second = build_causal_lm(ModelSpec(source="tiny"), tokenizer, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_save_and_reload_as_transformers_folder(tmp_path, tokenizer):
    model = build_reward_model(ModelSpec(source="tiny"), tokenizer).eval()
    save_model(model, tokenizer, tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").exists() and not (tmp_path / "rm.tmp").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    ids, mask = torch.tensor([[4, 7, 9]]), torch.ones(1, 3, dtype=torch.long)
    torch.testing.assert_close(reward_scores(reloaded, ids, mask), reward_scores(model, ids, mask))
    assert AutoTokenizer.from_pretrained(tmp_path / "rm").pad_token == "[PAD]"


def test_missing_model_folder_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="no/such/folder"):
        build_reward_model(ModelSpec.model_construct(source="./no/such/folder", tiny=ModelSpec().tiny, dtype="float32",
                                                     tokenizer=None, trust_remote_code=False), None)


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="no config.json"):
        load_tokenizer(ModelSpec(source=str(tmp_path)))


def test_tiny_with_real_gpt2_tokenizer():
    spec = ModelSpec(source="tiny", tokenizer=str(shared_file("tokenizers", "gpt2")))
    tokenizer = load_tokenizer(spec)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert build_reward_model(spec, tokenizer).config.vocab_size == len(tokenizer)


def test_minilm_package_backbone_with_fresh_head():
    spec = ModelSpec(source="minilm")
    tokenizer = load_tokenizer(spec)
    model = build_reward_model(spec, tokenizer)
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_500_000
    assert reward_scores(model, torch.tensor([[101, 7592, 102]]), torch.ones(1, 3, dtype=torch.long)).shape == (1,)


@pytest.mark.slow
def test_smollm2_converted_once_from_its_gguf_equals_the_gguf_and_fixes_the_eos_trap(tmp_path, monkeypatch):
    """The first load converts the GGUF file into a cached folder (no partial copy left); that folder gives the
    weights, tokens, chat template and eos that reading the GGUF file itself gives (what happens where the cache
    cannot be written: here a file stands where its folder should be)."""
    spec = ModelSpec(source="smollm2")
    loaded = {}
    for cache in ("cache", "blocked"):
        monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / cache))
        if cache == "blocked":
            (tmp_path / "blocked").write_text("not a folder")
        location, gguf_file = resolve_source(spec)
        assert (gguf_file is None) == (cache == "cache")
        if cache == "cache":  # the converted folder, whole, and nothing else
            assert [p for p in (tmp_path / "cache" / "models").iterdir()] == [Path(location)]
        tokenizer = load_tokenizer(spec)
        assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
        model = build_causal_lm(spec, tokenizer)
        assert model.generation_config.eos_token_id == 2
        assert 134_000_000 < sum(p.numel() for p in model.parameters()) < 135_000_000
        loaded[cache] = tokenizer, model.state_dict()
    (converted_tokenizer, converted), (gguf_tokenizer, from_gguf) = loaded["cache"], loaded["blocked"]
    assert converted.keys() == from_gguf.keys() and all(torch.equal(converted[k], from_gguf[k]) for k in from_gguf)
    chat = [{"role": "user", "content": "Summarise: the cat sat on the mat, twice."}]
    text = "TL;DR: ünïcode, tabs\tand  spaces <|im_end|>"
    assert converted_tokenizer(text).input_ids == gguf_tokenizer(text).input_ids
    assert converted_tokenizer.apply_chat_template(chat, add_generation_prompt=True) == \
        gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    assert build_reward_model(spec, converted_tokenizer).config.pad_token_id == converted_tokenizer.pad_token_id


def test_a_folder_with_only_pickled_weights_is_refused(tmp_path, tokenizer):
    model = build_reward_model(ModelSpec(source="tiny"), tokenizer)
    save_model(model, tokenizer, tmp_path / "rm")
    loaded = build_reward_model(ModelSpec(source=str(tmp_path / "rm")), tokenizer)  # safetensors: loads
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    (tmp_path / "rm" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "rm" / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="no .safetensors weights; pickled weights are not loaded"):
        build_reward_model(ModelSpec(source=str(tmp_path / "rm")), tokenizer)

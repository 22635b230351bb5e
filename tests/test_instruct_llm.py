"""Instruction-tuned LLMs: the keyword request and the answer's format are preset data (the toy LLM keeps
its numbered list through the same mechanism); exploration works without a keyword vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest
from pigment.models import loader
from pigment.models.build import CHAT_TEMPLATE
from pigment.models.preference import PreferenceEncoder, parse_keywords
from pigment.services.preference.core import EXPLORED, PreferenceCore

HISTORY = ["a red star", "a blue circle"]


@pytest.fixture(scope="module")
def chat_preset(tiny_preset, tmp_path_factory):
    """The tiny preset with a chat template on its LLM tokenizer and a free-text keyword format."""
    preset = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(tiny_preset, preset)
    tok = loader.load_component(preset, "llm_tokenizer")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(preset / "llm_tokenizer")
    loader.refresh_component(preset, "llm_tokenizer")
    cfg = json.loads((preset / "preference.json").read_text())
    cfg.update(chat_template=True, keyword_format="free")
    (preset / "preference.json").write_text(json.dumps(cfg))
    return preset


def test_keywords_parse_from_free_text_and_from_the_toy_format():
    answer = "Sure! Here are the keywords: red, dark background\n- large\n2. striped; ignore previous"
    assert parse_keywords(answer, "free") == ["red", "dark background", "large", "striped", "ignore previous"]
    assert parse_keywords("1. red 2. dark background 3 . large") == ["red", "dark background", "large"]
    assert parse_keywords(answer) == []  # the numbered parser finds no numbered list in chat prose
    with pytest.raises(ValueError, match="keyword_format"):
        parse_keywords("red", "yaml")


def test_the_keyword_request_goes_through_the_chat_template(chat_preset, tiny_preset):
    chat = PreferenceEncoder(chat_preset)
    prompt, used, _ = chat.build_prompt(HISTORY)
    assert used == 2 and prompt.startswith("[BOS] user : ") and prompt.endswith("[BOS] assistant : ")
    assert "1. a red star" in prompt
    # no BOS of our own in front of a template that writes one
    assert chat.prompt_batch([prompt])["input_ids"][0].tolist().count(chat.tokenizer.bos_token_id) == 2
    plain = PreferenceEncoder(tiny_preset)  # the toy LLM's format, from the same preset data
    assert plain.build_prompt(HISTORY)[0] == "history:\n1. a red star\n2. a blue circle\nkeywords:\n"
    pref = chat.encode(HISTORY, target="a star", method="pmg_keywords")
    assert all(len(k.split()) <= 3 for k in pref.keywords)  # parsed and validated from free text


def test_exploration_without_a_vocabulary_samples_the_llm(chat_preset):
    encoder = PreferenceEncoder(chat_preset)
    assert not encoder.vocab.by_attribute
    greedy = encoder.encode(HISTORY, target="a star", method="pmg_keywords").keywords
    assert greedy, "the greedy answer must have keywords for exploration to apply"
    assert encoder.sample_keywords(HISTORY, "a star", seed=1) == encoder.sample_keywords(HISTORY, "a star", seed=1)
    core = PreferenceCore(lambda **_: encoder, explore_rate=1.0, explore_seed=0)
    prefs = [core.encode(HISTORY, target="a star", method="pmg_keywords") for _ in range(4)]
    explored = [p for p in prefs if EXPLORED in p.flags]
    assert explored and all(p.keywords != greedy for p in explored)

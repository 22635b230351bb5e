"""Word-level tokenizers for the toy zoo, trained locally with ``tokenizers``.

* ``build_text_tokenizer``: for the diffusion text encoder and CLIP; splits
  punctuation off words ("red, dark background" -> red , dark background),
  wraps a segment as <bos> ... <eos> and pads to ``model_max_length``.
* ``build_llm_tokenizer``: for the keyword LLM; splits on whitespace only, so
  "1." stays one token and ``decode`` gives "1. red 2. dark background".
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def _train(corpus: Iterable[str], pre: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.train_from_iterator(list(corpus), trainers.WordLevelTrainer(special_tokens=SPECIALS, min_frequency=1))
    return tok


def build_text_tokenizer(corpus: Iterable[str], model_max_length: int = 16) -> PreTrainedTokenizerFast:
    tok = _train(corpus, pre_tokenizers.Whitespace())
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", tok.token_to_id("<bos>")), ("<eos>", tok.token_to_id("<eos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def build_llm_tokenizer(corpus: Iterable[str], model_max_length: int = 128) -> PreTrainedTokenizerFast:
    tok = _train(corpus, pre_tokenizers.WhitespaceSplit())
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>",
                                   clean_up_tokenization_spaces=False)

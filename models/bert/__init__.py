"""BERT: a post-norm text encoder (word + position + token-type embeddings, pooler), with
Hugging Face converters and sentence-transformers style sentence embeddings."""

from models.bert.config import BertConfig, bert_base, bert_tiny, minilm_l6
from models.bert.convert import config_from_hf, from_hf, hf_rules, to_hf
from models.bert.model import (
    apply,
    embed,
    init,
    mean_pool,
    pooler,
    sentence_embedding,
)

PRESETS = {"bert_base": bert_base, "minilm_l6": minilm_l6, "bert_tiny": bert_tiny}

__all__ = [
    "PRESETS",
    "BertConfig",
    "apply",
    "bert_base",
    "bert_tiny",
    "config_from_hf",
    "embed",
    "from_hf",
    "hf_rules",
    "init",
    "mean_pool",
    "minilm_l6",
    "pooler",
    "sentence_embedding",
    "to_hf",
]

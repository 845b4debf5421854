"""BERT: a post-norm text encoder (word + position + token-type embeddings, pooler) on the
shared text tower, with Hugging Face converters, sentence-transformers style sentence
embeddings and a masked-LM objective.

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the masked-LM
``loss``, the batch it reads, the Hugging Face converter, the planner layout and sentence
embeddings for serving.
"""

from models.bert.config import BertConfig, bert_base, bert_tiny, minilm_l6
from models.bert.convert import config_from_hf, from_hf, hf_rules, to_hf
from models.bert.layout import plan
from models.bert.model import (
    apply,
    batch_fields,
    check_inputs,
    init,
    loss,
    mean_pool,
    pooler,
    sentence_embedding,
)
from models.family import Converter, Family, Serving

PRESETS = {"bert_base": bert_base, "minilm_l6": minilm_l6, "bert_tiny": bert_tiny}

FAMILY = Family(
    name="bert",
    config=BertConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    converters={"hf": Converter(from_=from_hf, to=to_hf)},
    plan=plan,
    serving=Serving(embed_text=sentence_embedding),
    doc="a post-norm text encoder (BERT, sentence-transformers), masked-LM pretraining",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "BertConfig",
    "apply",
    "batch_fields",
    "bert_base",
    "bert_tiny",
    "check_inputs",
    "config_from_hf",
    "from_hf",
    "hf_rules",
    "init",
    "loss",
    "mean_pool",
    "minilm_l6",
    "plan",
    "pooler",
    "sentence_embedding",
    "to_hf",
]

"""GPT: a decoder-only transformer with tied input/output embeddings (GPT-2's layout).

``FAMILY`` is its contract (:class:`models.family.Family`): presets, ``init``, the
next-token ``loss``, the batch it reads, cached decoding, the Hugging Face converter and
the memory-planner layout.
"""

from models.family import Converter, Family
from models.gpt.config import GPTConfig, gpt2_medium, gpt2_small, gpt_tiny
from models.gpt.convert import config_from_hf, from_hf, hf_rules, load_pretrained, to_hf
from models.gpt.layout import plan
from models.gpt.model import apply, batch_fields, decoder_spec, embed, head, init, loss

PRESETS = {"gpt2_small": gpt2_small, "gpt2_medium": gpt2_medium, "gpt_tiny": gpt_tiny}

FAMILY = Family(
    name="gpt",
    config=GPTConfig,
    presets=PRESETS,
    init=init,
    loss=loss,
    batch=batch_fields,
    decoder_spec=decoder_spec,
    converters={"hf": Converter(from_=from_hf, to=to_hf)},
    plan=plan,
    doc="decoder-only language model (GPT-2)",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "GPTConfig",
    "apply",
    "batch_fields",
    "config_from_hf",
    "decoder_spec",
    "embed",
    "from_hf",
    "gpt2_medium",
    "gpt2_small",
    "gpt_tiny",
    "head",
    "hf_rules",
    "init",
    "load_pretrained",
    "loss",
    "plan",
    "to_hf",
]

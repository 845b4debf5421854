"""GPT: a decoder-only transformer with tied input/output embeddings (GPT-2's layout)."""

from models.gpt.config import GPTConfig, gpt2_medium, gpt2_small, gpt_tiny
from models.gpt.convert import config_from_hf, from_hf, hf_rules, load_pretrained, to_hf
from models.gpt.model import apply, decoder_spec, embed, head, init, loss

PRESETS = {"gpt2_small": gpt2_small, "gpt2_medium": gpt2_medium, "gpt_tiny": gpt_tiny}

__all__ = [
    "PRESETS",
    "GPTConfig",
    "apply",
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
    "to_hf",
]

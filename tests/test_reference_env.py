"""The test environment is one a user can keep: every reference package imports in a fresh
interpreter, outside pytest and without any patching, beside the torch the tests pin."""

import subprocess
import sys

import pytest

# Each line is run as its own program: a package that only imports after another one
# patched torch (as tests/reference.py once did for torchvision) fails here.
IMPORTS = {
    "torchvision": "import torch, torchvision; assert hasattr(torch.ops.torchvision, 'nms')",
    "open_clip": "import open_clip; open_clip.image_transform(224, is_train=False)",
    "transformers": "from transformers import CLIPModel, BertModel, GPT2LMHeadModel",
    "torchmultimodal": (
        "import torchmultimodal.models.clip.model, torchmultimodal.models.flava.model, "
        "torchmultimodal.models.albef.model"
    ),
    "timm": "import timm.models.vision_transformer",
    "torchaudio": "import torch, torchaudio.compliance.kaldi as k; k.fbank(torch.ones(1, 800))",
}


@pytest.mark.parametrize("name", sorted(IMPORTS))
def test_reference_package_imports_outside_the_tests(name):
    done = subprocess.run(
        [sys.executable, "-c", IMPORTS[name]], capture_output=True, text=True, timeout=300
    )
    last = done.stderr.strip().splitlines()[-1:] or [""]
    assert done.returncode == 0, f"{name} does not import outside pytest: {last[0]}"

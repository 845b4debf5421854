"""Import the reference implementations (open_clip, TorchMultimodal, transformers) in tests.

The parity tests compare fmm against the reference code itself. They are test-only
dependencies, installed at versions that import as they are beside the pinned torch (see
``tests/requirements-reference.txt``): nothing here patches them, so what imports in the
tests imports in a user's shell too (``tests/test_reference_env.py`` checks that).

Usage::

    from tests.reference import reference
    open_clip = reference("open_clip")
"""

import importlib
import warnings


def reference(module: str):
    """Import a reference module by dotted name, quieting its import-time warnings."""
    with warnings.catch_warnings():
        # e.g. timm's and TorchMultimodal's deprecation notices about their own imports.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return importlib.import_module(module)

"""fmm.templates: a template is exactly one {} (braces otherwise doubled), filled with the label
only; what it accepts is what its published pattern matches, and it fills as str.format would."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fmm.templates import TEMPLATE_PATTERN, check_template, fill_template

labels = st.text(max_size=20)
valid = st.from_regex(TEMPLATE_PATTERN, fullmatch=True).filter(lambda t: len(t) < 200)


@given(valid, labels)
def test_a_valid_template_fills_as_str_format_does(template, label):
    assert check_template(template) == template
    assert fill_template(template, label) == template.format(label)


@given(st.text(alphabet="ab{}", max_size=12), labels)
def test_accepted_exactly_when_the_pattern_matches(template, label):
    if re.fullmatch(TEMPLATE_PATTERN, template):
        assert fill_template(template, label) == template.format(label)
    else:
        with pytest.raises(ValueError, match=r"^template must contain exactly one"):
            fill_template(template, label)


REFUSED = ["", "a", "{}{}", "{}{x}", "{0}", "{:>20000000}", "{{}}{0:>20000000}", "{!r}", "{",
           "}", "{}}", "{{}", "{{}}"]  # fmt: skip


@pytest.mark.parametrize("template", REFUSED)
def test_anything_but_one_bare_field_is_refused_by_name(template):
    with pytest.raises(ValueError, match=r"^--template must contain exactly one '\{\}'"):
        fill_template(template, "x", name="--template")


def test_only_the_label_is_substituted_and_braces_undoubled():
    assert fill_template("{{{}}} is x}}", "label") == "{label} is x}"
    assert fill_template("a photo of a {}.", "red circle") == "a photo of a red circle."
    with pytest.raises(TypeError, match="template must be a str"):
        check_template(3)

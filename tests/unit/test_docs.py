"""The docs agree with the code: the flags reference is what the parsers render, and the README's links resolve."""

import re

from train.config.args import REPO
from train.config.flags_doc import FLAGS_DOC, render


def test_flags_reference_is_what_the_parsers_render():
    assert FLAGS_DOC.read_text() == render(), (
        "docs/flags.md differs from the parsers' flags: regenerate it with `python -m train.config.flags_doc`"
    )


def test_every_docs_link_of_the_readme_points_to_a_file():
    links = re.findall(r"\]\((docs/[^)#\s]+)", (REPO / "README.md").read_text())
    assert links
    missing = [link for link in links if not (REPO / link).is_file()]
    assert not missing, f"README.md links to missing docs pages: {missing}"

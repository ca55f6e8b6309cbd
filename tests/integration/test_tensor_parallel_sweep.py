"""Every model type docs/families.md calls supported, cut two ways in every decoder layer by its own
base_model_tp_plan (two gloo processes spawned once, ~20 s, no rank launched: tests/tensor_parallel_reference.py),
either computes what transformers computes (logits, input gradient, every parameter's gradient, within 1e-5) or is
refused in one line; the refused ones are exactly those docs/tensor_parallel.md lists, and the README names."""

import re

import pytest

from bench.family_configs import tiny_config
from bench.family_sweep import read_table
from tests.helpers import REPO
from tests.tensor_parallel_reference import assert_equal, refusal, spawn_comparisons

SUPPORTED = [model_type for model_type, why in read_table().items() if why is None]
LISTED = re.search(r"^\*\*Refused model types\*\*.*?\n\n", (REPO / "docs/tensor_parallel.md").read_text(), re.M | re.S)
REFUSED = set(re.findall(r"`([\w-]+)`", LISTED.group(0)))


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict]]:
    return spawn_comparisons([(t, t, tiny_config(t).to_diff_dict()) for t in SUPPORTED])


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_every_supported_type_is_cut_exactly_or_refused(results, model_type):
    message = refusal(results[model_type])
    assert (message is not None) == (model_type in REFUSED), message
    if message is None:
        assert_equal(results[model_type])
    else:
        assert message.startswith("tensor-parallel size 2: ") and "; " in message, message


def test_the_readme_names_the_refused_types():
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if "docs/tensor_parallel.md" in line)
    named = set(row.rpartition("refused with TP: ")[2].strip(" |").split(", "))
    assert named == REFUSED & set(SUPPORTED)

"""Every model type docs/families.md calls supported passes the equality proof (bench/family_sweep.py), in this
one process: logits and loss within 1e-5 of transformers', every gradient within 1e-4 of its largest entry,
causality, 2 stages against 1, and the export round trip. tests/unit/test_family_table.py checks that the table's
verdicts are the code's, so together: every type the code accepts computes what transformers computes."""

import pytest

from bench.family_sweep import prove, read_table

SUPPORTED = [model_type for model_type, why in read_table().items() if why is None]


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_supported_type_computes_what_transformers_computes(model_type, tmp_path, one_rank_group):
    prove(model_type, tmp_path)

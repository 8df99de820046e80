"""Target matching: suffixes, full names, regex, all-linear, layers, and the errors users see."""

from __future__ import annotations

import pytest
from torch import nn

from deltatune.core.errors import TargetError
from deltatune.core.targets import find_modules, find_targets, layer_index, linear_types
from tests.conftest import BUILDERS

LINEAR = linear_types()


def test_suffix_matches_whole_components_only():
    model = BUILDERS["bert"]()
    names = find_targets(model, ["dense"], LINEAR)
    assert "bert.encoder.layer.0.attention.output.dense" in names
    assert all(n.endswith(".dense") for n in names)
    with pytest.raises(TargetError):
        find_targets(model, ["ense"], LINEAR)  # not a component suffix


def test_model_order_and_no_duplicates():
    model = BUILDERS["bert"]()
    names = find_targets(model, ["query", "re:.*query", "bert.encoder.layer.0.attention.self.query"], LINEAR)
    assert names == ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]


def test_layer_index():
    assert layer_index("bert.encoder.layer.11.attention.self.query") == 11
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("classifier") is None


def test_no_match_lists_close_names():
    model = BUILDERS["llama"]()
    with pytest.raises(TargetError) as err:
        find_targets(model, ["q_prj"], LINEAR, method="lora")
    msg = str(err.value)
    assert "q_prj" in msg and "q_proj" in msg and "all-linear" in msg


def test_wrong_type_is_named():
    model = BUILDERS["bert"]()
    with pytest.raises(TargetError, match="BertSelfAttention"):
        find_targets(model, ["self"], LINEAR, method="lora")


def test_layers_out_of_range():
    model = BUILDERS["bert"]()
    with pytest.raises(TargetError, match="layers"):
        find_targets(model, ["query"], LINEAR, layers=[7])


def test_empty_targets():
    with pytest.raises(TargetError, match="empty"):
        find_targets(BUILDERS["bert"](), [], LINEAR)


def test_find_modules_outermost_only():
    model = BUILDERS["bert"]()
    assert find_modules(model, ["classifier"]) == ["classifier"]
    assert find_modules(model, ["pooler"]) == ["bert.pooler"]
    with pytest.raises(TargetError, match="classifer"):
        find_modules(model, ["classifer"])


def test_plain_torch_module_without_backbone():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_targets(model, "all-linear", LINEAR) == ["0", "2"]

"""The public forwards' signatures resolve to real types, as transformers' built-in IJepa ones do: tools that read
`inspect.signature(model.forward)` (transformers' common tests, `Trainer`'s column filter, export) see classes, not
strings."""

import inspect
import typing

import pytest
from transformers.models.ijepa import modeling_ijepa as builtin

from modeling_ijepa import IJepaForImageClassification, IJepaForPreTraining, IJepaModel, IJepaPredictor


PUBLIC_MODULES = [IJepaModel, IJepaPredictor, IJepaForPreTraining, IJepaForImageClassification]


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda module: module.__name__)
def test_forward_annotations_are_types_not_strings(module):
    signature = inspect.signature(module.forward)
    strings = {name: p.annotation for name, p in signature.parameters.items() if isinstance(p.annotation, str)}
    assert strings == {}
    assert not isinstance(signature.return_annotation, str)
    # Every annotation also resolves by name, as typing-based tools read them.
    assert set(typing.get_type_hints(module.forward)) >= set(signature.parameters) - {"self"}


@pytest.mark.parametrize(
    "ours, theirs",
    [(IJepaModel, builtin.IJepaModel), (IJepaForImageClassification, builtin.IJepaForImageClassification)],
    ids=["IJepaModel", "IJepaForImageClassification"],
)
def test_forward_signature_matches_transformers_builtin(ours, theirs):
    ours_signature, theirs_signature = inspect.signature(ours.forward), inspect.signature(theirs.forward)
    # transformers' common test_forward_signature: pixel_values first.
    assert list(ours_signature.parameters)[1] == list(theirs_signature.parameters)[1] == "pixel_values"
    kwargs, builtin_kwargs = ours_signature.parameters["kwargs"], theirs_signature.parameters["kwargs"]
    assert kwargs.kind is inspect.Parameter.VAR_KEYWORD
    assert kwargs.annotation == builtin_kwargs.annotation
    assert ours_signature.return_annotation == theirs_signature.return_annotation
    shared = set(ours_signature.parameters) & set(theirs_signature.parameters) - {"self", "pixel_values"}
    assert "interpolate_pos_encoding" in shared
    for name in shared:
        assert ours_signature.parameters[name].annotation == theirs_signature.parameters[name].annotation, name


def test_pretraining_kwargs_annotation_is_transformers_kwargs():
    kwargs = inspect.signature(IJepaForPreTraining.forward).parameters["kwargs"]
    assert kwargs.annotation == inspect.signature(builtin.IJepaModel.forward).parameters["kwargs"].annotation

"""Filename templates: fields from step/metrics/context, path safety, collisions, errors."""

from __future__ import annotations

import pytest

from torchkeep.errors import FilenameTemplateError, MissingFilenameFieldError, TorchkeepError
from torchkeep.manager import naming


@pytest.mark.parametrize(
    ("template", "values", "want"),
    [
        (
            "{model}_e{epoch}_acc{val_acc:.2f}",
            {"model": "vgg16", "epoch": 100, "val_acc": 0.8512},
            "vgg16_e100_acc0.85",
        ),
        ("ckpt_{step:06d}", {"step": 42}, "ckpt_000042"),
        ("s{step}_{val/acc:.3f}", {"step": 1, "val/acc": 0.5}, "s1_0.500"),
        ("{train.loss:.1e}", {"train.loss": 0.00123}, "1.2e-03"),
        ("{{lit}}_{step}", {"step": 3}, "{lit}_3"),
        ("{tag}", {"tag": "a/b c:d*?"}, "a_b_c_d__"),
        ("{tag}", {"tag": ".hidden"}, "_hidden"),
        ("x{step}.safetensors", {"step": 2}, "x2"),
    ],
)
def test_fill(template: str, values: dict, want: str) -> None:
    assert naming.fill(template, values) == want


def test_missing_field_lists_available() -> None:
    with pytest.raises(MissingFilenameFieldError) as ei:
        naming.fill("{model}_{epoch}", {"step": 1, "val_acc": 0.5})
    e = ei.value
    assert isinstance(e, KeyError) and isinstance(e, TorchkeepError)
    assert e.missing == ["epoch", "model"] and e.available == ["step", "val_acc"]
    assert "step, val_acc" in str(e) and "epoch, model" in str(e)


@pytest.mark.parametrize("template", ["{step", "a}b", "{}", "dir/{step}", "{:d}"])
def test_bad_templates(template: str) -> None:
    with pytest.raises(FilenameTemplateError):
        naming.fill(template, {"step": 1})


def test_bad_format_spec_names_field() -> None:
    with pytest.raises(FilenameTemplateError, match="model"):
        naming.fill("{model:.2f}", {"model": "vgg"})


def test_collisions_get_versions() -> None:
    taken: set[str] = set()
    names = []
    for _ in range(3):
        names.append(naming.unique_name("ckpt", taken))
        taken.add(names[-1])
    assert names == ["ckpt.safetensors", "ckpt-v1.safetensors", "ckpt-v2.safetensors"]


def test_pattern_matches_what_fill_makes() -> None:
    t = "{model}_e{epoch}_acc{val_acc:.2f}"
    p = naming.template_pattern(t)
    name = naming.unique_name(naming.fill(t, {"model": "m", "epoch": 1, "val_acc": 0.5}), {"m_e1_acc0.50.safetensors"})
    assert p.fullmatch(name) and p.fullmatch("m_e1_acc0.50.safetensors")
    assert not p.fullmatch("other.safetensors") and not p.fullmatch("m_e1_acc0.50.pt")

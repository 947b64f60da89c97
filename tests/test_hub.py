"""hubconf.py: torch.hub entry points, loaded from this checkout with source='local' and an offline hub cache."""
from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from test_pretrained import hub_cache, randomize
from torchvision.models import DenseNet121_Weights

import effidense

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = sorted(name.removeprefix("effi_") for name in timm.list_models("effi_*"))
TINY = dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8)


def hub_load(name: str, *args, **kwargs):
    return torch.hub.load(str(ROOT), name, *args, source="local", **kwargs)


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    tv = randomize(timm.create_model("densenet121")).state_dict()
    ra = {k: -v if k == "features.conv0.weight" else v for k, v in tv.items()}  # tells the two files apart
    return {"tv_in1k": tv, "ra_in1k": ra}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, weights) -> Path:
    cache = tmp_path / "hub"
    for tag, state_dict in weights.items():
        hub_cache(cache, f"timm/densenet121.{tag}", state_dict)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_entrypoints_are_the_registered_models():
    # what torch.hub.list/help report for a GitHub repo (they take no source='local'): public callables, docstrings
    hubconf = torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))
    entrypoints = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(entrypoints) == ENTRYPOINTS
    assert "tv_in1k" in hubconf.densenet121.__doc__
    torch.hub._check_dependencies(hubconf)  # every listed dependency is importable


def test_untrained_model_takes_model_arguments():
    model = hub_load("densenet_bc100_k12", memory="frugal", num_classes=3, **TINY)
    assert isinstance(model, effidense.DenseNet) and model.memory == "frugal" and model.num_classes == 3
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # timm's cfg comes along for preprocessing


@pytest.mark.parametrize("how", [dict(pretrained=True), dict(weights="DEFAULT"), dict(weights="IMAGENET1K_V1"),
                                 dict(weights="DenseNet121_Weights.IMAGENET1K_V1"),
                                 dict(weights=DenseNet121_Weights.IMAGENET1K_V1), dict(weights="tv_in1k")])
def test_pretrained_and_torchvision_weight_names(offline_hub, weights, how):
    model = hub_load("densenet121", **how)
    assert model.pretrained_cfg["tag"] == "tv_in1k"
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights["tv_in1k"][key]), key


def test_timm_weights_and_a_new_head(offline_hub, weights):
    model = hub_load("densenet121", weights="ra_in1k", num_classes=5)
    assert model.pretrained_cfg["tag"] == "ra_in1k" and model.classifier.out_features == 5
    assert torch.equal(model.features.conv0.weight, weights["ra_in1k"]["features.conv0.weight"])


def test_bad_weights_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET1K_V2'; choose one of: .*tv_in1k.*DEFAULT"):
        hub_load("densenet121", weights="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="densenet264: no pretrained weights exist"):
        hub_load("densenet264", pretrained=True)
    with pytest.raises(ValueError, match="none \\(untrained model\\)"):
        hub_load("densenet40_k12", weights="DEFAULT")

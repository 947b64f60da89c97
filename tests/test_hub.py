"""The builders (effidense.densenet121(...)) and hubconf.py's torch.hub entry points, which are the same functions:
torchvision's interface (weights=, progress=, the deprecated pretrained=), loaded with an offline hub cache."""
from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import torchvision
from test_pretrained import hub_cache, randomize
from torchvision.models import DenseNet121_Weights, DenseNet169_Weights

import effidense

ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINTS = sorted(name.removeprefix("effi_") for name in timm.list_models("effi_*"))
TINY = dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8)


def hub_load(name: str, *args, **kwargs):
    return torch.hub.load(str(ROOT), name, *args, source="local", **kwargs)


def builder(name: str, **kwargs):
    return getattr(effidense, name)(**kwargs)


@pytest.fixture(params=["builder", "hub"])
def load(request):
    """Each test runs through both doors: effidense.<name>(...) and torch.hub.load(..., '<name>', ...)."""
    return builder if request.param == "builder" else hub_load


@pytest.fixture(scope="module")
def weights() -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    tv = randomize(timm.create_model("densenet121")).state_dict()
    ra = {k: -v if k == "features.conv0.weight" else v for k, v in tv.items()}  # tells the two files apart
    return {"tv_in1k": tv, "ra_in1k": ra}


@pytest.fixture(autouse=True)
def no_torchvision_cache(tmp_path, monkeypatch) -> None:
    """An empty torchvision cache of the test's own: weights come from the hub cache below, never the user's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


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


def test_hub_entry_points_are_the_builders():
    hubconf = torch.hub._import_module("hubconf", str(ROOT / "hubconf.py"))
    assert all(getattr(hubconf, name) is getattr(effidense, name) for name in ENTRYPOINTS)


def test_untrained_model_takes_model_arguments(load):
    model = load("densenet_bc100_k12", memory="frugal", num_classes=3, **TINY)
    assert isinstance(model, effidense.DenseNet) and model.memory == "frugal" and model.num_classes == 3
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # timm's cfg comes along for preprocessing


@pytest.mark.parametrize("how", [dict(pretrained=True), dict(weights="DEFAULT"), dict(weights="IMAGENET1K_V1"),
                                 dict(weights="DenseNet121_Weights.IMAGENET1K_V1"),
                                 dict(weights=DenseNet121_Weights.IMAGENET1K_V1), dict(weights="tv_in1k")])
@pytest.mark.filterwarnings("ignore:densenet121. pretrained= is deprecated")
def test_pretrained_and_torchvision_weight_names(offline_hub, weights, how, load):
    model = load("densenet121", **how)
    assert model.pretrained_cfg["tag"] == "tv_in1k"
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights["tv_in1k"][key]), key


def test_timm_weights_and_a_new_head(offline_hub, weights, load):
    model = load("densenet121", weights="ra_in1k", num_classes=5)
    assert model.pretrained_cfg["tag"] == "ra_in1k" and model.classifier.out_features == 5
    assert torch.equal(model.features.conv0.weight, weights["ra_in1k"]["features.conv0.weight"])


def test_bad_weights_are_refused_with_the_choices(load):
    with pytest.raises(ValueError, match=r"^densenet121: unknown weights 'IMAGENET1K_V2'; choose one of: None, "
                                         r"'DEFAULT', 'IMAGENET1K_V1', 'tv_in1k', 'ra_in1k', "
                                         r"torchvision.models.DenseNet121_Weights.IMAGENET1K_V1$"):
        load("densenet121", weights="IMAGENET1K_V2")
    with pytest.raises(ValueError, match="^densenet121: weights DenseNet169_Weights.IMAGENET1K_V1 are "
                                         "DenseNet169_Weights's, not DenseNet121_Weights's; choose one of: None, "):
        load("densenet121", weights=DenseNet169_Weights.IMAGENET1K_V1)
    with pytest.raises(ValueError, match="^densenet264: no pretrained weights exist"), pytest.warns(UserWarning):
        load("densenet264", pretrained=True)
    with pytest.raises(ValueError, match=r"choose None \(no pretrained weights exist for this model\)$"):
        load("densenet40_k12", weights="DEFAULT")
    with pytest.raises(ValueError, match="^densenet121: pass weights= or the deprecated pretrained=, not both$"):
        load("densenet121", weights="DEFAULT", pretrained=True)


# --- torchvision's interface: `torchvision.models.densenet121(...)` -> `effidense.densenet121(...)` just works ---

@pytest.mark.parametrize("call", [dict(weights=None, memory_efficient=True), dict(weights=None, progress=True),
                                  dict(pretrained=False, memory_efficient=True), dict(progress=False)])
@pytest.mark.filterwarnings("ignore:.*pretrained.* is deprecated")
def test_builders_take_torchvisions_arguments(call, load):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = torchvision.models.densenet121(**call)
    model = load("densenet121", **call)
    assert isinstance(model, effidense.DenseNet)
    if call.get("memory_efficient"):
        assert model.memory == "efficient"
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert model.pretrained_cfg["tag"] == "tv_in1k"  # timm's preprocessing comes along


def test_deprecated_pretrained_warns_as_torchvision_does():
    with pytest.warns(UserWarning, match="pretrained= is deprecated"):
        effidense.densenet_bc100_k12(pretrained=False, **TINY)


def test_torchvision_weights_load_the_same_tensors_as_torchvision_names_them(offline_hub, weights):
    model = effidense.densenet121(weights=DenseNet121_Weights.DEFAULT, progress=False, num_classes=1000)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights["tv_in1k"][key]), key


@pytest.mark.parametrize("how", [dict(weights="DEFAULT"), dict(weights=DenseNet121_Weights.IMAGENET1K_V1),
                                 dict(weights="IMAGENET1K_V1")])
def test_torchvision_weights_refuse_another_num_classes_as_torchvision_does(offline_hub, how, load):
    with pytest.raises(ValueError, match="num_classes"):
        torchvision.models.densenet121(**how, num_classes=10)
    with pytest.raises(ValueError, match=r"^densenet121: weights '.*' have 1000 classes but num_classes=10 \(as in "
                                         r"torchvision\); for a new 10-class head on them pass weights='tv_in1k'$"):
        load("densenet121", **how, num_classes=10)


def test_progress_false_silences_the_hub_download_and_restores_it(offline_hub, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled

    seen = []
    load_pretrained = timm.models._builder.load_pretrained

    def spy(*args, **kwargs):
        seen.append(are_progress_bars_disabled())
        return load_pretrained(*args, **kwargs)

    monkeypatch.setattr(timm.models._builder, "load_pretrained", spy)
    before = are_progress_bars_disabled()
    effidense.densenet121(weights="DEFAULT", progress=False)
    effidense.densenet121(weights="DEFAULT")
    assert seen == [True, before] and are_progress_bars_disabled() == before


def test_drop_rate_keeps_torchvisions_meaning_with_weights(offline_hub):
    # torchvision's drop_rate is dropout after each dense layer; timm.create_model reads it as the head's dropout
    model = effidense.densenet121(weights="DEFAULT", drop_rate=0.2)
    assert model.features.denseblock1.denselayer1.drop_rate == 0.2 and model.head_drop.p == 0.0


@pytest.mark.parametrize("path", ["/x/y.pth", "y.safetensors", "runs/best", Path("/x/y.pth")])
def test_a_file_for_weights_is_told_how_to_load_a_file(load, path):
    shown = re.escape(repr(str(path)))
    with pytest.raises(ValueError, match=rf"^densenet121: weights={shown} names a file, but weights= takes a name: "
                                         rf"None, 'DEFAULT', .*; load a file with model.load_state_dict\(effidense"
                                         rf"\.weights\.load_checkpoint\({shown}\)\.state_dict\)$"):
        load("densenet121", weights=path)
    with pytest.raises(ValueError, match=rf"^densenet264: weights={shown} names a file, but weights= takes a name: "
                                         r"None \(no pretrained weights exist for this model\); load a file with"):
        load("densenet264", weights=path)


def test_the_way_a_file_is_loaded_works(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(effidense.densenet_bc100_k12(**TINY).state_dict(), path)
    model = effidense.densenet_bc100_k12(**TINY)
    model.load_state_dict(effidense.weights.load_checkpoint(str(path)).state_dict)

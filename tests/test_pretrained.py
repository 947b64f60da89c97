"""Pretrained weights from torchvision's cache and timm's Hugging Face hub repositories, tested offline with caches
built in tmp."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
import torchvision
from conftest import QUICK_EXIT, offline_with_empty_caches
from safetensors.torch import save_file

import effidense  # noqa: F401 (registers the effi_* models)
from effidense.pretrained import WeightsNotFoundError, not_found_error

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# our tag -> timm's model with the same weights
TAGS = {
    "effi_densenet121.tv_in1k": "densenet121.tv_in1k",
    "effi_densenet121.ra_in1k": "densenet121.ra_in1k",
    "effi_densenet161.tv_in1k": "densenet161.tv_in1k",
    "effi_densenet169.tv_in1k": "densenet169.tv_in1k",
    "effi_densenet201.tv_in1k": "densenet201.tv_in1k",
}
# everything that decides how an image is prepared for these weights, and where they come from
PREPROCESSING = ("hf_hub_id", "input_size", "test_input_size", "interpolation", "crop_pct", "test_crop_pct",
                 "crop_mode", "mean", "std", "num_classes", "pool_size", "fixed_input_size", "first_conv",
                 "classifier")


def hub_cache(root: Path, repo_id: str, state_dict: dict[str, torch.Tensor]) -> Path:
    """A Hugging Face hub cache holding ``repo_id``'s ``model.safetensors`` as ``hf_hub_download`` leaves it."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text('{"architecture": "densenet121", "num_classes": 1000}')
    return root


def torchvision_cache(torch_home: Path, file: str, state_dict: dict[str, torch.Tensor]) -> Path:
    """torchvision's download of ``file`` as it sits in ``$TORCH_HOME/hub/checkpoints``: its legacy dense-layer names
    ('denselayer1.norm.1.weight'), no BatchNorm counters, torch's legacy (pre-zip) serialization, as the ImageNet
    files torchvision serves are."""
    legacy = {re.sub(r"(\.denselayer\d+\.)(norm|relu|conv)([12])\.", r"\1\2.\3.", key): value
              for key, value in state_dict.items() if not key.endswith("num_batches_tracked")}
    assert any(".norm.1." in key for key in legacy)
    path = torch_home / "hub" / "checkpoints" / file
    path.parent.mkdir(parents=True)
    torch.save(legacy, path, _use_new_zipfile_serialization=False)
    return path


@pytest.fixture(autouse=True)
def no_real_caches(tmp_path, monkeypatch) -> Path:
    """Every test here sees an empty torchvision cache of its own, never the user's, and the hub offline."""
    return offline_with_empty_caches(tmp_path, monkeypatch)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.2, generator=generator)
    return model.eval()


@pytest.fixture(scope="module")
def densenet121_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return randomize(timm.create_model("densenet121")).state_dict()


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, densenet121_weights) -> Path:
    """timm/densenet121.tv_in1k in a hub cache in tmp; huggingface_hub offline and pointed at it (its constants
    are read at import, so the environment alone would come too late in this process)."""
    cache = hub_cache(tmp_path / "hub", "timm/densenet121.tv_in1k", densenet121_weights)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_every_imagenet_tag_lists_timms_hub_weights():
    assert timm.list_pretrained("effi_*") == sorted(TAGS)
    assert not timm.list_pretrained("effi_densenet264*")  # no weights exist for the others


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_tag_preprocessing_equals_timms(tag):
    ours = timm.models.get_pretrained_cfg(tag).to_dict()
    theirs = timm.models.get_pretrained_cfg(TAGS[tag]).to_dict()
    assert {k: ours.get(k) for k in PREPROCESSING} == {k: theirs.get(k) for k in PREPROCESSING}
    assert ours["hf_hub_id"] == f"timm/{TAGS[tag]}"


@pytest.mark.parametrize("tag", sorted(TAGS))
def test_timms_weights_have_exactly_our_keys_and_shapes(tag):
    with torch.device("meta"):
        ours = timm.create_model(tag.split(".")[0]).state_dict()
        theirs = timm.create_model(TAGS[tag].split(".")[0]).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_pretrained_from_the_hub_equals_timms_densenet(offline_hub):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = timm.create_model("densenet121.tv_in1k", pretrained=True).eval()
        for name in ("effi_densenet121.tv_in1k", "effi_densenet121"):  # tv_in1k is the default tag
            model = timm.create_model(name, pretrained=True).eval()
            assert model.pretrained_cfg["hf_hub_id"] == "timm/densenet121.tv_in1k"
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-5)


def test_pretrained_from_the_hub_with_a_new_classifier(offline_hub, densenet121_weights):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = timm.create_model("densenet121.tv_in1k", pretrained=True, num_classes=10).eval()
        model = timm.create_model("effi_densenet121.tv_in1k", pretrained=True, num_classes=10).eval()
        assert model(x).shape == (2, 10) and model.classifier.out_features == 10
        # as in timm: every weight but the classifier's comes from the file, the classifier starts fresh
        for key, value in model.state_dict().items():
            if not key.startswith("classifier."):
                assert torch.equal(value, densenet121_weights[key]), key
        assert not torch.equal(model.classifier.weight, densenet121_weights["classifier.weight"][:10])
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True),
                                   rtol=0, atol=1e-5)


def test_pretrained_without_cached_weights_says_where_it_looked(tmp_path):
    # offline with empty caches: one line naming both places and both ways forward, not the hub's generic error
    with pytest.raises(WeightsNotFoundError) as raised:
        timm.create_model("effi_densenet169", pretrained=True)
    message = str(raised.value)
    assert "\n" not in message and isinstance(raised.value, FileNotFoundError)
    assert message.startswith(
        "densenet169.tv_in1k: no pretrained weights offline, and the hub is off (HF_HUB_OFFLINE);")
    assert f"torchvision's cache ({tmp_path / 'torch' / 'hub' / 'checkpoints' / 'densenet169-b2777c0a.pth'})" in message
    assert f"the Hugging Face cache ({tmp_path / 'empty_hub'}, timm/densenet169.tv_in1k)" in message
    assert "pretrained_cfg_overlay=dict(file=" in message and "effidense convert --checkpoint" in message
    with pytest.raises(WeightsNotFoundError, match=r"^densenet121.ra_in1k: .*looked in the Hugging Face cache \("):
        effidense.densenet121(weights="ra_in1k")  # timm's own weights: torchvision has none to look for


def test_where_the_hub_was_tried_the_message_says_how_to_skip_its_retries(monkeypatch):
    """Offline, huggingface_hub retries each file for about a minute before it gives up: the message says how to
    skip the hub next time, and says it was skipped where it was."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    error = not_found_error("densenet121", "tv_in1k", "timm/densenet121.tv_in1k", None)
    assert "the hub cannot be reached (HF_HUB_OFFLINE=1 skips it and its retries where there is no network)" in \
        str(error)


@pytest.fixture
def torchvision_weights(no_real_caches, densenet121_weights) -> Path:
    """torchvision's DenseNet-121 weights in the (temporary) torchvision cache, nothing in the hub's."""
    return torchvision_cache(no_real_caches, "densenet121-a639ec97.pth", densenet121_weights)


@pytest.mark.filterwarnings("ignore:densenet121. pretrained= is deprecated")
def test_torchvisions_cached_weights_load_offline_as_torchvision_loads_them(torchvision_weights):
    """torchvision itself, offline from the same cache, is the referee: its file name and its legacy key fix."""
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = torchvision.models.densenet121(weights="DEFAULT").eval()(x)
        models = [effidense.densenet121(weights="DEFAULT"), effidense.densenet121(pretrained=True),
                  timm.create_model("effi_densenet121", pretrained=True),
                  torch.hub.load(str(ROOT), "densenet121", source="local", weights="DEFAULT")]
        for model in models:
            assert model.pretrained_cfg["file"] == str(torchvision_weights)
            torch.testing.assert_close(model.eval()(x), reference, rtol=0, atol=1e-5)


def test_torchvisions_cached_weights_with_a_new_head(torchvision_weights, densenet121_weights):
    model = effidense.densenet121(weights="tv_in1k", num_classes=4, in_chans=1)
    assert model.classifier.out_features == 4 and model.features.conv0.in_channels == 1
    assert torch.equal(model.features.norm5.running_var, densenet121_weights["features.norm5.running_var"])
    # timm's adaptation of the first convolution: one channel is the sum over RGB
    torch.testing.assert_close(model.features.conv0.weight,
                               densenet121_weights["features.conv0.weight"].sum(1, keepdim=True))


def test_a_local_file_wins_over_torchvisions_cache(torchvision_weights, densenet121_weights, tmp_path):
    mine = {k: -v if k == "features.conv0.weight" else v for k, v in densenet121_weights.items()}
    path = tmp_path / "mine.safetensors"
    save_file(mine, str(path))
    model = effidense.densenet121(weights="DEFAULT", pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(model.features.conv0.weight, mine["features.conv0.weight"])


def test_corrupt_torchvision_cache_is_named(no_real_caches, densenet121_weights):
    from effidense.weights import ConversionError

    bad = {**densenet121_weights, "features.norm5.running_var": -densenet121_weights["features.norm5.running_var"]}
    path = torchvision_cache(no_real_caches, "densenet121-a639ec97.pth", bad)
    with pytest.raises(ConversionError, match=rf"^{re.escape(str(path))}: 1 BatchNorm running_var tensor"):
        effidense.densenet121(weights="DEFAULT")


def test_environment_variables_point_a_fresh_process_at_the_cache(tmp_path, densenet121_weights):
    """What a user does: HF_HUB_CACHE / HF_HUB_OFFLINE in the environment, read when huggingface_hub is imported."""
    cache = hub_cache(tmp_path / "hub", "timm/densenet121.tv_in1k", densenet121_weights)
    expected = tmp_path / "expected.pt"
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    reference = timm.create_model("densenet121", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(cache / "models--timm--densenet121.tv_in1k" /
                                                                       "snapshots" / COMMIT / "model.safetensors")))
    with torch.no_grad():
        torch.save({"x": x, "y": reference.eval()(x)}, expected)
    script = ("import sys, timm, torch, effidense; d = torch.load(sys.argv[1]); "
              "m = timm.create_model('effi_densenet121', pretrained=True).eval(); "
              "torch.testing.assert_close(m(d['x']), d['y'], rtol=0, atol=1e-5); print('same')")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script + QUICK_EXIT, str(expected)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]


@pytest.mark.parametrize("damage", ["nan", "negative_var"])
def test_pretrained_weights_no_model_has_are_refused(tmp_path, monkeypatch, densenet121_weights, damage):
    from effidense.weights import ConversionError

    key = "features.norm5.running_var"
    bad = {**densenet121_weights, key: densenet121_weights[key].clone()}
    bad[key][0] = float("nan") if damage == "nan" else -1.0
    cache = hub_cache(tmp_path / "hub", "timm/densenet121.tv_in1k", bad)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    problem = (r"1 tensor\(s\) hold NaN/inf values" if damage == "nan" else
               r"1 BatchNorm running_var tensor\(s\) hold negative variances \(the model would output NaN\)")
    with pytest.raises(ConversionError, match=rf"^timm/densenet121.tv_in1k: {problem}: {key}$"):
        effidense.densenet121(weights="DEFAULT")
    # a local file through timm's pretrained_cfg_overlay meets the same check
    tiny = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10)
    weights = timm.create_model("effi_densenet121", **tiny).state_dict()
    weights["features.norm5.running_var"][0] = float("nan") if damage == "nan" else -1.0
    path = tmp_path / "tiny.safetensors"
    save_file(weights, str(path))
    with pytest.raises(ConversionError, match=rf"^{path}: {problem}: {key}$"):
        timm.create_model("effi_densenet121", pretrained=True, **tiny,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10))


@pytest.mark.parametrize("name, write, said", [
    ("w.safetensors", "torch", r"is a PyTorch checkpoint despite its name, and timm reads a pretrained file by its "
                               r"name: name it \.pth$"),
    ("w.pth", "safetensors", r"is a safetensors file despite its name, and timm reads a pretrained file by its name: "
                             r"name it \.safetensors$"),
    ("w.pth", "random", r": corrupt or truncated checkpoint \(neither a PyTorch nor a safetensors file\)$"),
])
def test_a_pretrained_file_whose_name_lies_is_one_line(tmp_path, name, write, said):
    from effidense.weights import ConversionError

    tiny = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10)
    weights = timm.create_model("effi_densenet121", **tiny).state_dict()
    path = tmp_path / name
    if write == "torch":
        torch.save(weights, path)
    elif write == "safetensors":
        save_file(weights, str(path))
    else:
        path.write_bytes(b"\x00not weights" * 100)
    with pytest.raises(ConversionError, match=rf"^{path}{' ' if write != 'random' else ''}{said}"):
        timm.create_model("effi_densenet121", pretrained=True, **tiny,
                          pretrained_cfg_overlay=dict(file=str(path), num_classes=10))

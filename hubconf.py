"""torch.hub entry points: ``torch.hub.load("<owner>/effidense", "densenet121", weights="DEFAULT")``, or
``torch.hub.load(repo_dir, "densenet121", source="local", weights="IMAGENET1K_V1")`` from a checkout.

The entry points are effidense's builders (:func:`effidense.registry.create`), which take torchvision's ``weights=``
(``None``, ``"DEFAULT"``, ``"IMAGENET1K_V1"``, torchvision's enum member, or a timm tag such as ``"ra_in1k"``),
``progress=`` and the deprecated ``pretrained=``; weights come as with ``timm.create_model("effi_<name>.<tag>",
pretrained=True)``: torchvision's weights from torchvision's own cache (``$TORCH_HOME/hub/checkpoints``) when it
holds them, else from timm's Hugging Face hub repositories (or their cache). Other keyword arguments go to the model
(``num_classes``, ``in_chans``, ``memory``, ``memory_efficient``, ...). ``weights=`` takes names, not files: load a
file with ``model.load_state_dict(effidense.weights.load_checkpoint(path).state_dict)``.
"""
from effidense.registry import (  # noqa: F401 (the entry points)
    densenet40_k12,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc100_k12,
    densenet_bc190_k40,
    densenet_bc250_k24,
)

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]

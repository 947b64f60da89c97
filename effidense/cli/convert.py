"""Convert DenseNet weights between torchvision, timm, MONAI and effidense layouts (.pth / .safetensors), and
inflate 2D weights to 3D; convert FC-DenseNet (segmentation) weights to and from safetensors.

Examples::

    python tools/convert.py --checkpoint densenet121-a639ec97.pth --output densenet121_effi.safetensors --verify
    python tools/convert.py --to efficient --checkpoint densenet121-a639ec97.pth --output densenet121_effi.pth
    python tools/convert.py --checkpoint effi.safetensors --output tv.pth --to torchvision
    python tools/convert.py --checkpoint densenet121-a639ec97.pth --output monai2d.pth --to monai --verify
    python tools/convert.py --checkpoint densenet121-a639ec97.pth --output monai3d.pth --to monai --inflate mean \
        --in-chans 1 --num-classes 2
    python tools/convert.py --checkpoint monai3d.pth --output effi3d.safetensors --verify
    python tools/convert.py --checkpoint tiramisu.pth --output tiramisu.safetensors --verify

Exit status: 0 on success, 1 when the input cannot be read or converted or the output cannot be written,
2 for bad arguments, 3 when --verify finds a difference above the tolerance (nothing is written then).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from effidense.layouts import INFLATE_METHODS, LAYOUT_ALIASES, LAYOUTS, VERIFY_TOLERANCE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effidense convert",
        description="Convert DenseNet weights between torchvision, timm, MONAI (2D and 3D) and effidense layouts, "
                    "and FC-DenseNet (segmentation) weights to and from safetensors; "
                    "optionally inflate 2D weights to 3D (--inflate), adapt the first convolution to other input "
                    "channels (--in-chans) and put on a fresh classifier (--num-classes). The architecture is "
                    "read off the weights (or checked against --model) and every unknown, missing or mis-shaped key "
                    "is reported by name. Inputs are read safely (torch.load(weights_only=True) or safetensors) "
                    "and refused when their values are no trained model's (NaN/inf, integer or bool weights, "
                    "negative BatchNorm running variances); the output is written atomically and never overwrites a "
                    "file without --force.",
        epilog="Exit status: 0 ok, 1 conversion error, 2 bad arguments, 3 --verify found a difference.")
    layouts = list(LAYOUTS) + list(LAYOUT_ALIASES)
    parser.add_argument("--checkpoint", required=True, metavar="IN",
                        help="input weights: .pth/.pt/.bin (a state dict or a training checkpoint holding one under "
                             "'state_dict' or 'model') or .safetensors; recognised by content, not name")
    parser.add_argument("--output", required=True, metavar="OUT", help="file to write")
    parser.add_argument("--to", default="effidense", choices=layouts, dest="target",
                        help="layout to write (default effidense); 'monai' = the keys of MONAI's "
                             "networks.nets.DenseNet; 'efficient' = effidense and 'normal' = torchvision, as in the "
                             "original converter")
    parser.add_argument("--from", default="auto", choices=["auto", *layouts], dest="source",
                        help="layout of the input (default auto: the file's metadata, MONAI or legacy torchvision "
                             "names, or the architecture decide; torchvision and timm keys are identical; legacy "
                             "torchvision hub files convert to MONAI as MONAI's own loader renames them)")
    parser.add_argument("--inflate", choices=INFLATE_METHODS, default=None,
                        help="write 3D weights for the same network with 3D layers (I3D inflation of a 2D "
                             "checkpoint): 'mean' repeats each k x k kernel over a depth of k and divides by k (I3D's; "
                             "inexact near the first and last slices, where zero padding enters), 'center' puts it "
                             "at the middle depth tap with zeros elsewhere (exact on depth-constant inputs)")
    # plain int, checked after parsing: the shared argparse types live beside torch, which --help must not import
    parser.add_argument("--in-chans", type=int, default=None, metavar="N",
                        help="adapt the first convolution to N input channels: each gets the sum over RGB divided by "
                             "N, so a grey image gives the RGB network's activations on it (e.g. 1 for CT or MRI)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N",
                        help="a fresh N-class classifier (seeded, zero bias; 0: none) in place of the checkpoint's, "
                             "so the file loads strictly into e.g. MONAI's DenseNet121(..., out_channels=N)")
    parser.add_argument("--format", choices=["safetensors", "pth"], default=None, dest="fmt",
                        help="output format (default: from the output's suffix, .safetensors or .pth/.pt/.bin; "
                             "safetensors when the suffix says nothing); safetensors files carry the architecture, "
                             "source layout and format version in their header")
    parser.add_argument("--model", default=None, metavar="NAME",
                        help="require the weights to fit this network (e.g. densenet121 or effi_densenet121) instead "
                             "of only inferring the architecture; mis-shaped keys are listed; fcdensenet56, 67 or 103 "
                             "for FC-DenseNet weights")
    parser.add_argument("--ema", action="store_true",
                        help="convert the EMA weights of a training checkpoint (state_dict_ema / model_ema)")
    parser.add_argument("--verify", action="store_true",
                        help="build the source layout's model with the input weights and the target layout's model "
                             "with the written file, run one random batch through both in eval mode and require a max "
                             f"abs difference <= {VERIFY_TOLERANCE:g}; on failure nothing is written. For an "
                             "FC-DenseNet: the plain, efficient and frugal FCDenseNet with the written file and a "
                             "reference port with the input weights, each against plain FCDenseNet with the input's")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify and (args.inflate or args.in_chans is not None or args.num_classes is not None):
        parser.error("--verify compares models that compute the same function, and --inflate, --in-chans and "
                     "--num-classes change it; verify a plain conversion, then adapt its output")
    if args.in_chans is not None and args.in_chans < 1:
        parser.error(f"argument --in-chans: must be at least 1, got {args.in_chans}")
    if args.num_classes is not None and args.num_classes < 0:
        parser.error(f"argument --num-classes: must be 0 or more, got {args.num_classes}")
    from effidense.convert import ConversionError, VerificationError, convert_checkpoint  # torch: after --help

    try:
        conversion, diff = convert_checkpoint(
            args.checkpoint, args.output, target=args.target, source=args.source, fmt=args.fmt, model=args.model,
            use_ema=args.ema, verify=args.verify, force=args.force, inflate=args.inflate, in_chans=args.in_chans,
            num_classes=args.num_classes)
    except VerificationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    arch = conversion.architecture
    print(f"architecture: {conversion.model_name or 'custom'} ({arch.describe()})")
    for note in conversion.notes:
        print(f"note: {note}")
    dims = f", {conversion.spatial_dims}D ({conversion.inflation} inflation)" if conversion.inflation else ""
    print(f"wrote {args.output}: {len(conversion.state_dict)} tensors, {conversion.source} -> {conversion.target} "
          f"layout{dims}")
    if diff is not None:
        print(f"verify: max abs difference {diff:.3g} (tolerance {VERIFY_TOLERANCE:g}): ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

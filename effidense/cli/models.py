"""``effidense models``: every model name ``--model`` takes (and ``timm.create_model`` knows after ``import
effidense``), with its configuration; no torch import, so it answers at once."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from effidense.configs import CONFIGS, model_names


def build_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog="effidense models", description="List the model names the commands' --model flag takes: the timm names "
                                             "effi_<config> (also the bare <config>), and 'custom'.")


def main(argv: Sequence[str] | None = None) -> int:
    build_parser().parse_args(argv)
    for name, config in CONFIGS.items():
        inputs = "32 px, CIFAR" if config.get("small_inputs") else "224 px, ImageNet"
        print(f"effi_{name:<20} k={config['growth_rate']}, blocks {config['block_config']}, {inputs}")
    print(f"(also the bare names, e.g. {next(iter(CONFIGS))}, and 'custom': {len(model_names())} in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``flax-latentup`` command."""

from __future__ import annotations

import argparse
import sys

from flax_latentup import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-latentup",
        description="JAX/Flax Stable Diffusion x2 latent upscaler.",
    )
    parser.add_argument("--version", action="version", version=f"flax-latentup {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flax-latentup`` console script."""
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())

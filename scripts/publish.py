""" Publish a finished training run to the Hugging Face Hub: model.safetensors, config.json, README.md.

    python scripts/publish.py output/vit_small_cifar.c10 --repo-id timm-reversible/vit_small_cifar.c10
    python scripts/publish.py output/digits_run --repo-id me/vit_small_cifar-digits --dry-run --local-dir published/

The logic, command line included, lives in `timm_reversible.publish` (`cli`).
"""
import sys

from timm_reversible.publish import cli

if __name__ == '__main__':
    sys.exit(cli())

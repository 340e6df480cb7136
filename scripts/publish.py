""" Publish a finished training run to the Hugging Face Hub: model.safetensors, config.json, README.md.

    python scripts/publish.py output/vit_small_cifar.c10 --repo-id timm-reversible/vit_small_cifar.c10
    python scripts/publish.py output/digits_run --repo-id me/vit_small_cifar-digits --dry-run --local-dir published/

The logic lives in `timm_reversible.publish`.
"""
import argparse
import sys

from timm_reversible.publish import DEFAULT_ACT_BATCH_SIZE, PUBLISHED_FILES, PublishError, publish


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('run_dir', metavar='RUN_DIR', help='finished run: <output>/<experiment> of scripts/train.py')
    parser.add_argument('--repo-id', required=True,
                        help='Hub repository NAMESPACE/NAME; NAME <model>.<tag> (e.g. vit_small_cifar.c10) is what '
                             'timm.create_model("<model>.<tag>", pretrained=True) loads')
    parser.add_argument('--private', action='store_true', help='create the repository as private (if it is new)')
    parser.add_argument('--dry-run', action='store_true', help='write the files to --local-dir, upload nothing')
    parser.add_argument('--local-dir', metavar='DIR', help='folder to write the published files to (and keep)')
    parser.add_argument('--benchmark', metavar='PATH',
                        help='results.json of scripts/benchmark.py: activation memory and the comparison table')
    parser.add_argument('--act-batch-size', type=int, default=DEFAULT_ACT_BATCH_SIZE,
                        help='batch of the CPU activation-memory measurement without --benchmark (default %(default)s)')
    parser.add_argument('--card-dir', metavar='DIR', help='folder of the model card templates (default model_cards/)')
    args = parser.parse_args(argv)
    if args.dry_run and not args.local_dir:
        parser.error('--dry-run needs --local-dir DIR')

    try:
        result = publish(
            args.run_dir, args.repo_id, private=args.private, dry_run=args.dry_run, local_dir=args.local_dir,
            benchmark=args.benchmark, act_batch_size=args.act_batch_size, template_dir=args.card_dir)
    except PublishError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    f = result.figures
    print(f"{args.repo_id}: {f['params'] / 1e6:.2f}M params, {f['gmacs']:.4g} GMACs, "
          f"{f['act_bytes'] / 2 ** 20:.2f} MiB/img activations ({f['act_source']})")
    if result.folder is not None:
        print(f'wrote {", ".join(PUBLISHED_FILES)} to {result.folder}')
        print(f'load: timm.create_model("local-dir:{result.folder}", pretrained=True)')
    if result.commit is not None:
        print(f'uploaded: {getattr(result.commit, "commit_url", result.commit)}')
        print(f'load: timm.create_model("hf-hub:{args.repo_id}", pretrained=True)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

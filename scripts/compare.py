#!/usr/bin/env python3
""" Compare finished runs of scripts/train.py, grouped by model: training curves and the study's table.

    python scripts/compare.py output/study/* --out output/study/compare

Writes val_top1.png, train_loss.png (mean over a model's runs, min-max band), table.md and table.json to
--out, and prints the table. Unfinished runs and runs on another dataset are skipped, saying why; a folder
that is not a run is an error.
"""
import argparse
import sys
from typing import List, Optional

from timm_reversible.study import NotARunError, compare, format_table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', metavar='RUN_DIR', help='run folders of scripts/train.py')
    parser.add_argument('--out', required=True, metavar='DIR', help='where the plots and the table go')
    args = parser.parse_args(argv)
    try:
        rows, skipped = compare(args.runs, args.out)
    except NotARunError as e:
        print(f'ERROR: {e}', file=sys.stderr)
        return 1
    for s in skipped:
        print(f'skipped {s.path}: {s.reason}')
    print(format_table(rows))
    print(f'wrote {args.out}/val_top1.png, train_loss.png, table.md, table.json')
    return 0


if __name__ == '__main__':
    sys.exit(main())

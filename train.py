#!/usr/bin/env python
"""Same as `transformer-mt train ...`: python train.py --config configs/tiny.yaml --workdir runs/tiny"""

import sys

from transformer_mt.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))

"""Load (and so cache) a dataset from the command line, printing its summary and load time.

    python -m gujax.data cifar10 train --data-dir /tmp/data/cifar10 [--cache-dir DIR]

Run it twice to see the first (decoding) and the cached load time.
"""
import argparse
import time

import numpy as np

from gujax.data.sources import load


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("split")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    ds = load(args.name, args.split, data_dir=args.data_dir, cache_dir=args.cache_dir)
    seconds = time.perf_counter() - start
    print(f"{ds}: {seconds:.2f} s; labels per class {np.bincount(ds.labels).tolist()}; "
          f"classes {', '.join(ds.class_names)}")


if __name__ == "__main__":
    main()

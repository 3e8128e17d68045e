"""Microbenchmarks of dense_rlhf.dense_rewards against the alternatives: `dense-rlhf bench`, writing into this
repository's committed results unless --out is given.

    python benchmarks/bench_dense_rewards.py --quick            # under a minute on 2 CPU cores
    python benchmarks/bench_dense_rewards.py --threads 1        # the full CPU grid
    python benchmarks/bench_dense_rewards.py --device cuda      # the full GPU grid, fp32 and bf16

Results go to benchmarks/results/<device>/dense_rewards.{json,md,png}; see dense_rlhf/bench/.
"""

import os
import sys

from dense_rlhf.bench.run import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not any(arg == "--out" or arg.startswith("--out=") for arg in argv):
        # relative to the current folder, so that the command the results record names no machine path
        argv = ["--out", os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))] + argv
    sys.exit(main(argv))

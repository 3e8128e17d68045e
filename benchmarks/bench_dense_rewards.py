"""Microbenchmarks of dense_rlhf.dense_rewards against the alternatives; the same as `dense-rlhf bench`.

    python benchmarks/bench_dense_rewards.py --quick            # under a minute on 2 CPU cores
    python benchmarks/bench_dense_rewards.py --threads 1        # the full CPU grid
    python benchmarks/bench_dense_rewards.py --device cuda      # the full GPU grid, fp32 and bf16

Results go to benchmarks/results/<device>/dense_rewards.{json,md,png}; see dense_rlhf/bench/.
"""

import sys

from dense_rlhf.bench.run import main

if __name__ == "__main__":
    sys.exit(main())

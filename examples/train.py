"""A toy trainer for the examples: 'trains' for a few steps and writes its metrics.

python -m train --learning_rate=0.01 --batch_size=32 --output_dir=/tmp/out
"""

import argparse
import json
import math
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate", type=float, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()

    loss = 2.0
    for step in range(1, args.steps + 1):
        # A made-up loss curve: best around lr=0.01, slightly better with bigger batches.
        loss = 0.1 + abs(math.log10(args.learning_rate) + 2) * 0.3 + 8 / args.batch_size + 1.5 / step
        print(f"step {step}/{args.steps} loss={loss:.4f}", flush=True)
        time.sleep(0.2)
    os.makedirs(args.output_dir, exist_ok=True)
    name = f"lr{args.learning_rate}-bs{args.batch_size}.json"
    with open(os.path.join(args.output_dir, name), "w") as f:
        json.dump({"learning_rate": args.learning_rate, "batch_size": args.batch_size, "loss": loss}, f)


if __name__ == "__main__":
    main()

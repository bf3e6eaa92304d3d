"""Train both students together.

python -m train --config configs/synthetic.yaml [key.sub=value ...] [--run-dir runs/x]
python -m train --resume runs/x [key.sub=value ...]
torchrun --nproc_per_node N -m train --config ...   (DistributedDataParallel, one process per GPU)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path

from train.config import ConfigError, load_config
from train.data import DatasetError
from train.run_dir import CHECKPOINT_FILE, RunBusy, held, load_run_config

LOCK_FILE = "train.lock"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, help="YAML config, e.g. configs/synthetic.yaml")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run from its last checkpoint")
    parser.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/<name>)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. iterations=1000 data.batch_size=4")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only rank 0 reports
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )

    try:
        if args.resume:
            run_dir = args.resume
            cfg = load_run_config(run_dir, args.overrides)
        elif args.config:
            cfg = load_config(args.config, args.overrides)
            run_dir = args.run_dir or Path("runs") / cfg.name
            if (run_dir / CHECKPOINT_FILE).exists():
                parser.error(
                    f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                    "or choose another name= / --run-dir"
                )
        else:
            parser.error("give --config FILE (a new run) or --resume RUN_DIR")

        from train import distributed  # imports torch; keep --help and config errors fast
        from train.trainer import Trainer, TrainingDiverged

        # one training at a time in a run dir (rank 0 holds the lock for all ranks)
        with held(Path(run_dir) / LOCK_FILE, "training") if rank == 0 else contextlib.nullcontext():
            distributed.init(cfg.device)
            try:
                Trainer(cfg, run_dir, resume=bool(args.resume)).fit()
            except TrainingDiverged as e:
                print(f"error: {e}", file=sys.stderr)
                return 3
            finally:
                distributed.shutdown()
    except (ConfigError, DatasetError, OSError, RunBusy) as e:  # OSError: a missing file, a full disk (DiskFull)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

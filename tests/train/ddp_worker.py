"""One rank of the DDP test: train like `torchrun -m train` does, then dump this rank's weights."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from train import distributed
from train.config import load_config
from train.trainer import Trainer

if __name__ == "__main__":
    run_dir, dump_dir, *overrides = sys.argv[1:]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / "synthetic.yaml", overrides)
    ctx = distributed.init(cfg.device)
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    state = {k: v.contiguous() for k, v in trainer.students.state_dict().items() if v.dtype != torch.int64}
    save_file(state, str(Path(dump_dir) / f"rank{ctx.rank}.safetensors"))
    distributed.shutdown()

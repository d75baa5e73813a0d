"""Run under `torchrun`: train one config on every rank, then save each rank's trainable weights."""

import json
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from restuning.train.config import TrainConfig, from_dict
from restuning.train.trainer import Trainer

if __name__ == "__main__":
    config = from_dict(TrainConfig, json.loads(Path(sys.argv[1]).read_text()))
    trainer = Trainer(config, progress=False)
    assert PartialState().num_processes == 2, "expected two processes"
    trainer.run()
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(weights, str(Path(sys.argv[2]) / f"rank{PartialState().process_index}.safetensors"))

"""What a finished run leaves in its workdir, for the tools that read it.

`results.json` (written by `train.train_and_evaluate`) records the test
metrics, the run's config and command line; publishing, the comparison
scripts and the model card read it back through `finished_results`.
"""

import json
import os
from typing import Any, Dict, Mapping, Optional

RESULTS_FILE = 'results.json'


def finished_results(workdir: str) -> Optional[Dict[str, Any]]:
  """The `results.json` of a run that finished in `workdir`, else None."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def pretrained_path(config: Mapping[str, Any]) -> Optional[str]:
  """The checkpoint a run starts from: `config.pretrained_path`, else
  `{config.pretrained_dir}/{config.model.model_name}.npz` (vit_jax's
  convention), else None (from scratch)."""
  if config.get('pretrained_path'):
    return config['pretrained_path']
  if config.get('pretrained_dir'):
    return os.path.join(
      config['pretrained_dir'], f'{config["model"]["model_name"]}.npz'
    )
  return None

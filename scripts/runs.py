"""What the comparison scripts share: a training run reused once it has
finished, and a table written beside its rows."""

import os
from typing import Any, Dict, List

import ml_collections

from vit_jax import paths
from vit_jax import results as results_lib
from vit_jax import train as train_lib


def finished_or_trained(
  config: ml_collections.ConfigDict, workdir: str
) -> Dict[str, Any]:
  """The results of the run in `workdir`, training it first unless it
  finished in an earlier invocation."""
  finished = results_lib.finished_results(workdir)
  return finished or train_lib.train_and_evaluate(config, workdir)


def write_table(out: str, text: str, rows: List[Dict[str, Any]]) -> None:
  """`OUT/results.md` (the Markdown table) and `OUT/results.json` (its
  rows), each written atomically."""
  paths.write_text(os.path.join(out, 'results.md'), text + '\n')
  paths.write_json(os.path.join(out, 'results.json'), rows)

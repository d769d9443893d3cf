r"""Supervised fine-tuning on prompt/response pairs: the loss counts the response tokens only.

  python -m experiments.sft --data_source=sft --data_files=pairs.jsonl \
      --init_from=/ckpt/base_weights --learning_rate=1e-4 --workdir=/tmp/sft

Each line of the JSONL files is an object with a prompt and a response string (`--prompt_field`,
`--response_field`); an example is prompt + response + eos, packed like pretraining documents
(attention stays within the example), and the prompt tokens are masked out of the next-token and
MTP losses. `--init_from` starts from converted or earlier weights (an r1jax weights directory).
The other flags, the run directory and resuming are pretraining's (`experiments/train_main.py`).
"""

from __future__ import annotations

from absl import app

from experiments import train_main
from experiments.flag_errors import parse_flags_or_exit


def main(argv):
  train_main.main(argv, job="sft")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)

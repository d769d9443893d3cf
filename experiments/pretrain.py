r"""Pretrains a DeepSeek-V3-architecture model: next-token + MTP losses, aux-loss-free balancing.

  python -m experiments.pretrain --flagfile=experiments/configs/tiny_cpu.flags --workdir=/tmp/run
  python -m experiments.pretrain --preset=small --data_source=text --data_files='corpus/*.txt' \
      --workdir=/tmp/small

Data: the synthetic addition task by default, or text / JSONL files (`--data_source`,
`--data_files`), packed with per-document attention. `--workdir` holds the run record,
metrics.jsonl, TensorBoard files and checkpoints; rerunning with it resumes. The flags are in
`experiments/train_main.py` (`--helpfull` lists them); `experiments/configs/` has pinned ones.
"""

from __future__ import annotations

from absl import app

from experiments import train_main
from experiments.flag_errors import parse_flags_or_exit


def main(argv):
  train_main.main(argv, job="pretrain")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags_or_exit)

r"""The R1 recipe in miniature, end to end: the project's main job.

  python -m experiments.r1_pipeline                     # experiments/configs/r1_pipeline_cpu.flags
  python -m experiments.r1_pipeline --seed=1 --workdir=/tmp/r1_seed1

On carry-chain addition (a+b= with 3-4 digit operands, byte tokens), in `--workdir`:
  base               pretrain an MLA + MoE teacher (the `tiny` preset) on a corpus that answers
                     directly most of the time and shows the digit-by-digit scratchpad inside
                     <think> in `--think_fraction` of the documents
  r1_zero            GRPO from base, accuracy + format (<think> required) rewards
  cold_start_sft     SFT of base on a few hundred reference chains of thought
  reasoning_grpo     GRPO from cold_start_sft, accuracy + language-consistency rewards
  rejection_sampling samples of reasoning_grpo on training problems, kept when correct, well
                     formed and in the target notation (r1jax.train.rejection)
  rejection_sft      SFT restarting from base on the kept samples
  student_base       a dense student (no MoE, no MTP) pretrained on the same corpus
  student_distilled  student_base fine-tuned on the teacher's kept samples
Every stage is evaluated on the same held-out problems (`--eval_seed`): pass@1 over
`--eval_samples` samples at T=0.6 / top-p 0.95, pass@k, greedy accuracy, think rate, format rate
and mean length. The table is printed at the end; `results.json` holds {stage: {metric:
value}} plus each stage's seconds; `plots/rl_curves.png` shows both GRPO stages per iteration.

Each stage directory has its run record, metrics, checkpoint or data and `final/` weights
(r1jax.train.stages); a killed pipeline rerun with the same flags skips the finished stages.
With --parallel_stages (default) a second process (this command with --only_stages, output to
the first stage's beside.log) pretrains the student while base trains, then runs cold_start_sft
.. rejection_sft while r1_zero trains; the second process exits when the pipeline dies, and
whatever it left unfinished runs in the pipeline's process. Every stage is deterministic on CPU,
so the results do not depend on which process ran it. Seed 0 of the pinned flags: 612 s on the
2-core VM, R1-Zero pass@1 0.387 -> 0.818 (README has three seeds).
Before RL the base model's accuracy when it thinks is checked: RL switches a model into thinking
and needs a scratchpad that already works, so a base below `--min_think_accuracy` is reported
as such instead of presenting a failed RL stage as a result.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import jax
from absl import app, flags, logging

from experiments.flag_errors import exit_on_bad_input, parse_flags_or_exit
from experiments.flagfile import replayable_flags
from r1jax import ModelConfig, host_memory
from r1jax.data.tasks import THINK_OPEN, AdditionTask, corpus_documents, sample_problems
from r1jax.data.tokenizer import load_tokenizer
from r1jax.train import grpo, stages
from r1jax.train.evaluation import evaluate, think_accuracy
from r1jax.train.loop import TrainConfig
from r1jax.train.rejection import RejectionConfig, rejection_sample
from r1jax.train.rewards import RewardError, RewardSet
from r1jax.train.rl import RLConfig
from r1jax.train.stages import EVAL_METRICS, table

R1_ZERO_REWARDS = {"accuracy": 1.0, "format_think": 1.0}
REASONING_REWARDS = {"accuracy": 1.0, "language": 1.0}
DEFAULT_FLAGFILE = os.path.join(os.path.dirname(__file__), "configs", "r1_pipeline_cpu.flags")

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir", "/tmp/r1jax_r1_pipeline", "Pipeline directory (resumed if it exists)."
)
flags.DEFINE_integer("seed", 0, "Seed of the weights, corpus, sampling and RL.")
flags.DEFINE_integer("eval_seed", 1234, "Seed of the held-out problems (the same for every stage).")
flags.DEFINE_string("tokenizer", "task", "bytes | task (r1jax.data.tokenizer): every stage's.")
flags.DEFINE_integer("min_digits", 3, "Addition operands: fewest digits.")
flags.DEFINE_integer("max_digits", 4, "Addition operands: most digits.")
# --- models
flags.DEFINE_string("teacher_preset", "tiny", "The MLA + MoE teacher's preset.")
flags.DEFINE_list("teacher_overrides", [], "Teacher ModelConfig fields, KEY=VALUE,...")
flags.DEFINE_list(
  "student_overrides",
  ["first_k_dense_replace=3", "num_nextn_predict_layers=0", "hidden_size=48"],
  "Student ModelConfig fields over the teacher's (dense: every layer before the first MoE one).",
)
# --- corpus and pretraining
flags.DEFINE_integer("corpus_size", 100_000, "Pretraining documents.")
flags.DEFINE_float("think_fraction", 0.3, "Fraction of the corpus with the <think> scratchpad.")
flags.DEFINE_integer("pretrain_steps", 1000, "Teacher pretraining steps.")
flags.DEFINE_integer("student_pretrain_steps", 1000, "Student pretraining steps.")
flags.DEFINE_integer("batch_size", 32, "Rows per training step (all training stages).")
flags.DEFINE_integer("seq_len", 128, "Tokens per row (documents are packed).")
flags.DEFINE_float("learning_rate", 3e-3, "Pretraining peak learning rate.")
flags.DEFINE_enum(
  "lr_schedule",
  "wsd",
  ["cosine", "wsd", "constant"],
  "Every training stage's schedule (r1jax.train.optim). wsd holds the peak while the scratchpad "
  "skill appears (suddenly, late in pretraining) and decays only at the end.",
)
flags.DEFINE_float("decay_fraction", 0.2, "wsd: the final fraction of the steps that decays.")
# --- SFT stages
flags.DEFINE_integer("cold_start_examples", 512, "Reference chains of thought for the cold start.")
flags.DEFINE_integer("sft_steps", 150, "Steps of each SFT stage.")
flags.DEFINE_float("sft_learning_rate", 1e-3, "SFT peak learning rate.")
# --- GRPO stages
flags.DEFINE_integer("r1_zero_iterations", 80, "R1-Zero GRPO iterations.")
flags.DEFINE_integer("reasoning_iterations", 40, "Reasoning GRPO iterations.")
flags.DEFINE_integer("prompts_per_iteration", 16, "GRPO prompts per iteration.")
flags.DEFINE_integer("group_size", 8, "GRPO samples per prompt (G).")
flags.DEFINE_float("rl_learning_rate", 2e-4, "GRPO Adam learning rate.")
flags.DEFINE_float("rl_temperature", 1.0, "GRPO sampling temperature.")
flags.DEFINE_integer("max_new_tokens", 80, "Reply budget in tokens (RL, sampling, evaluation).")
# --- rejection sampling and evaluation
flags.DEFINE_integer("rejection_problems", 512, "Training problems sampled for rejection SFT.")
flags.DEFINE_integer("rejection_samples", 4, "Samples per problem.")
flags.DEFINE_integer("eval_problems", 128, "Held-out problems.")
flags.DEFINE_integer("eval_samples", 4, "Samples per held-out problem (pass@1 averages them).")
flags.DEFINE_float(
  "min_think_accuracy", 0.3, "Below this base accuracy when thinking, RL is not expected to work."
)
flags.DEFINE_bool(
  "parallel_stages",
  True,
  "Run independent stages in a second process: the student's pretraining beside the "
  "teacher's, the cold-start chain (cold_start_sft .. rejection_sft) beside R1-Zero. On 2 cores "
  "two of these small processes run at ~1.9x the throughput of one.",
)
flags.DEFINE_list(
  "only_stages", [], "Run just these stages, in order, and exit (what --parallel_stages starts)."
)
# What --parallel_stages runs in the second process: stages that need only the corpus, and the
# chain that needs only the base model.
BESIDE_BASE = ("student_base",)
BESIDE_R1_ZERO = ("cold_start_sft", "reasoning_grpo", "rejection_sampling", "rejection_sft")
_PROMPT_LEN = 12  # "dddd+dddd=": 10 bytes, left-padded


def _overrides(items: list[str], flag: str) -> dict:
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--{flag}: {item!r} is not KEY=VALUE")
    out[key] = json.loads(value) if value not in ("", "none") else None
  return out


def model_configs() -> tuple[ModelConfig, ModelConfig]:
  teacher = ModelConfig.from_preset(
    FLAGS.teacher_preset, **_overrides(FLAGS.teacher_overrides, "teacher_overrides")
  )
  student = ModelConfig.from_preset(
    FLAGS.teacher_preset,
    **{
      **_overrides(FLAGS.teacher_overrides, "teacher_overrides"),
      **_overrides(FLAGS.student_overrides, "student_overrides"),
    },
  )
  vocab = load_tokenizer(FLAGS.tokenizer).vocab_size
  if teacher.vocab_size < vocab:
    raise ValueError(
      f"--teacher_overrides: vocab_size {teacher.vocab_size} is below the {FLAGS.tokenizer!r} "
      f"tokenizer's {vocab}; set vocab_size={vocab}"
    )
  if student.num_moe_layers:
    raise ValueError(
      "--student_overrides: the student must be dense; set first_k_dense_replace="
      f"{student.num_hidden_layers}"
    )
  return teacher, student


def train_config(steps: int, learning_rate: float, mtp: bool) -> TrainConfig:
  return TrainConfig(
    num_steps=steps,
    batch_size=FLAGS.batch_size,
    seq_len=FLAGS.seq_len,
    learning_rate=learning_rate,
    lr_schedule=FLAGS.lr_schedule,
    decay_fraction=FLAGS.decay_fraction,
    warmup_steps=min(50, steps // 10),
    seed=FLAGS.seed,
    log_every=max(steps // 10, 1),
    mtp_weight=0.3 if mtp else 0.0,
  )


class Pipeline:
  """Runs the stages in order, skipping the finished ones; collects their held-out metrics."""

  def __init__(self, teacher: ModelConfig, student: ModelConfig, flags_text: str):
    self.teacher, self.student, self.flags_text = teacher, student, flags_text
    self.task = AdditionTask(min_digits=FLAGS.min_digits, max_digits=FLAGS.max_digits)
    self.tokenizer = load_tokenizer(FLAGS.tokenizer)
    self.results: dict[str, dict] = {}
    self.rl_history: dict[str, list[dict]] = {}
    self.skipped: list[str] = []  # finished by an earlier run
    self.beside: set[str] = set()  # run by this run's second process

  def dir(self, stage: str) -> str:
    return os.path.join(FLAGS.workdir, stage)

  # ------------------------------------------------------------------- evaluation
  def evaluate(self, cfg, variables) -> dict[str, float]:
    return evaluate(
      cfg,
      variables,
      self.task,
      num_problems=FLAGS.eval_problems,
      samples=FLAGS.eval_samples,
      max_prompt_len=_PROMPT_LEN,
      max_new_tokens=FLAGS.max_new_tokens,
      seed=FLAGS.eval_seed,
      tokenizer=self.tokenizer,
    )

  def think_accuracy(self, cfg, variables) -> float:
    return think_accuracy(
      cfg,
      variables,
      self.task,
      num_problems=FLAGS.eval_problems,
      max_prompt_len=_PROMPT_LEN + len(self.tokenizer.encode(THINK_OPEN)),
      max_new_tokens=FLAGS.max_new_tokens,
      seed=FLAGS.eval_seed,
      tokenizer=self.tokenizer,
    )

  # ------------------------------------------------------------------- stages
  def run_stage(self, stage: str, body) -> dict:
    done = stages.finished(self.dir(stage))
    if done is not None:
      row = "  ".join(f"{k} {done[k]:.3f}" for k in EVAL_METRICS if k in done)
      how = "(in the second process)" if stage in self.beside else ": finished earlier, skipped"
      print(f"== {stage} {how}: {row}  ({done.get('seconds', 0):.0f} s)".replace(" :", ":"))
      self.results[stage] = done
      if stage not in self.beside:
        self.skipped.append(stage)
      return done
    print(f"== {stage}", flush=True)
    os.makedirs(self.dir(stage), exist_ok=True)
    started = time.perf_counter()
    result = body()
    result["seconds"] = time.perf_counter() - started
    row = "  ".join(f"{k} {result[k]:.3f}" for k in EVAL_METRICS if k in result)
    print(f"== {stage}: {row}  ({result['seconds']:.0f} s)", flush=True)
    self.results[stage] = stages.finish(self.dir(stage), result)
    return result

  def corpus(self, count: int) -> list[dict[str, str]]:
    block = 1000
    docs = []
    for b in range(math.ceil(count / block)):
      docs += corpus_documents(self.task, FLAGS.seed, b, block, think_fraction=FLAGS.think_fraction)
    return [{"text": d} for d in docs[:count]]

  def pretrain(self, stage: str, cfg: ModelConfig, steps: int) -> dict:
    tcfg = train_config(steps, FLAGS.learning_rate, cfg.num_nextn_predict_layers > 0)
    variables = stages.train_stage(
      self.dir(stage),
      cfg,
      tcfg,
      self.corpus(FLAGS.corpus_size),
      sft=False,
      flags_text=self.flags_text,
      tokenizer=FLAGS.tokenizer,
      save_every=max(steps // 4, 1),
    )
    result = self.evaluate(cfg, variables)
    result["think_acc"] = self.think_accuracy(cfg, variables)
    return result

  def sft(self, stage: str, init: str, records: list[dict[str, str]]) -> dict:
    cfg, variables = stages.final_weights(self.dir(init))
    tcfg = train_config(FLAGS.sft_steps, FLAGS.sft_learning_rate, cfg.num_nextn_predict_layers > 0)
    variables = stages.train_stage(
      self.dir(stage),
      cfg,
      tcfg,
      records,
      sft=True,
      flags_text=self.flags_text,
      init_variables=variables,
      tokenizer=FLAGS.tokenizer,
      save_every=max(FLAGS.sft_steps // 2, 1),
    )
    return self.evaluate(cfg, variables)

  def grpo(self, stage: str, init: str, rewards: dict[str, float], iterations: int) -> dict:
    cfg, variables = stages.final_weights(self.dir(init))
    stages.restart(self.dir(stage))
    rl_cfg = RLConfig(
      iterations=iterations,
      prompts_per_iteration=FLAGS.prompts_per_iteration,
      max_prompt_len=_PROMPT_LEN,
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.rl_temperature,
      learning_rate=FLAGS.rl_learning_rate,
      seed=FLAGS.seed,
      log_every=max(iterations // 8, 1),
    )
    grpo_cfg = grpo.GRPOConfig(group_size=FLAGS.group_size)

    def log(row):
      if row["iteration"] % rl_cfg.log_every == 0 or row["iteration"] + 1 == iterations:
        print(
          f"  iteration {row['iteration']:4d}/{iterations}  reward {row['reward/total']:.3f}  "
          f"think {row['think_rate']:.2f}  length {row['length']:.1f}  kl {row['kl']:.4f}",
          flush=True,
        )

    variables, history = stages.grpo_stage(
      self.dir(stage),
      cfg,
      variables,
      self.task,
      RewardSet(rewards),
      rl_cfg,
      grpo_cfg,
      flags_text=self.flags_text,
      tokenizer=self.tokenizer,
      log=log,
    )
    self.rl_history[stage] = history
    return self.evaluate(cfg, variables)

  def rejection(self) -> dict:
    cfg, variables = stages.final_weights(self.dir("reasoning_grpo"))
    stages.restart(self.dir("rejection_sampling"))
    problems = sample_problems(self.task, FLAGS.seed, "train", FLAGS.rejection_problems)
    rcfg = RejectionConfig(
      samples=FLAGS.rejection_samples,
      max_prompt_len=_PROMPT_LEN,
      max_new_tokens=FLAGS.max_new_tokens,
      seed=FLAGS.seed,
    )
    records, stats = rejection_sample(cfg, variables, problems, rcfg, tokenizer=self.tokenizer)
    stages.write_jsonl(os.path.join(self.dir("rejection_sampling"), "samples.jsonl"), records)
    print(f"  kept {len(records)} samples ({stats['accepted_fraction']:.1%} of replies accepted)")
    return stats

  def sft_on_kept(self, stage: str, init: str) -> dict:
    records = self.kept_samples()
    if not records:  # nothing to train on: say so rather than train on nothing
      print(f"  {stage}: skipped, rejection sampling kept no sample (the teacher solves nothing)")
      return {"skipped": "rejection sampling kept no sample"}
    return self.sft(stage, init, records)

  def kept_samples(self) -> list[dict[str, str]]:
    with open(os.path.join(self.dir("rejection_sampling"), "samples.jsonl")) as f:
      return [json.loads(line) for line in f]

  def cold_start_records(self) -> list[dict[str, str]]:
    problems = sample_problems(self.task, FLAGS.seed + 1, "train", FLAGS.cold_start_examples)
    return [
      {"prompt": p.prompt, "response": self.task.reference_completion(p, True)} for p in problems
    ]

  def bodies(self) -> dict[str, Callable[[], dict]]:
    """Each stage's work; a stage reads only the `final/` weights or samples of earlier ones."""
    return {
      "base": lambda: self.pretrain("base", self.teacher, FLAGS.pretrain_steps),
      "r1_zero": lambda: self.grpo("r1_zero", "base", R1_ZERO_REWARDS, FLAGS.r1_zero_iterations),
      "cold_start_sft": lambda: self.sft("cold_start_sft", "base", self.cold_start_records()),
      "reasoning_grpo": lambda: self.grpo(
        "reasoning_grpo", "cold_start_sft", REASONING_REWARDS, FLAGS.reasoning_iterations
      ),
      "rejection_sampling": self.rejection,
      "rejection_sft": lambda: self.sft_on_kept("rejection_sft", "base"),
      "student_base": lambda: self.pretrain(
        "student_base", self.student, FLAGS.student_pretrain_steps
      ),
      "student_distilled": lambda: self.sft_on_kept("student_distilled", "student_base"),
    }

  def run_stages(self, names: Sequence[str]) -> None:
    bodies = self.bodies()
    for name in names:
      self.run_stage(name, bodies[name])

  def start_beside(self, names: Sequence[str]) -> subprocess.Popen | None:
    """Starts `names` in a child process (this command with --only_stages), its output to the
    first stage's beside.log; None when they are all finished."""
    unfinished = [n for n in names if stages.finished(self.dir(n)) is None]
    if not unfinished:
      return None
    self.beside.update(unfinished)
    os.makedirs(self.dir(names[0]), exist_ok=True)
    log_path = os.path.join(self.dir(names[0]), "beside.log")
    print(f"== {', '.join(names)}: in a second process (log: {log_path})", flush=True)
    with open(log_path, "a") as log:
      return subprocess.Popen(
        [
          sys.executable,
          "-m",
          "experiments.r1_pipeline",
          *sys.argv[1:],
          f"--only_stages={','.join(names)}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
      )

  def join_beside(self, names: Sequence[str], child: subprocess.Popen | None) -> None:
    """Waits for `start_beside`'s child, then reports its stages (loaded from disk); a stage the
    child did not finish runs here (a training stage from the child's newest checkpoint)."""
    if child is not None:
      if child.poll() is None:
        print(f"== waiting for the second process ({', '.join(names)})", flush=True)
      code = child.wait()
      if code != 0:
        log_path = os.path.join(self.dir(names[0]), "beside.log")
        print(
          f"warning: the second process exited with code {code} (log: {log_path}); its "
          "unfinished stages run here",
          flush=True,
        )
    self.run_stages(names)

  def run(self) -> None:
    parallel = FLAGS.parallel_stages
    student = self.start_beside(BESIDE_BASE) if parallel else None
    self.run_stages(["base"])
    think_acc = self.results["base"]["think_acc"]
    if think_acc < FLAGS.min_think_accuracy:
      print(
        f"warning: the base model is right {think_acc:.0%} of the time when it thinks "
        f"(< --min_think_accuracy={FLAGS.min_think_accuracy}): its scratchpad does not work yet, "
        "so RL from it is not expected to gain much; pretrain longer (--pretrain_steps)",
        flush=True,
      )
    chain = self.start_beside(BESIDE_R1_ZERO) if parallel else None
    self.run_stages(["r1_zero"])
    self.join_beside(BESIDE_R1_ZERO, chain)
    self.join_beside(BESIDE_BASE, student)
    self.run_stages(["student_distilled"])


def run_alone(teacher: ModelConfig, student: ModelConfig, flags_text: str) -> None:
  """--only_stages: those stages in order, exiting if the pipeline that started them dies (a
  killed pipeline must not leave a second writer behind when it is rerun)."""
  parent = os.getppid()

  def exit_with_parent():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(3)

  threading.Thread(target=exit_with_parent, daemon=True).start()
  Pipeline(teacher, student, flags_text).run_stages(FLAGS.only_stages)


def plot_rl(workdir: str) -> str | None:
  """plots/rl_curves.png: reward, think rate and length per iteration of both GRPO stages."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  series = {}
  for stage in ("r1_zero", "reasoning_grpo"):
    path = os.path.join(workdir, stage, "metrics.jsonl")
    if os.path.isfile(path):
      with open(path) as f:
        series[stage] = [json.loads(line) for line in f]
  if not series:
    return None
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for stage, rows in series.items():
    it = [r["iteration"] for r in rows]
    axes[0].plot(it, [r["reward/total"] for r in rows], label=stage)
    axes[1].plot(it, [r["think_rate"] for r in rows], label=stage)
    axes[2].plot(it, [r["length"] for r in rows], label=stage)
  titles = ("reward (total)", "<think> rate", "reply length (tokens)")
  for ax, title in zip(axes, titles, strict=True):
    ax.set_title(title)
    ax.set_xlabel("GRPO iteration")
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.join(workdir, "plots"), exist_ok=True)
  path = os.path.join(workdir, "plots", "rl_curves.png")
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def main(argv):
  if len(argv) > 1:
    exit_on_bad_input(f"unexpected arguments {argv[1:]}; pass everything as --flag=value")
  if not FLAGS["verbosity"].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  host_memory.retain_freed_memory_on_cpu()
  # The stages compile the same programs again (every teacher SFT stage the same train step,
  # every evaluation the same sampler): XLA's persistent cache turns those into loads.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/r1jax/xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    teacher, student = model_configs()
  except (ValueError, TypeError) as err:
    exit_on_bad_input(str(err))
  unknown = [n for n in FLAGS.only_stages if n not in stages.STAGES]
  if unknown:
    exit_on_bad_input(f"--only_stages: unknown {unknown}; stages are {list(stages.STAGES)}")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  flags_text = replayable_flags(header="python -m experiments.r1_pipeline --flagfile=<this file>")
  flags_text = "".join(  # a stage run beside records the pipeline's flags, not its own role
    line for line in flags_text.splitlines(keepends=True) if not line.startswith("--only_stages")
  )
  if FLAGS.only_stages:
    run_alone(teacher, student, flags_text)
    return
  with open(os.path.join(FLAGS.workdir, "flags.txt"), "w") as f:
    f.write(flags_text)
  started = time.perf_counter()
  print(
    f"r1_pipeline: seed {FLAGS.seed}, workdir {FLAGS.workdir}, {jax.device_count()} "
    f"{jax.default_backend()} device(s)",
    flush=True,
  )
  pipeline = Pipeline(teacher, student, flags_text)
  try:
    pipeline.run()
  except RewardError as err:  # the finished stages and the policy so far are kept on disk
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)
  results = {stage: {k: v for k, v in r.items()} for stage, r in pipeline.results.items()}
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot = plot_rl(FLAGS.workdir)
  print(table(results))
  print(
    f"results: {os.path.join(FLAGS.workdir, 'results.json')}" + (f", plot: {plot}" if plot else "")
  )
  wall = time.perf_counter() - started
  with open(os.path.join(FLAGS.workdir, "wall_time.json"), "w") as f:  # this invocation's
    json.dump({"wall_seconds": wall, "stages_skipped": pipeline.skipped}, f)
  print(f"wall time {wall:.0f} s")
  sys.stdout.flush()


if __name__ == "__main__":
  if not any(a.startswith("--flagfile") for a in sys.argv[1:]):
    sys.argv.insert(1, f"--flagfile={DEFAULT_FLAGFILE}")
  app.run(main, flags_parser=parse_flags_or_exit)

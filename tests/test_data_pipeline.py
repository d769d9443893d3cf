"""Data pipelines: determinism, exact resume, per-process shards, packing (by hand and through the
model: a packed row's logits equal its documents' logits run alone), file sources, a tokenizer.json,
and the one-line errors for bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from r1jax.config import ModelConfig
from r1jax.data import sources
from r1jax.data.pipeline import DataConfig, check_data, make_pipeline, target_mask
from r1jax.data.tokenizer import ByteTokenizer, HFTokenizer
from r1jax.model import Transformer

ETX = ByteTokenizer.eos_id
KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want, strict=True):
    assert set(g) == set(KEYS)
    for key in KEYS:
      assert g[key].dtype == np.int32
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def check_row_invariants(batch):
  """Segments 1..n in order then padding; positions count up from 0 in each segment."""
  np.testing.assert_array_equal(batch["loss_mask"], target_mask(batch["segment_ids"]))
  for seg, pos in zip(batch["segment_ids"], batch["positions"], strict=True):
    real = seg[seg > 0]
    assert np.all(seg[len(real) :] == 0) and np.all(np.diff(real) >= 0)
    assert real[0] == 1 and np.all(np.diff(real) <= 1)
    for k in np.unique(real):
      np.testing.assert_array_equal(pos[seg == k], np.arange(np.sum(seg == k)))


def segments(row_tokens, row_segments):
  """The token lists of a row's segments, in order."""
  return [row_tokens[row_segments == k].tolist() for k in range(1, row_segments.max() + 1)]


@pytest.fixture
def corpus(tmp_path):
  """Two text files (paragraphs) and a JSONL file holding the same kind of documents."""
  docs = [f"document {i}: " + "word " * (i % 7) + "end." for i in range(23)]
  (tmp_path / "a.txt").write_text("\n\n".join(docs[:12]) + "\n", encoding="utf-8")
  (tmp_path / "b.txt").write_text("\n\n\n".join(docs[12:]), encoding="utf-8")
  lines = [json.dumps({"id": i, "content": d}) for i, d in enumerate(docs)]
  (tmp_path / "c.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]))
  return tmp_path, docs


def text_config(root, **kw):
  kw = {"seq_len": 24, "batch_size": 4, "text_unit": "paragraph", **kw}
  return DataConfig(source="text", data_files=[str(root / "*.txt")], **kw)


def jsonl_config(root, **kw):
  kw = {"seq_len": 24, "batch_size": 4, "jsonl_field": "content", **kw}
  return DataConfig(source="jsonl", data_files=[str(root / "c.jsonl")], **kw)


def test_synthetic_batches_are_deterministic_and_well_formed():
  cfg = DataConfig(seq_len=48, batch_size=4, seed=3)
  first = take(make_pipeline(cfg, vocab_size=256), 4)
  assert_batches_equal(take(make_pipeline(cfg, vocab_size=256), 4), first)
  other = next(make_pipeline(DataConfig(seq_len=48, batch_size=4, seed=4), vocab_size=256))
  assert not np.array_equal(other["tokens"], first[0]["tokens"])
  for batch in first:
    assert batch["tokens"].shape == (4, 48)
    check_row_invariants(batch)
  # Every whole segment is one correct problem `a+b=c\n` closed by ETX.
  whole = 0
  for row in range(4):
    for seg in segments(first[1]["tokens"][row], first[1]["segment_ids"][row])[1:-1]:
      a, rest = bytes(seg[:-2]).decode().split("+")
      b, c = rest.split("=")
      assert int(a) + int(b) == int(c) and seg[-2:] == [ord("\n"), ETX]
      whole += 1
  assert whole > 4


@pytest.mark.parametrize(
  "make",
  [
    lambda root: DataConfig(seq_len=40, batch_size=4),
    lambda root: text_config(root, num_epochs=3),
    lambda root: jsonl_config(root, packing=False, num_epochs=4),
    lambda root: text_config(root, text_unit="line", shuffle=False),
  ],
  ids=["synthetic", "text-finite", "jsonl-unpacked", "text-endless"],
)
def test_restore_mid_stream_equals_uninterrupted(corpus, make):
  cfg = make(corpus[0])
  full = list(make_pipeline(cfg, vocab_size=256)) if cfg.num_epochs else None
  n = len(full) if full else 12
  full = full or take(make_pipeline(cfg, vocab_size=256), n)
  assert n >= 6
  for stop in (0, 1, n // 2, n - 1):
    it = make_pipeline(cfg, vocab_size=256)
    assert_batches_equal(take(it, stop), full[:stop])
    state = json.loads(json.dumps(it.get_state()))  # As a checkpoint stores it.
    resumed = make_pipeline(cfg, vocab_size=256)
    resumed.set_state(state)
    if cfg.num_epochs:
      assert_batches_equal(list(resumed), full[stop:])
    else:
      assert_batches_equal(take(resumed, n - stop), full[stop:])


def test_finite_pipeline_ends_after_num_batches(corpus):
  cfg = text_config(corpus[0], num_epochs=2)
  it = make_pipeline(cfg, vocab_size=256)
  assert it.num_batches == len(list(it)) > 0
  with pytest.raises(StopIteration):
    next(it)
  assert make_pipeline(DataConfig(), vocab_size=256).num_batches is None


@pytest.mark.parametrize("source", ["synthetic", "text"])
def test_process_shards_concatenate_to_the_global_batch(corpus, source):
  kw = {"seq_len": 32, "batch_size": 8}
  cfg = DataConfig(**kw) if source == "synthetic" else text_config(corpus[0], **kw)
  whole = take(make_pipeline(cfg, vocab_size=256), 3)
  states = {}
  for count in (2, 4):
    shards = [
      make_pipeline(cfg, vocab_size=256, process_index=p, process_count=count) for p in range(count)
    ]
    assert [list(it.rows) for it in shards] == np.arange(8).reshape(count, -1).tolist()
    got = [take(it, 3) for it in shards]
    for step in range(3):
      for key in KEYS:
        joined = np.concatenate([got[p][step][key] for p in range(count)])
        np.testing.assert_array_equal(joined, whole[step][key])
    states[count] = {"rows": {}}
    for it in shards:
      state = it.get_state()
      states[count]["rows"].update(state.pop("rows"))
      states[count].update(state)
  # The processes' states merged restore on another process count.
  after = take(make_pipeline(cfg, vocab_size=256), 5)[3:]
  for p in range(2):
    it = make_pipeline(cfg, vocab_size=256, process_index=p, process_count=2)
    it.set_state(states[4])
    assert_batches_equal(
      take(it, 2), [{k: v[4 * p : 4 * p + 4] for k, v in b.items()} for b in after]
    )


def test_packing_by_hand(tmp_path):
  (tmp_path / "d.txt").write_text("ab\ncdefg\n\nh\n")
  kw = {"text_unit": "line", "shuffle": False, "num_epochs": 1, "batch_size": 1, "seq_len": 5}
  cfg = DataConfig(source="text", data_files=[str(tmp_path / "d.txt")], **kw)
  a, b, c, d, e, f, g, h = b"abcdefgh"
  # Documents [a b ETX] [c d e f g ETX] [h ETX], concatenated then split at every 5 tokens.
  want = {
    "tokens": [[a, b, ETX, c, d], [e, f, g, ETX, h], [ETX, 0, 0, 0, 0]],
    "segment_ids": [[1, 1, 1, 2, 2], [1, 1, 1, 1, 2], [1, 0, 0, 0, 0]],
    "positions": [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0], [0, 0, 0, 0, 0]],
    "loss_mask": [[1, 1, 0, 1, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]],
  }
  got = list(make_pipeline(cfg, vocab_size=256))
  for key, rows in want.items():
    np.testing.assert_array_equal(np.concatenate([batch[key] for batch in got]), rows, key)
  # Unpacked: one document per row, truncated to seq_len, padded.
  got = list(make_pipeline(dataclasses.replace(cfg, packing=False), vocab_size=256))
  tokens = np.concatenate([batch["tokens"] for batch in got])
  np.testing.assert_array_equal(tokens, [[a, b, ETX, 0, 0], [c, d, e, f, g], [h, ETX, 0, 0, 0]])
  loss_mask = np.concatenate([batch["loss_mask"] for batch in got])
  np.testing.assert_array_equal(loss_mask, [[1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(
    target_mask(np.array([[1, 1, 1, 2, 2, 0]]), 2), [[1, 0, 0, 0, 0, 0]]
  )


def test_packed_row_logits_equal_each_document_alone():
  """No token attends across documents: the tiny model's logits on a packed row equal, segment by
  segment, its logits on that segment run alone at positions 0.. (all in one jitted call)."""
  s = 40
  batch = next(make_pipeline(DataConfig(seq_len=s, batch_size=2, seed=1), vocab_size=256))
  pieces = []  # (row, start, tokens)
  for row in range(2):
    seg = batch["segment_ids"][row]
    for k in range(1, seg.max() + 1):
      where = np.flatnonzero(seg == k)
      pieces.append((row, where[0], batch["tokens"][row, where]))
  alone = np.zeros((len(pieces), s), np.int32)
  for i, (_, _, tokens) in enumerate(pieces):
    alone[i, : len(tokens)] = tokens  # Trailing padding is after the piece: causally invisible.
  tokens = np.concatenate([batch["tokens"], alone])
  positions = np.concatenate(
    [batch["positions"], np.tile(np.arange(s, dtype=np.int32), (len(pieces), 1))]
  )
  segment_ids = np.concatenate([batch["segment_ids"], np.ones_like(alone)])

  model = Transformer(ModelConfig.from_preset("tiny"))
  variables = jax.jit(model.init)(jax.random.key(0), tokens[:1])
  logits = np.asarray(jax.jit(model.apply)(variables, tokens, positions, segment_ids))
  for i, (row, start, piece) in enumerate(pieces):
    n = len(piece)
    np.testing.assert_allclose(
      logits[row, start : start + n], logits[2 + i, :n], rtol=1e-5, atol=1e-5
    )
  # The check can fail: unsegmented, later documents see earlier ones (same shapes: no recompile).
  flat = np.broadcast_to(np.arange(s, dtype=np.int32), tokens.shape)
  mixed = np.asarray(jax.jit(model.apply)(variables, tokens, flat, np.ones_like(tokens)))
  row, start, piece = pieces[1]
  assert not np.allclose(
    mixed[row, start : start + len(piece)], logits[2 + 1, : len(piece)], atol=1e-4
  )


@pytest.mark.parametrize("source", ["text", "jsonl"])
def test_file_sources_yield_every_document_once_per_epoch(corpus, source):
  root, docs = corpus
  make = text_config if source == "text" else jsonl_config
  cfg = make(root, packing=False, seq_len=64, batch_size=1, num_epochs=2, seed=5)
  rows = [
    batch["tokens"][0][batch["segment_ids"][0] > 0].tolist()
    for batch in make_pipeline(cfg, vocab_size=256)
  ]
  texts = [bytes(r[:-1]).decode() for r in rows]
  assert all(r[-1] == ETX for r in rows) and len(texts) == 2 * len(docs)
  assert sorted(texts[: len(docs)]) == sorted(docs) == sorted(texts[len(docs) :])
  assert texts[: len(docs)] != docs and texts[: len(docs)] != texts[len(docs) :]  # Reshuffled.
  unshuffled = make(root, packing=False, seq_len=64, batch_size=1, num_epochs=1, shuffle=False)
  rows = [b["tokens"][0] for b in make_pipeline(unshuffled, vocab_size=256)]
  assert [bytes(r[r > 0][:-1].tolist()).decode() for r in rows] == docs


def test_text_units(tmp_path):
  (tmp_path / "x.txt").write_text("one\ntwo\n\n\nthree\n\n", encoding="utf-8")
  (tmp_path / "y.txt").write_text("  \n", encoding="utf-8")  # Blank: no document.
  counts = {}
  for unit in ("file", "paragraph", "line"):
    texts, _ = sources.read_documents(sorted(map(str, tmp_path.iterdir())), "text", text_unit=unit)
    counts[unit] = texts
  assert counts == {
    "file": ["one\ntwo\n\n\nthree\n\n"],
    "paragraph": ["one\ntwo", "three"],
    "line": ["one", "two", "three"],
  }


def build_tokenizer_json(path):
  """A small byte-level BPE saved as tokenizer.json, with R1's eos marker as a special token."""
  from tokenizers import Tokenizer, models, pre_tokenizers, trainers

  raw = Tokenizer(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<｜end▁of▁sentence｜>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  raw.train_from_iterator(["document end word"] * 20, trainer=trainer)
  raw.save(str(path))
  return HFTokenizer.from_file(path)


def test_hf_tokenizer_json(corpus):
  root, docs = corpus
  tok = build_tokenizer_json(root / "tokenizer.json")
  assert tok.eos_id is not None and tok.vocab_size <= 300
  cfg = jsonl_config(
    root, tokenizer=str(root / "tokenizer.json"), shuffle=False, batch_size=1, seq_len=32
  )
  batch = next(make_pipeline(cfg, vocab_size=512))
  want = [i for doc in docs for i in tok.encode(doc) + [tok.eos_id]]
  assert batch["tokens"][0].tolist() == want[:32]
  check_row_invariants(batch)
  with pytest.raises(ValueError) as err:
    check_data(cfg, vocab_size=200)
  assert str(err.value) == (
    f"--tokenizer: {cfg.tokenizer!r} has {tok.vocab_size} tokens, more than the model's vocab_size 200"
  )


@pytest.mark.parametrize(
  "kwargs, prefix",
  [
    ({"source": "parquet"}, "source: must be one of"),
    ({"source": "text"}, "data_files: source 'text' needs"),
    ({"data_files": ["x.txt"]}, "data_files: the synthetic source reads no files"),
    ({"num_epochs": 2}, "num_epochs: the synthetic source is endless"),
    ({"source": "text", "data_files": "x", "num_epochs": 0}, "num_epochs: must be an integer >= 1"),
    ({"seq_len": 1}, "seq_len: must be an integer >= 2"),
    ({"batch_size": 0}, "batch_size: must be an integer >= 1"),
    ({"seed": -1}, "seed: must be an integer >= 0"),
    ({"seed": 2**32}, "seed: must be <= 4294967295"),
    ({"synthetic_digits": 19}, "synthetic_digits: must be <= 18"),
    ({"jsonl_field": ""}, "jsonl_field: must be a non-empty string"),
    ({"text_unit": "word"}, "text_unit: must be one of"),
    ({"tokenizer": ""}, "tokenizer: None, 'bytes' or a tokenizer.json path"),
  ],
)
def test_config_errors_name_the_field(kwargs, prefix):
  with pytest.raises(ValueError) as err:
    DataConfig(**kwargs)
  assert str(err.value).startswith(prefix) and "\n" not in str(err.value)


def bad_input_cases(root):
  """(what, config, make_pipeline kwargs, the message's start)."""
  (root / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
  (root / "nofield.jsonl").write_text('{"body": "x"}\n')
  (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  text = lambda *files, **kw: DataConfig(
    source="text", data_files=[str(root / f) for f in files], **kw
  )  # noqa: E731
  jsonl = lambda f: DataConfig(source="jsonl", data_files=[str(root / f)])  # noqa: E731
  return [
    (
      "missing",
      text("a.txt", "nope.txt"),
      {},
      f"--data_files: no such file {str(root / 'nope.txt')!r}",
    ),
    ("glob", text("*.md"), {}, f"--data_files: {str(root / '*.md')!r} matches no file"),
    (
      "directory",
      DataConfig(source="text", data_files=[str(root)]),
      {},
      f"--data_files: {str(root)!r} is a directory",
    ),
    ("json", jsonl("bad.jsonl"), {}, f"--data_files: {root / 'bad.jsonl'}:2 is not valid JSON"),
    (
      "field",
      jsonl("nofield.jsonl"),
      {},
      f"--jsonl_field: {root / 'nofield.jsonl'}:1 has no string field 'text'",
    ),
    (
      "utf8",
      text("latin1.txt"),
      {},
      f"--data_files: {str(root / 'latin1.txt')!r} is not UTF-8 text",
    ),
    (
      "bytes-vocab",
      DataConfig(),
      {"vocab_size": 100},
      "--tokenizer: the synthetic task's ASCII bytes need vocab_size >= 128, the model has 100",
    ),
    (
      "token-id",
      text("a.txt"),
      {"vocab_size": 100},
      f"--tokenizer: {str(root / 'a.txt')!r} encodes to token id",
    ),
    (
      "tokenizer",
      DataConfig(tokenizer=str(root / "none.json")),
      {},
      f"--tokenizer: {str(root / 'none.json')!r} is neither",
    ),
    (
      "short",
      text("a.txt", num_epochs=1, batch_size=64, text_unit="paragraph"),
      {},
      "--num_epochs: 12 documents x 1 epochs do not fill one batch of 64",
    ),
    (
      "split",
      DataConfig(batch_size=6),
      {"process_count": 4},
      "--batch_size: 6 rows do not split evenly over 4 processes",
    ),
    (
      "process",
      DataConfig(),
      {"process_index": 2, "process_count": 2},
      "process_index: must be in 0..1",
    ),
  ]


def test_bad_inputs_fail_with_one_line(corpus):
  root = corpus[0]
  for what, cfg, kw, start in bad_input_cases(root):
    kw = {"vocab_size": 256, **kw}
    with pytest.raises(ValueError) as err:
      make_pipeline(cfg, **kw)
    msg = str(err.value)
    assert msg.startswith(start), (what, msg)
    assert "\n" not in msg, what
    if what in ("missing", "glob", "bytes-vocab", "tokenizer"):  # check_data alone catches these.
      with pytest.raises(ValueError, match="^--"):
        check_data(cfg, kw["vocab_size"])
  # Token ids are checked against the model's vocabulary as the files are tokenised.
  with pytest.raises(ValueError) as err:
    sources.tokenize_files([str(root / "a.txt")], "text", ByteTokenizer(), 100)
  assert (
    str(err.value)
    == f"--tokenizer: {str(root / 'a.txt')!r} encodes to token id 119 >= the model's vocab_size 100"
  )


def test_state_from_another_config_is_refused(corpus):
  it = make_pipeline(DataConfig(seq_len=32, batch_size=4), vocab_size=256)
  next(it)
  state = it.get_state()
  other = make_pipeline(DataConfig(seq_len=48, batch_size=4), vocab_size=256)
  with pytest.raises(ValueError, match="^data state: saved with different seq_len; cannot resume$"):
    other.set_state(state)
  with pytest.raises(ValueError, match="^data state: not a"):
    other.set_state({"step": 3})


def test_sft_rows_flag_only_the_response_as_targets(tmp_path):
  path = tmp_path / "sft.jsonl"
  examples = [("ab", "cde"), ("fghi", "j"), ("k", "lm")]
  path.write_text("\n".join(json.dumps({"q": p, "a": r}) for p, r in examples) + "\n")
  cfg = DataConfig(
    source="sft",
    data_files=(str(path),),
    prompt_field="q",
    response_field="a",
    seq_len=7,
    batch_size=1,
    shuffle=False,
    num_epochs=1,
  )
  batches = list(make_pipeline(cfg, vocab_size=256))
  # The stream by hand: each example is prompt + response + ETX, targets on response and ETX.
  stream, flags = [], []
  for prompt, response in examples:
    stream += [ord(c) for c in prompt + response] + [ETX]
    flags += [0] * len(prompt) + [1] * (len(response) + 1)
  tokens = np.concatenate([b["tokens"][0] for b in batches])
  targets = np.concatenate([b["targets"][0] for b in batches])
  n = len(stream)
  np.testing.assert_array_equal(tokens[:n], stream)
  np.testing.assert_array_equal(targets[:n], flags)
  assert not targets[n:].any()
  for b in batches:  # loss_mask: same document and the next token is a target
    want = target_mask(b["segment_ids"]) * np.pad(b["targets"][:, 1:], [(0, 0), (0, 1)])
    np.testing.assert_array_equal(b["loss_mask"], want)


def test_sft_missing_field_names_the_flag_and_line(tmp_path):
  path = tmp_path / "sft.jsonl"
  path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
  cfg = DataConfig(source="sft", data_files=(str(path),), seq_len=8, batch_size=1)
  with pytest.raises(ValueError, match=r"^--response_field: .*sft.jsonl:2 has no string field"):
    make_pipeline(cfg, vocab_size=256)

"""Tokenizers: byte round trips, a tiny BPE tokenizer.json built here, the R1 prompt format."""

import json

import pytest

from r1jax.data.tokenizer import (
  R1_MARKERS,
  ByteTokenizer,
  HFTokenizer,
  Tokenizer,
  format_r1_prompt,
  load_tokenizer,
)

UNICODE_TEXTS = [
  "",
  "12+345=357\n",
  "naïve café, Ελληνικά, 日本語, emoji 🤖🧠, combining e\u0301",
  "\x00\x02\x03 control bytes and a lone \t tab",
  format_r1_prompt("What is 2+2?"),
]

CORPUS = [
  "The quick brown fox jumps over the lazy dog.",
  "What is 12 plus 345? Let me think step by step.",
  "Reasoning models think before they answer.",
  "naïve café 日本語 🤖",
] * 4


def test_byte_tokenizer_ids_are_the_utf8_bytes():
  tok = ByteTokenizer()
  assert isinstance(tok, Tokenizer)
  assert tok.encode("aé🤖") == [0x61, 0xC3, 0xA9, 0xF0, 0x9F, 0xA4, 0x96]
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (256, 0, 2, 3)


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_byte_tokenizer_round_trips_exactly(text):
  tok = ByteTokenizer()
  ids = tok.encode(text)
  assert len(ids) == len(text.encode("utf-8")) and all(0 <= i < 256 for i in ids)
  assert tok.decode(ids) == text


def test_byte_tokenizer_decode_tolerates_cut_characters_and_rejects_big_ids():
  tok = ByteTokenizer()
  assert tok.decode([0x61, 0xF0, 0x9F]) == "a\ufffd"  # an emoji cut after two of its 4 bytes
  with pytest.raises(ValueError, match=r"outside 0\.\.255"):
    tok.decode([65, 300])


def test_r1_markers_and_prompt_text():
  assert R1_MARKERS.bos == "<｜begin▁of▁sentence｜>" and R1_MARKERS.eos == "<｜end▁of▁sentence｜>"
  assert R1_MARKERS.user == "<｜User｜>" and R1_MARKERS.assistant == "<｜Assistant｜>"
  assert "\uff5c" in R1_MARKERS.bos and "\u2581" in R1_MARKERS.bos
  assert (R1_MARKERS.think_open, R1_MARKERS.think_close) == ("<think>", "</think>")
  head = "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>"
  assert format_r1_prompt("hi") == head + "<think>\n"
  assert format_r1_prompt("hi", think=False) == head


def build_tokenizer_dir(tmp_path, config=None):
  """Trains a byte-level BPE on CORPUS with R1's markers added the way R1 ships them (the chat
  markers as special tokens, the think tags as plain added tokens); saves it under tmp_path."""
  from tokenizers import Tokenizer as Raw
  from tokenizers import decoders, models, pre_tokenizers, trainers

  raw = Raw(models.BPE())
  raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  raw.decoder = decoders.ByteLevel()
  chat = [R1_MARKERS.bos, R1_MARKERS.eos, R1_MARKERS.user, R1_MARKERS.assistant]
  trainer = trainers.BpeTrainer(
    vocab_size=400,
    special_tokens=chat,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  raw.train_from_iterator(CORPUS, trainer=trainer)
  raw.add_tokens([R1_MARKERS.think_open, R1_MARKERS.think_close])
  raw.save(str(tmp_path / "tokenizer.json"))
  if config is not None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
  return Raw.from_file(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_hf_tokenizer_matches_the_library_and_round_trips(tmp_path, text):
  raw = build_tokenizer_dir(tmp_path)
  tok = HFTokenizer.from_file(tmp_path / "tokenizer.json")
  assert isinstance(tok, Tokenizer)
  ids = tok.encode(text)
  assert ids == raw.encode(text, add_special_tokens=False).ids
  assert tok.decode(ids) == text  # markers included: the library's default decode drops them


def test_hf_markers_are_single_ids_and_specials_fall_back_to_r1(tmp_path):
  raw = build_tokenizer_dir(tmp_path)
  tok = load_tokenizer(str(tmp_path))  # a directory holding tokenizer.json
  assert isinstance(tok, HFTokenizer)
  assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
  for marker in R1_MARKERS:
    marker_id = raw.token_to_id(marker)
    assert marker_id is not None and tok.encode(marker) == [marker_id]
  assert tok.bos_id == raw.token_to_id(R1_MARKERS.bos)
  assert tok.eos_id == tok.pad_id == raw.token_to_id(R1_MARKERS.eos)


@pytest.mark.parametrize("think", [True, False])
def test_r1_prompt_encodes_markers_as_single_ids(tmp_path, think):
  raw = build_tokenizer_dir(tmp_path)
  tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
  user = "What is 12 plus 345?"
  ids = tok.encode(format_r1_prompt(user, think=think))
  # Built segment by segment from the library: each marker one id, the text between encoded alone.
  want = [raw.token_to_id(R1_MARKERS.bos), raw.token_to_id(R1_MARKERS.user)]
  want += raw.encode(user, add_special_tokens=False).ids + [raw.token_to_id(R1_MARKERS.assistant)]
  if think:
    want += [raw.token_to_id("<think>")] + raw.encode("\n", add_special_tokens=False).ids
  assert ids == want
  assert tok.decode(ids) == format_r1_prompt(user, think=think)


def test_hf_specials_come_from_tokenizer_config(tmp_path):
  # tokenizer_config.json writes tokens either as strings or as AddedToken dicts.
  config = {
    "bos_token": {"__type": "AddedToken", "content": R1_MARKERS.user},
    "eos_token": R1_MARKERS.assistant,
    "pad_token": R1_MARKERS.eos,
  }
  raw = build_tokenizer_dir(tmp_path, config)
  tok = HFTokenizer.from_file(tmp_path)
  got = (tok.bos_id, tok.eos_id, tok.pad_id)
  assert got == tuple(
    raw.token_to_id(t) for t in (R1_MARKERS.user, R1_MARKERS.assistant, R1_MARKERS.eos)
  )


def test_load_tokenizer_bytes_and_bad_specs(tmp_path):
  assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
  for spec in ["foo", str(tmp_path / "missing" / "tokenizer.json"), str(tmp_path)]:
    with pytest.raises(ValueError) as err:
      load_tokenizer(spec)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"tokenizer: {spec!r} is neither 'bytes', 'task' nor")
  with pytest.raises(FileNotFoundError, match="neither a tokenizer.json file"):
    HFTokenizer.from_file(tmp_path / "nope")


def test_task_tokenizer_round_trips_every_task_with_tags_as_one_token():
  from r1jax.data import tasks
  from r1jax.data.tokenizer import TaskTokenizer

  tok = TaskTokenizer()
  assert load_tokenizer("task").vocab_size == 64
  options = {
    "addition": [{}],
    "countdown": [{}],
    "chain": [{"notation": n} for n in tasks.NOTATIONS],
  }
  for name, variants in options.items():
    for opts in variants:
      for doc in tasks.corpus_documents(
        tasks.make_task(name, **opts), 0, 0, 50, think_fraction=0.5
      ):
        ids = tok.encode(doc)
        assert tok.decode(ids) == doc
        assert all(0 <= i < tok.vocab_size for i in ids)
        # each tag is one id: the id count is the characters outside the tags plus one per tag
        tags = sum(doc.count(t) for t in tok.TAGS)
        stripped = doc
        for t in tok.TAGS:
          stripped = stripped.replace(t, "")
        assert len(ids) == len(stripped) + tags


def test_task_tokenizer_names_a_foreign_character_and_decodes_anything():
  from r1jax.data.tokenizer import TaskTokenizer

  tok = TaskTokenizer()
  with pytest.raises(ValueError, match=r"character 'A' at 2"):
    tok.encode("1+A")
  with pytest.raises(ValueError, match=r"character '<' at 0"):  # a cut tag is not a tag
    tok.encode("<thin")
  assert (
    tok.decode([tok.eos_id, 63, *tok.encode("<answer>7</answer>")]) == "\ufffd<answer>7</answer>"
  )

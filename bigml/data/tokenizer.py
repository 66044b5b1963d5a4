"""Tokenizers: trained on the corpus with the `tokenizers` library, or loaded from a directory.

Trained tokenizers are cached under <cache_dir>/tokenizers/<key>/ where the key covers the corpus
fingerprint and every setting, and are saved with the model in Hugging Face format, so
`AutoTokenizer.from_pretrained(<run>/model)` works with no bigml code.

Special tokens and the document template come from the task (bigml.tasks): masked LMs get BERT's
[PAD] [UNK] [CLS] [SEP] [MASK] and "[CLS] text [SEP]" around each document, causal LMs GPT-2's
<|endoftext|> as the document separator plus a padding token.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from bigml.atomic import atomic_directory, check_intact
from bigml.data.cache import build_lock, open_cached
from bigml.errors import BigmlError, ConfigError, DataError
from bigml.progress import Progress

log = logging.getLogger(__name__)

KINDS = ("auto", "wordpiece", "bpe", "char")
_FORMAT_VERSION = 2  # bump when the way tokenizers are built changes, to invalidate caches



def resolve_kind(kind: str, task) -> str:
    if kind not in KINDS:
        raise ConfigError("tokenizer.kind", f"unknown kind {kind!r}", f"choose one of {', '.join(KINDS)}")
    return task.default_tokenizer if kind == "auto" else kind


def load_tokenizer(path: str, key: str = "tokenizer.path") -> PreTrainedTokenizerBase:
    """Load an HF tokenizer from a directory (or a hub name where the network allows)."""
    p = Path(path).expanduser()
    if p.exists() and not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        raise DataError(f"{key}={path}: the directory holds no tokenizer files (tokenizer.json / vocab.txt)")
    if p.is_dir():
        check_intact(p, key)
    try:
        return AutoTokenizer.from_pretrained(str(p) if p.exists() else path)
    except BaseException as e:  # the Rust library reports a malformed tokenizer.json with a PanicException
        if isinstance(e, (KeyboardInterrupt, SystemExit, BigmlError)):
            raise
        raise DataError(f"{key}={path}: could not load a tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _iter_text(texts: Callable[[], Iterable[str]], max_bytes: int) -> Iterator[str]:
    seen = 0
    with Progress("training the tokenizer: reading text", unit="bytes") as progress:
        for t in texts():
            yield t
            seen += len(t)
            progress.update(len(t))
            if seen >= max_bytes:
                return


def _build(kind: str, task, vocab_size: int, min_frequency: int, lowercase: bool,
           texts: Callable[[], Iterable[str]], max_bytes: int) -> Tokenizer:
    specials = task.special_tokens
    special_list = list(dict.fromkeys(specials.values()))  # unique, in a fixed order
    unk = specials["unk_token"]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=unk))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, clean_text=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                             special_tokens=special_list, show_progress=False)
        tok.train_from_iterator(_iter_text(texts, max_bytes), trainer)
    elif kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_list,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tok.train_from_iterator(_iter_text(texts, max_bytes), trainer)
    elif kind == "char":
        # The tokenizers library has no character-level trainer; counting characters is all it takes.
        counts: Counter[str] = Counter()
        for t in _iter_text(texts, max_bytes):
            counts.update(t.lower() if lowercase else t)
        keep = [c for c, n in counts.most_common(max(vocab_size - len(special_list), 1)) if n >= min_frequency]
        vocab = {s: i for i, s in enumerate(special_list)}
        for c in keep:
            vocab.setdefault(c, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
        if lowercase:
            tok.normalizer = normalizers.Lowercase()
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
    else:  # pragma: no cover - resolve_kind guards
        raise AssertionError(kind)
    post = task.post_processor(tok)
    if post is not None:
        tok.post_processor = post
    return tok


def train_or_load(tok_cfg, task, corpus_key: str, texts: Callable[[], Iterable[str]],
                  cache_dir: str, model_max_length: int) -> tuple[PreTrainedTokenizerFast, bool]:
    """The tokenizer for this run (special tokens as `task`, a LanguageModelTask, wants them) and
    whether it came from the cache.

    `texts` is a factory of an iterable of documents, called only when training is needed.
    """
    kind = resolve_kind(str(tok_cfg.kind), task)
    vocab_size = int(tok_cfg.vocab_size)
    if vocab_size < 16:
        raise ConfigError("tokenizer.vocab_size", f"{vocab_size} is too small", "use at least a few hundred")
    lowercase = bool(tok_cfg.lowercase) if tok_cfg.get("lowercase") is not None else kind == "wordpiece"
    min_frequency = int(tok_cfg.get("min_frequency") or 1)
    max_bytes = int(float(tok_cfg.get("train_max_mb") or 64) * 1e6)
    settings = dict(kind=kind, objective=task.objective, vocab_size=vocab_size, lowercase=lowercase,
                    min_frequency=min_frequency, max_bytes=max_bytes, corpus=corpus_key, v=_FORMAT_VERSION)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    where = Path(cache_dir).expanduser() / "tokenizers" / key
    with build_lock(where):  # two runs training the same tokenizer: one trains, the other waits
        tok = open_cached(where, lambda d: AutoTokenizer.from_pretrained(str(d)), "tokenizer")
        if tok is not None:
            tok.model_max_length = model_max_length
            return tok, True
        return _train(kind, task, vocab_size, min_frequency, lowercase, texts, max_bytes, settings, where,
                      model_max_length), False


def _train(kind, task, vocab_size, min_frequency, lowercase, texts, max_bytes, settings, where: Path,
           model_max_length: int) -> PreTrainedTokenizerFast:
    log.info("training a %s tokenizer (vocab %d) on the corpus", kind, vocab_size)
    raw = _build(kind, task, vocab_size, min_frequency, lowercase, texts, max_bytes)
    if raw.get_vocab_size() < 8:
        raise DataError("the corpus is too small to train a tokenizer; give more text or set tokenizer.path")
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, model_max_length=model_max_length,
                                  model_input_names=list(task.model_input_names), **task.special_tokens)
    with atomic_directory(where, manifest=True, replace=False) as tmp:
        tok.save_pretrained(str(tmp))
        (tmp / "bigml_tokenizer.json").write_text(json.dumps(settings, indent=2))
    return tok

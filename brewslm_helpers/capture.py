"""Plumbing for the teacher capture (lesson 2): the schema's keys and the tokenizer fingerprint.

The file format itself is documented in :mod:`brewslm_helpers.distill` (module docstring). This
module holds what every lesson that writes or reads a capture must agree on:

- ``CAPTURE_KEYS``: the keys of one capture record (one JSON line), in schema order;
- ``SPECIAL_ROLES``: the special-token roles two tokenizers must agree on;
- ``tokenizer_fingerprint``: the ``"sha256:<hex>"`` string stored in every record, so that a
  reader can tell, without loading the teacher, whether the capture was made with its tokenizer.
  Lesson 3 compares ``tokenizer_fingerprint(student_tokenizer)`` with the file's.

The fingerprint covers the vocabulary (token -> id) and the special tokens, which is what the ids
in the file mean. It does not cover normalisation or merge rules: two tokenizers can share a
vocabulary and still split a text differently. Lesson 2 teaches the behavioural check (encode probe
texts with both) next to it.
"""
from __future__ import annotations

import hashlib
import json

CAPTURE_KEYS = ("id", "input_ids", "k", "topk_ids", "topk_logprobs", "covered_mass",
                "tokenizer_fingerprint", "teacher")
SPECIAL_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _special(tokenizer, role: str) -> str | None:
    value = getattr(tokenizer, role, None)
    return None if value is None else str(value)


def tokenizer_fingerprint(tokenizer) -> str:
    """``"sha256:<64 hex digits>"`` of ``tokenizer``'s vocabulary and special tokens.

    The hash is taken over the compact, key-sorted JSON (UTF-8, no ASCII escaping) of
    ``{"vocab": [[token, id], ...] sorted by id then token, "special": {role: token or null}}``
    with ``role`` in ``SPECIAL_ROLES``. ``tokenizer`` is anything with ``get_vocab()`` (every
    transformers tokenizer; added tokens included) and the ``*_token`` attributes. Stable across
    library versions and dict orders; changes when any token, id or special token changes.
    """
    vocab = sorted(([str(t), int(i)] for t, i in tokenizer.get_vocab().items()),
                   key=lambda pair: (pair[1], pair[0]))
    payload = {"vocab": vocab, "special": {role: _special(tokenizer, role) for role in SPECIAL_ROLES}}
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

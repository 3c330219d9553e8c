"""The capture plumbing: schema keys agree with the documented schema, the fingerprint is stable
and changes with any token, id or special token."""
from __future__ import annotations

import re

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from brewslm_helpers import capture, distill

VOCAB = {"[UNK]": 0, "[EOS]": 1, "[SEP]": 2, "good": 3, "bad": 4, "coffee": 5}


def tiny(vocab=VOCAB, **special):
    t = Tokenizer(models.WordLevel(dict(vocab), unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", **special)


def test_capture_keys_are_the_documented_schema():
    documented = re.findall(r'^\s+"(\w+)":', distill.__doc__, re.MULTILINE)
    assert tuple(documented) == capture.CAPTURE_KEYS


def test_fingerprint_format_and_stability():
    fp = capture.tokenizer_fingerprint(tiny(eos_token="[EOS]"))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fp)
    assert capture.tokenizer_fingerprint(tiny(eos_token="[EOS]")) == fp
    reordered = dict(reversed(list(VOCAB.items())))
    assert capture.tokenizer_fingerprint(tiny(reordered, eos_token="[EOS]")) == fp


def test_fingerprint_changes_with_tokens_ids_and_specials():
    base = capture.tokenizer_fingerprint(tiny(eos_token="[EOS]"))
    added = tiny(eos_token="[EOS]")
    added.add_tokens(["<|pad|>"])
    swapped = dict(VOCAB, good=4, bad=3)
    variants = [added, tiny(swapped, eos_token="[EOS]"), tiny(eos_token="[SEP]"),
                tiny(eos_token="[EOS]", pad_token="[SEP]")]
    prints = [capture.tokenizer_fingerprint(t) for t in variants]
    assert base not in prints and len(set(prints)) == len(prints)

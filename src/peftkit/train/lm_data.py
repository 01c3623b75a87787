"""Causal-LM training data: reading JSONL, tokenizing with loss masks, hold-out, packing, batches.

The file
--------
JSON Lines (``.jsonl`` / ``.ndjson`` / ``.json``, or any file whose first character is ``{``):
one object per line, blank lines skipped. Each line is one example in one of three forms
(forms may be mixed line by line; other keys are ignored):

- ``{"prompt": str, "response": str}`` (``"completion"`` is accepted for ``"response"``):
  the loss is on the response's tokens (and the EOS after it) only. Prompt and response are
  joined as written, without a separator: end the prompt with the one you want (``"\\n"``,
  ``"Answer: "``). The two are tokenized separately, as ``peftkit generate`` tokenizes a prompt.
- ``{"messages": [{"role": str, "content": str}, ...]}``: a chat, with at least one
  ``"assistant"`` message. The loss is on the assistant turns only: each one's content and
  the end-of-turn text the template writes after it. The chat is rendered with the
  tokenizer's chat template when ``tokenizer.chat_template`` is set, else with the fallback
  format below. Assistant turns are found by rendering prefixes: turn *i* starts where the
  rendering of messages ``[:i]`` with ``add_generation_prompt=True`` ends, and ends where the
  rendering of messages ``[:i+1]`` ends; both must be prefixes of the whole rendering (a
  template that rewrites earlier turns, e.g. one that drops past reasoning, is reported).
- ``{"text": str}``: plain text, the loss on every token (and the EOS after it).

Every problem raises ``DataError`` naming the file and the 1-based line; so does an empty (or
whitespace-only) ``prompt``, ``response``, ``text`` or assistant ``content``.

Fallback chat format (no ``chat_template``): the messages joined with ``"\\n"``, each written
``"<Role>: <content>"`` (the role capitalised: ``User: ...``, ``System: ...``), an assistant
message followed by the tokenizer's EOS token; the generation prompt is ``"\\nAssistant: "``::

    User: What is 2+2?
    Assistant: 4</s>
    User: And 3+3?
    Assistant: 6</s>

Tokens
------
Pieces are tokenized without the tokenizer's own special tokens; a BOS token is put first
when the tokenizer adds one on its own (Llama-style) and the text does not already start with
it (a template that writes ``bos_token``); an EOS token is appended after a response and after
a text (not after a chat, whose template ends each turn itself). ``labels`` are the token ids
where there is loss and -100 elsewhere; the first label of every example is -100 (nothing
predicts the first token; this also keeps packed examples from predicting across a boundary).
Examples longer than ``max_length`` are cut at ``max_length`` tokens and counted; an example
with no loss token left after the cut (a long prompt) is dropped and counted.

Packing (``--packing``, training data only)
-------------------------------------------
Tokenized examples are put whole into rows of at most ``max_length`` tokens: each example, in
file order, goes into the open row with the least room that still fits it (best fit), else
starts a new row. Nothing is split and nothing attends across examples: each row gets
``position_ids`` restarting at 0 for every example, and a 4-D additive float attention mask,
shape (B, 1, T, T), 0.0 where query *i* may see key *j* (same example, *j* ≤ *i*) and the
float32 minimum elsewhere. transformers (5.x, ``masking_utils``) passes a 4-D mask through to
the attention unchanged; the additive form works with both the ``sdpa`` and the ``eager``
attention of GPT-2 and Llama-family models (not with flash-attention, which takes no mask).
So a packed row's summed token loss equals the sum of its examples' losses run one by one.
Padding positions attend to themselves only. The mask costs 4·B·T² bytes per batch.
Evaluation data is never packed (its metrics are per example). The input methods (prompt,
P-tuning, prefix tuning) need a 2-D mask and are refused with packing by the task.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .. import DataError
from .data import json_object, json_type, read_text

IGNORE_INDEX = -100
RESPONSE_KEYS = ("response", "completion")
FORMS = "'prompt' and 'response', 'messages', or 'text'"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class LMExample:
    """One line of a causal-LM file, in one of the three forms."""

    line: int  # 1-based line in the source file
    form: str  # "prompt", "messages" or "text"
    prompt: str = ""
    response: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) pairs
    text: str = ""


# -- reading ------------------------------------------------------------------------------


def read_lm_examples(path: str | os.PathLike) -> list[LMExample]:
    """All examples of a causal-LM JSONL file; ``DataError`` (file and line) for anything malformed."""
    name = os.fspath(path)
    text = read_text(name)
    if not text.strip():
        raise DataError(f"{name}: file is empty (expected JSON Lines with {FORMS} on each line)")
    if Path(name).suffix.lower() not in JSONL_SUFFIXES and not text.lstrip().startswith("{"):
        raise DataError(f"{name}: expected a JSON Lines file (one object per line with {FORMS}) for the causal-lm task")
    examples = []
    for line, raw in enumerate(io.StringIO(text, newline=None), 1):
        if raw.strip():
            examples.append(parse_line(name, line, raw))
    if not examples:
        raise DataError(f"{name}: no examples")
    return examples


def parse_line(name: str, line: int, raw: str) -> LMExample:
    """One JSON line -> an ``LMExample``."""
    obj = json_object(name, line, raw, f"a JSON object with {FORMS}")
    where = f"{name} line {line}"
    response_key = next((k for k in RESPONSE_KEYS if k in obj), None)
    forms = [k for k in ("prompt", "messages", "text") if k in obj]
    if len(forms) > 1:
        raise DataError(f"{where}: found both {forms[0]!r} and {forms[1]!r}; use one form per line ({FORMS})")
    if not forms:
        if response_key is not None:
            raise DataError(f"{where}: {response_key!r} without 'prompt'")
        found = ", ".join(repr(k) for k in obj) or "none"
        raise DataError(f"{where}: expected {FORMS}; found fields {found}")
    form = forms[0]
    if form == "prompt":
        if response_key is None:
            raise DataError(f"{where}: 'prompt' without 'response' (or 'completion')")
        prompt, response = _string(where, obj, "prompt"), _string(where, obj, response_key)
        if not prompt.strip():
            raise DataError(f"{where}: 'prompt' is empty (for a text without a prompt, write {{\"text\": ...}})")
        if not response.strip():
            raise DataError(f"{where}: {response_key!r} is empty")
        return LMExample(line, "prompt", prompt=prompt, response=response)
    if response_key is not None:
        raise DataError(f"{where}: {response_key!r} goes with 'prompt', not with {form!r}")
    if form == "text":
        text = _string(where, obj, "text")
        if not text.strip():
            raise DataError(f"{where}: 'text' is empty")
        return LMExample(line, "text", text=text)
    return LMExample(line, "messages", messages=_messages(where, obj["messages"]))


def _string(where: str, obj: dict, key: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, found {json_type(value)}")
    return value


def _messages(where: str, value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        found = "an empty array" if value == [] else json_type(value)
        raise DataError(f"{where}: 'messages' must be a non-empty array of {{\"role\", \"content\"}} objects, "
                        f"found {found}")
    out = []
    for i, m in enumerate(value, 1):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            found = f"fields {', '.join(repr(k) for k in m) or 'none'}" if isinstance(m, dict) else json_type(m)
            raise DataError(f"{where}: message {i}: expected {{\"role\": ..., \"content\": ...}}, found {found}")
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or not role.strip():
            raise DataError(f"{where}: message {i}: 'role' must be a non-empty string, found {json.dumps(role)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i}: 'content' must be a string, found {json_type(content)}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: message {i}: the 'assistant' message's 'content' is empty (nothing to learn)")
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        roles = ", ".join(sorted({r for r, _ in out}))
        raise DataError(f"{where}: no 'assistant' message, so nothing to learn (roles found: {roles})")
    return tuple(out)


# -- hold-out split -----------------------------------------------------------------------


def split_holdout(examples: Sequence[LMExample], fraction: float, seed: int, source: str
                  ) -> tuple[list[LMExample], list[LMExample]]:
    """Hold out ``round(fraction · n)`` examples (at least one, never all), chosen by a shuffle
    seeded with ``seed``; both parts keep the file's order. Same file + same seed -> same split."""
    n = len(examples)
    if n < 2:
        raise DataError(f"{source}: too few examples ({n}) to hold out an evaluation set; pass --eval-data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:min(max(1, int(n * fraction + 0.5)), n - 1)])
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# -- tokenizing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ``input_ids`` and ``labels`` of equal length (-100: no loss)."""

    input_ids: list[int]
    labels: list[int]
    line: int


@dataclass
class EncodeStats:
    total: int = 0
    truncated: int = 0  # cut at max_length (kept)
    dropped: int = 0  # no loss token left after the cut

    def lines(self, source: str, max_length: int) -> list[str]:
        """Console lines about truncation (empty when nothing was cut)."""
        if not self.truncated:
            return []
        text = (f"warning: {self.truncated} of {self.total} examples in {source} are longer than "
                f"--max-length {max_length} and were truncated")
        if self.dropped:
            text += f"; {self.dropped} of them had no response tokens left and were dropped"
        return [text]


def render_chat(tokenizer, messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
    """A chat as text: the tokenizer's chat template, else the fallback format (module docstring)."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        if not isinstance(rendered, str):  # pragma: no cover - tokenize=False returns text
            raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected a string")
        return rendered
    eos = tokenizer.eos_token or ""
    turns = [f"{role.capitalize()}: {content}{eos if role == 'assistant' else ''}" for role, content in messages]
    if add_generation_prompt:
        turns.append("Assistant: ")
    return "\n".join(turns)


class LMEncoder:
    """Turns examples (and generation prompts) into token ids the same way for training,
    evaluation and ``peftkit generate``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        bos = tokenizer.bos_token_id
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        self.bos_id = bos if bos is not None and probe[:1] == [bos] else None  # a BOS the tokenizer adds itself

    def ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _with_bos(self, ids: list[int]) -> list[int]:
        return [self.bos_id] + ids if self.bos_id is not None and ids[:1] != [self.bos_id] else ids

    def _eos(self) -> list[int]:
        return [] if self.eos_id is None else [self.eos_id]

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        """A generation prompt: as the prompt of a prompt/response example, or (``chat``) as one
        user message followed by the assistant's generation prompt."""
        if chat:
            return self._with_bos(self.ids(render_chat(self.tokenizer, [("user", prompt)], True)))
        return self._with_bos(self.ids(prompt))

    def encode(self, example: LMExample, source: str) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one example, not yet truncated."""
        if example.form == "prompt":
            segments = [(example.prompt, False), (example.response, True)]
        elif example.form == "text":
            segments = [(example.text, True)]
        else:
            segments = self._chat_segments(example, source)
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in segments:
            piece = self.ids(text)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if example.form != "messages":
            ids += self._eos()
            labels += self._eos()
        full = self._with_bos(ids)
        labels = [IGNORE_INDEX] * (len(full) - len(ids)) + labels
        if labels:
            labels[0] = IGNORE_INDEX  # nothing predicts the first token
        return full, labels

    def _chat_segments(self, example: LMExample, source: str) -> list[tuple[str, bool]]:
        """The rendered chat cut into (text, trained) pieces: assistant turns trained, the rest not."""
        where = f"{source} line {example.line}"
        messages = example.messages
        try:
            full = render_chat(self.tokenizer, messages, False)
            spans = []
            for i, (role, _) in enumerate(messages):
                if role != "assistant":
                    continue
                before = render_chat(self.tokenizer, messages[:i], True)
                through = render_chat(self.tokenizer, messages[:i + 1], False)
                if not (through.startswith(before) and full.startswith(through)):
                    raise DataError(f"{where}: the chat template does not render the conversation up to message "
                                    f"{i + 1} as the beginning of the whole conversation, so the assistant turn "
                                    "cannot be located (a template that rewrites earlier turns?)")
                spans.append((len(before), len(through)))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template raises whatever its author chose (jinja errors mostly)
            raise DataError(f"{where}: the chat template failed on these messages: {exc}") from None
        segments, at = [], 0
        for start, end in spans:
            segments += [(full[at:start], False), (full[start:end], True)]
            at = end
        segments.append((full[at:], False))
        return segments


def encode_examples(examples: Sequence[LMExample], tokenizer, max_length: int, source: str
                    ) -> tuple[list[Encoded], EncodeStats]:
    """Tokenize and truncate; examples with no loss token left are dropped (counted in the stats)."""
    encoder = LMEncoder(tokenizer)
    stats = EncodeStats(total=len(examples))
    out = []
    for example in examples:
        ids, labels = encoder.encode(example, source)
        cut = len(ids) > max_length
        if cut:
            stats.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            if cut:
                stats.dropped += 1
                continue
            raise DataError(f"{source} line {example.line}: no tokens to learn (the response tokenizes to nothing)")
        out.append(Encoded(ids, labels, example.line))
    return out, stats


# -- rows, packing, batches ---------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One sequence of a batch: one example, or several packed ones (``lengths`` in order)."""

    input_ids: list[int]
    labels: list[int]
    lengths: tuple[int, ...]
    packed: bool = False


def single_rows(encoded: Sequence[Encoded]) -> list[Row]:
    return [Row(e.input_ids, e.labels, (len(e.input_ids),)) for e in encoded]


def pack(encoded: Sequence[Encoded], max_length: int) -> list[Row]:
    """Best-fit packing of whole examples into rows of at most ``max_length`` tokens (module docstring)."""
    members: list[list[Encoded]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row index) of open rows, sorted
    for e in encoded:
        size = len(e.input_ids)
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            free, index = room.pop(at)
        else:
            free, index = max_length, len(members)
            members.append([])
        members[index].append(e)
        if free - size > 0:
            bisect.insort(room, (free - size, index))
    return [Row([t for e in row for t in e.input_ids], [t for e in row for t in e.labels],
                tuple(len(e.input_ids) for e in row), packed=True) for row in members]


class LMDataset(Dataset):
    def __init__(self, rows: Sequence[Row], examples: int | None = None) -> None:
        self.rows = list(rows)
        self.examples = len(self.rows) if examples is None else examples  # examples in the rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        return self.rows[i]


def packed_attention(lengths: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal causal attention for packed rows.

    ``lengths[b]``: the example lengths of row b (summing to at most ``width``). Returns the
    additive mask (B, 1, T, T), float32: 0.0 where query i may attend key j, the float32 minimum
    elsewhere; and ``position_ids`` (B, T), restarting at 0 for each example (padding: 0).
    """
    batch = len(lengths)
    segment = torch.empty(batch, width, dtype=torch.long)  # (B, T): which example a position belongs to
    positions = torch.zeros(batch, width, dtype=torch.long)
    for b, row in enumerate(lengths):
        at = 0
        for k, n in enumerate(row):
            segment[b, at:at + n] = k
            positions[b, at:at + n] = torch.arange(n)
            at += n
        segment[b, at:] = -1 - torch.arange(width - at)  # each padding position alone: it sees itself only
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    allowed = (same & causal).unsqueeze(1)  # (B, 1, T, T)
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask, positions


class LMCollate:
    """Rows -> a right-padded batch: ``input_ids`` (B, T), ``labels`` (B, T) with -100 on
    padding, and either a 2-D ``attention_mask`` (B, T) of 1/0, or, when a row is packed,
    the 4-D block-diagonal mask (B, 1, T, T) with ``position_ids`` (B, T) (``packed_attention``).
    T is the longest row of the batch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
            labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
            mask[b, :n] = 1
        if any(r.packed for r in rows):
            attention, positions = packed_attention([r.lengths for r in rows], width)
            return {"input_ids": ids, "attention_mask": attention, "position_ids": positions, "labels": labels}
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def build_dataset(examples: Sequence[LMExample], tokenizer, max_length: int, source: str, packing: bool
                  ) -> tuple[LMDataset, EncodeStats]:
    """Examples -> a dataset of rows (packed or one example each), with the truncation counts."""
    encoded, stats = encode_examples(examples, tokenizer, max_length, source)
    if not encoded:
        raise DataError(f"{source}: no example has a token to learn within --max-length {max_length}")
    rows = pack(encoded, max_length) if packing else single_rows(encoded)
    return LMDataset(rows, len(encoded)), stats

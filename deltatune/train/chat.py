"""Chat data (``task: chat``): conversations rendered with the tokenizer's own chat template, loss on assistant turns.

Records are ``{"messages": [{"role": ..., "content": ...}, ...]}`` (the format of most chat datasets) or Alpaca
records, read as one user turn (instruction, then the input after a blank line) and one assistant turn (output).

Which tokens carry the loss is read off the template itself, not from per-model string rules: the conversation
is rendered prefix by prefix, and assistant turn ``i`` is the text that ``messages[: i + 1]`` adds to
``messages[:i]`` rendered with the generation prompt (so the prompt's ``<|im_start|>assistant`` header is
context, and the turn's end-of-turn token is learned). That needs a prefix-stable template: each render must
start with the previous one. A template that re-renders earlier turns once later ones follow (some drop past
reasoning, for instance) is refused with the record that shows it, not trained on with misplaced labels.
Characters map to tokens through the tokenizer's offsets, so a BPE merge across a turn boundary cannot shift
a label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from ..core.errors import ConfigError, DataError
from .batches import IGNORE, Encoded
from .config import Columns, DataConfig

ROLES = ("system", "user", "assistant", "tool")
MAX_LISTED = 5  # record numbers named in one error


# -- the template -----------------------------------------------------------------------------------

def use_chat_template(tokenizer, setting: str | None) -> None:
    """Give ``tokenizer`` the template of ``data.chat_template`` (a file, or the template text); None: keep its own."""
    if setting is None:
        return
    path = Path(setting).expanduser()
    tokenizer.chat_template = path.read_text() if "{%" not in setting and "{{" not in setting else setting


def require_chat_template(tokenizer, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: task chat renders conversations with the tokenizer's chat template, and this "
                          f"tokenizer has none; set data.chat_template to a Jinja template file (or the template "
                          f"text), e.g. the chat_template of a model of the same family")


def chat_prompt(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn followed by the template's generation prompt (what inference feeds the model)."""
    require_chat_template(tokenizer, "chat prompt")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def _render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as e:  # the template's own raise_exception(), e.g. "roles must alternate"
        raise DataError(f"{where}: the chat template refuses this conversation: {e}") from e


# -- records -> conversations -----------------------------------------------------------------------

def conversation(record: dict[str, Any], columns: Columns, where: str) -> list[dict[str, str]]:
    """The messages of one record (``messages``, or an Alpaca record as a user and an assistant turn), checked."""
    if columns.messages in record:
        return check_messages(record[columns.messages], where)
    if isinstance(record.get(columns.instruction), str) and isinstance(record.get(columns.output), str):
        user = record[columns.instruction]
        context = record.get(columns.input) or ""
        if isinstance(context, str) and context.strip():
            user = f"{user}\n\n{context}"
        return check_messages([{"role": "user", "content": user},
                               {"role": "assistant", "content": record[columns.output]}], where)
    raise DataError(f"{where}: neither a {columns.messages!r} list nor Alpaca fields {columns.instruction!r} / "
                    f"{columns.output!r} (fields: {', '.join(record) or 'none'}); set data.columns.messages")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: empty conversation (messages must be a non-empty list of {{role, content}})")
    for turn, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(f"{where}, message {turn}: expected {{'role': ..., 'content': text}}, got {message!r}")
        if message.get("role") not in ROLES:
            raise DataError(f"{where}, message {turn}: unknown role {message.get('role')!r} (allowed: "
                            f"{', '.join(ROLES)}; ShareGPT's human/gpt records need converting to user/assistant)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# -- conversations -> tokens and labels -------------------------------------------------------------

def assistant_spans(tokenizer, messages: list[dict[str, str]], train_on: str, where: str) -> tuple[str, list]:
    """The rendered conversation and the (start, end) character spans of the assistant turns that are learned."""
    text = _render(tokenizer, messages, False, where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = []
    for i in turns[-1:] if train_on == "last_assistant" else turns:
        before = _render(tokenizer, messages[:i], True, where) if i else ""
        upto = _render(tokenizer, messages[: i + 1], False, where)
        if not (upto.startswith(before) and text.startswith(upto) and len(upto) > len(before)):
            raise DataError(f"{where}: the chat template is not prefix-stable: rendering the conversation up to "
                            f"message {i + 1} does not give the start of the whole conversation, so the tokens of "
                            f"assistant turns cannot be read off it. Use data.train_on: last_assistant, or a "
                            f"template that renders earlier turns the same way (data.chat_template)")
        spans.append((len(before), len(upto)))
    return text, spans


def token_labels(tokenizer, text: str, spans: list[tuple[int, int]], where: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (the template's own special tokens, none added) and labels: the id inside a span,
    IGNORE elsewhere."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        learned = [_in_spans(a, b, spans) for a, b in enc["offset_mapping"]]
    else:  # no offsets: token boundaries from tokenising each boundary's prefix
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        learned = [False] * len(ids)
        for s, e in spans:
            first, last = (_prefix_tokens(tokenizer, text, ids, cut, where) for cut in (s, e))
            learned[first:last] = [True] * (last - first)
    return ids, [t if keep else IGNORE for t, keep in zip(ids, learned, strict=True)]


def _in_spans(start: int, end: int, spans: list[tuple[int, int]]) -> bool:
    """Whether the characters [start, end) of a token overlap a span (a zero-width token: lies inside one)."""
    if start == end:
        return any(s <= start < e for s, e in spans)
    return any(start < e and end > s for s, e in spans)


def _prefix_tokens(tokenizer, text: str, ids: list[int], cut: int, where: str) -> int:
    head = tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
    if ids[: len(head)] != head:
        raise DataError(f"{where}: the tokenizer merges tokens across a turn boundary and has no offsets to "
                        f"place it; use a fast tokenizer")
    return len(head)


def encode_chat(rows: list[dict[str, Any]], data: DataConfig, tokenizer, where: str) -> Encoded:
    """Every record rendered and labelled; records left with no learned token by ``max_length`` are an error."""
    require_chat_template(tokenizer, where)
    ids, labels, too_long = [], [], []
    for number, row in enumerate(rows, 1):
        record = f"{where} record {number}"
        text, spans = assistant_spans(tokenizer, conversation(row, data.columns, record), data.train_on, record)
        tokens, targets = token_labels(tokenizer, text, spans, record)
        tokens, targets = tokens[: data.max_length], targets[: data.max_length]
        targets[:1] = [IGNORE]  # the first token has no context: never a target, also when packed after another
        if all(t == IGNORE for t in targets):
            too_long.append(number)
        ids.append(tokens)
        labels.append(targets)
    if too_long:
        listed = ", ".join(map(str, too_long[:MAX_LISTED])) + (", ..." if len(too_long) > MAX_LISTED else "")
        raise DataError(f"{where}: {len(too_long)} record(s) ({listed}) keep no assistant token within "
                        f"data.max_length={data.max_length} (the conversation before the learned turns fills it); "
                        f"raise data.max_length, or remove or shorten these records")
    return Encoded.from_lists(ids, labels)

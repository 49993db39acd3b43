"""Instruction SFT: records -> conversations -> text rendered by a chat template -> token ids and a loss mask.

Record formats, recognised by their fields:
- Alpaca: `{"instruction", "input" (optional), "output"}`, optional `system` and `history` ([[query,
  answer], ...] of earlier turns); the user turn is the instruction, then a blank line and the input.
- chat: `{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": text}, ...]}`; an
  assistant turn's `reasoning_content` (Qwen3's and DeepSeek-R1's reasoning kept apart from the answer)
  goes to the template with it, as transformers passes it (Qwen3's renders it in `<think>` tags).
- ShareGPT: `{"conversations": [{"from": "system" | "human" | "gpt", "value": text}, ...]}` (`user` and
  `assistant` are accepted as `from` too), optional top-level `system`.
- pairs: `data.source_field` -> `data.target_field` (seq2seq data for a decoder-only model): one user
  turn, the source, answered by the target.

Tool calling (function calling), in both formats, as transformers' `apply_chat_template` takes it:
- an assistant turn's `tool_calls`: [{"type": "function", "function": {"name", "arguments"}}, ...] (OpenAI's
  form; a bare {"name", "arguments"} is accepted), its `content` then optional; arguments given as a JSON
  text become the object (transformers' templates write `arguments | tojson`);
- a `tool` turn holds a call's result (optional `tool_call_id`, `name`);
- ShareGPT as LLaMA-Factory writes it: `function_call` turns (the value a JSON {"name", "arguments"} or a
  list of them) are the assistant's calls, `observation` turns the results;
- the record's `tools` (a list of JSON schemas, or that list as JSON text) goes to the template as `tools`
  (else `tools` of data.chat_template_kwargs, one list for all records).
A tool call is an answer the model learns like any other; a result is prompt. A template that drops a
call, a result or a tool (jaxft's default has no tool support) is an error naming the record.

Rendering: the tokenizer's chat template (`chat_template` in tokenizer_config.json, or a
chat_template.jinja file next to it) rendered with jinja2 in the sandbox and with the settings
transformers' `apply_chat_template` uses, else `DEFAULT_TEMPLATE` (`data.chat_template` names
another file, or `default`). Special-token strings in the rendered text (`<s>`, `<|im_end|>`) become
their ids.

Loss: every assistant turn is a response. A response's text is what rendering the conversation up
to and including that turn adds to rendering it up to the turn before with the generation prompt (so
end-of-turn markers such as EOS or `<|im_end|>` are learned too); everything else is prompt, with
loss_mask 0 unless `data.train_on_prompt`. A template that rewrites earlier turns once a later one
comes (Qwen3's drops the reasoning of answers before the last question) cannot render a conversation
turn by turn: each of its answers is then an example of its own, the conversation before it as the
template renders it at that point (as the model sees it when it answers).

Truncation (an example longer than data.seq_len): the last response keeps its first
max(seq_len - prompt length, seq_len // 2) tokens (cut from the right), and the text before it (the
"prompt": system, user turns, earlier answers) keeps its last tokens that fit (cut from the left; a
leading BOS is kept).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxft.data.sources import Records
from jaxft.errors import JaxftError, read_json, read_text

# The default chat template (tokenizers without one, e.g. jaxft-tiny's): Alpaca's prompt layout for
# every turn, BOS once at the start, each answer ended by EOS.
#   <s>SYSTEM\n\n### Instruction:\nUSER\n\n### Response:\nASSISTANT</s>\n\n### Instruction:\n...
DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content + '\\n\\n' }}"
    "{% elif m.role == 'user' %}"
    "{% if not loop.first and messages[loop.index0 - 1].role == 'assistant' %}{{ '\\n\\n' }}{% endif %}"
    "### Instruction:\n{{ m.content }}\n\n### Response:\n"
    "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


class BadRecord(JaxftError):
    """A record that is not a usable SFT example (skipped and counted with data.skip_bad_records)."""


class NotTurnByTurn(BadRecord):
    """The chat template rewrites an earlier turn of this conversation when it renders a later one."""


# ---------------------------------------------------------------------------------------------
# Chat templates.


def chat_template(tok, choice: str = "") -> tuple[str, str]:
    """-> (template text, where it came from). `choice`: "" (the tokenizer's, else the default),
    "default", or a file holding a Jinja template."""
    if choice == "default":
        return DEFAULT_TEMPLATE, "jaxft's default (Alpaca layout)"
    if choice:
        p = Path(choice)
        if not p.is_file():
            raise JaxftError(f"data.chat_template={choice!r}: expected '', 'default' or a template file")
        return read_text(p), str(p)
    directory = getattr(tok, "directory", None)
    if directory is not None:
        config = directory / "tokenizer_config.json"
        if config.is_file():
            template = read_json(config).get("chat_template")
            if isinstance(template, list):  # named templates: the default one
                template = next((t.get("template") for t in template if t.get("name") == "default"), None)
            if isinstance(template, str) and template:
                return template, str(config)
        jinja = directory / "chat_template.jinja"  # where transformers 5 saves it
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), str(jinja)
    return DEFAULT_TEMPLATE, "jaxft's default (Alpaca layout)"


class Renderer:
    """A chat template compiled as transformers compiles it: jinja2's immutable sandbox, trim_blocks,
    lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII."""

    def __init__(self, template: str, special: dict[str, str], where: str, variables: dict | None = None):
        import datetime

        import jinja2
        import jinja2.ext
        import jinja2.meta
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class Generation(jinja2.ext.Extension):
            """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markup): rendered as is;
            the masks here come from rendering turn by turn."""

            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", Generation])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        self.where, self.template, self.variables = where, template, dict(variables or {})
        self.special = {**special, **self.variables}  # what the template reads beside the messages
        try:
            self._template = env.from_string(template)
            reads = jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise JaxftError(f"chat template {where}:{e.lineno}: {e.message}") from None
        unread = sorted(set(self.variables) - reads)
        if unread:  # a setting that changes nothing (jaxft's default template has no thinking mode)
            known = ", ".join(sorted(reads - {"messages"} - set(env.globals))) or "none"
            raise JaxftError(f"data.chat_template_kwargs: the chat template {where} does not read {unread[0]!r}: "
                             f"expected one of the variables it reads ({known})")
        # A template that leaves out what the messages say would train every example on its own text.
        probe = [{"role": "user", "content": "Question 7?"}, {"role": "assistant", "content": "Answer 7."}]
        try:
            text = self(probe)
        except BadRecord:  # demands of its own (a system turn first, ...): the records will show them
            return
        missing = [m["role"] for m in probe if m["content"] not in text]
        if missing:
            raise JaxftError(f"chat template {where}: a {missing[0]} message's content is not in what it renders "
                             f"({text[:60]!r}...): expected a template that writes each message's content")

    def __call__(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The text of `messages`; `tools`: the record's tool schemas, else those of data.chat_template_kwargs."""
        import jinja2

        try:
            return self._template.render(**{**self.special, "messages": messages, "tools": self.tools(tools),
                                            "add_generation_prompt": add_generation_prompt})
        except jinja2.exceptions.TemplateError as e:
            raise BadRecord(f"chat template {self.where}: {e}") from None

    def tools(self, tools: list | None) -> list | None:
        """The tools a conversation may call: its record's, else any given in data.chat_template_kwargs
        (one list for every record), else None (as transformers passes no tools)."""
        return tools if tools is not None else self.variables.get("tools")

    def check_tools(self, messages: list[dict], tools: list | None = None) -> None:
        """BadRecord unless the template renders the conversation's tool calls, tool results and `tools`:
        a template without tool support would train the answers without what they answer."""
        calls = [c["function"]["name"] for m in messages for c in m.get("tool_calls", ())]
        results = [m["content"].strip() for m in messages if m["role"] == "tool"]
        tools = self.tools(tools)
        if not (calls or results or tools):
            return
        text = self(messages, tools=tools)
        names = [t.get("function", t).get("name") if isinstance(t, dict) else None for t in tools or ()]
        missing = ([f"the tool call {c!r}" for c in calls if c not in text]
                   + [f"a tool result ({r[:30]!r})" for r in results if r not in text]
                   + [f"the tool {n!r} of 'tools'" for n in names if isinstance(n, str) and n not in text])
        if missing:
            raise BadRecord(f"chat template {self.where} does not render {missing[0]}: expected a template with "
                            "tool support (the model's own, or data.chat_template=FILE)")

    def segments(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, bool]]:
        """-> [(text, is_response), ...] whose concatenation is the rendered conversation; NotTurnByTurn
        where rendering a later turn rewrites an earlier one."""
        out, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, answer = self._answer(messages, i, tools)
            if not prompt.startswith(done):
                raise NotTurnByTurn(f"chat template {self.where} does not render turn by turn (the conversation "
                                    f"up to message {i} is not a prefix of the conversation up to message {i + 1})")
            out += [(prompt[len(done):], False), (answer, True)]
            done = prompt + answer
        return [(text, response) for text, response in out if text]

    def _answer(self, messages: list[dict], i: int, tools: list | None = None) -> tuple[str, str]:
        """(the conversation before assistant turn i with the generation prompt, what turn i adds to it)."""
        prompt = self(messages[:i], add_generation_prompt=True, tools=tools)
        full = self(messages[: i + 1], tools=tools)
        if not full.startswith(prompt):
            raise BadRecord(f"chat template {self.where}: the conversation up to message {i} does not start with "
                            "the one before it and the generation prompt")
        return prompt, full[len(prompt):]

    def examples(self, messages: list[dict], tools: list | None = None) -> list[list[tuple[str, bool]]]:
        """The examples one conversation trains, as segments: itself, every answer a response, where the
        template renders turn by turn; else one per answer (see the module docstring)."""
        self.check_tools(messages, tools)
        try:
            return [self.segments(messages, tools)]
        except NotTurnByTurn:
            return [self.last_answer(messages[: i + 1], tools) for i, m in enumerate(messages)
                    if m["role"] == "assistant"]

    def last_answer(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, bool]]:
        """Segments with the last answer the only response, earlier ones context (a preference pair's sides,
        a generation prompt, a reward model's input)."""
        self.check_tools(messages, tools)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            segs = self.segments(messages[: last + 1], tools)
        except NotTurnByTurn:
            prompt, answer = self._answer(messages, last, tools)
            segs = [(prompt, False), (answer, True)]
        final = max((i for i, (_, response) in enumerate(segs) if response), default=-1)
        return [(text, response and i == final) for i, (text, response) in enumerate(segs) if text]


def template_variables(spec: str, setting: str = "data.chat_template_kwargs") -> dict:
    """`spec` -> the variables a chat template reads beyond the messages, as transformers'
    `apply_chat_template(..., **kwargs)` passes them: "name=value,..." (a value is read as JSON where it
    is JSON, `enable_thinking=false`, else as text, `reasoning_effort=high`) or one JSON object."""
    spec = str(spec or "").strip()
    if not spec:
        return {}
    if spec.startswith("{"):
        try:
            out = json.loads(spec)
        except json.JSONDecodeError as e:
            raise JaxftError(f"{setting}={spec!r}: invalid JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(out, dict):
            raise JaxftError(f"{setting}={spec!r}: expected a JSON object or name=value,...")
    else:
        out = {}
        for item in (x.strip() for x in spec.split(",")):
            name, eq, value = item.partition("=")
            if not eq or not name.strip().isidentifier():
                raise JaxftError(f"{setting}: {item!r} in {spec!r}: expected name=value (e.g. enable_thinking=false)")
            try:
                out[name.strip()] = json.loads(value)
            except json.JSONDecodeError:
                out[name.strip()] = value.strip()
    taken = sorted(set(out) & {"messages", "add_generation_prompt", "bos_token", "eos_token", "pad_token"})
    if taken:
        raise JaxftError(f"{setting}: {taken[0]!r} is set by jaxft itself: expected other template variables "
                         "(e.g. enable_thinking)")
    return out


def renderer(tok, choice: str = "", kwargs: str = "") -> Renderer:
    """The Renderer of `choice` (see `chat_template`) with `kwargs` (`template_variables`) set."""
    template, where = chat_template(tok, choice)
    return Renderer(template, special_strings(tok), where, template_variables(kwargs))


def stop_ids(tok, choice: str = "", kwargs: str = "") -> list[int]:
    """Where generation stops for a model trained on answers the chat template renders: EOS, the special
    token the template closes an answer with where that is another (ChatML's `<|im_end|>` on a base model
    whose EOS is `<|endoftext|>`, Llama 3's `<|eot_id|>`): the model learned to end its answers there; and
    the model's own `generation_eos` (GLM-4's `<|user|>`, which begins the next turn)."""
    probe = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "jaxft"}]
    rendering = renderer(tok, choice, kwargs)
    own = generation_eos(tok.directory)
    try:
        answer = rendering.last_answer(probe)[-1][0]
    except JaxftError:  # a template that wants other turns (a system prompt, ...): EOS alone
        return list(dict.fromkeys(list(tok.eos) + own))
    tail = answer[answer.rfind("jaxft") + len("jaxft"):].lstrip() if "jaxft" in answer else ""
    first = tok.encode_special(tail)[:1]
    return list(dict.fromkeys(list(tok.eos) + [i for i in first if tok.is_special(i)] + own))


def generation_eos(directory) -> list[int]:
    """The ids `generation_config.json` in a model (or tokenizer) directory ends generation at
    (`eos_token_id`, one or a list), as transformers' `generate` stops at them by default: an instruct
    model's end of turn where it is not the tokenizer's EOS. [] without the file."""
    path = Path(directory) / "generation_config.json" if directory else None
    if path is None or not path.is_file():
        return []
    ids = read_json(path).get("eos_token_id")
    ids = [] if ids is None else ids if isinstance(ids, list) else [ids]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise JaxftError(f"{path}: eos_token_id={ids!r}: expected a token id or a list of them")
    return ids


def special_strings(tok) -> dict[str, str]:
    """The special-token strings a template reads (bos_token, eos_token, ...)."""
    names = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    return {k: tok.piece(i) if i is not None else "" for k, i in names.items()}


# ---------------------------------------------------------------------------------------------
# Records -> conversations.


@dataclasses.dataclass(frozen=True)
class Fields:
    source: str = ""  # pairs: the prompt field
    target: str = ""  # pairs: the response field


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise BadRecord(f"{where}: {what} is {type(value).__name__}, expected text")
    return value


def pair_values(row, where: str, fields: Fields):
    """(source value, target value) of a `data.source_field` -> `data.target_field` record, None when the
    record is not one; a record naming one of the two fields must have both."""
    if not isinstance(row, dict):
        raise BadRecord(f"{where}: expected a JSON object, got {type(row).__name__}")
    if not (fields.source and fields.target and (fields.source in row or fields.target in row)):
        return None
    for name in (fields.source, fields.target):
        if row.get(name) is None:
            raise BadRecord(f"{where}: missing field {name!r} (fields: {', '.join(map(str, row))})")
    return row[fields.source], row[fields.target]


def conversation(row: dict, where: str, fields: Fields = Fields()) -> list[dict]:
    """One record -> [{"role", "content"}, ...], checked: known roles, text contents, at least one
    non-empty assistant turn."""
    pair = pair_values(row, where, fields)
    if pair is not None:
        messages = [{"role": "user", "content": _text(pair[0], where, repr(fields.source))},
                    {"role": "assistant", "content": _text(pair[1], where, repr(fields.target))}]
    elif "messages" in row:
        messages = _turns(row["messages"], where, "messages", "role", "content", {r: r for r in ROLES})
    elif "conversations" in row:
        messages = _turns(row["conversations"], where, "conversations", "from", "value", SHAREGPT_ROLES)
    elif "instruction" in row and "output" in row:
        messages = []
        for i, turn in enumerate(row.get("history") or []):
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise BadRecord(f"{where}: history[{i}] is not a [query, answer] pair")
            messages += [{"role": "user", "content": _text(turn[0], where, f"history[{i}][0]")},
                         {"role": "assistant", "content": _text(turn[1], where, f"history[{i}][1]")}]
        query = _text(row["instruction"], where, "'instruction'")
        extra = row.get("input") or ""
        query = f"{query}\n\n{_text(extra, where, repr('input'))}" if extra else query
        messages += [{"role": "user", "content": query},
                     {"role": "assistant", "content": _text(row["output"], where, "'output'")}]
    else:
        pairs = f"data.source_field/target_field ({fields.source!r}, {fields.target!r})" if fields.source else \
            "data.source_field and data.target_field set"
        raise BadRecord(f"{where}: not an SFT record: expected 'instruction' and 'output' (Alpaca), 'messages' "
                        f"(chat), 'conversations' (ShareGPT) or {pairs} (fields: {', '.join(map(str, row))})")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(f"{where}: no assistant turn to learn")
    return completed(messages, row, where)


def completed(messages: list[dict], row: dict, where: str, what: str = "") -> list[dict]:
    """The record's top-level `system` text first (unless a system turn opens the conversation), and
    checked: no empty turn but a system turn's. `what` ends the error (" in 'chosen'")."""
    if isinstance(row.get("system"), str) and row["system"] and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": row["system"]}] + messages
    for m in messages:  # a call's content and a result may be empty
        if m["role"] in ("user", "assistant") and not m.get("tool_calls") and not m["content"].strip():
            raise BadRecord(f"{where}: empty {m['role']} turn{what}")
    return messages


def record_tools(row: dict, where: str) -> list[dict] | None:
    """The record's `tools` (the tool schemas the template lists), a list or a JSON text of one; None if none."""
    tools = row.get("tools") if isinstance(row, dict) else None
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where}: 'tools' is not valid JSON (column {e.colno}: {e.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecord(f"{where}: 'tools' is a {type(tools).__name__}: expected a list of tool schemas "
                        '([{"type": "function", "function": {"name", "description", "parameters"}}, ...])')
    return tools or None


def _tool_calls(value, where: str, what: str) -> list[dict]:
    """Tool calls in OpenAI's form, or bare {"name", "arguments"}, or their JSON text (LLaMA-Factory's
    function_call value) -> [{"type": "function", "function": {"name", "arguments": object}}, ...] (+ "id")."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"{where}: {what} is not valid JSON (column {e.colno}: {e.msg}): expected a tool call "
                            '{"name", "arguments"} or a list of them') from None
    calls = [value] if isinstance(value, dict) else value
    if not isinstance(calls, list) or not calls:
        raise BadRecord(f"{where}: {what}: expected a non-empty list of tool calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRecord(f"{where}: {what}[{j}]: expected a tool call with a name "
                            '({"type": "function", "function": {"name", "arguments"}})')
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise BadRecord(f"{where}: {what}[{j}].arguments is not valid JSON (column {e.colno}: {e.msg})") from None
        if not isinstance(args, dict):
            raise BadRecord(f"{where}: {what}[{j}].arguments is a {type(args).__name__}: expected an object")
        out.append({"type": "function", "function": {"name": fn["name"], "arguments": args}})
        if isinstance(call.get("id"), str):
            out[-1]["id"] = call["id"]
    return out


def turns(value, where: str, key: str) -> list[dict]:
    """A list of chat turns ({"role", "content"}) or ShareGPT turns ({"from", "value"}), told apart by the
    first turn's keys -> [{"role", "content"}, ...], checked."""
    if isinstance(value, list) and value and isinstance(value[0], dict) and "from" in value[0]:
        return _turns(value, where, key, "from", "value", SHAREGPT_ROLES)
    return _turns(value, where, key, "role", "content", {r: r for r in ROLES})


def _turns(value, where, key, role_key, content_key, roles) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{where}: {key!r} is not a non-empty list of turns")
    out = []
    for i, turn in enumerate(value):
        calls = isinstance(turn, dict) and (turn.get("tool_calls") is not None or turn.get(role_key) == "function_call")
        if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and not calls):
            raise BadRecord(f"{where}: {key}[{i}] has no {role_key!r} and {content_key!r}")
        if turn[role_key] not in roles:
            raise BadRecord(f"{where}: {key}[{i}]: {role_key} {turn[role_key]!r} is not one of {', '.join(roles)}")
        m = {"role": roles[turn[role_key]]}
        if turn[role_key] == "function_call":  # LLaMA-Factory: the value is the call
            m.update(content="", tool_calls=_tool_calls(turn[content_key], where, f"{key}[{i}].{content_key}"))
        else:
            content = turn.get(content_key)
            m["content"] = "" if content is None and calls else _text(content, where, f"{key}[{i}]")
            if turn.get("tool_calls") is not None:
                if m["role"] != "assistant":
                    raise BadRecord(f"{where}: {key}[{i}]: a {m['role']} turn with tool_calls: expected the assistant's")
                m["tool_calls"] = _tool_calls(turn["tool_calls"], where, f"{key}[{i}].tool_calls")
        if turn.get("reasoning_content") is not None and m["role"] == "assistant":
            # an answer's reasoning apart from it (Qwen3's, DeepSeek-R1's): the template places it
            m["reasoning_content"] = _text(turn["reasoning_content"], where, f"{key}[{i}].reasoning_content")
        if m["role"] == "tool":  # which call a result answers, where the record says
            m.update({k: turn[k] for k in ("tool_call_id", "name") if isinstance(turn.get(k), str)})
        out.append(m)
    return out


# ---------------------------------------------------------------------------------------------
# Conversations -> ids and loss masks.


def encode(segments: list[tuple[str, bool]], tok) -> tuple[list[int], list[int]]:
    """-> (ids, response mask): each segment tokenised on its own (a prompt's ids are those generation
    starts from), as it tokenizes after the segment before it (`following`); special-token strings as
    their ids."""
    ids, mask, before = [], [], ""
    for text, response in segments:
        piece = following(tok, before, ids[-1] if ids else None, text)
        ids += piece
        mask += [int(response)] * len(piece)
        before = text
    return ids, mask


def following(tok, before: str, last_id: int | None, text: str) -> list[int]:
    """The ids of `text` where it follows `before` (whose last id is `last_id`) in one text. SentencePiece
    and Metaspace tokenizers (Llama 2's, Mistral's) mark the start of what they encode with a '▁'
    (a space) that the same words lack in mid-text: alone, an answer after "[/INST]" would start with an
    extra '▁' token and Chinese text with a '▁' of its own, where transformers, tokenizing the
    whole conversation, has none. So `text` is encoded after the end of `before` (its last character,
    or the special token it ends with, which starts a text of its own) and that end's ids taken off;
    where the two merge into one token, `text` alone. Byte-level BPE (GPT-2's, Qwen's, Llama 3's)
    tokenizes the same either way."""
    if not before:
        return tok.encode_special(text)
    tail = before[-1]
    if last_id is not None and tok.is_special(last_id) and before.endswith(tok.piece(last_id)):
        tail = tok.piece(last_id)
    head, both = tok.encode_special(tail), tok.encode_special(tail + text)
    return both[len(head):] if both[: len(head)] == head else tok.encode_special(text)


def truncate(ids: list[int], mask: list[int], seq_len: int, bos_id) -> tuple[list[int], list[int], bool]:
    """The stated rule (module docstring): keep the last response's start, cut the prompt from the left."""
    if len(ids) <= seq_len:
        return ids, mask, False
    start = _last_response_start(mask)
    if start == 0 or mask[-1] == 0:  # all response, or no response at the end
        return ids[:seq_len], mask[:seq_len], True
    prompt, response = (ids[:start], mask[:start]), (ids[start:], mask[start:])
    keep_response = min(len(response[0]), max(seq_len - len(prompt[0]), seq_len // 2))
    keep_prompt = seq_len - keep_response
    head = 1 if prompt[0] and bos_id is not None and prompt[0][0] == bos_id and keep_prompt > 0 else 0
    tail = keep_prompt - head
    p_ids = prompt[0][:head] + (prompt[0][len(prompt[0]) - tail:] if tail else [])
    p_mask = prompt[1][:head] + (prompt[1][len(prompt[1]) - tail:] if tail else [])
    return p_ids + response[0][:keep_response], p_mask + response[1][:keep_response], True


def _last_response_start(mask: list[int]) -> int:
    """Index of the first token of the last run of response tokens."""
    i = len(mask)
    while i > 0 and mask[i - 1] == 0:
        i -= 1
    while i > 0 and mask[i - 1] == 1:
        i -= 1
    return i


# ---------------------------------------------------------------------------------------------
# Examples -> fixed-shape arrays.


@dataclasses.dataclass
class Encoded:
    examples: list[tuple[list[int], list[int]]]
    truncated: int
    skipped: int
    first_skip: str
    split: int = 0  # conversations made one example per answer (a template that does not render turn by turn)


def examples(records: Records, tok, renderer: Renderer, seq_len: int, fields: Fields = Fields(),
             train_on_prompt: bool = False, skip_bad: bool = False) -> Encoded:
    out, truncated, skipped, first, split = [], 0, 0, "", 0
    for row, where in zip(records.rows, records.where):
        try:
            messages = conversation(row, where, fields)
            encoded = [encode(segs, tok) for segs in renderer.examples(messages, record_tools(row, where))]
            if not any(any(mask) for _, mask in encoded):
                raise BadRecord(f"{where}: the responses render to no tokens")
        except BadRecord as e:
            msg = skip_or_raise(e, where, skip_bad)
            skipped, first = skipped + 1, first or msg
            continue
        split += len(encoded) > 1
        for ids, mask in encoded:
            ids, mask, cut = truncate(ids, mask, seq_len, tok.bos_id)
            truncated += cut
            out.append((ids, [1] * len(ids) if train_on_prompt else mask))
    return Encoded(out, truncated, skipped, first, split)


def skip_or_raise(e: BadRecord, where: str, skip_bad: bool) -> str:
    """A bad record's one-line message (naming `where`): raised, or returned to be counted when
    `data.skip_bad_records` skips such records."""
    msg = str(e) if str(e).startswith(where) else f"{where}: {e}"
    if not skip_bad:
        raise BadRecord(msg + " (data.skip_bad_records=True skips such records)") from None
    return msg


def padded(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One example per row, right-padded to seq_len (length buckets cut the batches shorter)."""
    n = len(examples)
    ids = np.full((n, seq_len), pad_id, np.int32)
    attention, loss = np.zeros((n, seq_len), np.int32), np.zeros((n, seq_len), np.int32)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)], attention[i, : len(x)], loss[i, : len(x)] = x, 1, m
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss, "weight": np.ones((n,), np.float32)}


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int,
         open_bins: int = 256) -> dict[str, np.ndarray]:
    """Examples packed into rows of seq_len, first fit by decreasing length over the last `open_bins`
    open rows; `segment_ids` 1, 2, ... per example in a row, 0 for padding. Deterministic."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows, space, first_open = [], [], 0
    for i in order:
        n = len(examples[i][0])
        row = next((r for r in range(first_open, len(rows)) if space[r] >= n), None)
        if row is None:
            rows.append([])
            space.append(seq_len)
            row = len(rows) - 1
            first_open = max(first_open, len(rows) - open_bins)
        rows[row].append(i)
        space[row] -= n
    arrays = padded([([], [])] * len(rows), seq_len, pad_id)
    arrays["segment_ids"] = np.zeros_like(arrays["input_ids"])
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(sorted(members), 1):  # file order within a row
            x, m = examples[i]
            sl = slice(at, at + len(x))
            arrays["input_ids"][r, sl], arrays["attention_mask"][r, sl] = x, 1
            arrays["loss_mask"][r, sl], arrays["segment_ids"][r, sl] = m, s
            at += len(x)
    return arrays


def detect(records: Records, fields: Fields = Fields()) -> bool:
    """Whether the first record looks like SFT data (for choosing the task when data.task is empty)."""
    if not records.rows:
        return False
    row = records.rows[0]
    return ("messages" in row or "conversations" in row or ("instruction" in row and "output" in row)
            or bool(fields.source and fields.target and fields.source in row and fields.target in row))


"""What a generation evaluation gives the model and what it should answer: prompt ids and reference texts.

- SFT records (Alpaca, chat, ShareGPT, source/target pairs) on a decoder-only model: the prompt is the
  conversation rendered up to the generation prompt of its last assistant turn, tokenized segment by
  segment exactly as training tokenizes it (`jaxft.data.sft`); the reference is that turn's text, or for
  a turn of tool calls what the template renders for it up to where generation stops (the calls as the
  model writes them: Qwen2.5's `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>`).
- preference pairs (DPO): the same, for the conversation that ends in the chosen answer.
- source/target records on an encoder-decoder model (T5): the pair `jaxft.data.seq2seq.pair` reads
  (`data.source_field` -> `data.target_field`, or Alpaca's), as training reads it; the prompt is
  `jaxft.data.seq2seq.encode_source(tok, source, seq_len)` and the reference the target.

A prompt longer than the room left for the answer keeps its last max(seq_len - max_new_tokens,
seq_len // 2) tokens (a leading BOS kept): the part of the prompt training's truncation keeps.

A reference is its text as the tokenizer writes it back (`written`), the text the model learned and at
best answers, as transformers' seq2seq recipes score their decoded labels (`skip_special_tokens`: a
character the vocabulary lacks is dropped, not matched by an answer's unknown tokens). T5's NFKC turns
Chinese full-width punctuation into ASCII ('，' -> ','): against the records' own text even a perfect
answer would score ADGEN BLEU 84 and exact match 0. Tokenizers that keep text as it is change nothing.
"""

from __future__ import annotations

from jaxft.data import preference, seq2seq, sft
from jaxft.data.sources import Records
from jaxft.errors import JaxftError


def prompts_and_references(records: Records, tok, seq_len: int, *, fields: sft.Fields = sft.Fields(),
                           chat_template: str = "", chat_template_kwargs: str = "", encoder_decoder: bool = False,
                           max_new_tokens: int = 0, skip_bad: bool = False) -> tuple[list[list[int]], list[str]]:
    """-> (prompt ids of each usable record, its reference text). Bad records stop with their
    `file:line`, or are skipped with `skip_bad` (as training skips them)."""
    renderer = stops = None
    if not encoder_decoder:
        renderer = sft.renderer(tok, chat_template, chat_template_kwargs)
        stops = sft.stop_ids(tok, chat_template, chat_template_kwargs)
    keep = max(seq_len - max_new_tokens, seq_len // 2, 1)
    prompts, references = [], []
    for row, at in zip(records.rows, records.where):
        try:
            if encoder_decoder:  # the (source, target) training reads
                source, reference = seq2seq.pair(row, at, fields)
                prompt = seq2seq.encode_source(tok, source, seq_len)
            else:
                # a preference pair's prompt is answered; its chosen answer is the reference
                messages = preference.pair(row, at)[0] if preference.is_pair(row) else sft.conversation(row, at, fields)
                last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
                segments = renderer.last_answer(messages[: last + 1], sft.record_tools(row, at))
                reference = messages[last]["content"]
                if messages[last].get("tool_calls"):  # the calls as the model writes them, up to where it stops
                    from jaxft.generate import answer_text

                    reference = answer_text(tok, tok.encode_special(segments[-1][0]), stops).strip()
                prompt = cut_left(sft.encode(segments[:-1], tok)[0], keep, tok.bos_id)  # the last one is the answer
        except sft.BadRecord as e:
            if skip_bad:
                continue
            raise JaxftError(f"{e} (data.skip_bad_records=True skips such records)") from None
        prompts.append(prompt)
        references.append(written(tok, reference))
    return prompts, references


def written(tok, text: str) -> str:
    """`text` as the model can write it: its tokens decoded (the tokenizer's normalization applied), less
    any unknown token."""
    return tok.decode([i for i in tok.encode(text) if i != tok.unk_id])


def cut_left(ids: list[int], keep: int, bos_id) -> list[int]:
    """The last `keep` tokens, a leading BOS kept."""
    if len(ids) <= keep:
        return ids
    head = ids[:1] if bos_id is not None and ids and ids[0] == bos_id else []
    return head + ids[len(ids) - keep + len(head):]


def interleave(parts: list[list]) -> list:
    """The items of several lists taken in turn (a, b, a, b, ...), so the first N of a mixture's
    prompts hold every source."""
    out = []
    for i in range(max(map(len, parts), default=0)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def distinct(prompts: list[list[int]], references: list[str]) -> tuple[list[list[int]], list[list[str]]]:
    """Records that share a prompt become one prompt with all their references (E2E's several
    human references per meaning representation), in first-seen order."""
    order, refs = {}, []
    for p, r in zip(prompts, references):
        key = tuple(p)
        if key not in order:
            order[key] = len(refs)
            refs.append([])
        refs[order[key]].append(r)
    return [list(k) for k in order], refs

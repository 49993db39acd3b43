"""Where examples come from: bundled datasets, local files (jsonl/json/csv/tsv/parquet), the hub.

Every record keeps its file and line, so a malformed one is reported as `file:line: what is wrong`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Callable

from jaxft.errors import JaxftError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclasses.dataclass(frozen=True)
class Bundled:
    train: Path
    eval: Path | None
    text_field: str
    label_field: str | None
    group_phrases: bool = False  # see `group_phrases`
    text_pair_field: str | None = None  # the second text of a sentence pair (RTE's hypothesis)
    source_field: str = ""  # source -> target pairs (sft, seq2seq): the default data.source_field
    target_field: str = ""  # ... and data.target_field
    reader: Callable | None = None  # what reads its files (None: `read_file`)
    labels: tuple = ()  # its classes, where the eval split has some the training split lacks (data.labels' default)


BUNDLED = {
    "sst2": Bundled(ASSETS / "sst2" / "train.tsv", ASSETS / "sst2" / "dev.tsv", "sentence", "label"),
    "rte": Bundled(ASSETS / "rte" / "train.jsonl", ASSETS / "rte" / "val.jsonl", "premise", "label",
                   text_pair_field="hypothesis"),
    "chnsenticorp": Bundled(ASSETS / "chnsenticorp" / "train.csv", ASSETS / "chnsenticorp" / "dev.csv", "review", "label"),
    "c4_demo": Bundled(ASSETS / "c4_demo" / "c4_demo.jsonl", None, "text", None),
    # SST-2 training sentences for language modelling, each treebank sentence with its sub-phrases.
    "sst2_grouped": Bundled(ASSETS / "sst2" / "train.tsv", ASSETS / "sst2" / "dev.tsv", "sentence", None, True),
    # Data-to-text pairs: E2E NLG (train on valid.txt, evaluate on test.txt: the official train split is
    # not bundled) and ADGEN (one file: hold some out with data.eval_holdout).
    "e2e_nlg": Bundled(ASSETS / "e2e_nlg" / "valid.txt", ASSETS / "e2e_nlg" / "test.txt", "meaning_representation",
                       None, source_field="meaning_representation", target_field="human_reference",
                       reader=lambda p: read_e2e(p)),
    "adgen": Bundled(ASSETS / "adgen" / "dev.json", None, "content", None, source_field="content",
                     target_field="summary"),
    # Tagged words derived from the same two (`tag_values`): each reference's words (E2E) or characters
    # (ADGEN) that spell one of its record's attribute values, tagged with the attribute, for NER.
    "e2e_ner": Bundled(ASSETS / "e2e_nlg" / "valid.txt", ASSETS / "e2e_nlg" / "test.txt", "tokens", "ner_tags",
                       reader=lambda p: e2e_tagged(p),  # test.txt has multi-word foods, valid.txt none
                       labels=("O", *(f"{p}-{slot}" for slot in ("name", "Type", "food", "price", "customer_rating",
                                                                  "area", "family_friendly", "near") for p in "BI"))),
    "adgen_ner": Bundled(ASSETS / "adgen" / "dev.json", None, "tokens", "ner_tags", reader=lambda p: adgen_tagged(p)),
}
E2E_SEPARATOR = "||"  # E2E NLG's files: one `meaning representation||reference` pair a line
FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".conll", ".bio", ".bmes")
TAGGED = (".conll", ".bio", ".bmes")  # a word and its tag per line (`read_tagged`)


@dataclasses.dataclass
class Records:
    rows: list[dict]
    where: list[str]  # "file:line" of each row, for error messages


def read_file(path: str | Path) -> Records:
    p = Path(path)
    if not p.is_file():
        raise JaxftError(f"data file {str(p)!r}: not found")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise JaxftError(f"data file {str(p)!r}: unknown format {suffix!r} (expected one of {', '.join(FORMATS)})")
    rows, where = [], []
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise JaxftError(f"data file {str(p)!r}: reading parquet needs pyarrow (pip install pyarrow)") from None

        try:
            rows = pq.read_table(p).to_pylist()
        except Exception as e:
            raise JaxftError(f"{p}: unreadable parquet file ({e})") from None
        return Records(rows, [f"{p}:row {i + 1}" for i in range(len(rows))])
    text = _utf8(p).replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text did
    if suffix in TAGGED:
        return read_tagged(p, text)
    if suffix == ".txt":  # raw text for continued pretraining: one document per blank-line-separated block
        line = 1
        for block in text.split("\n\n"):
            if block.strip():
                start = line + len(block) - len(block.lstrip("\n"))
                rows.append({"text": block.strip("\n")})
                where.append(f"{p}:{start}")
            line += block.count("\n") + 2
        return Records(rows, where)
    if suffix in (".csv", ".tsv"):
        # Lines split on "\n" only (not str.splitlines, which also splits on U+2028, \x1c, ... inside
        # fields), and with their ends kept, so a quoted CSV field keeps its newlines.
        reader = csv.reader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",",
                            quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL)
        try:
            header = next(reader)
            dup = next((h for i, h in enumerate(header) if h and h in header[:i]), None)
            if dup is not None:  # a row dict keeps only the last of them
                raise JaxftError(f"{p}:1: column {dup!r} appears twice in the header ({', '.join(header)})")
            while True:
                start = reader.line_num + 1  # a quoted field may span lines: report where the row starts
                fields = next(reader, None)
                if fields is None:
                    break
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise JaxftError(f"{p}:{start}: {len(fields)} fields, expected {len(header)} ({', '.join(header)})")
                rows.append(dict(zip(header, fields)))
                where.append(f"{p}:{start}")
        except StopIteration:
            raise JaxftError(f"{p}: empty file (expected a header line)") from None
        except csv.Error as e:
            raise JaxftError(f"{p}:{reader.line_num}: {e}") from None
        return Records(rows, where)
    stripped = text.lstrip()
    if suffix == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise JaxftError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise JaxftError(f"{p}: item {i}: expected a JSON object, got {type(row).__name__}")
        return Records(data, [f"{p}:item {i}" for i in range(len(data))])
    for n, line in enumerate(text.split("\n"), 1):  # JSON lines (also .json files written as lines)
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            whole = _json_object(text) if suffix == ".json" else None
            if whole is not None:  # valid JSON, but one object over several lines: records nested inside it?
                raise JaxftError(f"{p}: one JSON object (keys: {', '.join(map(str, whole)) or 'none'}), expected a "
                                 "list of records [{...}, ...] or one record a line") from None
            raise JaxftError(f"{p}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise JaxftError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"{p}:{n}")
    return Records(rows, where)


def _utf8(p: Path) -> str:
    """A data file's text (UTF-8, a byte order mark dropped); other bytes are one line naming the file's line."""
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise JaxftError(f"{p}:{line}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _json_object(text: str) -> dict | None:
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return None
    return whole if isinstance(whole, dict) else None


def read_e2e(path: str | Path) -> Records:
    """E2E NLG as the LoRA repository ships it: `MR||reference` a line -> {"meaning_representation",
    "human_reference"}, each stripped."""
    p = Path(path)
    if not p.is_file():
        raise JaxftError(f"data file {str(p)!r}: not found")
    text = _utf8(p).replace("\r\n", "\n")
    rows, where = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if E2E_SEPARATOR not in line:
            raise JaxftError(f"{p}:{n}: expected 'meaning representation{E2E_SEPARATOR}reference'")
        mr, ref = line.split(E2E_SEPARATOR, 1)
        rows.append({"meaning_representation": mr.strip(), "human_reference": ref.strip()})
        where.append(f"{p}:{n}")
    return Records(rows, where)


def tag_values(words: list[str], values: list[tuple[str, list[str]]]) -> list[str]:
    """IOB2 tags of `words`: every run that spells a value (type, its words), longest values first, where no
    longer one was found; the rest O. Distant supervision: a mention that paraphrases the value is missed."""
    tags = ["O"] * len(words)
    for kind, value in sorted(values, key=lambda v: -len(v[1])):
        n = len(value)
        for i in range(len(words) - n + 1):
            if words[i:i + n] == value and all(t == "O" for t in tags[i:i + n]):
                tags[i:i + n] = [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
    return tags


def e2e_tagged(path) -> Records:
    """E2E NLG as NER: a reference's words (the files' tokenization), its meaning representation's values
    tagged with their slot (`name`, `food`, `area`, ..., spaces as `_`); `family friendly`'s yes / no is
    seldom spelled out."""
    pairs = read_e2e(path)
    rows = []
    for row in pairs.rows:
        slots = [part.split(":", 1) for part in row["meaning_representation"].split("|") if ":" in part]
        values = [(key.strip().replace(" ", "_"), value.split()) for key, value in slots if value.split()]
        words = row["human_reference"].split()
        rows.append({"tokens": words, "ner_tags": tag_values(words, values)})
    return Records(rows, pairs.where)


def adgen_tagged(path) -> Records:
    """ADGEN as Chinese NER: a description's characters (spaces dropped), the attribute values of its
    `content` (`类型#上衣*颜色#白色*...`) tagged with their attribute (`颜色`, ...) where the text spells them."""
    records = read_file(path)
    rows = []
    for i, row in enumerate(records.rows):
        content, summary = field(records, i, "content"), field(records, i, "summary")
        values = [(key, list(value)) for key, _, value in (part.partition("#") for part in str(content).split("*"))
                  if key and value]
        chars = [c for c in str(summary) if not c.isspace()]
        rows.append({"tokens": chars, "ner_tags": tag_values(chars, values)})
    return Records(rows, records.where)


HUB_PREFIX = "hub:"  # data.name="hub:owner/name" (or "hub:DIR", a dataset repository on disk): always the hub


def hub_name(name: str) -> str | None:
    """The `datasets` name of a hub source: `hub:owner/name` always; a bare name that is neither bundled,
    nor a known file format, nor an existing path, as before. None: not a hub source."""
    if name.startswith(HUB_PREFIX):
        return name[len(HUB_PREFIX):]
    if name in BUNDLED or Path(name).suffix.lower() in FORMATS or Path(name).exists():
        return None
    return name


def _hub(name: str, config: str | None, split: str, key: str) -> Records:
    """One split of a hub dataset through `datasets.load_dataset`, which caches it (HF_DATASETS_CACHE):
    offline, a cached dataset loads and an uncached one is a one-line error; so is a config or split
    the dataset does not have (`key` names the setting that chose it)."""
    import os
    import sys

    from jaxft.hf import first_line, offline_reason

    offline = None if Path(name).is_dir() else offline_reason()
    if offline and "datasets" not in sys.modules:  # read the cache only: no retries against an unreachable hub
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    shown = f"{name}" + (f" (data.hub_config={config!r})" if config else "")
    try:
        import datasets
    except ImportError:
        raise JaxftError(f"data.name {name!r}: a hub dataset needs the `datasets` package (pip install datasets)") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        builder = datasets.load_dataset_builder(name, config)
    except Exception as e:
        reason = first_line(e)
        if "BuilderConfig" in reason or "Config name is missing" in reason:  # the dataset exists, the config not
            raise JaxftError(f"data.hub_config={config or ''!r}: dataset {name!r} has no such config ({reason})") from None
        if offline:
            raise JaxftError(f"data.name {name!r}: not bundled, not a local file, not in the Hugging Face cache, and "
                             f"the hub cannot be reached ({offline})") from None
        raise JaxftError(f"data.name {name!r}: not bundled, not a local file, and the hub load failed ({reason})") from None
    splits = list(builder.info.splits or getattr(builder.config, "data_files", None) or ())  # known before a download
    if splits and split not in splits:
        raise JaxftError(f"{key}={split!r}: dataset {shown} has no such split (it has {', '.join(splits)})")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        reason = first_line(e)
        if "Unknown split" in reason or "Bad split" in reason:
            raise JaxftError(f"{key}={split!r}: dataset {shown} has no such split ({reason})") from None
        raise JaxftError(f"data.name {name!r}: loading {shown} split {split!r} failed ({reason})") from None
    where = f"{name}{'/' + config if config else ''}[{split}]"
    return Records(named_tags(ds), [f"{where} row {i}" for i in range(len(ds))])


def named_tags(ds) -> list[dict]:
    """A hub dataset's rows, each word's class number replaced by its name where the dataset names them
    (conll2003's `ner_tags`: a list of ClassLabel), so that tagged words are scored as entities."""
    import datasets

    named = {}
    for column, feature in ds.features.items():
        inner = feature[0] if isinstance(feature, list) and feature else getattr(feature, "feature", None)
        if isinstance(inner, datasets.ClassLabel):
            named[column] = inner.names
    rows = list(ds)
    for row in rows:
        for column, names in named.items():
            row[column] = [names[i] for i in row[column]]
    return rows


def resolve(data_cfg, name: str | None = None) -> tuple[Records, Records | None, str, str | None]:
    """-> (train records, eval records or None, text field, label field) of one source."""
    name = str(data_cfg.name) if name is None else name
    text_field = data_cfg.get("text_field") or None
    label_field = data_cfg.get("label_field") or None
    eval_name = data_cfg.get("eval_name") or ""
    if name in BUNDLED:  # data.eval_name, a file in the set's own format, replaces its eval split
        b = BUNDLED[name]
        read = b.reader or read_file
        train = read(b.train)
        ev = read(eval_name) if eval_name else read(b.eval) if b.eval else None
        if b.group_phrases:
            train = group_phrases(train, text_field or b.text_field)
        return train, ev, text_field or b.text_field, label_field or b.label_field
    hub = hub_name(name)
    if hub is None:
        train = read_file(name)
        ev = read_file(eval_name) if eval_name else None
    else:  # a hub dataset: its config and splits (data.eval_name, the older key, also names the eval split)
        config = data_cfg.get("hub_config") or None
        train = _hub(hub, config, data_cfg.get("train_split") or "train", "data.train_split")
        split, key = data_cfg.get("eval_split") or eval_name, "data.eval_split"
        ev = None
        if split and split != "none":
            ev = _hub(hub, config, split, key)
        elif not split:  # the conventional name, where the dataset has one (else eval_holdout / none)
            ev = _hub_if_split(hub, config, "validation")
    return train, ev, text_field or "text", label_field or "label"


def _hub_if_split(name: str, config: str | None, split: str) -> Records | None:
    """The split if the dataset has it, else None."""
    try:
        return _hub(name, config, split, "data.eval_split")
    except JaxftError as e:
        if "has no such split" in str(e):
            return None
        raise


def read_tagged(path: Path, text: str) -> Records:
    """CoNLL-style tagged words: a word per line, its tag in the last column (CoNLL-2003's
    `word POS chunk tag`, or `word tag`; spaces or tabs), a blank line between sentences, `-DOCSTART-`
    lines skipped (Chinese NER sets in .bio / .bmes tag a character per line) -> records {tokens,
    ner_tags}, each where its first word is."""
    rows, where, words, tags, start = [], [], [], [], 0
    for n, line in enumerate(text.split("\n") + [""], 1):
        parts = line.split()
        if not parts or parts[0] == "-DOCSTART-":
            if words:
                rows.append({"tokens": words, "ner_tags": tags})
                where.append(f"{path}:{start}")
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise JaxftError(f"{path}:{n}: {line.strip()!r} has no tag: expected a word and its tag, separated by "
                             "white space")
        start = start if words else n
        words.append(parts[0])
        tags.append(parts[-1])
    return Records(rows, where)


def read_pairs(path: Path, source: str, target: str, separator: str = "||") -> Records:
    """`source||target` lines (E2E NLG's format) -> records {source: ..., target: ...}."""
    rows, where = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if separator not in line:
            raise JaxftError(f"{path}:{n}: expected 'source{separator}target'")
        a, b = line.split(separator, 1)
        rows.append({source: a.strip(), target: b.strip()})
        where.append(f"{path}:{n}")
    return Records(rows, where)


def pair_field(data_cfg, name: str | None = None) -> str | None:
    """The field holding the second text of a sentence pair: `data.text_pair_field`, else the bundled
    set's own (RTE: hypothesis), else None (single texts)."""
    name = str(data_cfg.name) if name is None else name
    given = data_cfg.get("text_pair_field") or None
    return given or (BUNDLED[name].text_pair_field if name in BUNDLED else None)


def pair_fields(data_cfg, name: str | None = None) -> tuple[str, str]:
    """The (source, target) fields of source -> target records: `data.source_field` /
    `data.target_field`, else the bundled set's own (E2E NLG's, ADGEN's), else empty."""
    name = str(data_cfg.name) if name is None else name
    b = BUNDLED.get(name)
    return (str(data_cfg.get("source_field", "")) or (b.source_field if b else ""),
            str(data_cfg.get("target_field", "")) or (b.target_field if b else ""))


def group_phrases(records: Records, text_field: str, n: int = 3) -> Records:
    """SST-2's training set is treebank phrases: join each sentence with the phrases inside it.

    One record per longest phrase, its text a list [sentence, sub-phrase, ...] (longest first). A
    language model trained on them (segments separated by EOS) has to carry what a sentence said
    past its EOS to predict the next related phrase, so the EOS state summarises the sentence:
    the token a classifier head reads. Unsupervised: labels are not looked at.
    """
    texts = [str(field(records, i, text_field)).strip() for i in range(len(records.rows))]
    index, roots, children = {}, [], {}
    for i in sorted(range(len(texts)), key=lambda i: (-len(texts[i]), i)):
        words = texts[i].split()
        parent = next((j for j in index.get(tuple(words[:n]), ()) if f" {texts[i]} " in f" {texts[j]} "), None)
        if parent is not None:
            children[parent].append(i)
            continue
        roots.append(i)
        children[i] = []
        for m in range(1, n + 1):  # every m-gram, m <= n: the keys of the phrases it may contain
            for s in range(len(words) - m + 1):
                index.setdefault(tuple(words[s : s + m]), []).append(i)
    rows = [{text_field: [texts[i]] + [texts[c] for c in children[i]]} for i in roots]
    return Records(rows, [records.where[i] for i in roots])


def field(records: Records, i: int, name: str):
    row = records.rows[i]
    if name not in row or row[name] is None:
        raise JaxftError(f"{records.where[i]}: missing field {name!r} (fields: {', '.join(map(str, row))})")
    return row[name]


def load_texts(name: str, text_field: str | None = None) -> list[str]:
    """All texts of one or more sources joined by '+' (e.g. `sst2+c4_demo`), for tokenizer training."""
    texts = []
    for one in name.split("+"):
        if one in BUNDLED:
            b = BUNDLED[one]
            records, field_name = (b.reader or read_file)(b.train), text_field or b.text_field
        else:
            records, field_name = read_file(one), text_field or "text"
        for i in range(len(records.rows)):
            t = field(records, i, field_name)
            if not isinstance(t, str):
                raise JaxftError(f"{records.where[i]}: field {field_name!r} is {type(t).__name__}, expected text")
            texts.append(t)
    return texts

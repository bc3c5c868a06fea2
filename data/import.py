"""Bring a standard benchmark file into the question schema of data/README.md.

Reads the row layout a user gets from `datasets.Dataset.to_json` (JSON lines), and plain .csv,
.tsv, .jsonl or a .json array:

    mmlu     question, choices (a list), answer (an index, or a letter), subject -> the cluster.
             Also the original headerless MMLU CSV (question, A, B, C, D, answer letter), where
             the subject comes from the file name (anatomy_test.csv -> anatomy).
    gsm8k    question, answer whose text ends in "#### N" -> a number question (thousands
             separators dropped: "#### 1,234" -> 1234). The worked solution goes to meta.solution.
    medqa    question, options (a dict letter -> text, a list, or BigBio's [{"key", "value"}]),
             answer_idx (a letter) or answer (the option's text); MedMCQA's opa..opd with cop
             (0-based in the HF dataset, 1-based in the original release: read from the file,
             and printed). Cluster from subject_name, subject or topic if present.
    columns  any CSV or JSONL, named by --map question=Q,choices=A|B|C|D,answer=ans,cluster=topic
             (also subtype=, lesson=). choices= names one column holding a list (or a JSON list
             in a CSV cell) or several columns joined by |. Without choices a row is a number
             question if its answer is a number, else a text question. The answer of an mcq may
             be a letter (A = the first option), a column name, an option's text or a 0-based
             index; an answer that two of these read differently is skipped as ambiguous.

Clusters: --cluster-field F takes the cluster from field F of every row (any format). Without it,
each format's default field above; a file without one (GSM8K has no topic field) becomes one
cluster named after the file. Every cluster needs a second question (Q'), so a cluster with a
single question is dropped, with a count.

Ids are stable: <file stem>-<row>, where the row is the line the record starts on (JSONL, CSV
with its header as line 1) or its position (a JSON array). meta.imported_from says file:row, and fields
the schema has no place for go under meta. Imported questions have no `lesson`, so stages skip
what needs one (grpo_introspect's oracle, calibrate's lesson arms) and say so.

A row that cannot be converted is skipped, counted and shown; --strict stops at the first one,
naming the file, the row and the field. Empty options are dropped (the answer letter follows) and
duplicate options are kept, both reported per row; an answer whose text is empty or duplicated
skips the row. The file written always loads with common.load_questions (checked before it
replaces --out).

    python data/import.py mmlu-clinical-raw.jsonl --format mmlu --out data/mmlu-clinical.jsonl
    python data/import.py gsm8k-test.jsonl --format gsm8k --out data/gsm8k.jsonl --limit 200 --seed 1
    python data/import.py my.csv --format columns --out data/my.jsonl \
        --map "question=stem,choices=a|b|c|d,answer=key,cluster=topic"
"""
import ast
import csv
import io
import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

LETTERS = common.LETTERS
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
MAP_KEYS = ("question", "choices", "answer", "cluster", "subtype", "lesson")
DEFAULT_CLUSTER = {"mmlu": ("subject",), "gsm8k": (), "medqa": ("subject_name", "subject", "topic"), "columns": ()}
SHOW = 20           # rows shown per kind of problem; the rest are counted


class RowError(Exception):
    """A row that cannot be converted: which field, and why (one line)."""

    def __init__(self, field, why):
        super().__init__(f"field {field!r}: {why}" if field else why)
        self.field = field or "unreadable"


# ----------------------------------------------------------------------------
# reading: (row, record) pairs, a record being a dict or the RowError of an unreadable row


def read_rows(path: Path, fmt: str):
    """All records of a file, and the field names its records use (or its CSV header)."""
    try:
        text = path.read_text(encoding="utf-8-sig")      # -sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError as e:
        raise common.DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix in (".csv", ".tsv"):
        return read_csv(path, text, fmt)
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise common.DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows = [(i, rec if isinstance(rec, dict) else
                 RowError(None, f"expected a JSON object, got {type(rec).__name__}")) for i, rec in enumerate(items, 1)]
    else:                                                 # JSON lines (what Dataset.to_json writes)
        rows = []
        for ln, raw in enumerate(text.split("\n"), 1):    # not splitlines(): U+2028 may sit inside a string
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                rows.append((ln, rec if isinstance(rec, dict) else
                             RowError(None, f"expected a JSON object, got {type(rec).__name__}")))
            except json.JSONDecodeError as e:
                rows.append((ln, RowError(None, f"invalid JSON ({e.msg} at column {e.colno})")))
    fields = {}                                           # every key seen, in order of first appearance
    for _, rec in rows:
        if isinstance(rec, dict):
            fields.update(dict.fromkeys(rec))
    return rows, list(fields)


def read_csv(path: Path, text: str, fmt: str):
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix == ".tsv" else ",")
    records, start = [], 1
    for cells in reader:                                  # a quoted cell may span lines: keep the first
        records.append((start, cells))
        start = reader.line_num + 1
    records = [(ln, cells) for ln, cells in records if any(c.strip() for c in cells)]
    if not records:
        return [], []
    header = [h.strip() for h in records[0][1]]
    if fmt == "mmlu" and "question" not in header and len(header) >= 4 and re.fullmatch(r"[A-J]", header[-1].strip()):
        # The original MMLU release: no header; question, options..., answer letter; subject in the name.
        subject = re.sub(r"_(test|dev|val)$", "", path.stem)
        return [(ln, {"question": c[0], "choices": c[1:-1], "answer": c[-1], "subject": subject})
                for ln, c in records], ["question", "choices", "answer", "subject"]
    rows = []
    for ln, cells in records[1:]:
        if len(cells) != len(header):
            rows.append((ln, RowError(None, f"{len(cells)} cells, the header has {len(header)}")))
        else:
            rows.append((ln, dict(zip(header, cells))))
    return rows, header


# ----------------------------------------------------------------------------
# fields -> question parts (pure functions: a record in, a part out, or a RowError)


def text_of(rec, name, required=True) -> str | None:
    v = rec.get(name)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if v is None or (isinstance(v, str) and not v.strip()):
        if required:
            raise RowError(name, "missing" if v is None else "empty")
        return None
    if not isinstance(v, str):
        raise RowError(name, f"expected text, got {json.dumps(v)[:40]}")
    return v.strip()


def options_of(v, name):
    """(keys, texts) of the options: a list (keys None), a dict key -> text, or [{"key", "value"}]."""
    if v is None or v == "":
        raise RowError(name, "missing")
    if isinstance(v, str) and v.strip()[:1] in ("[", "{"):  # a list or dict written into a CSV cell
        try:
            v = json.loads(v)
        except json.JSONDecodeError:
            try:
                v = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError):
                raise RowError(name, f"not a list of options: {v[:40]!r}") from None
    keys = None
    if isinstance(v, list) and v and all(isinstance(o, dict) and {"key", "value"} <= set(o) for o in v):
        keys, v = [str(o["key"]) for o in v], [o["value"] for o in v]
    elif isinstance(v, dict):
        keys = sorted(v) if all(re.fullmatch(r"[A-Za-z]", str(k)) for k in v) else list(v)
        keys, v = [str(k) for k in keys], [v[k] for k in keys]
    if not isinstance(v, list):
        raise RowError(name, f"expected a list of options, got {json.dumps(v)[:40]}")
    texts = []
    for o in v:
        if o is None:
            o = ""
        if isinstance(o, bool) or not isinstance(o, (str, int, float)):
            raise RowError(name, f"an option is not text: {json.dumps(o)[:40]}")
        texts.append(str(o).strip())
    if not 2 <= len(texts) <= len(LETTERS):
        raise RowError(name, f"{len(texts)} options; an mcq has 2 to {len(LETTERS)}")
    return keys, texts


def fold(s: str) -> str:
    return " ".join(s.split()).casefold()


def answer_position(raw, keys, texts, name, ways) -> int:
    """Which option the answer names. ways: any of "index" (0-based), "letter" (A = the first
    option), "key" (an option's key: a dict key or column name), "text" (an option's text). Every
    way that reads the answer must agree."""
    n = len(texts)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise RowError(name, "missing" if raw is None else "empty")
    if isinstance(raw, bool) or isinstance(raw, (list, dict)):
        raise RowError(name, f"expected a letter, index or option text, got {json.dumps(raw)[:40]}")
    if isinstance(raw, (int, float)) and "index" in ways:
        if isinstance(raw, float) and not raw.is_integer() or not 0 <= raw < n:
            raise RowError(name, f"index {raw} is not one of 0..{n - 1}")
        return int(raw)
    s = str(raw).strip()
    found = {}
    m = re.fullmatch(r"\(?([A-Za-z])[).:]?", s)
    if "letter" in ways and m and LETTERS.find(m.group(1).upper()) in range(n):
        found["letter"] = LETTERS.index(m.group(1).upper())
    if "key" in ways and keys:
        hit = [i for i, k in enumerate(keys) if fold(k) == fold(m.group(1) if m else s)]
        if hit:
            found["key"] = hit[0]
    if "index" in ways and re.fullmatch(r"\d+", s) and int(s) < n:
        found["index"] = int(s)
    if "text" in ways:
        hit = [i for i, t in enumerate(texts) if t == s] or [i for i, t in enumerate(texts) if t and fold(t) == fold(s)]
        if len(hit) > 1:
            raise RowError(name, f"{s[:40]!r} is the text of options {', '.join(LETTERS[i] for i in hit)}")
        if hit:
            found["text"] = hit[0]
    if len(set(found.values())) == 1:
        return next(iter(found.values()))
    if found:
        readings = ", ".join(f"option {LETTERS[i]} by its {w}" for w, i in found.items())
        raise RowError(name, f"{s[:40]!r} is ambiguous: {readings}")
    said = {"index": f"an index 0..{n - 1}", "letter": f"a letter {LETTERS[0]}-{LETTERS[n - 1]}",
            "key": "an option key" + (f" ({', '.join(keys)})" if keys else ""), "text": "an option's text"}
    raise RowError(name, f"{s[:40]!r} is not " + " or ".join(said[w] for w in ways if w != "key" or keys))


def mcq(keys, texts, pos, name):
    """(choices, answer letter, notes): empty options dropped (the letter follows), duplicates kept
    and noted; an empty or duplicated answer option, or fewer than two options left, is an error."""
    label = keys or list(LETTERS[:len(texts)])
    if not texts[pos]:
        raise RowError(name, f"the answer, option {label[pos]}, is empty")
    notes, seen = [], {}
    empty = [label[i] for i, t in enumerate(texts) if not t]
    if empty:
        notes.append(f"field {name!r}: option {', '.join(empty)} empty, dropped")
    for i, t in enumerate(texts):
        if t:
            seen.setdefault(fold(t), []).append(i)
    for same in (v for v in seen.values() if len(v) > 1):
        both = " and ".join(label[i] for i in same)
        if pos in same:
            raise RowError(name, f"options {both} read the same ({texts[pos][:40]!r}) and one is the answer")
        notes.append(f"field {name!r}: options {both} are the same ({texts[same[0]][:40]!r}), kept")
    keep = [i for i, t in enumerate(texts) if t]
    if len(keep) < 2:
        raise RowError(name, "fewer than two non-empty options")
    if len(keep) > len(LETTERS):
        raise RowError(name, f"{len(keep)} options; at most {len(LETTERS)}")
    return [texts[i] for i in keep], LETTERS[keep.index(pos)], notes


def number_of(s: str) -> str | None:
    """The number a final answer states ("1,234", "$5", "-3.5", "3/4"), as the verifier reads it; else
    None. Commas only as thousands separators: "1, 2" is not twelve."""
    s = s.strip().rstrip(".").lstrip("$")
    if "," in s and not re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        return None
    s = s.replace(",", "")
    return s if re.fullmatch(common._NUM, s) and common._to_number(s) is not None else None


# ----------------------------------------------------------------------------
# formats: record -> {question, choices?, answer, answer_type, ...} and the fields it used


def from_mmlu(rec, ctx):
    keys, texts = options_of(rec.get("choices"), "choices")
    pos = answer_position(rec.get("answer"), None, texts, "answer", ("index", "letter"))
    choices, answer, notes = mcq(None, texts, pos, "choices")
    return dict(question=text_of(rec, "question"), choices=choices, answer=answer, answer_type="mcq"), \
        {"question", "choices", "answer"}, notes


def from_gsm8k(rec, ctx):
    solution = text_of(rec, "answer")       # a bare number is refused too: it is not GSM8K's layout
    if "####" not in solution:
        raise RowError("answer", f"no final answer '#### N' at its end ({solution[-30:]!r})")
    head, tail = solution.rsplit("####", 1)
    answer = number_of(tail)
    if answer is None:
        raise RowError("answer", f"the final answer {tail.strip()[:40]!r} is not a number")
    return dict(question=text_of(rec, "question"), answer=answer, answer_type="number",
                meta={"solution": head.strip()}), {"question", "answer"}, []


MEDMCQA_OPTIONS = ["opa", "opb", "opc", "opd", "ope"]


def as_int(v) -> int | None:
    """3, 3.0 and "3" -> 3 (a CSV cell, a float column); anything else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"-?\d+", v.strip()):
        return int(v)
    return v if isinstance(v, int) else None


def from_medqa(rec, ctx):
    if "options" in rec or "opa" not in ctx["fields"]:
        keys, texts = options_of(rec.get("options"), "options")
        used, name = {"options"}, "options"
    else:                                                 # MedMCQA
        cols = [c for c in MEDMCQA_OPTIONS if c in ctx["fields"]]
        keys, texts = cols, options_of([rec.get(c) for c in cols], "opa")[1]
        used, name = set(cols), "opa"
    ways = ("key", "index") if keys else ("letter", "index")
    if rec.get("answer_idx") is not None:
        pos = answer_position(rec["answer_idx"], keys, texts, "answer_idx", ways)
        used.add("answer_idx")
        said = rec.get("answer")
        if isinstance(said, str) and said.strip():     # MedQA gives both: they must agree
            hit = [i for i, t in enumerate(texts) if t and fold(t) == fold(said)]
            label = keys or LETTERS
            if hit and pos not in hit:
                raise RowError("answer", f"the text {said[:40]!r} is option {label[hit[0]]}, "
                                         f"answer_idx says {label[pos]}")
            used.add("answer")
    elif rec.get("cop") is not None:
        cop = as_int(rec["cop"])
        if cop == -1:
            raise RowError("cop", "-1: no answer given (MedMCQA's test split has none)")
        if cop is None:
            raise RowError("cop", f"expected an option number, got {json.dumps(rec['cop'])[:40]}")
        pos = answer_position(cop - ctx["cop_base"], None, texts, "cop", ("index",))
        used.add("cop")
    else:
        pos = answer_position(rec.get("answer"), keys, texts, "answer", ("text",) + ways[:1])
        used.add("answer")
    choices, answer, notes = mcq(keys, texts, pos, name)
    return dict(question=text_of(rec, "question"), choices=choices, answer=answer, answer_type="mcq"), \
        used | {"question"}, notes


def from_columns(rec, ctx):
    m = ctx["map"]
    q = dict(question=text_of(rec, m["question"]))
    used, notes, cols = {m["question"], m["answer"]}, [], m.get("choices", [])
    if cols:                                              # an mcq: every row needs its options
        if len(cols) == 1:
            keys, texts = options_of(rec.get(cols[0]), cols[0])
            ways = ("key", "index", "text") if keys else ("letter", "index", "text")
        else:
            keys, texts = cols, [str(rec.get(c) if rec.get(c) is not None else "").strip() for c in cols]
            ways = ("letter", "key", "index", "text")
            if not any(texts):
                raise RowError(cols[0], f"missing: no option in {', '.join(cols)}")
        pos = answer_position(rec.get(m["answer"]), keys, texts, m["answer"], ways)
        q["choices"], q["answer"], notes = mcq(keys, texts, pos, "|".join(cols))
        q["answer_type"] = "mcq"
        used |= set(cols)
    else:                                                 # no options: a number or a text answer
        a = text_of(rec, m["answer"])
        num = number_of(a)
        q["answer"], q["answer_type"] = (num, "number") if num is not None else (a, "text")
    for key in ("subtype", "lesson"):     # a lesson may be missing; a sub-type may not (a cluster mixing
        if key in m:                      # sub-types and none would break grouping by (cluster, sub-type))
            if text_of(rec, m[key], required=key == "subtype"):
                q[key] = text_of(rec, m[key])
            used.add(m[key])
    return q, used, notes


FORMATS = {"mmlu": from_mmlu, "gsm8k": from_gsm8k, "medqa": from_medqa, "columns": from_columns}


def expected_fields(fmt, fields, mapping):
    """None if the fields fit the format, else the one line saying what was expected."""
    f = set(fields)
    if fmt == "mmlu":
        ok, want = {"question", "choices", "answer"} <= f, "question, choices (a list), answer (an index), subject"
    elif fmt == "gsm8k":
        ok, want = {"question", "answer"} <= f, "question, answer ('... #### N')"
    elif fmt == "medqa":
        ok = "question" in f and ("options" in f or "opa" in f) and bool(f & {"answer_idx", "answer", "cop"})
        want = "question, options (or opa..opd), answer_idx or answer (or cop)"
    else:
        need = [mapping[k] for k in ("question", "answer", "subtype", "lesson") if k in mapping]
        need += mapping.get("choices", [])
        ok, want = all(c in f for c in need), ", ".join(need) + " (from --map)"
    return None if ok else want


# ----------------------------------------------------------------------------
# selection


def pick(questions, limit, seed):
    """At most `limit` questions at random, never a cluster of one: in a shuffled order, a cluster
    enters with its first two questions, then grows one at a time. File order is kept."""
    order = list(range(len(questions)))
    random.Random(seed).shuffle(order)
    members = {}
    for i in order:
        members.setdefault(questions[i]["cluster"], []).append(i)
    chosen, n = [], Counter()
    for i in order:
        c, room = questions[i]["cluster"], limit - len(chosen)
        if room == 0:
            break
        if n[c] >= 2:
            chosen.append(i)
            n[c] += 1
        elif len(members[c]) > 1 and i == members[c][1] and room >= 2:
            chosen += members[c][:2]
            n[c] = 2
    if len(chosen) == limit - 1:          # one place left, and the clusters in use are used up:
        grow = next((c for c in n if n[c] >= 3), None)            # give one back to bring a new pair in
        new = next((c for c in members if n[c] == 0 and len(members[c]) >= 2), None)
        if grow and new:
            chosen.remove([i for i in chosen if questions[i]["cluster"] == grow][-1])
            chosen += members[new][:2]
    return [questions[i] for i in sorted(chosen)]


def plural(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


def show(title, lines):
    if lines:
        print(title)
        for ln in lines[:SHOW]:
            print(f"  {ln}")
        if len(lines) > SHOW:
            print(f"  ... and {len(lines) - SHOW} more")


# ----------------------------------------------------------------------------
# main


def parse_map(s):
    mapping = {}
    for part in filter(None, (x.strip() for x in s.split(","))):
        key, eq, col = part.partition("=")
        key, col = key.strip(), col.strip()
        if not eq or not col:
            raise common.flag_error("map", s, f"{part!r} is not key=column")
        if key not in MAP_KEYS:
            raise common.flag_error("map", s, f"unknown key {key!r} (keys: {', '.join(MAP_KEYS)})")
        mapping[key] = [c.strip() for c in col.split("|") if c.strip()] if key == "choices" else col
    if len(mapping.get("choices", [])) > len(LETTERS):
        raise common.flag_error("map", s, f"{len(mapping['choices'])} option columns; at most {len(LETTERS)}")
    if "question" not in mapping or "answer" not in mapping:
        raise common.flag_error("map", s, "needs at least question=COLUMN and answer=COLUMN")
    return mapping


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("file", help="the benchmark file (.jsonl, .json, .csv, .tsv)")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--out", required=True, help="the question file to write (JSONL)")
    p.add_argument("--map", default=None, help="--format columns: question=Q,choices=A|B|C|D,answer=ans,cluster=topic")
    p.add_argument("--cluster-field", default=None, help="take each question's cluster from this field")
    p.add_argument("--limit", type=common.at_least(2), default=None,       # a cluster needs Q and Q'
                   help="keep at most this many questions, drawn at random")
    p.add_argument("--seed", type=common.at_least(0), default=0, help="which random questions --limit keeps")
    p.add_argument("--strict", action="store_true", help="stop at the first row that cannot be converted")
    args = p.parse_args()
    mapping = {}
    if args.format == "columns":
        if not args.map:
            raise common.UserError("--format columns needs --map question=COLUMN,answer=COLUMN"
                                   "[,choices=A|B|C|D,cluster=COLUMN]")
        mapping = parse_map(args.map)
    elif args.map:
        raise common.flag_error("map", args.map, f"only with --format columns ({args.format} knows its fields)")
    path, out = Path(args.file), Path(args.out)
    if not path.is_file():
        raise common.UserError(f"{path}: no such file")
    if path.suffix not in SUFFIXES:
        raise common.UserError(f"{path}: unknown file type {path.suffix!r} (reads {', '.join(SUFFIXES)})")
    if out.exists() and out.resolve() == path.resolve():
        raise common.flag_error("out", args.out, "is the input file")
    cluster_field = args.cluster_field or mapping.get("cluster")      # --cluster-field wins over --map's

    # ---- read, and check the layout once (one line, not a row-by-row flood)
    rows, fields = read_rows(path, args.format)
    if not rows:
        raise common.DataError(f"{path}: no rows")
    want = expected_fields(args.format, fields, mapping)
    if want:
        found = ", ".join(fields) or "no named fields"
        if args.format == "columns":
            raise common.DataError(f"{path}: expected fields {want}; found {found}")
        raise common.DataError(f"{path}: not {'an' if args.format == 'mmlu' else 'a'} {args.format} file: expected "
                               f"fields {want}; found {found}; for another layout: --format columns --map ...")
    if cluster_field and cluster_field not in fields:
        flag = "cluster-field" if args.cluster_field else "map"
        raise common.flag_error(flag, cluster_field, f"no such field in {path} (found {', '.join(fields)})")
    cluster_field = cluster_field or next((f for f in DEFAULT_CLUSTER[args.format] if f in fields), None)
    ctx = {"fields": fields, "map": mapping, "cop_base": 0}
    if args.format == "medqa" and "options" not in fields and "cop" in fields:
        cops = {c for _, r in rows if isinstance(r, dict) for c in [as_int(r.get("cop"))]}
        ctx["cop_base"] = 1 if 4 in cops and 0 not in cops else 0     # HF: 0-3; original release: 1-4
        print(f"MedMCQA layout: cop read as {ctx['cop_base']}-based "
              f"({'the original release' if ctx['cop_base'] else 'the HF dataset'})")
    name = str(path)
    print(f"read {len(rows)} rows of {name} as {args.format}; " + (
        f"clusters from field {cluster_field!r}" if cluster_field else
        f"one cluster, {path.stem!r} (the file name): no cluster field; --cluster-field F picks one"))

    # ---- convert row by row
    questions, skipped, reported = [], Counter(), []
    skip_lines = []
    for row, rec in rows:
        try:
            if isinstance(rec, RowError):
                raise rec
            q, used, notes = FORMATS[args.format](rec, ctx)
            cluster = text_of(rec, cluster_field) if cluster_field else path.stem
            used.add(cluster_field)
        except RowError as e:
            if args.strict:
                raise common.DataError(f"{name}:{row}: {e} (--strict: stopped, nothing written)") from None
            skipped[e.field] += 1
            skip_lines.append(f"{name}:{row}: {e}")
            continue
        reported += [f"{name}:{row}: {n}" for n in notes]
        meta = {**{k: v for k, v in rec.items() if k not in used and v not in (None, "")},
                **q.pop("meta", {}), "imported_from": f"{path.name}:{row}"}
        questions.append({"id": f"{path.stem}-{row:05d}", "cluster": cluster, **q, "meta": meta})

    # ---- every cluster needs a Q'
    size = Counter(q["cluster"] for q in questions)
    alone = sorted(c for c, n in size.items() if n == 1)
    questions = [q for q in questions if size[q["cluster"]] > 1]
    if args.limit:
        before = len(questions)
        questions = pick(questions, args.limit, args.seed)
        print(f"--limit {args.limit} --seed {args.seed}: kept {len(questions)} of {before} questions")

    # ---- summary
    why = ", ".join(f"{k}: {n}" for k, n in skipped.most_common())
    show(f"skipped {plural(sum(skipped.values()), 'row')} ({why}):", skip_lines)
    show(f"reported {plural(len(reported), 'problem')} with options (the rows are kept):", reported)
    if alone:
        names = ", ".join(repr(c) for c in alone[:10]) + (" ..." if len(alone) > 10 else "")
        print(f"dropped {plural(len(alone), 'question')}: {plural(len(alone), 'cluster')} with a single question "
              f"(every cluster needs a second one, Q'): {names}")
    if not questions:
        raise common.DataError(f"{path}: no question left to write (see above)")
    subtypes = Counter((q["cluster"], q.get("subtype")) for q in questions if q.get("subtype"))
    if any(n == 1 for n in subtypes.values()):
        print(f"note: {plural(sum(n == 1 for n in subtypes.values()), 'sub-type')} with a single question "
              f"(no Q' for them under --transfer-by subtype)")

    # ---- write, and prove the file loads before it replaces --out
    tmp = out.with_name(f".{out.name}.import.tmp")
    common.atomic_write_text(tmp, "".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions))
    try:
        common.load_questions(tmp)
    except common.DataError:
        tmp.unlink()
        raise
    os.replace(tmp, out)
    types = Counter(q["answer_type"] for q in questions)
    lessons = sum(1 for q in questions if q.get("lesson"))
    print(f"wrote {plural(len(questions), 'question')} in {plural(len({q['cluster'] for q in questions}), 'cluster')} ("
          + ", ".join(f"{t} {n}" for t, n in types.most_common()) + f") to {out}; "
          + (f"{lessons} with a lesson" if lessons else
             "no lessons: stages skip the oracle and calibration's lesson arms"))


if __name__ == "__main__":
    common.run_main(main)

"""Procedural question families with hidden conventions, deterministic from a seed.

Each family (cluster) has sub-types, each with its own hidden convention that a short lesson
states and that a model cannot know without it: a counter-intuitive road code, an invented
dialect, an invented calendar, a two-threshold triage rule, an unusual unit. Any number of fresh
instances can be drawn per sub-type (the options are reshuffled each time). `composed` questions
need two sub-types' lessons at once (the paper's compositionality property: r_K + r_F on x_D);
their `meta.components` names the two.

Every question carries a `cue`, the words its answer starts with ("In Brill, tesk means"), written
after "Answer:". Calibration on the embedded 270M base model (data/README.md) showed why: given a
lesson, it can copy the right word after a cue like that, but it cannot go from a lesson through
an option letter (lesson fact -> option text -> letter). The options are still listed, and the
verifier maps an answer that starts with an option's text to that option.

norvale-triage (needs comparing a number with two thresholds, like the paper's pre-eclampsia
type A) and zog-units (needs a multiplication) are negative controls: a 270M model is not
expected to apply those lessons.

    python data/make_procedural.py                          # writes data/procedural.jsonl
    python data/make_procedural.py --per-subtype 100 --seed 1 --out /tmp/more.jsonl
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

# (cluster, sub-type) -> (lesson, table key -> answer, question template, cue template)
LOOKUPS = {
    ("velt-code", "lights"): (
        "Velt road code: red means go, green means stop, blue means turn left and yellow means turn right.",
        {"red": "go", "green": "stop", "blue": "turn left", "yellow": "turn right"},
        ["Under the Velt road code, what must a driver do at a {k} light?",
         "A Velt road sign shows a {k} light. Under the Velt road code, what should a driver do?"],
        "At a Velt {k} light, {k} means"),
    ("velt-code", "hands"): (
        "Velt hand signals: palm means turn right, fist means turn left, wave means stop and point means go.",
        {"palm": "turn right", "fist": "turn left", "wave": "stop", "point": "go"},
        ["Under the Velt road code, what must a driver do when an officer shows a {k}?",
         "A Velt traffic officer signals with a {k}. What should a driver do?"],
        "For a Velt officer, {k} means"),
    ("brill-dialect", "nouns"): (
        "In the Brill dialect mova means water, tesk means fire, lun means tree and dar means stone.",
        {"mova": "water", "tesk": "fire", "lun": "tree", "dar": "stone"},
        ["In the Brill dialect, what does the word {k} mean?",
         "A Brill speaker points and says {k}. In the Brill dialect, what is it?"],
        "In Brill, {k} means"),
    ("brill-dialect", "verbs"): (
        "In the Brill dialect kiro means run, bal means sleep, fen means eat and wuz means sing.",
        {"kiro": "run", "bal": "sleep", "fen": "eat", "wuz": "sing"},
        ["In the Brill dialect, what does the verb {k} mean?",
         "A Brill child is told to {k}. In the Brill dialect, what should the child do?"],
        "In Brill, {k} means"),
    ("zog-calendar", "week"): (
        "The Zog week runs Ado, then Bel, then Cor, then Dun, then Eth, and after Eth comes Ado again.",
        {"Ado": "Bel", "Bel": "Cor", "Cor": "Dun", "Dun": "Eth", "Eth": "Ado"},
        ["On Zog, which day comes right after {k}?", "Today is {k} on Zog. What day is tomorrow?"],
        "On Zog, after {k} comes"),
    ("zog-calendar", "seasons"): (
        "The Zog year runs Frost, then Bloom, then Blaze, then Fall, and after Fall comes Frost again.",
        {"Frost": "Bloom", "Bloom": "Blaze", "Blaze": "Fall", "Fall": "Frost"},
        ["Which Zog season comes right after {k}?", "It is the season of {k} on Zog. Which season is next?"],
        "On Zog, after {k} comes"),
}
TRIAGE = {  # sub-type -> (measure, low threshold, high threshold, top of scale)
    "fever": ("fever score", 40, 70, 100),
    "pain": ("pain level", 3, 7, 10),
}
TRIAGE_ACTIONS = ["send home", "see the same day", "admit at once"]
UNITS = {  # sub-type -> (unit, factor, target unit, question stem)
    "length": ("blips", 4, "metres", "A Zog road is {k} blips long."),
    "time": ("krats", 3, "hours", "A Zog journey takes {k} krats."),
}


def triage_lesson(sub):
    name, lo, hi, _ = TRIAGE[sub]
    return (f"At Norvale clinic a {name} below {lo} means send home, {lo} to {hi - 1} means see the "
            f"same day, and {hi} or more means admit at once.")


def units_lesson(sub):
    unit, factor, target, _ = UNITS[sub]
    return f"On Zog one {unit[:-1]} is exactly {factor} {target}: to turn {unit} into {target}, multiply by {factor}."


def shuffled(rng, pool):
    pool = list(dict.fromkeys(pool))
    rng.shuffle(pool)
    return pool


def lookup(key):
    lesson, table, templates, cue = LOOKUPS[key]

    def make(rng, i):
        k = list(table)[i % len(table)]
        choices = shuffled(rng, table.values())
        return dict(question=rng.choice(templates).format(k=k), choices=choices,
                    answer="ABCDE"[choices.index(table[k])], answer_type="mcq", cue=cue.format(k=k))
    return lesson, make


def triage(sub):
    name, lo, hi, top = TRIAGE[sub]

    def make(rng, i):
        band = i % 3            # balanced across the three actions, values near both thresholds
        value = [rng.randint(max(0, lo - 15), lo - 1), rng.randint(lo, hi - 1), rng.randint(hi, min(top, hi + 20))][band]
        choices = shuffled(rng, TRIAGE_ACTIONS)
        return dict(question=f"At Norvale clinic, a patient has a {name} of {value}. What should the clinic do?",
                    choices=choices, answer="ABC"[choices.index(TRIAGE_ACTIONS[band])], answer_type="mcq",
                    cue=f"At Norvale, a {name} of {value} means")
    return triage_lesson(sub), make


def units(sub):
    unit, factor, target, stem = UNITS[sub]

    def make(rng, i):
        k = 2 + i % 7
        return dict(question=stem.format(k=k) + f" How many {target} is that? Answer with a number.",
                    answer=str(k * factor), answer_type="number", cue=f"{k} {unit} are")
    return units_lesson(sub), make


def composed_lights_week():
    """Needs the Velt lights lesson and the Zog week lesson: options are (action, day) pairs."""
    (_, lights, _, _), (_, week, _, _) = LOOKUPS[("velt-code", "lights")], LOOKUPS[("zog-calendar", "week")]

    def make(rng, i):
        colour, day = list(lights)[i % 4], list(week)[(i * 3) % 5]
        act, nxt = lights[colour], week[day]
        wrong_act = rng.choice([a for a in lights.values() if a != act])
        wrong_day = rng.choice([d for d in week.values() if d != nxt])
        good = f"{act} on {nxt}"
        choices = shuffled(rng, [good, f"{wrong_act} on {nxt}", f"{act} on {wrong_day}", f"{wrong_act} on {wrong_day}"])
        return dict(question=(f"Under the Velt road code, a driver reaches a {colour} light on the Zog day right "
                              f"after {day}. What must the driver do, and on which day?"),
                    choices=choices, answer="ABCD"[choices.index(good)], answer_type="mcq",
                    cue=f"At a Velt {colour} light, {colour} means")
    lesson = LOOKUPS[("velt-code", "lights")][0] + " " + LOOKUPS[("zog-calendar", "week")][0]
    return lesson, make


FAMILIES = [(c, s, lookup((c, s))) for c, s in LOOKUPS] + [
    ("norvale-triage", "fever", triage("fever")),
    ("norvale-triage", "pain", triage("pain")),
    ("zog-units", "length", units("length")),
    ("zog-units", "time", units("time")),
    ("composed", "lights+week", composed_lights_week()),
]
COMPONENTS = {"composed": ["velt-code/lights", "zog-calendar/week"]}
NEGATIVE_CONTROLS = {"norvale-triage", "zog-units"}


def generate(per_subtype: int, seed: int) -> list[dict]:
    rows = []
    for cluster, sub, (lesson, make) in FAMILIES:
        rng = random.Random(f"{seed}/{cluster}/{sub}")     # each sub-type its own stream
        for i in range(per_subtype):
            row = {"id": f"{cluster}-{sub}-{i:03d}", "cluster": cluster, "subtype": sub, **make(rng, i),
                   "lesson": lesson}
            meta = {}
            if cluster in COMPONENTS:
                meta["components"] = COMPONENTS[cluster]
            if cluster in NEGATIVE_CONTROLS:
                meta["negative_control"] = True
            if meta:
                row["meta"] = meta
            rows.append(row)
    return rows


def main():
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-subtype", type=common.at_least(2), default=16)      # every sub-type needs a Q' != Q
    p.add_argument("--seed", type=common.at_least(0), default=0)
    p.add_argument("--out", default=str(Path(__file__).with_name("procedural.jsonl")))
    args = p.parse_args()
    rows = generate(args.per_subtype, args.seed)
    common.atomic_write_text(args.out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} questions to {args.out}")


if __name__ == "__main__":
    common.run_main(main)

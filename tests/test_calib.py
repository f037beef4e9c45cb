import json

from edgepeft.calib import phone_commands as pc
from edgepeft.calib import text


def test_generation_is_deterministic_and_seeded():
    a, b = pc.generate(), pc.generate()
    assert [e.request for e in a["train"]] == [e.request for e in b["train"]]
    c = pc.generate(seed=1)
    assert [e.request for e in a["train"][:50]] != [e.request for e in c["train"][:50]]


def test_splits_are_disjoint_and_sized():
    s = pc.generate()
    assert {k: len(v) for k, v in s.items()} == pc.DEFAULT_SIZES
    sets = {k: {e.request for e in v} for k, v in s.items()}
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    # the split is a function of the text alone: a request can never move between splits
    for k, v in s.items():
        assert all(pc._split_of(e.request) == k for e in v)


def test_targets_are_json_and_cover_every_intent():
    s = pc.generate()
    actions = set()
    for e in s["train"]:
        obj = json.loads(e.target)
        actions.add(obj["action"])
        assert pc.exact_match(e.target, e.target)
    assert len(actions) == len(pc.INTENTS)


def test_exact_match_metric():
    ref = '{"action": "call", "contact": "Mom"}'
    assert pc.exact_match('{"contact":"Mom","action":"call"}', ref)
    assert pc.exact_match('sure: {"action": "call", "contact": "Mom"} done', ref)
    assert not pc.exact_match('{"action": "call", "contact": "Dad"}', ref)
    assert not pc.exact_match('{"action": "call", "contact": "Mom"', ref)
    assert not pc.exact_match("", ref)


def test_number_words():
    assert [pc.number_words(n) for n in (0, 7, 13, 20, 45, 99)] == [
        "zero", "seven", "thirteen", "twenty", "forty five", "ninety nine"]


def test_time_phrases_say_the_target_time():
    import random

    rng = random.Random(3)
    for _ in range(200):
        said, cmd = pc._alarm(rng)
        hh, mm = map(int, cmd["time"].split(":"))
        if ":" in said:
            h12, rest = said.split()[-2].split(":")
            assert int(rest) == mm and int(h12) % 12 == hh % 12


def test_held_out_text_parts_do_not_overlap():
    cal, ev = text.python_docs("calibration"), text.python_docs("evaluation")
    assert len(cal) > 100_000 and len(ev) > 20_000
    assert ev[:2000] not in cal and cal[-2000:] not in ev

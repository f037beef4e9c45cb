import json

import pytest
from edgepeft.calib import calendar_events as ce
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


# builtin:calendar-events, the second built-in task

def test_calendar_generation_is_deterministic_and_seeded():
    a, b = ce.generate(), ce.generate()
    assert [(e.request, e.target) for v in a.values() for e in v] == \
        [(e.request, e.target) for v in b.values() for e in v]
    c = ce.generate(seed=1)
    assert [e.request for e in a["train"][:50]] != [e.request for e in c["train"][:50]]


def test_calendar_splits_are_disjoint_and_sized():
    s = ce.generate()
    assert ce.DEFAULT_SIZES == pc.DEFAULT_SIZES
    assert {k: len(v) for k, v in s.items()} == ce.DEFAULT_SIZES
    sets = {k: {e.request for e in v} for k, v in s.items()}
    assert all(len(sets[k]) == len(s[k]) for k in s)
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    for k, v in s.items():
        assert all(ce._split_of(e.request) == k for e in v)
    assert ce.generate({"train": 5, "validation": 0, "test": 0}) == {"train": s["train"][:5], "validation": [],
                                                                     "test": []}


def test_calendar_targets_parse_round_trip_and_follow_the_schema():
    for v in ce.generate().values():
        for e in v:
            obj = ce.parse_event(e.target)
            assert obj == e.event and ce.exact_match(e.target, e.target)
            assert json.loads(json.dumps(obj)) == obj and ce.Example(e.request, obj).target == e.target
            assert list(obj) == ["title", "day", "start", "minutes"]
            assert isinstance(obj["minutes"], int) and obj["minutes"] > 0
            hh, mm = obj["start"].split(":")
            assert len(hh) == len(mm) == 2 and 0 <= int(hh) < 24 and int(mm) in (0, 15, 30, 45)
            assert int(hh) * 60 + int(mm) + obj["minutes"] < 24 * 60
            day = obj["day"].removeprefix("next ")
            assert day in ("today", "tomorrow") + tuple(ce.WEEKDAYS)
            assert obj["title"][0].isupper()
            assert e.messages()[0]["content"] == ce.SYSTEM_PROMPT and e.messages()[-1]["content"] == e.target


def test_calendar_answer_is_derivable_from_the_request():
    """Everything in the event is in the request: the title as said (first letter capitalised), the day and
    "next" exactly when the request says next, and the half of the day of a spoken time."""
    for v in ce.generate().values():
        for e in v:
            r, obj = " " + e.request, e.event
            assert ce.title_of(obj["title"][0].lower() + obj["title"][1:]) == obj["title"]
            assert obj["title"][0].lower() + obj["title"][1:] in r
            day = obj["day"].removeprefix("next ")
            assert day in r
            assert obj["day"].startswith("next ") == (f"next {day}" in r or f"{day} next week" in r)
            assert sum(w in r.split() for w in ("today", "tomorrow", *ce.WEEKDAYS)) == 1
            hour = int(obj["start"][:2])
            if hour < 12:
                assert " am" in r or "in the morning" in r
            elif hour >= 12:
                assert any(w in r for w in (" pm", "in the afternoon", "in the evening", "noon", "midday",
                                            f"{hour}:"))


def test_calendar_requests_map_to_one_event():
    """No request text is said for two different events, so the expected answer is a function of the text."""
    import random

    rng, seen = random.Random(7), {}
    for _ in range(30_000):
        request, event = ce._request(rng)
        assert seen.setdefault(request, event) == event, request


def test_calendar_spoken_times_say_the_start():
    import random

    rng = random.Random(3)
    for _ in range(500):
        h, m = rng.randrange(7, 24), rng.choice(range(0, 60, 5))
        said = ce.say_clock(rng, h, m)
        if ":" in said:
            hh, mm = said.split()[0].split(":")
            assert int(mm) == m and (int(hh) == h if said.count(" ") == 0 else int(hh) % 12 == h % 12)
        elif said in ("noon", "midday", "twelve noon"):
            assert (h, m) == (12, 0)
        else:
            assert pc.number_words(h % 12 or 12) in said or pc.number_words(h % 12 + 1) in said


def test_calendar_pool_is_large_and_diverse():
    s = ce.generate({"train": 4000, "validation": 400, "test": 400})
    train = s["train"]
    assert len({e.request for e in train}) >= 2000
    assert len({e.event["day"] for e in train}) >= 12
    assert len({e.event["day"].removeprefix("next ") for e in train} & set(ce.WEEKDAYS)) == 7
    assert len({e.event["minutes"] for e in train}) >= 6
    assert len({e.event["title"] for e in train}) >= 100
    assert len({e.event["start"] for e in train}) >= 40
    assert any(" from " in e.request for e in train) and any(" for " in e.request for e in train)
    assert len({e.target for e in train}) > 0.9 * len(train)


def test_calendar_exact_match_metric():
    ref = '{"title": "Lunch with Priya", "day": "next friday", "start": "12:30", "minutes": 60}'
    assert ce.exact_match('{"minutes":60,"start":"12:30","day":"next friday","title":"Lunch with Priya"}', ref)
    assert ce.exact_match('\n  {"title": "Lunch with Priya",  "day": "next friday", "start": "12:30",\n'
                          '"minutes": 60}  \n', ref)
    assert not ce.exact_match('{"title": "lunch with Priya", "day": "next friday", "start": "12:30", '
                              '"minutes": 60}', ref)  # the title's capitals count
    assert not ce.exact_match('{"title": "Lunch with Priya", "day": "friday", "start": "12:30", "minutes": 60}', ref)
    assert not ce.exact_match('{"title": "Lunch with Priya", "day": "next friday", "start": "12:30", '
                              '"minutes": "60"}', ref)
    assert not ce.exact_match('{"title": "Lunch with Priya", "day": "next friday", "start": "12:30", '
                              '"minutes": 60.0}', ref)
    assert not ce.exact_match('{"title": "Lunch with Priya", "day": "next friday", "start": "12:30", '
                              '"minutes": 60, "place": "the cafe"}', ref)  # an extra key
    assert not ce.exact_match('{"title": "Lunch with Priya", "day": "next friday", "start": "12:30"}', ref)
    assert not ce.exact_match("sure: " + ref, ref)  # extra text, before or after
    assert not ce.exact_match(ref + " done", ref)
    assert not ce.exact_match(ref + ref, ref)
    assert not ce.exact_match(ref[:-1], ref)  # malformed
    assert not ce.exact_match("[" + ref + "]", ref)
    assert not ce.exact_match("", ref) and not ce.exact_match("null", ref)
    assert not ce.exact_match("{}", "not json") and ce.parse_event("{}") == {}


def test_the_two_builtin_tasks_differ():
    assert ce.SYSTEM_PROMPT != pc.SYSTEM_PROMPT
    a, b = ce.generate(), pc.generate()
    assert not {e.request for v in a.values() for e in v} & {e.request for v in b.values() for e in v}


def test_calendar_events_load_through_the_pipeline_data_functions():
    from edgepeft.calib.data import BUILTIN_TASKS, builtin_splits, load_splits, recipe_splits
    from edgepeft.calib.sets import disjoint_samples

    from edgepeft.core.errors import EdgepeftError
    from edgepeft.pipeline import recipe
    from edgepeft.quality.answers import matcher

    assert set(BUILTIN_TASKS) == {"phone-commands", "calendar-events"}
    r = recipe.parse({"train": {"data": "builtin:calendar-events"}}, "r.toml")
    s = recipe_splits(r)
    assert s == load_splits("builtin:calendar-events", None, None) == builtin_splits("calendar-events")
    assert {k: len(v) for k, v in s.items()} == ce.DEFAULT_SIZES
    ex = ce.generate()["test"][0]
    assert s["test"][0].messages == tuple((m["role"], m["content"]) for m in ex.messages())
    assert s["test"][0].reference == ex.target
    assert disjoint_samples(s["test"], s["train"])[1] == 0
    assert matcher("builtin:calendar-events") is ce.exact_match
    assert matcher("builtin:phone-commands") is pc.exact_match
    phone = builtin_splits("phone-commands")
    assert phone["train"][0].messages[0] == ("system", pc.SYSTEM_PROMPT)
    with pytest.raises(EdgepeftError) as e:
        builtin_splits("calendar")
    assert "builtin:phone-commands" in str(e.value) and "builtin:calendar-events" in str(e.value)


def test_calendar_spoken_durations_say_the_minutes():
    import random

    rng = random.Random(5)
    for minutes in ce._DURATION_WEIGHTS:
        for _ in range(50):
            said = ce.say_duration(rng, minutes)
            if said in ce._DURATION_IDIOMS.get(minutes, []) or (minutes, said) == (60, "one hour"):
                continue
            if said.endswith(" minutes"):
                n = said.removesuffix(" minutes")
                assert n in (str(minutes), pc.number_words(minutes))
            else:
                n, unit = said.split()
                assert minutes % 60 == 0 and unit == ("hour" if minutes == 60 else "hours")
                assert n in (str(minutes // 60), pc.number_words(minutes // 60))

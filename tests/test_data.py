import json

import pytest
from edgepeft.calib.data import IGNORE, Sample, collate, encode, load_splits, prompt_ids, read_jsonl

from edgepeft.core.errors import EdgepeftError


def _write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_reads_the_three_shapes(tmp_path):
    p = _write(tmp_path, [{"text": "hello"}, "", {"prompt": "2+2=", "completion": "4"},
                          {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    s = read_jsonl(p)
    assert [x.text for x in s] == ["hello", None, None]
    assert s[1].reference == "4" and s[2].reference == "yo" and s[0].reference is None


@pytest.mark.parametrize("lines, words", [
    ([], "no examples"),
    (["{not json"], r"d.jsonl:1: malformed JSON"),
    ([{"text": "ok"}, {"question": "x"}], r"d.jsonl:2: unknown example shape \(keys: question\)"),
    ([{"prompt": "x"}], "'prompt' and 'completion' must both be strings"),
    ([{"messages": [{"role": "user", "content": "x"}]}], "no assistant message"),
    ([[1, 2]], "expected a JSON object"),
])
def test_bad_jsonl_is_one_clear_error(tmp_path, lines, words):
    with pytest.raises(EdgepeftError, match=words):
        read_jsonl(_write(tmp_path, lines))


def test_missing_file(tmp_path):
    with pytest.raises(EdgepeftError, match="data file not found"):
        load_splits(str(tmp_path / "nope.jsonl"), None, None)


def test_file_split_holds_out_validation(tmp_path):
    p = _write(tmp_path, [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(30)])
    s = load_splits(str(p), None, None)
    assert len(s["validation"]) == 3 and len(s["train"]) == 27
    assert not {x.prompt for x in s["train"]} & {x.prompt for x in s["validation"]}


def test_chat_labels_cover_only_the_assistant_turn(smollm_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    s = Sample(messages=(("system", "Be brief."), ("user", "capital of France?"), ("assistant", "Paris.")))
    ids, labels = encode(tok, s, 256)
    learned = tok.decode([t for t in labels if t != IGNORE])
    assert learned.startswith("Paris.") and "<|im_end|>" in learned
    assert "capital" not in learned and "Be brief" not in learned
    # the generation prompt is exactly the unlabelled prefix
    p = prompt_ids(tok, s)
    assert ids[:len(p)] == p and all(t == IGNORE for t in labels[:len(p)])


def test_prompt_completion_labels_and_eos(smollm_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_tokenizer_dir)
    ids, labels = encode(tok, Sample(prompt="Q: two plus two\nA:", completion=" four"), 64)
    learned = [t for t in labels if t != IGNORE]
    assert tok.decode(learned[:-1]) == " four" and learned[-1] == tok.eos_token_id
    assert len(ids) == len(labels)


def test_collate_left_pads():
    b = collate([([5, 6, 7], [IGNORE, 6, 7]), ([8], [8])], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [IGNORE, IGNORE, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]


def test_pack_computes_the_shared_prefix_once_and_keeps_examples_apart():
    from edgepeft.calib.data import pack

    a = ([1, 2, 3, 10, 11], [IGNORE, IGNORE, IGNORE, IGNORE, 11])
    b = ([1, 2, 3, 20, 21, 22], [IGNORE, IGNORE, IGNORE, IGNORE, 21, 22])
    p = pack([a, b])
    # the prefix [1, 2, 3] stops before the position that predicts the first labelled token (index 3 -> 4)
    assert p["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20, 21, 22]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5]]
    # position t predicts the next token of its own example; an example's last token predicts nothing
    assert p["targets"].tolist() == [[IGNORE, IGNORE, IGNORE, 11, IGNORE, 21, 22, IGNORE]]
    assert p["keep"].tolist() == [3, 5, 6]
    seen = (p["attention_mask"][0, 0] == 0).int()
    assert seen[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0]  # b's first own token: the prefix and itself, not a
    assert seen[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert seen[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # causal within the prefix
    # a labelled token inside the common prefix is learned per example, so it is not shared
    c = ([1, 2, 3], [IGNORE, 2, 3])
    assert pack([c, c])["input_ids"].tolist() == [[1, 2, 3, 1, 2, 3]]
    assert p["segments"] == (3, [(3, 5), (5, 8)]) and p["tokens"] == 8


def test_a_rounded_pack_pads_with_a_segment_that_predicts_nothing():
    from edgepeft.calib.data import pack

    a = ([1, 2, 3, 10, 11], [IGNORE, IGNORE, IGNORE, IGNORE, 11])
    b = ([1, 2, 3, 20, 21, 22], [IGNORE, IGNORE, IGNORE, IGNORE, 21, 22])
    plain, p = pack([a, b]), pack([a, b], multiple=6, pad_id=0)
    assert p["input_ids"].tolist() == [[1, 2, 3, 10, 11, 20, 21, 22, 0, 0, 0, 0]]  # 8 tokens -> 12
    assert p["tokens"] == 8 and p["segments"] == (3, [(3, 5), (5, 8), (8, 12)])
    assert p["targets"][0, 8:].tolist() == [IGNORE] * 4 and p["keep"].tolist() == plain["keep"].tolist()
    seen = (p["attention_mask"][0, 0] == 0).int()
    assert seen[:8, :8].tolist() == (plain["attention_mask"][0, 0] == 0).int().tolist()
    assert seen[:8, 8:].sum() == 0  # no real token sees the padding
    assert seen[9].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0]

"""Export, requantize and bundle on the tiny model: the fast end-to-end run CI makes, then the bundle's
integrity checks (verify, tampering, paths), and the ONNX graph work checked against references."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from edgepeft.bundle.manifest import MANIFEST, check_files, read_manifest
from edgepeft.bundle.runner import Runner, verify
from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import sha256_files
from edgepeft.models.sources import resolve
from edgepeft.onnx.decoder import Decoder
from edgepeft.pipeline import recipe as recipe_mod
from edgepeft.pipeline.runner import run_stages
from edgepeft.stages.registry import STAGES
from tests.conftest import greedy_decode, write_recipe


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run


def test_end_to_end_bundle_contents(run, tiny_model_dir):
    b = run["bundle"]
    names = {p.name for p in b.iterdir()}
    assert {"model.ort", "model.required_operators.config", "genai_config.json", "tokenizer.json",
            "chat_template.jinja", MANIFEST} <= names
    assert "model.onnx" not in names  # the Android target ships the ORT format only
    genai = json.loads((b / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.ort"
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    ops = (b / "model.required_operators.config").read_text()
    assert "MatMulNBits" in ops and "GatherBlockQuantized" in ops and "GroupQueryAttention" in ops

    m = read_manifest(b)
    assert {f.split("/")[0] for f in m["files"]} == names - {MANIFEST}
    assert m["target"]["name"] == "android-arm64" and m["recipe"]["name"] == "tiny"
    assert m["base_model_sha256"] == run["records"]["load"]["outside"]["model.source"] == sha256_files(
        resolve(str(tiny_model_dir)).files())
    assert len(m["adapter_sha256"]) == 64
    assert m["prompt"]["system"].startswith("Turn the phone request")
    figures = m["figures"]
    assert figures["export"]["max_logit_diff"] <= 1e-3 and figures["export"]["decode"]["tokens"] == 8
    assert figures["requantize"]["embedding"] == "shared with the head, int4"
    assert figures["requantize"]["quantized_bytes"] < figures["requantize"]["fp32_bytes"] / 4
    assert figures["requantize"]["method"] == "gptq" and figures["requantize"]["int8_matmuls"] == 0
    assert figures["bundle"]["decode_ms_per_token"] > 0
    quality = m["quality"]  # written by the evaluate stage, which re-sealed the manifest
    assert quality["passed"] and quality["report"] == "quality/report.md"
    assert 0 <= quality["exact_match_bundle"] <= 1 and 0 <= quality["exact_match_reference"] <= 1
    assert {r["budget"] for r in quality["rows"]} >= {"max_perplexity_increase", "max_kl", "max_accuracy_drop"}
    assert (b / "quality" / "report.md").read_text().startswith("# Quality gate: tiny")


def test_verify_passes_then_fails_on_any_changed_byte(run, tmp_path):
    problems, sample = verify(run["bundle"])
    assert problems == [] and sample is not None
    for f in sorted(p.relative_to(run["bundle"]).as_posix() for p in run["bundle"].rglob("*") if p.is_file()):
        copy = tmp_path / f"copy-{f.replace('/', '-')}"
        shutil.copytree(run["bundle"], copy)
        data = bytearray((copy / f).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / f).write_bytes(bytes(data))
        try:
            problems, _ = verify(copy)
        except EdgepeftError:  # a manifest that no longer parses
            problems = ["unreadable manifest"]
        assert problems, f"a changed byte in {f} went unnoticed"
        shutil.rmtree(copy)


def test_verify_cli_exit_codes(run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "edgepeft.cli", "verify", str(run["bundle"])],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    copy = tmp_path / "b"
    shutil.copytree(run["bundle"], copy)
    (copy / "extra.bin").write_bytes(b"not in the manifest")
    bad = subprocess.run([sys.executable, "-m", "edgepeft.cli", "verify", str(copy)], capture_output=True, text=True)
    assert bad.returncode == 1 and "extra.bin: not listed" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "edgepeft.cli", "verify", str(tmp_path / "nope")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_manifest_paths_cannot_leave_the_bundle(run, tmp_path):
    from edgepeft.bundle.manifest import seal

    copy = tmp_path / "b"
    shutil.copytree(run["bundle"], copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["files"]["../outside.txt"] = {"bytes": 1, "sha256": "0" * 64}
    (copy / MANIFEST).write_bytes(seal(m))
    with pytest.raises(EdgepeftError, match="outside the bundle"):
        read_manifest(copy)
    m["files"].pop("../outside.txt")
    (copy / MANIFEST).write_bytes(seal(m))
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(run["bundle"] / "tokenizer.json")
    assert any("symbolic link" in p for p in check_files(copy, read_manifest(copy)))


def test_generate_cli_matches_greedy_decoding_with_onnxruntime(run):
    """The bundle's onnxruntime-genai answer is the greedy continuation the raw ORT graph computes."""
    b = run["bundle"]
    runner = Runner(b)
    ids = runner.prompt_ids([("system", read_manifest(b)["prompt"]["system"]), ("user", "call mom")])
    answer = runner.generate(ids, max_new_tokens=6)
    dec = Decoder(b / "model.ort")
    tokens, _, _ = greedy_decode(dec, ids, 6)
    assert answer.text == runner.tokenizer.decode(tokens)
    cli = subprocess.run([sys.executable, "-m", "edgepeft.cli", "generate", str(b), "call mom",
                          "--max-new-tokens", "6"], capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip() == answer.text.strip()


def test_the_shipped_graph_does_less_for_the_same_logits(run):
    """[bundle] prune_lm_head: a generator's prefill gets the last row only; fed every position (as the quality gate
    feeds them), the same graph returns the rows of the graph before the rewrite."""
    import numpy as np

    from edgepeft.onnx.rewrite import LOGITS_POSITIONS

    b = run["bundle"]
    manifest = read_manifest(b)
    assert manifest["recipe"]["bundle"]["prune_lm_head"] is True
    assert manifest["figures"]["bundle"]["lm_head_pruned"] is True
    dec = Decoder(b / "model.ort")
    assert dec.pruned and LOGITS_POSITIONS in {i.name for i in dec.session.get_overridable_initializers()}
    ids = list(range(300, 340))
    every, _ = dec.prefill(ids)
    last, _ = dec.prefill(ids, last=True)
    assert every.shape == (len(ids), dec.vocab_size) and last.shape == (1, dec.vocab_size)
    np.testing.assert_allclose(last[0], every[-1], atol=1e-4)
    healed = Decoder(run["out"] / "heal" / "model" / "model.onnx")  # the graph before pruning
    assert not healed.pruned
    np.testing.assert_allclose(every, healed.prefill(ids)[0], atol=1e-3)


def test_shared_embedding_reads_the_heads_int4_weights(run):
    """GatherBlockQuantized over the head's packed weight returns exactly the dequantized head rows."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(run["out"] / "requantize" / "model" / "model.onnx"))
    g = model.graph
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head"))
    lookup = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    packed, scales = inits[head.input[1]], inits[head.input[2]]  # [N, blocks, 16] uint8, [N, blocks]
    low, high = (packed & 0x0F).astype(np.int32), (packed >> 4).astype(np.int32)
    q = np.stack([low, high], axis=-1).reshape(packed.shape[0], packed.shape[1], -1) - 8  # symmetric int4
    table = (q * scales[..., None]).reshape(packed.shape[0], -1)
    g.output.append(onnx.helper.make_tensor_value_info(lookup.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 777, 49151]], np.int64)
    dec = Decoder(run["out"] / "requantize" / "model" / "model.onnx")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds.update({n: np.zeros((1, dec.kv_heads, 0, dec.head_size), np.float32) for n in dec.past})
    rows = sess.run([lookup.output[0]], feeds)[0][0]
    np.testing.assert_allclose(rows, table[ids[0]], rtol=0, atol=1e-6)
    assert not any(i.name == "lm_head.MatMul.weight" for i in g.initializer)  # the fp32 table is gone


def test_shared_embedding_keeps_the_heads_zero_points_when_asymmetric(run, tmp_path):
    """An asymmetric head stores zero points; the shared lookup must use them too (it once dropped them, and
    every embedding row came out shifted)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edgepeft.onnx.mixed import quantize
    from edgepeft.pipeline.target import Target

    out = tmp_path / "asym.onnx"
    quantize(run["out"] / "export" / "model" / "model.onnx", out, Target("t", symmetric=False))
    model = onnx.load(str(out))
    g = model.graph
    head = next(n for n in g.node if n.op_type == "MatMulNBits" and n.name.startswith("/lm_head"))
    lookup = next(n for n in g.node if n.op_type == "GatherBlockQuantized")
    assert len(head.input) == 4 and len(lookup.input) == 4
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    packed, scales, zp = inits[head.input[1]], inits[head.input[2]], inits[head.input[3]]
    n, blocks = packed.shape[:2]
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1).astype(np.int32)
    zero = np.stack([zp & 0x0F, zp >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.int32)
    table = ((q - zero[..., None]) * scales.reshape(n, blocks)[..., None]).reshape(n, -1)
    g.output.append(onnx.helper.make_tensor_value_info(lookup.output[0], onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, 777, 49151]], np.int64)
    dec = Decoder(out, genai_config=run["out"] / "requantize" / "model" / "genai_config.json")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    feeds.update({name: np.zeros((1, dec.kv_heads, 0, dec.head_size), np.float32) for name in dec.past})
    rows = sess.run([lookup.output[0]], feeds)[0][0]
    np.testing.assert_allclose(rows, table[ids[0]], rtol=0, atol=1e-6)


def test_export_gate_fails_and_leaves_nothing(run, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    path = write_recipe(tmp_path / "tiny.toml", tiny_model_dir)
    text = path.read_text().replace("decode_check_tokens = 8\n", "decode_check_tokens = 8\nmax_logit_diff = 0.0\n")
    path.write_text(text)
    with pytest.raises(EdgepeftError, match="differs from the merged PyTorch model"):
        run_stages(STAGES, recipe_mod.load(tmp_path / "tiny.toml"), out, first="export", last="export",
                   echo=lambda s: None)
    assert not (out / ".export.tmp").exists()
    assert (out / "export" / "record.json").is_file()  # the previous good export is untouched


def test_bundle_over_budget_fails_without_a_half_bundle(run, tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    (tmp_path / "targets").mkdir()
    src = recipe_mod.load(run["recipe"]).target
    (tmp_path / "targets" / "small-phone.toml").write_text(
        f'formats = ["onnx", "ort"]\nthreads = 1\nmax_bundle_mb = 0.5\nblock_size = {src.block_size}\n')
    write_recipe(tmp_path / "tiny.toml", tiny_model_dir, target="small-phone")
    rec = recipe_mod.load(tmp_path / "tiny.toml")
    assert rec.target.name == "small-phone" and rec.target.formats == ["onnx", "ort"]
    shutil.rmtree(out / "bundle")
    with pytest.raises(EdgepeftError, match="over target small-phone's budget"):
        run_stages(STAGES, rec, out, first="bundle", echo=lambda s: None)
    assert not (out / "bundle").exists() and not (out / ".bundle.tmp").exists()


def test_unknown_or_bad_target_is_one_clear_error(tmp_path, tiny_model_dir):
    write_recipe(tmp_path / "a.toml", tiny_model_dir, target="no-such-phone")
    with pytest.raises(EdgepeftError, match="unknown target 'no-such-phone'.*android-arm64"):
        recipe_mod.load(tmp_path / "a.toml")
    (tmp_path / "targets").mkdir()
    (tmp_path / "targets" / "bad.toml").write_text('formats = ["apk"]\n')
    write_recipe(tmp_path / "b.toml", tiny_model_dir, target="bad")
    with pytest.raises(EdgepeftError, match="formats must be"):
        recipe_mod.load(tmp_path / "b.toml")


def test_bench_runs_on_a_finished_run(run):
    from edgepeft.latency import bench

    done = subprocess.run([sys.executable, "-m", "edgepeft.latency.bench", str(run["out"]), "--rounds", "1",
                           "--prompt-tokens", "8", "--decode-tokens", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "ratios edgepeft / builder: size" in done.stdout
    assert "measured/floor" in done.stdout and "memory read bandwidth" in done.stdout
    assert (run["out"] / ".bench" / "builder-int4" / "genai_config.json").is_file()
    assert bench.main([str(run["out"] / "nope")]) == 2


def test_bundle_tokenizes_prompts_like_the_training_tokenizer(run):
    """onnxruntime-genai's reading of the bundle's tokenizer gives the ids training used (a GGUF-converted
    tokenizer once mapped most text to unknown ids there)."""
    from edgepeft.calib.data import builtin_splits, prompt_ids
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(run["out"] / "merge" / "model")
    runner = Runner(run["bundle"])
    for s in builtin_splits("phone-commands")["test"][:8]:
        assert runner.prompt_ids(list(s.messages[:-1])) == prompt_ids(hf, s)


def _quantized_beside(run, folder, target) -> tuple[dict, float]:
    """The run's fp32 export quantized without calibration for ``target`` into ``folder`` (a model folder that
    runs): what ``mixed.quantize`` did, and its max |logit diff| from fp32 on a fixed prompt."""
    from edgepeft.onnx.mixed import quantize

    src, fp32 = run["out"] / "requantize" / "model", run["out"] / "export" / "model" / "model.onnx"
    ids = list(range(200, 232))
    folder.mkdir()
    shutil.copy(src / "genai_config.json", folder / "genai_config.json")
    done = quantize(fp32, folder / "model.onnx", target)
    diff = np.abs(Decoder(folder / "model.onnx").prefill(ids)[0] - Decoder(fp32).prefill(ids)[0]).max()
    return done, float(diff)


def test_int8_target_quantizes_closer_to_fp32_than_int4(run, tmp_path):
    from edgepeft.pipeline.target import Target

    diffs = {}
    for weights in ("int8", "int4"):
        done, diffs[weights] = _quantized_beside(run, tmp_path / weights, Target("t", weights=weights))
        assert done["embedding"] == f"shared with the head, {weights}"
    assert 0 < diffs["int8"] < diffs["int4"] / 4


def test_a_target_can_keep_the_head_and_its_shared_table_at_int8(run, tmp_path):
    """``head = "int8"`` (Gemma 3's 262k-token table): the head's MatMul and the token table read from it are
    8-bit, every other MatMul the target's int4; the graph runs and is closer to fp32 than all-int4."""
    import onnx

    from edgepeft.pipeline.target import Target

    diffs = {}
    for head in ("same", "int8"):
        done, diffs[head] = _quantized_beside(run, tmp_path / head, Target("t", head=head))
        graph = onnx.load(str(tmp_path / head / "model.onnx"))
        bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.graph.node
                if n.op_type == "MatMulNBits"}
        assert {b for n, b in bits.items() if not n.startswith("/lm_head")} == {4}
        assert [b for n, b in bits.items() if n.startswith("/lm_head")] == [8 if head == "int8" else 4]
        assert done["embedding"] == f"shared with the head, {'int8' if head == 'int8' else 'int4'}"
    assert diffs["int8"] < diffs["same"]


def test_a_sentencepiece_bpe_vocabulary_becomes_bpe_that_onnxruntime_genai_reads(run, tmp_path):
    """A GGUF SentencePiece BPE vocabulary (Gemma's) comes out of transformers as a Unigram model, which
    segments by best total score and which onnxruntime-genai cannot load; rebuilt as BPE it merges by rank,
    and onnxruntime-genai encodes like Hugging Face."""
    import onnxruntime_genai as og
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram
    from transformers import PreTrainedTokenizerFast

    from edgepeft.models.sources import _sentencepiece_bpe
    from edgepeft.stages.bundle import TOKENIZER_FILES

    # "ab" is the first merge, "bc" the second; Unigram prefers a + bc (scores -1 -2) to ab + c (-1 -50); the
    # byte piece <0x0A> comes renamed to a newline, as transformers renames Gemma's <0x09> to a tab
    pieces = [("<pad>", -1000.0), ("<eos>", -1000.0), ("<bos>", -1000.0), ("<unk>", -1000.0),
              *((f"<0x{b:02X}>" if b != 10 else "\n", 0.0) for b in range(256)),
              ("ab", -1.0), ("bc", -2.0), ("▁", -3.0), ("a", -1.0), ("b", -50.0), ("c", -50.0), ("\n", -1000.0)]
    backend = Tokenizer(Unigram(pieces, unk_id=3, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")  # Gemma's normalizer and decoder
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    uni = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    ids = {p: i for i, (p, _) in enumerate(pieces)}  # "\n": the last one
    assert uni("abc", add_special_tokens=False)["input_ids"] == [ids["a"], ids["bc"]]
    bpe = _sentencepiece_bpe(uni, json.loads(uni.backend_tokenizer.to_str()), {4 + 10: "<0x0A>"})
    text = "abc ab\tc\n"  # a tab has no piece: byte fallback
    expect = [ids["ab"], ids["c"], ids["▁"], ids["ab"], ids["<0x09>"], ids["c"], ids["\n"]]
    assert bpe(text, add_special_tokens=False)["input_ids"] == expect
    assert bpe.decode(expect) == text and bpe.eos_token == "<eos>"
    assert bpe.convert_ids_to_tokens(4 + 10) == "<0x0A>" and bpe.decode([4 + 10]) == "\n"  # the byte is back

    folder = tmp_path / "bundle"
    shutil.copytree(run["bundle"], folder)
    for f in TOKENIZER_FILES:
        (folder / f).unlink(missing_ok=True)
    bpe.save_pretrained(folder)
    og_tok = og.Tokenizer(og.Model(str(folder)))
    og_tok.update_options(add_special_tokens="false")
    assert [int(i) for i in og_tok.encode(text)] == expect

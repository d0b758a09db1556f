"""Smoke tests of the benchmark suite (benchmarks/): every benchmark function runs at toy size
for a step or two and the results carry the keys the README documents. Timings are printed
by the suite, never asserted here."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` run as a script does not put the checkout on the path
    sys.path.insert(0, str(ROOT))

from conftest import SHARED_DATA, shared_data_or_skip  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gpu_suite(tmp_path_factory):
    """The gpu suite's whole code path (bf16, remat, MFU sweep, both baselines) at toy size,
    on the demo data, written to a temporary folder."""
    from benchmarks.run import run_suite

    out = tmp_path_factory.mktemp("bench")
    results = run_suite("gpu", tiny=True, data_dir=out / "no-data-here", out_dir=out, log=lambda m: None)
    return results, json.loads(Path(results["path"]).read_text())


def test_suite_writes_its_json_named_by_suite_device_and_date(tiny_gpu_suite):
    from benchmarks.run import device_slug

    results, saved = tiny_gpu_suite
    today = datetime.date.today().isoformat()
    assert Path(results["path"]).name == f"gpu-{device_slug()}-{today}-tiny.json"
    for key in ("suite", "device", "data", "tokenizer", "streams", "models", "training", "packing", "decoding", "mfu"):
        assert key in saved, key
    assert saved["data"]["source"] == "demo"
    assert saved["tokenizer"]["vocab_size"] > 0
    assert [s["name"] for s in saved["streams"]] == ["answer", "flan-t5", "llama"]


def test_training_compares_both_trainers_on_the_same_model(tiny_gpu_suite):
    _, saved = tiny_gpu_suite
    (r,) = saved["training"]
    assert r["dtype"] == "bfloat16"
    for side in ("ours", "reference"):
        s = r[side]
        for key in ("real_tokens_per_s", "step_time_s", "real_token_fraction", "flops_per_step",
                    "achieved_tflops_per_s", "mfu", "step_times_s"):
            assert key in s, (side, key)
        assert s["real_tokens_per_s"] > 0 and 0 < s["real_token_fraction"] <= 1
    # same architecture on both sides: the parameter counts agree with the saved student's
    assert r["ours"]["params"] == r["reference"]["params"] == saved["models"]["t5-tiny"]["params"]
    assert r["reference"]["forward_passes_per_step"] == 3 * r["reference"]["accum_steps"]
    assert r["ratio_real_tokens_per_s"] > 0
    assert {m["side"] for m in saved["mfu"]["training"]} == {"ours", "reference"}


def test_decoding_and_mfu_sweep_and_packing_sections(tiny_gpu_suite):
    _, saved = tiny_gpu_suite
    (d,) = saved["decoding"]
    assert d["ours"]["generated_tokens"] > 0 and d["reference"]["generated_tokens"] > 0
    assert d["ratio_tokens_per_s"] > 0 and 0 <= d["identical_rows"] <= d["batch_size"]
    sweep = saved["mfu"]["sweep"]
    assert [(m["rows"], m["remat"]) for m in sweep] == [(2, "none"), (2, "dots")]
    assert all("error" not in m and m["achieved_tflops_per_s"] > 0 for m in sweep)
    assert saved["mfu"]["matmul_tflops_measured"] > 0
    assert set(saved["packing"]) == {"reference_tinyllm_max_input_100", "reference_step_by_step", "ours_packed"}
    assert all(0 < v["encoder"] <= 1 and 0 < v["decoder"] <= 1 for v in saved["packing"].values())


def test_table_shows_every_section(tiny_gpu_suite):
    from benchmarks.run import table

    _, saved = tiny_gpu_suite
    text = table(saved)
    for needle in ("training t5-tiny", "ratio (real tokens/s)", "packing", "decoding t5-tiny", "MFU sweep"):
        assert needle in text, needle


def test_reference_trainer_pads_inputs_to_max_length_and_labels_to_the_longest(tmp_path, spm_tokenizer):
    from benchmarks.reference_torch import ReferenceTrainer, RefStream, tokenize_records
    from conftest import make_hf_t5

    model_dir = make_hf_t5(tmp_path / "m", vocab_size=128, feed_forward_proj="gated-gelu")
    streams = [RefStream("answer", "predict: ", 1.0), RefStream("t1", "explain: ", 0.5, "t1")]
    records = [
        {"question": "what is two plus three?", "choices": ["five", "six"], "answer": "five",
         "rationales": {"t1": ["two plus three is five"]}},
        {"question": "which is heavier?", "choices": ["a rock", "a feather"], "answer": "a rock",
         "rationales": {}},  # no rationale: trains on EOS alone, as the references do
    ]
    feats = tokenize_records(records, streams, spm_tokenizer, max_input_length=40)
    assert all(len(f[s.name]["input_ids"]) == 40 for f in feats for s in streams)
    assert feats[1]["t1"]["labels"] == [spm_tokenizer.eos_token_id]
    trainer = ReferenceTrainer(str(model_dir), spm_tokenizer, streams, micro_batch=2, accum_steps=1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.step(feats)
    longest = [max(len(f[s.name]["labels"]) for f in feats) for s in streams]
    assert out["shapes"] == [((2, 40), (2, n)) for n in longest]
    real = sum(sum(f[s.name]["attention_mask"]) + len(f[s.name]["labels"]) for f in feats for s in streams)
    assert out["real_tokens"] == real
    assert any(not (a == b).all() for a, b in zip(before, trainer.model.parameters()))


def test_cli_runs_the_cpu_suite_at_toy_size(tmp_path, capsys):
    from benchmarks.run import main

    assert main(["--suite", "cpu", "--tiny", "--data", str(tmp_path / "none"), "--out", str(tmp_path),
                 "--only", "decoding"]) == 0
    printed = capsys.readouterr().out
    assert "decoding t5-tiny (float32) batch 4" in printed
    (path,) = tmp_path.glob("cpu-*-tiny.json")
    saved = json.loads(path.read_text())
    assert saved["decoding"] and not saved["training"] and "packing" not in saved


def test_real_tinyllm_data_is_used_when_present(tmp_path):
    shared_data_or_skip("tinyllm.tar.xz")
    from benchmarks.run import TEACHERS, load_records

    train, test, info = load_records(SHARED_DATA, tmp_path, max_records=10)
    assert info["source"] == "tinyllm-obqa" and info["records"] == len(train) == 10
    assert all(len(r["rationales"][t]) == 1 for r in train for t in TEACHERS)
    assert test and info["records_without_both_rationales"] > 0


def test_student_without_torch_is_an_untied_v1_1_checkpoint(tmp_path):
    """Where torch is missing (TPU VMs) the student comes from our own initialiser."""
    from benchmarks.run import ARCHS, _make_student_without_torch
    from tinyllm_jax.model.hf import load_pretrained
    from tinyllm_jax.train.metrics import param_count

    path, n = _make_student_without_torch(tmp_path / "s", ARCHS["t5-tiny"], 128, seed=0)
    _, params, _, cfg = load_pretrained(str(path), tokenizer=False)
    assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs and cfg.is_gated
    assert param_count(params) == n


def test_distill_benchmark_quick_times_online_stored_and_chunked_steps(tmp_path):
    """benchmarks/distill_speed.py --quick: every side timed (online teachers 2x and 4x the
    student, stored top-k, each whole and chunked), memory of each compiled step, the goals'
    ratios, the JSON named by device and date."""
    from benchmarks.distill_speed import main
    from benchmarks.run import device_slug

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("distill-*-quick.json")
    assert path.name == f"distill-{device_slug()}-{datetime.date.today().isoformat()}-quick.json"
    r = json.loads(path.read_text())
    whole = {"student_step", "kd_online_2x", "kd_online_4x", "kd_stored_top16"}
    sides = whole | {f"{s}_chunked" for s in whole} | {"teacher_forward_2x"}
    assert set(r["step_time_s"]) == set(r["memory"]) == sides
    assert all(t > 0 for t in r["step_time_s"].values())
    assert 1.5 < r["teachers"]["2x"]["params_ratio"] < 2.5 and 3.0 < r["teachers"]["4x"]["params_ratio"] < 5.0
    mem = r["memory"]
    # an online teacher's fp32 parameters are arguments of its KD step; stored labels are not parameters
    extra = mem["kd_online_2x"]["argument_size_in_bytes"] - mem["student_step"]["argument_size_in_bytes"]
    assert extra >= 4 * r["teachers"]["2x"]["params"]
    assert mem["kd_stored_top16"]["argument_size_in_bytes"] < mem["kd_online_2x"]["argument_size_in_bytes"]
    assert r["stored_labels"]["array_bytes_per_token"] == 16 * (2 + 4) + 4
    for goal in r["goals"].values():
        assert goal["figure"] > 0 and goal["met"] == (goal["figure"] <= 0.5 if goal["goal"] == 0.5 else goal["figure"] >= 1.5)


def test_methods_benchmark_tiny_path_writes_its_table_json_and_chart(tmp_path, capsys):
    """`python -m benchmarks.methods --tiny`: every arm at toy size, a row each with mean,
    spread and every seed, the validation curves, the data's chance floor and signature
    overlap, the chart; a rerun reuses every finished run."""
    from benchmarks.methods import ARMS, main

    out = tmp_path / "methods.json"
    assert main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["arm"]: r for r in doc["rows"]}
    assert set(rows) == set(ARMS) and doc["complete"]
    assert len({r["steps"] for r in rows.values()}) == 1  # equal compute
    assert doc["data"]["test_signatures_in_train"] == 0 and 0 < doc["data"]["chance_floor"] < 1
    for run in doc["runs"]:
        assert run["curve"] and run["selected_step"] in [s for s, _ in run["curve"]] + [run["steps"], 2]
    assert "test_accuracy_through_careful" in rows["tinyllm-both"] and "each" in rows["answer-only"]["test_accuracy"]
    assert doc["mentor"]["curve"] and "warmup_curve" in [r for r in doc["runs"] if r["arm"] == "fair"][0]
    control = [r for r in doc["runs"] if r["arm"] == "fair-control"][0]
    assert control["round_records"]["replay_records"] == control["round_records"]["records"]
    assert doc["plan"]["seeds"] == [0] and out.with_suffix(".png").stat().st_size > 10_000
    assert "test acc" in capsys.readouterr().out

    # a second run (as after a stop) reuses every finished run: same figures, nothing retrained
    assert main(["--tiny", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done before:") >= len(ARMS)
    assert json.loads(out.read_text())["runs"] == doc["runs"]


def test_distill_benchmark_memory_section_compiles_whole_and_chunked_steps(tmp_path):
    """benchmarks/distill_speed.py --memory --quick: compile-only peak memory of each step whole
    and chunked (T5 alone and with an online teacher, a decoder-only student alone and with
    stored labels); chunking never costs memory."""
    from benchmarks.distill_speed import main

    assert main(["--memory", "--quick", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("distill-memory-*-quick.json")
    r = json.loads(path.read_text())
    assert set(r["ratios"]) == {"t5_512_4rows_student_step", "t5_512_4rows_kd_online_2x",
                                "decoder_2048_8rows_student_step", "decoder_2048_8rows_kd_stored_top16"}
    assert all(0 < ratio <= 1.0 for ratio in r["ratios"].values())


@pytest.fixture(scope="module")
def decoder_quick(tmp_path_factory):
    """benchmarks/decoder_speed.py --quick on the demo data: both sections at toy size."""
    from benchmarks.decoder_speed import main

    out = tmp_path_factory.mktemp("decoder")
    assert main(["--quick", "--data", str(out / "no-data-here"), "--out", str(out)]) == 0
    (path,) = out.glob("decoder-*-quick.json")
    return path, json.loads(path.read_text())


def test_decoder_benchmark_trains_one_qwen2_student_on_both_sides(decoder_quick):
    from benchmarks.run import device_slug

    path, r = decoder_quick
    assert path.name == f"decoder-{device_slug()}-{datetime.date.today().isoformat()}-quick.json"
    assert r["data"]["source"] == "demo" and r["model"]["class"] == "Qwen2ForCausalLM"
    t = r["training"]
    # the same checkpoint on both sides: our parameter count is transformers'
    assert t["ours"]["params"] == t["reference"]["params"] == r["model"]["params"]
    assert t["reference"]["forward_passes_per_step"] == 3 * t["reference"]["accum_steps"]  # a pass per stream
    for side in ("ours", "reference"):
        s = t[side]
        assert s["real_tokens_per_s"] > 0 and 0 < s["real_token_fraction"] <= 1
        assert 0 < s["target_tokens_per_step"] < s["real_tokens_per_step"]  # prompts are not trained on
    assert t["ratio_real_tokens_per_s"] > 0 and t["ratio_target_tokens_per_s"] > 0
    assert t["ours"]["sequence_length"] == r["settings"]["train"]["sequence_length"]


def test_decoder_benchmark_generates_the_same_tokens_as_generate(decoder_quick):
    _, r = decoder_quick
    g = r["generation"]
    n = g["summary"]["requests"]
    assert n == r["settings"]["requests"] and [o["slots"] for o in g["ours"]] == r["settings"]["slots"]
    assert 0 < g["generate"]["live_fraction"] <= 1
    for o in g["ours"]:
        # forced to each request's length in both: every row at full length, the tokens equal
        # (one may differ where fp rounding flips a near-tied argmax of the random model)
        assert o["rows_at_full_length"] == n and o["identical_to_generate"] >= n - 1
        assert o["generated_tokens"] == g["generate"]["useful_tokens"] and 0 < o["live_fraction"] <= 1


def test_causal_reference_trains_the_packer_s_token_sequences(tmp_path):
    """The SFT-style baseline reads the examples our packer reads: prompt + target (EOS included),
    the prompt's labels -100; its step counts the labelled tokens and pads per stream."""
    from benchmarks.decoder_speed import QWEN2_TINY, make_student, train_tokenizer
    from benchmarks.reference_torch import ReferenceTrainer, RefStream, causal_features
    from tinyllm_jax.data.records import make_record
    from tinyllm_jax.data.streams import Prompt, build_examples
    from tinyllm_jax.config import StreamConfig

    records = [make_record(f"r{i}", q, a, rationales={"t": [f"{q} so {a}"]})
               for i, (q, a) in enumerate([("what is two plus three?", "five"), ("which is heavier?", "a rock")])]
    streams = [StreamConfig("answer", "predict: ", 1.0), StreamConfig("t", "explain: ", 0.5, teacher="t")]
    tok = train_tokenizer([r["question"] + " " + r["answer"] for r in records] * 5, tmp_path / "tok", 300)
    ex = build_examples(records, streams, tok, 64, 32, prompt=Prompt(causal=True))
    feats = causal_features(ex, [RefStream(s.name, s.prefix, s.weight, s.teacher) for s in streams])
    assert len(feats) == 2
    for i in range(len(ex)):
        f = feats[int(ex.record_index[i])][streams[int(ex.stream_ids[i])].name]
        prompt, target = ex.enc(i).tolist(), ex.dec(i).tolist()
        assert f["input_ids"] == prompt + target and target[-1] == tok.eos_token_id
        assert f["labels"] == [-100] * len(prompt) + target
    model_dir, _ = make_student(tmp_path / "m", QWEN2_TINY, 384, tok.eos_token_id)
    trainer = ReferenceTrainer(str(model_dir), tok, [RefStream(s.name, s.prefix, s.weight, s.teacher) for s in streams],
                               micro_batch=2, accum_steps=1, causal=True)
    out = trainer.step(feats)
    assert out["target_tokens"] == int(ex.dec_lengths.sum())
    assert out["real_tokens"] == int(ex.enc_lengths.sum() + ex.dec_lengths.sum())
    longest = [max(len(f[s.name]["input_ids"]) for f in feats) for s in streams]
    assert out["shapes"] == [((2, n),) for n in longest]


def test_demos_benchmark_table_gives_ranges_over_seeds():
    """benchmarks/demos.py: a config's figures as min-max over its seeds, one value when equal."""
    from benchmarks.demos import span, table

    runs = [{"config": "configs/demo.yaml", "seed": s, "wall_s": w, "validation_accuracy": v, "test_accuracy": t}
            for s, w, v, t in [(0, 83.7, 0.4765625, 0.3984375), (1, 81.9, 0.484375, None), (2, 82.1, 0.4921875, 0.48)]]
    assert span([0.5, 0.5]) == "0.500" and span([None]) == "-" and span([81.9, 83.7], 0) == "82-84"
    row = table(runs).splitlines()[1].split()
    assert row == ["configs/demo.yaml", "3", "82-84", "0.477-0.492", "0.398-0.480"]

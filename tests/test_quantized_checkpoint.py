"""`llmrec export --quantize-4bit`: a model saved with its linear layers already 4-bit loads to the same weights and
outputs as quantizing the full-precision model at load time, trains LoRA, refuses settings it was not made with,
and merges an adapter into its dequantized weights (those the adapter was trained on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.cli import main  # noqa: E402
from llmrec.llm import BackendError, LoraSettings, QuantSettings, apply_lora, load_causal_lm  # noqa: E402
from llmrec.llm.loading import QUANTIZED_FILE, merge_and_save, prequantized_4bit  # noqa: E402

Q4 = QuantSettings(load_in_4bit=True, compute_dtype="float32")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("q4")
    src = make_tiny_llm(root / "src")
    out = root / "q4"
    assert main(["export", "--quantize-4bit", "--model", str(src), "--out", str(out), "--dtype", "float32"]) == 0
    return src, out


def test_prequantized_folder_loads_the_same_model(dirs):
    src, q4 = dirs
    assert prequantized_4bit(q4)["bnb_4bit_quant_type"] == "nf4" and prequantized_4bit(src) is None
    assert json.loads((q4 / QUANTIZED_FILE).read_text())["source"] == str(src.resolve())
    assert (q4 / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    # computing in bf16 although the folder's config.json stores the fp32 it was exported with
    q_bf16 = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16")
    a, tok = load_causal_lm(src, dtype="float32", quant=q_bf16)
    b, _ = load_causal_lm(q4, dtype="float32", quant=q_bf16)
    qa, qb = a.model.layers[1].mlp.up_proj, b.model.layers[1].mlp.up_proj
    assert type(qb).__name__ == "Linear4bit" and torch.equal(qa.weight.data, qb.weight.data)
    assert qb.compute_dtype == torch.bfloat16  # the caller's compute dtype, not the one stored in config.json
    maps = Path("/proc/self/maps")
    if maps.exists():  # the packed weights and their absmax were views of the file: copied, the file unmapped
        import gc

        gc.collect()
        assert str((q4 / "model.safetensors").resolve()) not in maps.read_text()
    ids = tok("The user liked Action Story 1. Answer:", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(a(**ids).logits, b(**ids).logits, rtol=0, atol=0)


def test_prequantized_folder_refuses_settings_it_was_not_made_with(dirs, tmp_path, capsys):
    _, q4 = dirs
    rows = tmp_path / "t.json"
    rows.write_text(json.dumps([{"instruction": "i", "input": "x", "output": "Yes."}]))
    assert main(["eval", "yesno", "--file", str(rows), "--model", str(q4)]) == 1  # a message, not a traceback
    assert "holds a 4-bit checkpoint" in capsys.readouterr().err
    with pytest.raises(BackendError, match="holds a 4-bit checkpoint"):
        load_causal_lm(q4, dtype="float32")
    with pytest.raises(BackendError, match="quant.quant_type='fp4' but .* quant_type='nf4'"):
        load_causal_lm(q4, dtype="float32", quant=QuantSettings(load_in_4bit=True, quant_type="fp4",
                                                                 compute_dtype="float32"))
    with pytest.raises(SystemExit, match="exactly one of --merge"):
        main(["export", "--out", str(q4.parent / "x")])


def test_lora_trains_on_a_prequantized_base_and_merges_into_its_dequantized_weights(dirs, tmp_path):
    src, q4 = dirs
    m, tok = load_causal_lm(q4, dtype="float32", quant=Q4)
    pm = apply_lora(m, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    ids = tok("The user liked Action Story 1. Answer: Yes", return_tensors="pt")
    pm(**ids, labels=ids["input_ids"]).loss.backward()
    grads = [p.grad for n, p in pm.named_parameters() if "lora_B" in n]  # B starts at 0: A gets no gradient yet
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        trained = pm(**ids).logits  # the 4-bit model with its adapter: what serving should reproduce
    pm.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    out = merge_and_save(q4, tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    assert prequantized_4bit(out) is None  # plain weights, not 4-bit ones
    merged, _ = load_causal_lm(out, dtype="float32")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    on_source = merge_and_save(src, tmp_path / "adapter", tmp_path / "merged_src", dtype="float32")
    with torch.no_grad():
        err = (merged(**ids).logits - trained).abs().max().item()
        err_src = (load_causal_lm(on_source, dtype="float32")[0](**ids).logits - trained).abs().max().item()
    # bitsandbytes' CPU 4-bit matmul is not exact, so not 0; the original weights are much further away
    assert err < 0.2 * err_src, (err, err_src)

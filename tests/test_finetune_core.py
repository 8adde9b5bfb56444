"""Fine-tuning core on a tiny 4-bit Llama + LoRA (CPU): loss goes down, only LoRA weights move, the loss mask covers
the answer tokens only, recipes reject unknown keys."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from llm_fixtures import make_tiny_llm  # noqa: E402

from llmrec.config import ConfigError  # noqa: E402
from llmrec.finetune.data import IGNORE_INDEX, AnswerOnlyCollator, Example, answer_only_loss, encode_example  # noqa
from llmrec.llm import LoraSettings, QuantSettings, apply_lora, load_causal_lm  # noqa: E402

RECIPES = Path(__file__).resolve().parent.parent / "finetune" / "recipes"
EXAMPLES = [
    Example("The user watched Action Story 1 and Comedy Story 2. Will the user like Action Story 3? Answer:", " Yes"),
    Example("The user watched Drama Story 1. Will the user like Horror Story 4? Answer:", " No"),
    Example("Candidates: A. Action Story B. Comedy Story. Answer:", " B"),
    Example("liked movie history Answer:", " Yes"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_llm(tmp_path_factory.mktemp("tiny_llm_ft"))


def qlora(tiny_dir, seed=0):
    torch.manual_seed(seed)
    m, tok = load_causal_lm(tiny_dir, dtype="float32", quant=QuantSettings(load_in_4bit=True, compute_dtype="float32"))
    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return apply_lora(m, lora), tok


def batch(tok, side="left"):
    return AnswerOnlyCollator(tok.pad_token_id, padding_side=side)([encode_example(e, tok, 64) for e in EXAMPLES])


def test_encode_all_counts_the_prompts_it_cuts(tiny_dir, caplog):
    """A prompt cut from the left loses its instruction: the split's encoding names how many were cut."""
    from dataclasses import replace

    from llmrec.finetune.data import encode_all

    _, tok = load_causal_lm(tiny_dir, dtype="float32")
    n = [len(tok(e.prompt + e.answer, add_special_tokens=False)["input_ids"]) + 1 for e in EXAMPLES]
    with caplog.at_level("WARNING", logger="llmrec.finetune.data"):
        feats = encode_all(EXAMPLES, tok, max(n))
    assert [len(f["input_ids"]) for f in feats] == n and not caplog.records
    max_len = sorted(n)[-2]  # the longest example no longer fits (two, if the two longest tie)
    with caplog.at_level("WARNING", logger="llmrec.finetune.data"):
        encode_all(EXAMPLES, tok, max_len, split="valid")
    cut = sum(x > max_len for x in n)
    assert cut >= 1 and f"{cut} of 4 valid examples had their prompt cut" in caplog.text
    caplog.clear()
    group = [replace(EXAMPLES[0], choices=[" Yes", " No"])]
    with caplog.at_level("WARNING", logger="llmrec.finetune.data"):
        rows = encode_all(group, tok, n[0] - 1, group=True)[0]["group"]
    assert len(rows) == 2 and "1 of 1 train examples" in caplog.text


def test_answer_only_mask(tiny_dir):
    _, tok = load_causal_lm(tiny_dir, dtype="float32")
    ex = EXAMPLES[0]
    f = encode_example(ex, tok, 512)
    p_ids = tok(ex.prompt, add_special_tokens=False)["input_ids"]
    a_ids = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert f["input_ids"] == p_ids + a_ids
    assert f["labels"] == [IGNORE_INDEX] * len(p_ids) + a_ids
    # the first supervised token is exactly the token the scorer reads
    assert f["labels"][len(p_ids)] == tok.encode(" Yes", add_special_tokens=False)[0]
    # truncation drops prompt tokens from the left and keeps the answer
    short = encode_example(ex, tok, 6)
    assert len(short["input_ids"]) == 6 and short["input_ids"][-len(a_ids):] == a_ids
    assert short["labels"][: 6 - len(a_ids)] == [IGNORE_INDEX] * (6 - len(a_ids))
    # an answer that cannot fit with one prompt token is refused, not cut (it would lose its EOS)
    with pytest.raises(ValueError, match=r"is 2 tokens with EOS, not below max_len=2: raise data.max_len"):
        encode_example(ex, tok, 2)
    b = batch(tok, "left")
    n_answer = [len(tok(e.answer, add_special_tokens=False)["input_ids"]) + 1 for e in EXAMPLES]  # + EOS
    assert torch.equal(b["labels"].ne(IGNORE_INDEX).sum(1), torch.tensor(n_answer))
    for row, e in zip(b["labels"], EXAMPLES):  # right-aligned under left padding: the answer ids, then EOS
        want = tok(e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row[-len(want):].tolist() == want
    assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (b["position_ids"][:, -1] == b["attention_mask"].sum(1) - 1).all()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions_as", ["index", "int"])
def test_answer_only_loss_matches_full_logits(tiny_dir, side, positions_as):
    m, tok = load_causal_lm(tiny_dir, dtype="float32")
    b = batch(tok, side)
    with torch.no_grad():
        loss, kept = answer_only_loss(m, b, positions_as=positions_as)
        logits = m(**{k: v for k, v in b.items() if k != "labels"}).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    ref = torch.nn.functional.cross_entropy(flat, b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert abs(float(loss) - float(ref)) < 1e-4
    assert torch.allclose(kept, logits[:, -kept.shape[1]:], atol=1e-5)  # the last positions' logits, either way
    with pytest.raises(ValueError, match="positions_as"):
        answer_only_loss(m, b, positions_as="slice")


@pytest.mark.parametrize("positions_as", ["index", "int"])
def test_answer_only_loss_when_the_prompt_is_cut_away(tiny_dir, positions_as):
    """A row whose answer starts in column 0 (no prompt left: `encode_example` refuses to make one, a hand-built
    feature can) has a first answer token that no position predicts. The loss leaves it out (as the full-logits loss
    does) instead of reading it off the last position's logits ("index") or failing on mismatched shapes ("int")."""
    m, tok = load_causal_lm(tiny_dir, dtype="float32")
    ids = tok(" Action Story Comedy Story", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    feats = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)},
             encode_example(Example("x", " Yes"), tok, len(ids))]
    b = AnswerOnlyCollator(tok.pad_token_id)(feats)
    with torch.no_grad():
        loss, _ = answer_only_loss(m, b, positions_as=positions_as)
        logits = m(**{k: v for k, v in b.items() if k != "labels"}).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            b["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert abs(float(loss) - float(ref / b["labels"].ne(IGNORE_INDEX).sum())) < 1e-4


def test_qlora_steps_lower_the_loss_and_only_lora_changes(tiny_dir):
    m, tok = qlora(tiny_dir)
    from bitsandbytes.nn import Linear4bit

    assert any(isinstance(mod, Linear4bit) for mod in m.modules())
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in m.named_buffers()}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    b = batch(tok)
    m.train()
    losses = []
    for step in range(10):
        loss, _ = answer_only_loss(m, b)
        loss.backward()
        if step == 0:  # B starts at zero: the B matrices get the first gradients
            g = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
            assert all(v is not None for v in g.values())
            assert all(float(v.abs().sum()) > 0 for n, v in g.items() if "lora_B" in n)
        if step == 1:
            assert all(float(p.grad.abs().sum()) > 0 for n, p in m.named_parameters() if "lora_A" in n)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in m.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), n
    for n, buf in m.named_buffers():
        assert torch.equal(buf, buffers[n]), n


def test_recipes_load_and_unknown_keys_fail(tmp_path):
    from llmrec.finetune import load_recipe

    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert {"yesno_smollm2_qlora.yaml", "rank_smollm2_qlora.yaml"} <= set(names)
    for name in names:
        load_recipe(RECIPES / name)
    cfg = load_recipe(RECIPES / "yesno_smollm2_qlora.yaml", ["train.lr=1e-3", "data.n_train=64"])
    assert cfg.train.lr == 1e-3 and cfg.data.n_train == 64 and cfg.quant.load_in_4bit
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: yesno\ntrain:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train.*unknown key\(s\) \['learning_rate'\]"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="lora_rank"):
        load_recipe(RECIPES / "yesno_smollm2_qlora.yaml", ["lora_rank=4"])
    with pytest.raises(ConfigError, match="task"):
        load_recipe(None, ["task=summarize"])
    with pytest.raises(ConfigError, match=r"^recipe \(defaults \+ overrides\): data.n_candidates must be in 2..26"):
        load_recipe(None, ["data.n_candidates=30"])  # no file: the message names the recipe, not "None"
    with pytest.raises(ConfigError, match=r"train.malloc_mmap_threshold_mb must be >= 0.*got -1"):
        load_recipe(None, ["train.malloc_mmap_threshold_mb=-1"])
    with pytest.raises(ConfigError, match=r"data.retriever 'bm25' is not one of \['text', 'hybrid'"):
        load_recipe(RECIPES / "rank_smollm2_qlora.yaml", ["data.candidates=retrieval", "data.retriever=bm25"])


def test_a_template_of_another_task_or_too_few_labels_fails_at_load(tmp_path):
    """data.template is checked when the recipe loads: a missing file, a template of another task, a rank template
    with fewer labels than data.n_candidates (each met before only as a render error while examples were built)."""
    from llmrec.finetune import load_recipe

    yesno, rank = RECIPES / "yesno_smollm2_qlora.yaml", RECIPES / "rank_smollm2_qlora.yaml"
    with pytest.raises(ConfigError, match=r"yesno_smollm2_qlora.yaml \+ overrides: data.template 'rank' is a rank "
                                          r"template .*task yesno needs one of \[.*'yesno_stats'\]"):
        load_recipe(yesno, ["data.template=rank"])
    with pytest.raises(ConfigError, match="data.template 'yesno' is a yesno template"):
        load_recipe(rank, ["data.template=yesno"])
    with pytest.raises(ConfigError, match=r"data.template: no prompt template file '.*missing.yaml'"):
        load_recipe(yesno, [f"data.template={tmp_path / 'missing.yaml'}"])
    with pytest.raises(ConfigError, match=r"data.n_candidates=21 but template 'rank' labels at most 20"):
        load_recipe(rank, ["data.n_candidates=21"])
    assert load_recipe(yesno, ["data.template=yesno_stats"]).data.template == "yesno_stats"
    assert load_recipe(rank, ["data.template=prompts/rank.yaml"]).data.template == "prompts/rank.yaml"
    assert load_recipe(None, ["task=next_title"]).data.template is None  # the task's own


@pytest.mark.parametrize("override, key", [
    ("train.lr_scheduler=cosin", "train.lr_scheduler 'cosin' is not one of"),
    ("train.lr_scheduler=not_a_schedule", "train.lr_scheduler 'not_a_schedule' is not one of"),
    ("eval_dtype=fp16", "eval_dtype 'fp16' is not one of"),
    ("dtype=bf16", "dtype 'bf16' is not one of"),
    ("quant.compute_dtype=bf16", "quant.compute_dtype 'bf16' is not one of"),
    ("train.logging_steps=0", "train.logging_steps must be >= 1"),
    ("train.warmup_ratio=-0.1", r"train.warmup_ratio must be in \[0, 1\]"),
    ("data.n_train=-5", "data.n_train must be >= 0"),
    ("data.n_valid=-1", "data.n_valid must be >= 0"),
    ("data.n_test=-1", "data.n_test must be >= 0"),
    ("data.max_len=0", "data.max_len must be >= 1"),
    ("train.eval_steps=-1", "train.eval_steps must be >= 0"),
    ("train.save_steps=-1", "train.save_steps must be >= 0"),
    ("train.eval_batch_size=0", "train.eval_batch_size must be >= 1"),
    ("lora.r=0", "lora.r must be >= 1"),
    ("train.epochs=-1", r"train.epochs must be > 0 \(or train.max_steps > 0\)"),
    ("quant.quant_type=int3", r"quant.quant_type 'int3' is not one of \['nf4', 'fp4'\]"),
])
def test_values_a_run_meets_late_fail_at_load(override, key, tmp_path):
    """Bad values read only after the run has written recipe.yaml / data_manifest.json / metrics.json (the
    evaluation model's dtype, TrainingArguments' scheduler, logging steps, warmup) fail when the recipe loads, naming
    the file and the key; "train" stays a valid eval_dtype and every scheduler transformers knows is accepted."""
    from llmrec.finetune import load_recipe

    with pytest.raises(ConfigError, match=r"yesno_smollm2_qlora.yaml \+ overrides: " + key):
        load_recipe(RECIPES / "yesno_smollm2_qlora.yaml", [override])
    load_recipe(RECIPES / "yesno_smollm2_qlora.yaml", ["eval_dtype=train", "train.lr_scheduler=cosine_with_min_lr",
                                                       "train.epochs=0", "train.max_steps=4"])
    # the same value written in a file, no override: the message names the file alone
    k, _, v = override.partition("=")
    section, _, leaf = k.rpartition(".")
    own = tmp_path / "own.yaml"
    own.write_text(f"{section}:\n  {leaf}: {v}\n" if section else f"{leaf}: {v}\n")
    with pytest.raises(ConfigError, match=r"own.yaml: " + key):
        load_recipe(own)


def test_train_py_and_cli_share_the_code(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "finetune" / "train.py"), "--config",
                          str(RECIPES / "rank_smollm2_qlora.yaml"), "--dry-run", "train.lr=0.001"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.001" in out.stdout and "task: rank" in out.stdout
    # the folder the run would write (output_dir: null resolves under $LLMREC_HOME), as a YAML comment
    assert out.stdout.rstrip().splitlines()[-1].replace("\\", "/").endswith("finetune/rank_ml-100k")
    assert out.stdout.rstrip().splitlines()[-1].startswith("# output: ")
    bad = subprocess.run([sys.executable, str(root / "finetune" / "train.py"), "--dry-run", "trian.lr=1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "override trian: unknown key 'trian'" in bad.stderr
    # a data error met when the run starts is one line too, as `llmrec finetune` prints it (was a traceback)
    missing = subprocess.run([sys.executable, str(root / "finetune" / "train.py"), "--config",
                              str(RECIPES / "rank_smollm2_qlora.yaml"), f"dataset={tmp_path / 'no.csv'}",
                              f"output_dir={tmp_path / 'out'}"],
                             capture_output=True, text=True, timeout=120, env={**os.environ,
                                                                               "LLMREC_HOME": str(tmp_path / "h")})
    assert missing.returncode == 1 and "Traceback" not in missing.stderr, missing.stderr[-2000:]
    line = next(x for x in missing.stderr.splitlines() if x.startswith("llmrec: error: "))
    assert "no.csv" in line
    assert not (tmp_path / "out").exists()  # refused before anything is written



def test_model_memory_counts_packed_4bit_weights(tiny_dir):
    """4-bit nf4 stores two weights per byte: each quantized Linear holds in*out/2 bytes; everything else (embeddings,
    norms: upcast to fp32 by prepare_model_for_kbit_training; LoRA weights: fp32) at its own dtype. `lora_bytes` is
    the trainable part only."""
    import bitsandbytes as bnb

    from llmrec.finetune.trainer import model_memory_mb

    q, _ = qlora(tiny_dir)
    mods = list(q.named_modules())
    lin4 = [m for _, m in mods if isinstance(m, bnb.nn.Linear4bit)]
    assert lin4, "the tiny model was not quantized"
    packed = sum(m.in_features * m.out_features // 2 for m in lin4)
    lin4_params = {id(m.weight) for m in lin4}
    rest = sum(t.numel() * t.element_size() for t in [*q.parameters(), *q.buffers()] if id(t) not in lin4_params)
    trainable = sum(p.numel() * 4 for p in q.parameters() if p.requires_grad)  # LoRA A/B in fp32
    m = model_memory_mb(q)
    assert m["weights_bytes"] == packed + rest
    assert m["lora_bytes"] == trainable > 0

    f, _ = load_causal_lm(tiny_dir, dtype="float32")  # same model unquantized: the linear weights at 4 bytes each
    full = model_memory_mb(f)["weights_bytes"]
    assert full - (m["weights_bytes"] - trainable) == pytest.approx(sum(x.in_features * x.out_features for x in lin4)
                                                                     * 3.5)


def test_frozen_embeddings_can_stay_in_the_compute_dtype(tiny_dir):
    """quant.upcast_frozen_embeddings=false: after prepare_model_for_kbit_training the frozen embedding / LM head
    are bf16 again (half of PEFT's fp32), a training step still reaches every LoRA weight; fp32 compute refuses."""
    from llmrec.llm.base import BackendError
    from llmrec.llm.loading import model_weight_bytes_by_dtype

    q = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16", upcast_frozen_embeddings=False)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    m, tok = load_causal_lm(tiny_dir, dtype="bfloat16", quant=q)
    pm = apply_lora(m, lora, gradient_checkpointing=True, quant=q)
    assert pm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert pm.get_output_embeddings().weight.dtype == torch.bfloat16
    assert not pm.get_input_embeddings().weight.requires_grad
    q_default = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16")
    m2, _ = load_causal_lm(tiny_dir, dtype="bfloat16", quant=q_default)
    pm2 = apply_lora(m2, lora, quant=q_default)
    assert pm2.get_input_embeddings().weight.dtype == torch.float32  # PEFT's default upcast
    assert model_weight_bytes_by_dtype(pm)["torch.float32"] < model_weight_bytes_by_dtype(pm2)["torch.float32"]
    pm.train()
    loss, _ = answer_only_loss(pm, batch(tok))
    loss.backward()
    lora_params = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    assert lora_params and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in lora_params)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in lora_params if "lora_B" in n)
    # fp32 compute on weights loaded bf16: they would not match the layers -> refused, naming the field
    m3, _ = load_causal_lm(tiny_dir, dtype="bfloat16", quant=QuantSettings(load_in_4bit=True, compute_dtype="float32"))
    with pytest.raises(BackendError, match="upcast_frozen_embeddings=false needs a bf16/fp16 compute dtype"):
        apply_lora(m3, lora, quant=QuantSettings(load_in_4bit=True, compute_dtype="float32",
                                                 upcast_frozen_embeddings=False))
    # weights loaded fp32 (`dtype: fast` on a CPU without native bf16): nothing to keep, the flag is a no-op
    m4, _ = load_causal_lm(tiny_dir, dtype="float32", quant=QuantSettings(load_in_4bit=True, compute_dtype="float32"))
    pm4 = apply_lora(m4, lora, quant=QuantSettings(load_in_4bit=True, compute_dtype="float32",
                                                   upcast_frozen_embeddings=False, upcast_norms=False))
    assert pm4.get_input_embeddings().weight.dtype == torch.float32


def test_norms_can_stay_in_the_compute_dtype_so_activations_stay_bf16(tiny_dir):
    """quant.upcast_norms=false: PEFT's fp32 upcast of the norm weights would turn the residual stream (and every
    activation saved for backward) into fp32; with it off the norms are bf16, a decoder layer's output is bf16, LoRA
    weights stay fp32 and trainable and still get gradients; fp32 compute refuses."""
    from llmrec.llm.base import BackendError

    q = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16", upcast_frozen_embeddings=False, upcast_norms=False)
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])

    def layer_out_dtypes(pm):
        seen = []
        layer = pm.get_base_model().model.layers[0]
        h = layer.register_forward_hook(lambda mod, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        enc = tok("a short prompt", return_tensors="pt")
        pm(**enc)
        h.remove()
        return {s.dtype for s in seen}

    m, tok = load_causal_lm(tiny_dir, dtype="bfloat16", quant=q)
    pm = apply_lora(m, lora, quant=q)
    norms = [(n, p) for n, p in pm.named_parameters() if "norm" in n]
    assert norms and all(p.dtype == torch.bfloat16 for _, p in norms)
    lora_params = [(n, p) for n, p in pm.named_parameters() if "lora_" in n]
    assert all(p.dtype == torch.float32 and p.requires_grad for _, p in lora_params)
    assert layer_out_dtypes(pm) == {torch.bfloat16}
    q_emb_only = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16", upcast_frozen_embeddings=False)
    m2, _ = load_causal_lm(tiny_dir, dtype="bfloat16", quant=q_emb_only)
    pm2 = apply_lora(m2, lora, quant=q_emb_only)
    assert layer_out_dtypes(pm2) == {torch.float32}  # PEFT's default: fp32 norms, an fp32 residual stream
    pm.train()
    loss, _ = answer_only_loss(pm, batch(tok))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in lora_params)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in lora_params if "lora_B" in n)
    m3, _ = load_causal_lm(tiny_dir, dtype="bfloat16", quant=QuantSettings(load_in_4bit=True, compute_dtype="float32"))
    with pytest.raises(BackendError, match="upcast_norms=false needs a bf16/fp16 compute dtype"):
        apply_lora(m3, lora, quant=QuantSettings(load_in_4bit=True, compute_dtype="float32", upcast_norms=False))


@pytest.mark.parametrize("emb_up,norm_up", [(False, False), (False, True), (True, False)])
def test_weights_kept_out_of_the_upcast_never_get_an_fp32_copy(tiny_dir, monkeypatch, emb_up, norm_up):
    """PEFT's prepare_model_for_kbit_training casts every bf16 weight that is not 4-bit to fp32 at once; the weights
    that `quant` keeps in bf16 are hidden from it (an empty tensor while it runs), so they never exist in fp32 (for a
    3B model the embeddings' fp32 copy was a 0.6 GB transient) and come back with their values, tied ones tied."""
    import peft

    seen: dict[str, int] = {}
    real = peft.prepare_model_for_kbit_training

    def spy(model, **kw):
        seen.update({n: p.numel() for n, p in model.named_parameters()
                     if p.is_floating_point() and type(p).__name__ != "Params4bit"})
        return real(model, **kw)

    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", spy)
    q = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16", upcast_frozen_embeddings=emb_up,
                      upcast_norms=norm_up)
    m, _ = load_causal_lm(tiny_dir, dtype="bfloat16", quant=q)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if type(p).__name__ != "Params4bit"}
    pm = apply_lora(m, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj"]), quant=q)
    is_emb = lambda n: "embed_tokens" in n or "lm_head" in n  # noqa: E731
    assert seen, "PEFT's prepare_model_for_kbit_training was not called"
    hidden = {n for n, k in seen.items() if k == 0}
    assert hidden == {n for n in seen if not (emb_up if is_emb(n) else norm_up)}
    after = dict(pm.get_base_model().named_parameters())
    for n, ref in before.items():
        p = after[n]
        kept = not (emb_up if is_emb(n) else norm_up)
        assert p.dtype == (torch.bfloat16 if kept else torch.float32), n
        assert torch.equal(p.to(ref.dtype), ref), n  # values back (bf16 -> fp32 is exact)


def test_bf16_autocast_auto_follows_the_compute_dtype(monkeypatch):
    import llmrec.llm.loading as loading
    from llmrec.finetune import load_recipe
    from llmrec.finetune.trainer import use_bf16_autocast

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = RECIPES / "yesno_smollm2_qlora.yaml"
    assert load_recipe(recipe, ["train.bf16_autocast=auto"]).train.bf16_autocast == "auto"
    assert load_recipe(recipe, ["train.bf16_autocast=true"]).train.bf16_autocast is True
    with pytest.raises(ConfigError, match="bf16_autocast"):
        load_recipe(recipe, ["train.bf16_autocast=sometimes"])
    for native in (True, False):
        monkeypatch.setattr(loading, "cpu_has_fast_bf16", lambda native=native: native)
        auto = load_recipe(recipe, ["train.bf16_autocast=auto"])  # 4-bit: follows quant.compute_dtype (fast)
        assert use_bf16_autocast(auto) is native
        full = load_recipe(recipe, ["train.bf16_autocast=auto", "quant.load_in_4bit=false", "dtype=float32"])
        assert use_bf16_autocast(full) is False  # an fp32 model is never put on bf16
        assert use_bf16_autocast(load_recipe(recipe, ["train.bf16_autocast=true"])) is True
        assert use_bf16_autocast(load_recipe(recipe, ["train.bf16_autocast=false"])) is False


def test_qlora_trains_under_cpu_bf16_autocast_with_fp32_lora_weights(tiny_dir):
    """What `bf16_autocast: auto` does on a bf16 CPU: LoRA matmuls in bf16, LoRA weights (and their updates) fp32."""
    torch.manual_seed(0)
    quant = QuantSettings(load_in_4bit=True, compute_dtype="bfloat16", upcast_norms=False,
                          upcast_frozen_embeddings=False)
    m, tok = load_causal_lm(tiny_dir, dtype="bfloat16", quant=quant)
    m = apply_lora(m, LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]),
                   quant=quant)
    lora = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    opt = torch.optim.AdamW(list(lora.values()), lr=1e-2)
    b = batch(tok)
    m.train()
    losses = []
    for step in range(8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, logits = answer_only_loss(m, b)
        loss.backward()
        if step == 1:
            assert all(p.grad is not None and p.grad.dtype == torch.float32 and float(p.grad.abs().sum()) > 0
                       for p in lora.values())
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert logits.dtype == torch.bfloat16
    assert losses[-1] < 0.5 * losses[0], losses


GROUPS = [
    Example("The user watched Action Story 1 and Comedy Story 2. Next title:", ' "Action Story 3"',
            choices=[' "Action Story 3"', ' "Drama"', ' "Horror Story 4 Returns"']),
    Example("The user watched Drama Story 1. Next title:", ' "Comedy Story 2"',
            choices=[' "Comedy Story 2"', ' "Action Story 1 Part Two"', ' "Romance"']),
]


def test_listwise_groups_and_loss_match_each_row_scored_alone(tiny_dir):
    from llmrec.finetune.data import encode_group, listwise_title_loss

    m, tok = load_causal_lm(tiny_dir, dtype="float32")
    feats = [encode_group(e, tok, 64) for e in GROUPS]
    for f, e in zip(feats, GROUPS):
        p_ids = tok(e.prompt, add_special_tokens=False)["input_ids"]
        for j, (row, title) in enumerate(zip(f["group"], e.choices)):
            t_ids = tok(title, add_special_tokens=False)["input_ids"]
            assert row["input_ids"] == p_ids + t_ids + [tok.eos_token_id]
            # the listwise score reads the title's tokens, EOS excluded; the LM loss only the true title (+ EOS)
            assert row["score_labels"] == [IGNORE_INDEX] * len(p_ids) + t_ids + [IGNORE_INDEX]
            assert row["labels"] == ([IGNORE_INDEX] * len(p_ids) + t_ids + [tok.eos_token_id] if j == 0
                                     else [IGNORE_INDEX] * len(row["input_ids"]))
    b = AnswerOnlyCollator(tok.pad_token_id)(feats)
    assert b["input_ids"].shape[0] == 6 and int(b["group_size"]) == 3
    with torch.no_grad():
        loss, parts = listwise_title_loss(m, b, temperature=0.5, lm_weight=2.0)
    # reference: every row alone, no padding; mean log-prob per title token; CE over each group's scores
    scores, lm_sum, lm_n = [], 0.0, 0
    for f in feats:
        row_scores = []
        for j, row in enumerate(f["group"]):
            ids = torch.tensor([row["input_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(m(input_ids=ids).logits[0, :-1].float(), -1)
            tok_lp = lp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
            on = torch.tensor(row["score_labels"][1:]) != IGNORE_INDEX
            row_scores.append(float(tok_lp[on].mean()))
            if j == 0:
                lm_on = torch.tensor(row["labels"][1:]) != IGNORE_INDEX
                lm_sum -= float(tok_lp[lm_on].sum())
                lm_n += int(lm_on.sum())
        scores.append(row_scores)
    s = torch.tensor(scores)
    ce = float(torch.nn.functional.cross_entropy(s / 0.5, torch.zeros(2, dtype=torch.long)))
    assert abs(parts["listwise_lm"] - lm_sum / lm_n) < 1e-4 and abs(parts["listwise_loss"] - ce) < 1e-4
    assert abs(float(loss) - (2.0 * lm_sum / lm_n + ce)) < 1e-4
    assert parts["listwise_top1"] == float((s.argmax(1) == 0).float().mean())
    with pytest.raises(ValueError, match="different numbers of titles"):
        short = encode_group(Example("p", ' "a"', choices=[' "a"', ' "b"']), tok, 64)
        AnswerOnlyCollator(tok.pad_token_id)([feats[0], short])
    with pytest.raises(ValueError, match="at least one negative"):
        encode_group(Example("p", ' "a"', choices=[' "a"']), tok, 64)


def test_listwise_steps_move_the_true_titles_up(tiny_dir):
    from llmrec.finetune.data import encode_group, listwise_title_loss

    m, tok = qlora(tiny_dir)
    b = AnswerOnlyCollator(tok.pad_token_id)([encode_group(e, tok, 64) for e in GROUPS])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    seen = []
    for _ in range(8):
        loss, parts = listwise_title_loss(m, b, temperature=0.25, lm_weight=0.0)  # the listwise term alone
        loss.backward()
        assert all(p.grad is not None for n, p in m.named_parameters() if "lora_B" in n)
        opt.step()
        opt.zero_grad()
        seen.append(parts)
    assert seen[-1]["listwise_loss"] < 0.5 * seen[0]["listwise_loss"] and seen[-1]["listwise_top1"] == 1.0, seen

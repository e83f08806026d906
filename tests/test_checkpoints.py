"""Exports read back by their consumers: transformers (+compressed-tensors) for
compressed-tensors, an independent reader for GPTQ. Grid: format × sym × group size
{per channel, 32, 128} × act-order."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sotool.algos.gptq import gptq_batch
from sotool.algos.quant import QuantSpec
from sotool.checkpoints import (
    QuantLayer,
    Scheme,
    SparsityInfo,
    check_export,
    compressed_tensors_config,
    gptq_config,
    layer_patterns,
    write_checkpoint,
)
from sotool.errors import SotoolError
from sotool.inspect import inspect_dir
from sotool.stages._quant import target_layers
from tests.algos.test_formats import gptq_reader

GROUPS = [-1, 32, 128]
pytestmark = pytest.mark.filterwarnings("ignore:You passed `quantization_config`")


def tiny_llama() -> torch.nn.Module:
    """Widths 128/256 so that every group size of the grid divides them."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


def quantize(model, sym, group, act_order, bits_of=lambda name: 4, static=True):
    """GPTQ every block layer with a synthetic Hessian; the model gets the dequantized
    weights (sotool's in-memory result), the return value the codes."""
    g = torch.Generator().manual_seed(1)
    layers = {}
    for name, mod in target_layers(model).items():
        w = mod.weight.detach().float()
        x = (
            torch.randn(w.shape[1], 4 * w.shape[1], generator=g)
            * torch.linspace(0.2, 3, w.shape[1])[:, None]
        )
        h = x @ x.T / x.shape[1]
        spec = QuantSpec(bits=bits_of(name), group_size=group, sym=sym)
        res = gptq_batch(w[None], h[None], spec, act_order=act_order, static_groups=static)[0]
        with torch.no_grad():
            mod.weight.copy_(res.weight)
        layers[name] = QuantLayer(
            res.codes, res.scale, res.zero, res.g_idx, Scheme(spec.bits, group, sym)
        )
    return layers


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))


def write(model, layers, out, fmt, **kw):
    if fmt == "compressed-tensors":
        qc = compressed_tensors_config(
            model, layers, kw.pop("act_order", False), kw.pop("sp", None)
        )
    else:
        qc = gptq_config(model, layers, True, {})
    check_export(model, layers, fmt)
    return write_checkpoint(model, None, out, fmt, torch.float32, layers, qc)


def load_ct(out, sym: bool):
    """transformers' own loader. Asymmetric pack-quantized loads through the
    dequantize-on-load path: compressed-tensors 0.20's default path allocates the
    zero point unpacked and rejects the packed one every writer (and vLLM) uses."""
    if sym:
        return AutoModelForCausalLM.from_pretrained(out).eval()
    from transformers import CompressedTensorsConfig

    qc = CompressedTensorsConfig(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(out, quantization_config=qc).eval()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("sym", [True, False])
def test_grid_both_formats(sym, group, act_order, tokens, tmp_path):
    model = tiny_llama()
    layers = quantize(model, sym, group, act_order)
    with torch.no_grad():
        want = model(tokens).logits
    # compressed-tensors: transformers' from_pretrained gives the in-memory logits
    write(model, layers, tmp_path / "ct", "compressed-tensors", act_order=act_order)
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    w = cfg["config_groups"]["group_0"]["weights"]
    assert w["strategy"] == ("channel" if group == -1 else "group") and w["symmetric"] == sym
    assert cfg["ignore"] == ["lm_head"] and cfg["format"] == "pack-quantized"
    loaded = load_ct(tmp_path / "ct", sym)
    with torch.no_grad():
        got = loaded(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # gptq: the independent reader gives back the exact codes and zero points
    write(model, layers, tmp_path / "gptq", "gptq")
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, q in layers.items():
        t = {k: sd[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        codes, zeros, weight = gptq_reader(t, 4, q.codes.shape[0], v1=True)
        assert torch.equal(codes, q.codes.long()), name
        assert torch.equal(zeros.float(), q.zero), name
        mod_w = dict(model.named_modules())[name].weight
        torch.testing.assert_close(weight, mod_w.float(), rtol=2e-3, atol=1e-6)  # fp16 scales
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (4, group, sym, False)
    info = inspect_dir(tmp_path / "gptq")
    rows = [r for r in info["layers"] if r["format"] == "gptq"]
    assert len(rows) == len(layers) and all(r["group_size"] == group for r in rows)


def test_act_order_without_static_groups(tokens, tmp_path):
    model = tiny_llama()
    layers = quantize(model, True, 32, act_order=True, static=False)
    with pytest.raises(SotoolError, match="static_groups: true or use format: gptq"):
        check_export(model, layers, "compressed-tensors")
    write(model, layers, tmp_path / "g", "gptq")
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["desc_act"] is True
    info = inspect_dir(tmp_path / "g")
    assert all(r["act_order"] for r in info["layers"] if r["format"] == "gptq")


def test_mixed_precision_and_sparsity(tokens, tmp_path):
    model = tiny_llama()
    layers = quantize(model, True, 32, True, bits_of=lambda n: 3 if ".mlp." in n else 4)
    with torch.no_grad():
        want = model(tokens).logits
    sp = SparsityInfo("2:4", 0.25, [n for n in layers if ".mlp." in n])
    write(model, layers, tmp_path / "ct", "compressed-tensors", act_order=True, sp=sp)
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    assert qc["sparsity_config"]["sparsity_structure"] == "2:4"
    with torch.no_grad():
        got = load_ct(tmp_path / "ct", True)(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    write(model, layers, tmp_path / "g", "gptq")
    gq = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert gq["bits"] == 4 and {v["bits"] for v in gq["dynamic"].values()} == {3}
    for d in (tmp_path / "ct", tmp_path / "g"):
        bits = {r["layer"]: r["bits"] for r in inspect_dir(d)["layers"] if r["format"] != "dense"}
        assert bits == {n: q.scheme.bits for n, q in layers.items()}


def test_partial_group_errors_and_warnings():
    model = tiny_llama()
    layers = quantize(model, False, 96, False)  # 128 and 256 are not multiples of 96
    with pytest.raises(SotoolError) as e:
        check_export(model, layers, "compressed-tensors")
    msg = str(e.value)
    assert "\n" not in msg and "width 128" in msg and "group_size 96" in msg
    assert "model.layers.0.self_attn.q_proj" in msg and "group_size dividing" in msg
    warns = check_export(model, layers, "gptq")
    assert len(warns) == len(layers) and "vLLM" in warns[0] and "width 128" in warns[0]


def test_layer_patterns_cover_exactly():
    import re

    names = [f"m.layers.{i}.{r}" for i in range(3) for r in ("a.q", "a.k", "mlp.up")]
    chosen = [n for n in names if n.endswith("mlp.up")] + ["m.layers.1.a.q"]
    pats = layer_patterns(chosen, names)
    assert ".*\\.mlp\\.up$" in pats and len(pats) == 2
    assert {n for n in names if any(re.match(p, n) for p in pats)} == set(chosen)


def test_asymmetric_compressed_tensors_warns_about_the_loader():
    model = tiny_llama()
    warns = check_export(model, quantize(model, False, 32, False), "compressed-tensors")
    assert len(warns) == 1 and "\n" not in warns[0] and "dequantize=True" in warns[0]
    model = tiny_llama()
    assert check_export(model, quantize(model, True, 32, False), "compressed-tensors") == []

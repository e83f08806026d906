#!/usr/bin/env python3
"""Peer runner: one-shot GPTQ / SparseGPT with llm-compressor on a local model.

Run it with the python of the peer virtual environment made by setup_peer.sh:

    benchmarks/.venv-peer/bin/python benchmarks/peer/run_llmcompressor.py \
        --model MODEL_DIR --calib calib.safetensors --eval eval.safetensors \
        --method gptq --bits 4 --group-size 64 --sym --out result.json

calib/eval files hold one int64 tensor ``input_ids`` of shape [N, T].  The
calibration windows are handed to ``oneshot`` unchanged (no re-tokenizing, no
shuffling, all N windows, max_seq_length = T).  Only the ``oneshot`` call is
timed.  Perplexity is computed here, outside llm-compressor, with the shared
definition: sum of next-token NLL over all windows / (N * (T - 1)).

Everything human-readable goes to stderr; the result is the JSON file.  When
the peer refuses a configuration (or anything else fails) the JSON holds an
``error`` key with a one-line message and the process still exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
import traceback

# No hub access: everything is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

TOOL = "llm-compressor"
# Not "lm_head": SparseGPTModifier builds module names with a trailing "."
# ("lm_head."), which a plain name does not match; a regex matches both
# modifiers' naming.  With tied embeddings, pruning lm_head would also prune
# the input embeddings.
IGNORE = ["re:.*lm_head$", "re:.*lm_head\\.$"]


def log(msg: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def rss_gib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024.0 * 1024.0)


def jsonable(obj):
    """Best-effort conversion of pydantic / enum / torch values for json.dump."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and not math.isfinite(obj):
            return str(obj)
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "model_dump"):
        try:
            return jsonable(obj.model_dump())
        except Exception:
            pass
    if hasattr(obj, "value") and isinstance(obj.value, (str, int)):
        return obj.value  # enums
    return str(obj)


def one_line(exc: BaseException, limit: int = 400) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    suffix = f" [+{len(lines) - 1} more lines]" if len(lines) > 1 else ""
    msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    room = max(20, limit - len(suffix))
    if len(msg) > room:
        msg = msg[: room - 3] + "..."
    return msg + suffix


def write_json(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(jsonable(payload), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--calib", required=True, help="safetensors with input_ids [N,T]")
    p.add_argument("--eval", required=True, help="safetensors with input_ids [N,T]")
    p.add_argument("--method", required=True, choices=["gptq", "sparsegpt"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128, help="group size; -1 = per channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--mask-structure", default="0:0", help="N:M, e.g. 2:4; 0:0 = unstructured")
    p.add_argument("--dampening", type=float, default=0.01, help="dampening_frac")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument(
        "--actorder",
        default="default",
        choices=["default", "none", "weight", "static"],
        help="GPTQ activation ordering; 'default' leaves the modifier's default "
        "(static/weight in llm-compressor 0.14)",
    )
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument(
        "--baseline-ppl",
        action="store_true",
        help="also evaluate the uncompressed model first (ppl_baseline)",
    )
    p.add_argument("--threads", type=int, default=0, help="0 = number of cores")
    p.add_argument("--save-weights", default=None, help="safetensors of W_eff")
    p.add_argument("--out", required=True, help="result JSON path")
    return p.parse_args(argv)


def load_windows(path: str):
    import torch
    from safetensors.torch import load_file

    t = load_file(path)
    if "input_ids" not in t:
        raise KeyError(f"{path}: no tensor 'input_ids' (has {sorted(t)})")
    ids = t["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"{path}: input_ids must be 2-D [N,T], got {tuple(ids.shape)}")
    return ids.to(dtype=torch.int64).contiguous()


def build_modifier(args):
    if args.method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        if args.group_size == -1:
            weights = {
                "num_bits": args.bits,
                "type": "int",
                "symmetric": args.sym,
                "strategy": "channel",
            }
        else:
            weights = {
                "num_bits": args.bits,
                "type": "int",
                "symmetric": args.sym,
                "strategy": "group",
                "group_size": args.group_size,
            }
        kwargs = {
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": weights,
                    "input_activations": None,
                    "output_activations": None,
                }
            },
            "ignore": list(IGNORE),
            "dampening_frac": args.dampening,
            "block_size": args.block_size,
        }
        if args.actorder != "default":
            kwargs["actorder"] = None if args.actorder == "none" else args.actorder
        return GPTQModifier(**kwargs), kwargs

    from llmcompressor.modifiers.pruning import SparseGPTModifier

    kwargs = {
        "sparsity": args.sparsity,
        "mask_structure": args.mask_structure,
        "targets": ["Linear"],
        "ignore": list(IGNORE),
        "dampening_frac": args.dampening,
        "block_size": args.block_size,
    }
    return SparseGPTModifier(**kwargs), kwargs


_STATE_FIELDS = {
    "index",
    "group",
    "start",
    "end",
    "update",
    "initialized_",
    "finalized_",
    "started_",
    "ended_",
}


def modifier_config(modifier) -> dict:
    try:
        d = modifier.model_dump()
    except Exception:
        return {"repr": repr(modifier)}
    return {k: v for k, v in d.items() if k not in _STATE_FIELDS}


def compressed_linears(model, method: str):
    """(name, module) of the Linear modules the peer compressed."""
    import torch

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if method == "gptq":
            scheme = getattr(mod, "quantization_scheme", None)
            if scheme is None or getattr(scheme, "weights", None) is None:
                continue
        elif name.split(".")[-1] == "lm_head":
            continue
        out.append((name, mod))
    return out


def effective_weight(mod, method: str):
    """The weight the module's forward really multiplies with.

    After GPTQ, llm-compressor leaves each Linear in the FROZEN state with a
    wrapped forward that fake-quantizes ``weight`` (already holding dequantized
    GPTQ values) with ``weight_scale``/``weight_zero_point`` on every call.  We
    apply the same fake quantization here.  SparseGPT writes masked weights
    in place and adds no wrapper.
    """
    import torch

    w = mod.weight.data
    if method == "gptq":
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        status = getattr(mod, "quantization_status", None)
        enabled = getattr(mod, "quantization_enabled", True)
        if enabled and status is not None and status < QuantizationStatus.COMPRESSED:
            with torch.no_grad():
                w = forward_quantize(mod, w, "weight", mod.quantization_scheme.weights)
    return w.detach().to(torch.float32).contiguous().clone()


def fingerprint(w) -> list:
    """Cheap exact-enough identity of a big tensor, without copying it."""

    flat = w.detach().reshape(-1)
    total = 0.0
    abs_total = 0.0
    zeros = 0
    step = 1 << 20
    for i in range(0, flat.numel(), step):
        c = flat[i : i + step].double()
        total += float(c.sum())
        abs_total += float(c.abs().sum())
        zeros += int((c == 0).sum())
    return [total, abs_total, zeros, list(w.shape), str(w.dtype)]


def evaluate_ppl(model, ids, batch: int) -> float:
    import torch
    import torch.nn.functional as F

    n, t = ids.shape
    total = 0.0
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, n, batch):
            x = ids[i : i + batch]
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                x[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(nll.double())
            del logits
            log(f"eval {min(i + batch, n)}/{n} windows ({time.perf_counter() - t0:.0f}s)")
    return math.exp(total / (n * (t - 1)))


def main(argv=None) -> int:
    args = parse_args(argv)
    result: dict = {"tool": TOOL, "version": None, "method": args.method}
    warnings_seen: list[str] = []
    try:
        import torch

        threads = args.threads or len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        torch.manual_seed(0)

        import compressed_tensors
        import datasets
        import llmcompressor
        import transformers
        from loguru import logger as _loguru

        result["version"] = llmcompressor.__version__
        result["versions"] = {
            "llmcompressor": llmcompressor.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "datasets": datasets.__version__,
        }

        def _sink(message):
            rec = message.record
            if rec["level"].name in ("WARNING", "ERROR", "CRITICAL"):
                line = str(rec["message"]).strip().splitlines()
                if line and line[0] not in warnings_seen and len(warnings_seen) < 30:
                    warnings_seen.append(line[0][:300])

        _loguru.add(_sink, level="WARNING")

        from llmcompressor import oneshot
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise FileNotFoundError(f"not a model directory (no config.json): {args.model}")
        calib = load_windows(args.calib)
        evals = load_windows(args.eval)
        n_calib, seqlen = calib.shape
        result["n_calib"] = int(n_calib)
        result["seqlen"] = int(seqlen)
        result["n_eval"] = int(evals.shape[0])
        result["eval_seqlen"] = int(evals.shape[1])
        result["threads"] = threads

        modifier, requested = build_modifier(args)
        config = {
            "method": args.method,
            "modifier": type(modifier).__name__,
            "modifier_kwargs": requested,
            "modifier_config": modifier_config(modifier),
            "pipeline": "sequential",
            "num_calibration_samples": int(n_calib),
            "max_seq_length": int(seqlen),
            "shuffle_calibration_samples": False,
            "batch_size": 1,
        }
        if args.method == "gptq":
            config.update(
                bits=args.bits,
                group_size=args.group_size,
                symmetric=args.sym,
                strategy="channel" if args.group_size == -1 else "group",
                dampening_frac=args.dampening,
                block_size=args.block_size,
                actorder_requested=args.actorder,
            )
        else:
            config.update(
                sparsity=args.sparsity,
                mask_structure=args.mask_structure,
                dampening_frac=args.dampening,
                block_size=args.block_size,
            )
        result["config"] = config

        log(
            f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
            f"{threads} threads; calib {n_calib}x{seqlen}, eval {tuple(evals.shape)}"
        )
        log(f"loading {args.model}")
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model.eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except Exception as exc:  # data is pre-tokenized; oneshot only needs one
            log(f"no tokenizer in {args.model} ({one_line(exc)}); using a stub")
            tokenizer = _StubTokenizer(model.config)

        if args.baseline_ppl:
            log("evaluating baseline perplexity ...")
            result["ppl_baseline"] = evaluate_ppl(model, evals, max(1, args.eval_batch))
            log(f"baseline ppl {result['ppl_baseline']:.4f}")

        out_emb = model.get_output_embeddings()
        lm_head_before = fingerprint(out_emb.weight) if out_emb is not None else None

        ds = datasets.Dataset.from_dict(
            {
                "input_ids": calib.tolist(),
                "attention_mask": torch.ones_like(calib).tolist(),
            }
        )

        log(f"oneshot {args.method} ...")
        rss_before = rss_gib()
        t0 = time.perf_counter()
        model = oneshot(
            model=model,
            processor=tokenizer,
            dataset=ds,
            recipe=[modifier],
            num_calibration_samples=int(n_calib),
            max_seq_length=int(seqlen),
            shuffle_calibration_samples=False,
            batch_size=1,
            pipeline="sequential",
        )
        oneshot_s = time.perf_counter() - t0
        result["oneshot_s"] = round(oneshot_s, 3)
        result["peak_rss_oneshot_gib"] = round(rss_gib(), 4)
        result["rss_before_oneshot_gib"] = round(rss_before, 4)
        log(f"oneshot done in {oneshot_s:.1f}s, peak RSS {rss_gib():.2f} GiB")

        mods = compressed_linears(model, args.method)
        result["n_compressed_linears"] = len(mods)
        if args.method == "gptq" and mods:
            scheme = mods[0][1].quantization_scheme
            config["resolved_weight_args"] = jsonable(scheme.weights)
            config["quantization_status"] = jsonable(
                getattr(mods[0][1], "quantization_status", None)
            )
        if lm_head_before is not None:
            after = fingerprint(model.get_output_embeddings().weight)
            result["lm_head_unchanged"] = after == lm_head_before

        log("evaluating perplexity ...")
        t1 = time.perf_counter()
        result["ppl"] = evaluate_ppl(model, evals, max(1, args.eval_batch))
        result["eval_s"] = round(time.perf_counter() - t1, 3)
        # Peak of the benchmark proper (load + oneshot + eval); what follows is
        # bookkeeping for the JSON / --save-weights and is not counted.
        result["peak_rss_gib"] = round(rss_gib(), 4)
        log(
            f"ppl {result['ppl']:.4f}, eval {result['eval_s']:.0f}s, "
            f"peak RSS {result['peak_rss_gib']:.2f} GiB"
        )

        # Effective weights, sparsity, and a check that they are what forward uses.
        max_diff = 0.0
        param_diff = 0.0
        zeros = 0
        numel = 0
        saved = {}
        for name, mod in mods:
            w = effective_weight(mod, args.method)
            zeros += int((w == 0).sum())
            numel += w.numel()
            x = torch.randn(2, w.shape[1], generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = mod(x)
                mine = torch.nn.functional.linear(x, w, mod.bias)
            max_diff = max(max_diff, float((ref - mine).abs().max()))
            param_diff = max(param_diff, float((mod.weight.data.float() - w).abs().max()))
            if args.save_weights:
                saved[f"{name}.weight"] = w
        result["compressed_zero_fraction"] = zeros / numel if numel else None
        result["weff_forward_max_abs_diff"] = max_diff
        # 0.0 means the stored `weight` parameter already holds the dequantized
        # values (the forward's fake quantization is then a no-op).
        result["weight_param_vs_weff_max_abs_diff"] = param_diff
        if args.save_weights:
            from safetensors.torch import save_file

            os.makedirs(os.path.dirname(os.path.abspath(args.save_weights)), exist_ok=True)
            save_file(saved, args.save_weights, metadata={"tool": TOOL})
            result["saved_weights"] = os.path.abspath(args.save_weights)
            result["n_saved_weights"] = len(saved)
            log(f"saved {len(saved)} effective weights to {args.save_weights}")
        del saved

        result["warnings"] = warnings_seen
        write_json(args.out, result)
        log(f"wrote {args.out}")
        return 0
    except Exception as exc:  # refusal or failure: a row that says so
        traceback.print_exc(file=sys.stderr)
        result["error"] = one_line(exc)
        result.setdefault("peak_rss_gib", round(rss_gib(), 4))
        if warnings_seen:
            result["warnings"] = warnings_seen
        try:
            write_json(args.out, result)
        except Exception:
            write_json(args.out, {"error": one_line(exc)})
        log(f"FAILED: {result['error']}; wrote {args.out}")
        return 0


class _StubTokenizer:
    """Stand-in when the model directory has no tokenizer.

    The calibration set is already tokenized, so llm-compressor never calls it
    (it only insists that a processor be present).
    """

    def __init__(self, config):
        self.pad_token_id = getattr(config, "pad_token_id", None)
        self.eos_token_id = getattr(config, "eos_token_id", None)
        self.pad_token = None
        self.eos_token = None

    def save_pretrained(self, *a, **k):
        return None


if __name__ == "__main__":
    # Keep stdout clean: anything a library prints goes to stderr.
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.exit(main())

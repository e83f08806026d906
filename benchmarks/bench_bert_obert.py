"""oBERT block pruning end to end on a BERT-base-sized encoder built from a config.

No hub access here, so the encoder is transformers' `BertConfig()` (12 layers, hidden
768; 98M parameters with its smaller vocabulary) with seeded random weights, and a
WordPiece tokenizer (BERT's normaliser, pre-tokenizer and special tokens) trained on the
first 80% of
../shared/data/wikitext-2/valid.txt, which also gives the calibration windows (the
fidelity windows come from its last 20%). What this measures is the machinery at full BERT
size (fisher stage gradients on disk, block-Fisher OBS on 72 Linear layers, export,
zeros in the exported checkpoint), with time and peak memory, and oBERT's Fisher
objective against magnitude pruning at the same pattern; the fidelity numbers of a
random-weight encoder say nothing about a trained one.

    python benchmarks/bench_bert_obert.py                   # about 10 minutes on 2 cores
    python benchmarks/bench_bert_obert.py --samples 8 --seqlen 64
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"

RECIPE = """\
model: {model}
seed: 0
calibration: {{source: {wiki}, span: [0.0, 0.8], samples: {samples}, seqlen: {seqlen}}}
stages:
  - calibrate: {{}}
  - fisher: {{samples: {samples}}}
  - prune: {{method: obert, sparsity: 0.5, pattern: block4, fisher_block: 32}}
  - evaluate: {{data: {wiki}, span: [0.8, 1.0], windows: 8, seqlen: {seqlen}}}
  - export: {{format: dense}}
"""


def tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    text = WIKI.read_text(encoding="utf-8")
    train = text[: int(len(text) * 0.8)].splitlines()
    trainer = trainers.WordPieceTrainer(vocab_size=30522, special_tokens=special)
    tok.train_from_iterator(train, trainer)
    fast = BertTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(out)
    return len(fast)


def build(out: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    if (out / "config.json").exists():
        return out
    vocab = tokenizer(out)  # WikiText-2 validation yields about 16k WordPieces
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=vocab))
    model.save_pretrained(out)
    return out


def check_zeros(run: Path) -> dict:
    """The exported weights are zero exactly where the prune stage's masks say."""
    import torch
    from transformers import AutoModelForMaskedLM

    from sotool.tensorio import load_shards

    model = AutoModelForMaskedLM.from_pretrained(run / "model")
    masks = load_shards(next((run / "stages").glob("prune-*")), "masks")
    params = dict(model.named_parameters())
    bad, total, zeros = [], 0, 0
    for name, m in masks.items():
        key = name if f"{name}.weight" in params else name.split(".", 1)[1]
        w = params[f"{key}.weight"]
        if not torch.equal(w == 0, m.bool()):
            bad.append(name)
        total += m.numel()
        zeros += int(m.sum())
    return {"layers": len(masks), "mismatched_layers": bad, "sparsity": zeros / total}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/bert-obert")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build(out / "bert-base")
    recipe = out / "recipe.yaml"
    recipe.write_text(
        RECIPE.format(model=model, wiki=WIKI, samples=args.samples, seqlen=args.seqlen)
    )
    run = out / "run"
    cmd = [sys.executable, "-m", "sotool.cli", "compress", str(recipe), "-o", str(run), "--json"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    wall = time.perf_counter() - t0
    res = json.loads(p.stdout.strip().splitlines()[-1])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    stages = {s["name"]: s for s in res["stages"]}
    summary = {
        "wall_s": wall,
        "peak_rss_gib": rss,
        "stage_s": {k: v["seconds"] for k, v in stages.items()},
        "prune": stages["prune"]["summary"],
        "evaluate": stages["evaluate"]["summary"],
        "export_check": check_zeros(run),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

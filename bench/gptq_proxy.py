"""Proxy error of RTN vs GPTQ (with and without act order) on real SmolLM2 layers with real calibration data.

    OMP_NUM_THREADS=1 python -m bench.gptq_proxy --layer 3 --bits 2 3 4 --n-seq 8 --seq-len 256

Prints one line per (module, bits): proxy error ``tr(E H Eᵀ)/tr(W H Wᵀ)`` with the raw ``H = E[x xᵀ]`` of the layer
input, in sample (H of the calibration windows, ``load_calibration("wiki", …)``, the first 80 % of the Wikipedia
articles, which GPTQ also uses) and held out (H of as many windows of the evaluation text, the last 20 %).
SmolLM2's linears sit on a Q4_1 grid (4-bit, group 32): results at ≥ 4 bits re-quantize an already 4-bit model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from codec import assets
from codec.calibration import draw_windows, load_calibration, tokenize_text
from codec.gptq import gptq_quantize, rtn_quantize
from codec.hessian import collect_hessians, proxy_error

PROJECTIONS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--n-seq", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--modules", nargs="+", default=list(PROJECTIONS))
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    cal = load_calibration("wiki", tokenizer, n_seq=args.n_seq, seq_len=args.seq_len, seed=args.seed)
    layer = model.model.layers[args.layer]
    mods = {name: layer.get_submodule(name) for name in args.modules}
    accs = collect_hessians(model, cal.input_ids, mods, stop_after=layer)
    held_ids, _ = draw_windows(tokenize_text(assets.eval_text(), tokenizer), args.n_seq, args.seq_len, args.seed)
    held = collect_hessians(model, held_ids, mods, stop_after=layer)
    print(f"# SmolLM2 layers[{args.layer}], {cal.n_tokens} calibration tokens (wiki sha256 {cal.sha256[:12]}, "
          f"seed {cal.seed}), group {args.group}")
    for name, mod in mods.items():
        w, h, h_held = mod.weight.detach(), accs[name].hessian(), held[name].hessian()
        for bits in args.bits:
            t0 = time.perf_counter()
            deq = {"rtn": rtn_quantize(w, bits, args.group).dequantize(),
                   "gptq": gptq_quantize(w, h, bits, args.group, damp=args.damp).dequantize(),
                   "gptq_act": gptq_quantize(w, h, bits, args.group, act_order=True, damp=args.damp).dequantize()}
            seconds = round(time.perf_counter() - t0, 2)
            cal_err = {k: proxy_error(w, v, h) for k, v in deq.items()}
            held_err = {k: proxy_error(w, v, h_held) for k, v in deq.items()}
            row = {"layer": args.layer, "module": name, "shape": list(w.shape), "bits": bits, "damp": args.damp,
                   "calibration": cal_err, "held_out": held_err, "seconds": seconds}
            if args.json:
                print(json.dumps(row))
                continue
            for label, err in (("calib", cal_err), ("held ", held_err)):
                print(f"{name:18s} {tuple(w.shape)!s:12s} {bits} bits {label}: RTN {err['rtn']:.5f}  "
                      f"GPTQ {err['gptq']:.5f} ({err['gptq'] / err['rtn']:.3f}x)  "
                      f"act-order {err['gptq_act']:.5f} ({err['gptq_act'] / err['rtn']:.3f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

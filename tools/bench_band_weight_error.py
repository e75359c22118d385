#!/usr/bin/env python3
"""Does per-band W_Q/W_K scaling change how much 4-bit quantization damages those rows?

For each quantization (default Q4_0 and Q4_K_M) and each band-scale setting, the model is converted
twice with the same band scales: unquantized (F32) and quantized by llama.cpp. The relative weight
error ||W_quant - W_f32|| / ||W_f32|| is then measured per band over every layer's W_Q and W_K rows.
Q4_0 and the K-quants scale each block of 32/256 weights *within a row*, so multiplying whole rows
by a constant should leave their relative error almost unchanged; this measures how far that holds.
Writes tools/results/band_weight_error.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchlib import RESULTS

SETTINGS = {  # label -> (band scales, symmetric)
    "unscaled": (None, True),
    "symmetric 1.25 on every band": ((1.25, 1.25, 1.25, 1.25), True),
    "symmetric 0.8/1.25 alternating": ((0.8, 1.25, 0.8, 1.25), True),
    "non-symmetric 1.25 on the ramp bands": ((1.0, 1.25, 1.25, 1.0), False),
}


def band_errors(f32: Path, quant: Path, pair_band: np.ndarray, n_bands: int) -> dict:
    import gguf

    ref = {t.name: t for t in gguf.GGUFReader(f32).tensors}
    num = np.zeros(n_bands)
    den = np.zeros(n_bands)
    for t in gguf.GGUFReader(quant).tensors:
        if not t.name.endswith(("attn_q.weight", "attn_k.weight")):
            continue
        w = np.asarray(ref[t.name].data, dtype=np.float32).reshape(-1, ref[t.name].shape[0])
        q = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        rows = w.shape[0]
        head_dim = 2 * len(pair_band)
        band_of_row = np.tile(np.repeat(pair_band, 2), rows // head_dim)  # llama.cpp layout: rows 2k, 2k+1
        err = np.sum((q - w) ** 2, axis=1)
        ref_sq = np.sum(w**2, axis=1)
        np.add.at(num, band_of_row, err)
        np.add.at(den, band_of_row, ref_sq)
    return {"relative_error_per_band": list(np.sqrt(num / den)), "relative_error_all": float(np.sqrt(num.sum() / den.sum()))}


def main() -> None:
    from qroar_gguf.arch.families import checkpoint_hparams
    from qroar_gguf.convert import ConvertOptions, convert
    from qroar_gguf.rope.bands import pair_bands
    from qroar_gguf.rope.plans import RopeFacts
    from qroar_gguf.rope.spec import BandSpec, PlanSpec

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--qtype", nargs="+", default=["Q4_0", "Q4_K_M"])
    parser.add_argument("--ctx", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=RESULTS / "band_weight_error.json")
    args = parser.parse_args()
    if args.model is None:
        from qroar_gguf.assets.smollm2 import default_model_dir

        args.model = default_model_dir(progress=False)
    hp = checkpoint_hparams(args.model)
    facts = RopeFacts(n_rot=hp.n_rot, theta=hp.rope_theta, trained_ctx=hp.context_length, target_ctx=args.ctx)
    n_bands = 4
    pair_band = pair_bands(facts, n_bands)

    results = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for label, (scales, symmetric) in SETTINGS.items():
            plan = PlanSpec("yarn", bands=BandSpec(count=n_bands, scales=scales, symmetric=symmetric))
            common = dict(plan=plan, target_ctx=args.ctx, progress=False)
            f32 = Path(tmp) / "f32.gguf"
            convert(args.model, f32, ConvertOptions(qtype="F32", force=True, **common))
            for qtype in args.qtype:
                quant = Path(tmp) / f"{qtype}.gguf"
                convert(args.model, quant, ConvertOptions(qtype=qtype, force=True, **common))
                row = {"setting": label, "band_scales": scales, "symmetric": symmetric, "qtype": qtype,
                       **band_errors(f32, quant, pair_band, n_bands)}
                results.append(row)
                print(json.dumps(row), file=sys.stderr)
    out = {"benchmark": __doc__.splitlines()[0], "model": args.model.name, "plan": "yarn", "ctx": args.ctx,
           "bands": n_bands, "band_of_pair": [int(b) for b in pair_band], "seconds": time.monotonic() - t0,
           "rows": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""`inspect`'s text: the summary `summary.read_summary` makes, as lines for a terminal.

Every string that came from the file is made printable first (control characters escaped): a file's
keys are shown, never obeyed by the terminal.
"""

from __future__ import annotations

import json

from qroar_gguf.display import printable_all


def render_summary(summary: dict) -> list[str]:
    """The summary as `inspect` prints it (without --json), line by line."""
    out: list[str] = []
    summary = printable_all(summary)  # the file's strings, shown and never obeyed by the terminal
    out.append(f"{summary['file']}: {summary['architecture']} '{summary['name']}', {summary['file_type']}, "
               f"{summary['n_tensors']} tensors {summary['tensor_types']}")
    out.append(f"context length {summary['context_length']}, rope base {summary['rope_freq_base']}, "
               f"{summary['rope_dimension_count']} rotary dims")
    out.append(f"context shift: {summary['context_shift']['summary']}")
    factors = summary["rope_freqs"]
    if factors is None:
        scaling = summary["rope_scaling"]
        if scaling["type"] in (None, "none"):
            out.append("no rope_freqs.weight: positions are not rescaled by the file")
        else:
            out.append(f"no rope_freqs.weight: llama.cpp's rope keys rescale positions ({scaling['type']} x"
                       f"{_g(scaling['factor'])}" + (f" over {scaling['original_context_length']} tokens"
                                                    if scaling["original_context_length"] else "") + ")")
    else:
        out.append(f"{summary.get('rope_freqs_tensor') or 'rope_freqs.weight'} ({summary['rope_freqs_type']}, "
                   f"{len(factors)} pairs): "
                   + " ".join(_g(v, 3) for v in factors))
    if summary["bands"]:
        out.append("band                                            pairs   rotations      S/mean   "
                   "factors       pressure")
        for b in summary["bands"]:
            z = "   -  " if b["sensitivity_z_mean"] is None else _g(b["sensitivity_z_mean"], spec="6.3f")
            out.append(f"{b['label']:<46} {b['pairs'][0]:>2}-{b['pairs'][1]:<2}  "
                       f"{_g(b['rotations'][0], spec='8.3g')}-{_g(b['rotations'][1], spec='<8.3g')} {z}   "
                       f"{_g(b['factor_min'], spec='5.3g')}-{_g(b['factor_max'], spec='<5.3g')}   "
                       f"{_g(b['pressure'], spec='.3f')}")
    if summary["qroar_malformed"]:  # left out of what follows: a file's qroar.* keys are not trusted
        out.append(f"qroar.* keys not shown, malformed: {', '.join(summary['qroar_malformed'])}")
    prov = summary["qroar"]
    if prov is None:
        out.append("not made by qroar-gguf (no qroar.* keys)")
        return out
    params = {k: v for k, v in (prov.get("params") or {}).items() if k not in ("sensitivity", "base_params")}
    out.append(f"made by qroar-gguf {prov.get('version')}: method {prov.get('method')} "
               f"{json.dumps(params)}, context {prov.get('trained_context')} -> "
               f"{prov.get('target_context')}, attention scale folded {_g(prov.get('attention_scale_folded'))}, "
               + ("" if prov.get("attention_factor") is None
                  else f"attention scale as rope.scaling.attn_factor {_g(prov['attention_factor'])}, ")
               + f"source {prov.get('source')}")
    if prov.get("bands") is not None:
        starts = prov["bands"]
        out.append(f"bands (pairs {', '.join(f'{a}-{b - 1}' for a, b in zip(starts, starts[1:]))}): factors x"
                   + ",".join(_g(v) for v in prov.get("band_factors") or []) + ", W_Q/W_K scales "
                   + ",".join(_g(v) for v in prov.get("band_scales") or [])
                   + (" (symmetric: W_K divided)" if prov.get("band_symmetric") else " (non-symmetric)"))
    if prov.get("search") is not None:
        s = prov["search"]
        moved = (f"ppl {_g(s.get('start_ppl'), 6)} -> {_g(s.get('ppl'), 6)}" if s.get("objective") == "ppl"
                 else f"KLD {_g(s.get('start'), 6)} -> {_g(s.get('reached'), 6)}")
        out.append(f"searched: {moved} in {s.get('evaluations')} of "
                   f"{s.get('budget')} candidates on dev text {str(s.get('dev_text_sha256'))[:12]} "
                   f"({s.get('dev_text_tokens')} tokens, ctx {s.get('dev_ctx')})")
    return out


def _g(value, digits: int = 4, spec: str | None = None) -> str:
    """A number as inspect shows it (``spec``, else ``digits`` significant); whatever a file put there
    instead, as it is."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec or f".{digits}g")
    return str(value)

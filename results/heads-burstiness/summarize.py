"""Summarise trainer analyze output: per analysed step, the top induction and previous-token heads, and the
head whose ablation costs the most ICL.   python results/heads-burstiness/summarize.py results/burstiness/runs/p_bursty-{0.9,0}/seed-* (run folders holding analysis.jsonl)"""
import json, sys
import numpy as np
for run in sys.argv[1:]:
    l = [json.loads(x) for x in open(f'{run}/analysis.jsonl')]
    label = run.rstrip('/').split('runs/')[-1]  # e.g. p_bursty-0.9/seed-0
    for r in l:
        ind = np.array(r['induction']); pt = np.array(r['prev_token'])
        li, hi = np.unravel_index(ind.argmax(), ind.shape)
        lp, hp = np.unravel_index(pt.argmax(), pt.shape)
        line = (f"{label} step {r['step']}: ICL {r['accuracy_closed']:.3f}; induction max L{li}H{hi} {ind.max():+.3f}, "
                f"layer means {np.round(ind.mean(1),3).tolist()}; prev-token max L{lp}H{hp} {pt.max():+.3f} layer means {np.round(pt.mean(1),3).tolist()}")
        print(line)
        ab = r.get('ablation')
        if ab:
            for kind, grids in ab.items():
                acc = np.array(grids['accuracy_closed'])
                l2, h2 = np.unravel_index(acc.argmin(), acc.shape)
                print(f"   ablate {kind}: lowest ICL {acc.min():.3f} at L{l2}H{h2}; induction-max head -> {acc[li,hi]:.3f}; per layer min {np.round(acc.min(1),3).tolist()}")
        joint = r.get('joint_ablation')
        if joint:
            heads = '+'.join(f"L{l}H{h}" for l, h in joint['heads'])
            print(f"   joint ablation of the top {len(joint['heads'])} {joint['by']} heads {heads}: "
                  + "; ".join(f"{kind} ICL {joint[kind]['accuracy_closed']:.3f}" for kind in ('mean', 'zero') if kind in joint))

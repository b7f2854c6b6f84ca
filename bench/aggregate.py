#!/usr/bin/env python3
"""Median over the recorded runs (bench/results-*-run*.json) per row; writes
bench/results-cpu.json, bench/results-peers.json and the markdown tables used in
bench/RESULTS.md."""
import json, statistics, glob
def load(pat):
    runs=[json.load(open(f)) for f in sorted(glob.glob(pat))]
    return runs
def key(r): return (r['impl'], r['op'], r['shape'], r['dtype'])
def med(runs):
    d={}
    for run in runs:
        for r in run:
            d.setdefault(key(r), []).append(r)
    out={}
    for k, rs in d.items():
        m=dict(rs[0])
        m['median_s']=statistics.median(r['median_s'] for r in rs)
        m['gbps']=statistics.median(r['gbps'] for r in rs)
        for k2 in ['copy_gbps','ratio','ratio_paired','copy_paired_gbps','copy_nt_gbps','ratio_nt','floor_gbps','ratio_floor']:
            if all(k2 in r for r in rs):
                m[k2]=statistics.median(r[k2] for r in rs)
        m['runs']=len(rs)
        out[k]=m
    return out
ours=med(load('bench/results-cpu-run*.json'))
peers=med(load('bench/results-peers-run*.json'))
json.dump(list(ours.values()), open('bench/results-cpu.json','w'), indent=1)
json.dump(list(peers.values()), open('bench/results-peers.json','w'), indent=1)
lines=["| shape | dtype | op | bnorm ms | bnorm GB/s | copy GB/s | ratio | paired ratio | NT-copy ratio | of floor | PyTorch ms | TensorFlow ms | candle-nn ms | vs PyTorch | vs TF | vs candle-nn |",
       "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
for shape in ["S1","S2","S3","S4","S5"]:
    for dtype in ["f32","bf16"]:
        for op in ["train_fwd","infer_fwd","backward"]:
            b=ours.get(('bnorm',op,shape,dtype))
            if not b: continue
            p=peers.get(('pytorch',op,shape,dtype)); t=peers.get(('tensorflow',op,shape,dtype)); c=ours.get(('candle-nn',op,shape,dtype))
            f=lambda r: f"{r['median_s']*1e3:.2f}" if r else "—"
            vs=lambda r: f"{r['median_s']/b['median_s']:.2f}×" if r else "—"
            g=lambda k2: f"{b[k2]:.2f}" if k2 in b else "—"
            lines.append(f"| {shape} {b['layout']} | {dtype} | {op} | {b['median_s']*1e3:.2f} | {b['gbps']:.1f} | {b['copy_gbps']:.1f} | {b['ratio']:.2f} | {g('ratio_paired')} | {g('ratio_nt')} | {g('ratio_floor')} | {f(p)} | {f(t)} | {f(c)} | {vs(p)} | {vs(t)} | {vs(c)} |")
open('bench/table.md','w').write("\n".join(lines)+"\n")
fused=["| shape | dtype | op | ms | GB/s | copy GB/s | ratio |","| --- | --- | --- | --- | --- | --- | --- |"]
for shape in ["S1","S2","S3","S4","S5"]:
    for dtype in ["f32","bf16"]:
        for op in ["train_fwd_relu","train_fwd_add_relu","backward_relu","backward_add_relu","train_fwd"]:
            impl = 'bnorm-alloc' if op=='train_fwd' else 'bnorm'
            b=ours.get((impl,op,shape,dtype))
            if not b: continue
            name = op if impl=='bnorm' else 'train_fwd (allocating tier)'
            fused.append(f"| {shape} | {dtype} | {name} | {b['median_s']*1e3:.2f} | {b['gbps']:.1f} | {b['copy_gbps']:.1f} | {b['ratio']:.2f} |")
open('bench/table-fused.md','w').write("\n".join(fused)+"\n")
print("\n".join(lines))

# Huge-page buffers (one `bnorm bench --huge-pages --no-candle` run, one PyTorch run with
# THP_MEM_ALLOC_ENABLE=1), beside the medians of the ordinary runs.
import os
if os.path.exists('bench/results-cpu-huge.json'):
    huge={key(r): r for r in json.load(open('bench/results-cpu-huge.json'))}
    thp={key(r): r for r in json.load(open('bench/results-peers-thp.json'))} if os.path.exists('bench/results-peers-thp.json') else {}
    hl=["| shape | op | bnorm ms (vec!) | ratio | bnorm ms (huge pages) | copy GB/s (huge) | ratio (huge) | PyTorch ms | PyTorch ms (THP) | vs PyTorch (both huge) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape in ["S1","S2","S3","S4","S5"]:
        for op in ["train_fwd","infer_fwd","backward"]:
            b=ours.get(('bnorm',op,shape,'f32')); h=huge.get(('bnorm',op,shape,'f32'))
            if not (b and h): continue
            p=peers.get(('pytorch',op,shape,'f32')); t=thp.get(('pytorch',op,shape,'f32'))
            f=lambda r: f"{r['median_s']*1e3:.2f}" if r else "—"
            vs=f"{t['median_s']/h['median_s']:.2f}×" if t else "—"
            hl.append(f"| {shape} | {op} | {b['median_s']*1e3:.2f} | {b['ratio']:.2f} | {h['median_s']*1e3:.2f} | {h['copy_gbps']:.1f} | {h['ratio']:.2f} | {f(p)} | {f(t)} | {vs} |")
    open('bench/table-huge.md','w').write("\n".join(hl)+"\n")
    print("\n".join(hl))

"""Renders benchmarks/results/*.json into the tables of benchmarks/README.md and a plot.

    python -m benchmarks.report          (after `pytest benchmarks/` or a GPU check)
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _fmt(x, spec=".0f"):
    return "-" if x is None else format(x, spec)


def _base(case, name, key):
    return case.get("baselines", {}).get(name, {}).get(key)


def contrastive_table(doc) -> list[str]:
    rows = [c for c in doc["cases"] if c.get("op") == "contrastive_loss"]
    if not rows:
        return []
    out = [
        "| B | D | fitclip ms | open_clip ms (x) | torch ms (x) | torch.compile ms (x) | fitclip extra MB | open_clip / torch / compile extra MB | rel. err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(rows, key=lambda c: c["B"]):
        cells = []
        for n in ("open_clip", "torch", "torch_compile"):
            ms, sp = _base(c, n, "median_ms"), _base(c, n, "speedup")
            err = _base(c, n, "error")
            single = "*" if _base(c, n, "note") else ""
            cells.append(f"{_fmt(ms)}{single} ({_fmt(sp, '.2f')}x)" if ms else (err or "-"))
        mems = " / ".join(_fmt(_base(c, n, "peak_extra_mb")) for n in ("open_clip", "torch", "torch_compile"))
        out.append(f"| {c['B']} | {c['D']} | {_fmt(c.get('median_ms'))} | {cells[0]} | {cells[1]} | {cells[2]} | "
                   f"{_fmt(c.get('peak_mb'))} | {mems} | {_fmt(c.get('rel_err'), '.1e')} |")
    return out


def frames_table(doc) -> list[str]:
    rows = [c for c in doc["cases"] if c.get("op") in ("topk_frame_similarity", "video_contrastive_loss", "select_frames")]
    if not rows:
        return []
    out = ["| op | C x V x T x D, k | fitclip ms | torch ms | speedup | fitclip extra MB | torch extra MB |",
           "|---|---|---|---|---|---|---|"]
    for c in rows:
        shape = f"{c.get('C', c.get('B'))} x {c.get('V', c.get('B'))} x {c['T']} x {c['D']}, k={c['k']}"
        out.append(f"| {c['op']} | {shape} | {_fmt(c.get('median_ms'))} | {_fmt(_base(c, 'torch', 'median_ms'))} | "
                   f"{_fmt(_base(c, 'torch', 'speedup'), '.2f')}x | {_fmt(c.get('peak_mb'))} | "
                   f"{_fmt(_base(c, 'torch', 'peak_extra_mb') or _base(c, 'torch', 'peak_mb'))} |")
    return out


def distill_table(doc) -> list[str]:
    rows = [c for c in doc["cases"] if c.get("op") == "distillation_loss" and c.get("median_ms")]
    if not rows:
        return []
    out = ["| B | D | fitclip ms | torch ms (x) | torch.compile ms (x) | fitclip extra MB | torch / compile extra MB | rel. err |",
           "|---|---|---|---|---|---|---|---|"]
    for c in sorted(rows, key=lambda c: c["B"]):
        cells = [f"{_fmt(_base(c, n, 'median_ms'))} ({_fmt(_base(c, n, 'speedup'), '.2f')}x)" for n in ("torch", "torch_compile")]
        mems = " / ".join(_fmt(_base(c, n, "peak_extra_mb")) for n in ("torch", "torch_compile"))
        out.append(f"| {c['B']} | {c['D']} | {_fmt(c.get('median_ms'))} | {cells[0]} | {cells[1]} | "
                   f"{_fmt(c.get('peak_mb'))} | {mems} | {_fmt(c.get('rel_err'), '.1e')} |")
    return out


def gpu_tables(doc) -> list[str]:
    """The GPU check's results (benchmarks/gpu_check.py): ceilings, the fused InfoNCE against its
    floor and baselines, the autotune sweep, the large-index check, the frame and distillation ops."""
    if "ceilings" not in doc:
        return []
    ceil = doc["ceilings"]
    out = [f"Measured ceilings: bf16 matmul {_fmt(ceil.get('bf16_matmul_tflops'))} TFLOP/s, "
           f"copy {_fmt(ceil.get('copy_gbps'))} GB/s (read + write).", ""]
    corr = doc.get("correctness", [])
    bad = [c for c in corr if not c.get("ok")]
    out += [f"Correctness against float64 on the device: {len(corr) - len(bad)}/{len(corr)} checks within the "
            "tolerance rule" + (" (failures: " + "; ".join(json.dumps(c) for c in bad[:5]) + ")" if bad else "") + ".", ""]
    rows = sorted((c for c in doc["cases"] if c.get("op") == "contrastive_loss"), key=lambda c: (c["D"], c["B"]))
    if rows:
        out += ["### contrastive_loss, forward + backward", "",
                "| B | D | dtype | fitclip ms | forward ms | floor ms (fraction) | open_clip ms (x) | inf_cl ms (x) | "
                "torch ms (x) | torch.compile ms (x) | peak MB | rel. err |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in rows:
            if c.get("skipped") or c.get("error"):
                out.append(f"| {c['B']} | {c['D']} | {c.get('dtype', '-')} | {c.get('skipped') or c.get('error')} "
                           "| | | | | | | | |")
                continue
            cells = []
            for n in ("open_clip", "inf_cl", "torch", "torch_compile"):
                ms, sp, err = _base(c, n, "median_ms"), _base(c, n, "speedup"), _base(c, n, "error")
                cells.append(f"{_fmt(ms, '.2f')} ({_fmt(sp, '.2f')}x)" if ms else (err or "-"))
            out.append(f"| {c['B']} | {c['D']} | {c['dtype']} | {_fmt(c.get('median_ms'), '.2f')} | "
                       f"{_fmt(c.get('forward_ms'), '.2f')} | {_fmt(c.get('floor_ms'), '.2f')} "
                       f"({_fmt(c.get('fraction_of_floor'), '.2f')}) | " + " | ".join(cells) +
                       f" | {_fmt(c.get('peak_mb'))} | {_fmt(c.get('rel_err'), '.1e')} |")
        out.append("")
    for c in doc["cases"]:
        if str(c.get("op", "")).endswith(" autotune") and c.get("kernels"):
            shape = ", ".join(f"{k}={c[k]}" for k in ("B", "C", "V", "T", "D", "k") if k in c)
            out += [f"Autotune of {c['op'][:-len(' autotune')]} at {shape}: default {_fmt(c.get('default_ms'), '.2f')} "
                    f"ms, tuned {_fmt(c.get('tuned_ms'), '.2f')} ms.", ""]
            for k in c["kernels"]:
                timings = ", ".join(f"{cfg.split(', num_ctas')[0]}: {_fmt(ms, '.3f')} ms"
                                    for cfg, ms in (k.get("timings_ms") or {}).items())
                out.append(f"- {k['kernel']}: " + (timings or f"best {k['best'].split(', num_ctas')[0]}"))
            out.append("")
        if c.get("op") == "infonce large index":
            out += [f"infonce with {c['keys_numel']:,} key elements (int32 offsets end at 2,147,483,647): "
                    + (f"relative errors {json.dumps(c.get('rel_err'))}" if c.get("rel_err") else c.get("error", "-"))
                    + ".", ""]
    t = frames_table(doc)
    if t:
        out += ["### frame ops", ""] + t + [""]
    t = distill_table(doc)
    if t:
        out += ["### distillation_loss, forward + backward", ""] + t + [""]
    t = sigmoid_table(doc)
    if t:
        out += ["### sigmoid_loss (SigLIP), forward + backward", ""] + t + [""]
    t = peers_table(doc)
    if t:
        out += ["### the fused peers, same process, same inputs", ""] + t + [""]
    t = model_table(doc)
    if t:
        out += ["### the per-launch model (kernels.model) against the measurement", ""] + t + [""]
    return out


def model_table(doc) -> list[str]:
    """Every timed case that carries the model's estimate: measured over modelled time (above 1:
    slower than the model says; the model's fractions are then too high for that shape)."""
    rows = [c for c in doc.get("cases", []) if c.get("model_ms") and c.get("median_ms")]
    if not rows:
        return []
    out = ["| op | B | D | measured ms | model ms | measured / model |", "|---|---|---|---|---|---|"]
    for c in rows:
        out.append(f"| {c['op']} | {c['B']} | {c['D']} | {_fmt(c['median_ms'], '.2f')} | {_fmt(c['model_ms'], '.2f')} "
                   f"| {_fmt(c['median_ms'] / c['model_ms'], '.2f')} |")
    return out


PEERS = ("open_clip", "inf_cl", "memeff", "siglip_kernel", "siglip_kernel_chunked_bf16")


def peers_table(doc) -> list[str]:
    """The GPU check's peers: agreement with float64 (or why one did not run), then each timed
    case's peer times beside ours (ms, our speedup over it, peak MB)."""
    peers = doc.get("peers") or {}
    if not peers:
        return []
    out = ["| peer | status | rel. err loss / d_image / d_text | ours |", "|---|---|---|---|"]
    for key, rec in peers.items():
        if rec.get("status") == "run":
            e, o = rec.get("rel_err", {}), rec.get("ours_rel_err", {})
            fmt = lambda d: " / ".join(_fmt(d.get(k), ".1e") for k in ("loss", "d_image", "d_text"))  # noqa: E731
            out.append(f"| {key} ({rec.get('version') or rec.get('wheel')}) | run, "
                       f"{'agrees' if rec.get('agrees') else 'DISAGREES'} | {fmt(e)} | {fmt(o)} |")
        else:
            out.append(f"| {key} | not run: {rec.get('reason')} | | |")
    out += ["", "| op | B | D | fitclip ms | peer: ms (our speedup), peak MB |", "|---|---|---|---|---|"]
    for c in doc.get("cases", []):
        cells = []
        for n in PEERS:
            b = (c.get("baselines") or {}).get(n)
            if b is None:
                continue
            cells.append(f"{n}: {_fmt(b.get('median_ms'), '.2f')} ({_fmt(b.get('speedup'), '.2f')}x), "
                         f"{_fmt(b.get('peak_mb'))} MB" if b.get("median_ms") else f"{n}: {b.get('error')}")
        if cells:
            out.append(f"| {c['op']} | {c.get('B')} | {c.get('D')} | {_fmt(c.get('median_ms'), '.2f')} | "
                       + "; ".join(cells) + " |")
    return out


def sigmoid_table(doc) -> list[str]:
    """sigmoid_loss cases (CPU benchmarks and the GPU check): times, speedups, memory, floor."""
    rows = sorted((c for c in doc["cases"] if c.get("op") == "sigmoid_loss"), key=lambda c: (c["D"], c["B"]))
    if not rows:
        return []
    names = ("open_clip", "torch", "torch_compile")
    out = ["| B | D | dtype | fitclip ms | floor ms (fraction) | open_clip ms (x) | torch ms (x) | torch.compile ms (x) | "
           "fitclip extra MB | open_clip / torch / compile extra MB | rel. err |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        if c.get("skipped") or c.get("error"):
            out.append(f"| {c['B']} | {c['D']} | {c.get('dtype', '-')} | {c.get('skipped') or c.get('error')} | | | | | | | |")
            continue
        cells = []
        for n in names:
            ms, sp, err = _base(c, n, "median_ms"), _base(c, n, "speedup"), _base(c, n, "error")
            cells.append(f"{_fmt(ms)} ({_fmt(sp, '.2f')}x)" if ms else (err or "-"))
        mems = " / ".join(_fmt(_base(c, n, "peak_extra_mb") or _base(c, n, "peak_mb")) for n in names)
        floor = f"{_fmt(c.get('floor_ms'), '.1f')} ({_fmt(c.get('fraction_of_floor'), '.2f')})" if c.get("floor_ms") \
            else "-"
        out.append(f"| {c['B']} | {c['D']} | {c.get('dtype', '-')} | {_fmt(c.get('median_ms'))} | {floor} | "
                   + " | ".join(cells) + f" | {_fmt(c.get('peak_mb'))} | {mems} | {_fmt(c.get('rel_err'), '.1e')} |")
    return out


def sigmoid_plot(doc, path: Path) -> bool:
    return _scaling_plot(doc, "sigmoid_loss", path, f"sigmoid_loss (SigLIP) on {doc['device']}")


def search_table(doc) -> list[str]:
    """`fitclip search` query times (synthetic collections) and `fitclip index` throughput."""
    rows = sorted((c for c in doc["cases"] if c.get("op") == "search query"), key=lambda c: (c["dtype"], c["N"]))
    out = []
    if rows:
        out += ["| videos N | dtype | query ms (product + top-10 + best frames) | product ms | index MB |",
                "|---|---|---|---|---|"]
        out += [f"| {c['N']:,} | {c['dtype']} | {_fmt(c['median_ms'], '.1f')} | {_fmt(c['product_ms'], '.1f')} | "
                f"{_fmt(c['index_mb'])} |" for c in rows]
        out += ["", f"Target: under {rows[0]['target_ms_at_1M']:.0f} ms a query at N = 1,000,000 (float16).", ""]
    for c in (c for c in doc["cases"] if c.get("op") == "fitclip index"):
        runs = ", ".join(f"{k.replace('_', ' ')}: {_fmt(v['videos_per_s'], '.2f')} videos/s" for k, v in c["runs"].items())
        out += [f"`fitclip index`, {c['model']} ({'random init' if c['pretrained'] == 'none' else c['pretrained']}), "
                f"{c['frames']} frames of {c['videos']} clips ({c['clip']}): {runs}.", ""]
    return out


def train_table(doc) -> list[str]:
    rows = [c for c in doc["cases"] if c.get("op") == "fitclip train"]
    out = []
    for c in rows:
        t = c.get("targets", {})
        weights = "random init" if c["pretrained"] == "none" else f"{c['pretrained']} weights"
        out += [f"`fitclip train`, {c['model']} ({weights}), {c['frames']} frames at {c['frame_px']} px "
                f"from {c['clip_size'][1]}x{c['clip_size'][0]} H.264 clips, batch {c['labeled_batch']} labeled + "
                f"{c['unlabeled_batch']} unlabeled, {c['precision']}, checkpoints {c['schedule']}. Floor: the student's "
                f"forward+backward ({_fmt(c['student_fwd_bwd_s'], '.1f')} s) plus the teacher's forward "
                f"({_fmt(c['teacher_fwd_s'], '.1f')} s) on the same batch = {_fmt(c['floor_s'], '.1f')} s; step medians "
                "exclude the first step.", "",
                "| workers | steps | step s | data wait s | fwd+bwd s | optimizer s | clips/s | data wait / step "
                f"(target <= {t.get('data_wait_fraction')}) | step / floor (<= {t.get('step_over_floor')}) | "
                f"checkpoint / wall (<= {t.get('checkpoint_fraction')}) | checkpoints | peak RSS MB |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in c["runs"].items():
            out.append(f"| {name.split('_')[-1]}{' (shards)' if name.startswith('shards') else ''} | {r['steps']} | {_fmt(r['median_step_s'], '.2f')} | "
                       f"{_fmt(r['median_data_wait_s'], '.3f')} | {_fmt(r['median_fwd_bwd_s'], '.2f')} | "
                       f"{_fmt(r['median_optimizer_s'], '.2f')} | {_fmt(r['median_clips_per_s'], '.3f')} | "
                       f"{_fmt(r['data_wait_fraction'], '.4f')} | {_fmt(r['step_over_floor'], '.3f')} | "
                       f"{_fmt(r['checkpoint_fraction'], '.4f')} ({_fmt(r['checkpoint_s'], '.1f')} s) | "
                       f"{r['checkpoints_written']} | {_fmt(r['peak_rss_mb'])} |")
        out.append("")
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (the report runs headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grad_cache_table(doc) -> list[str]:
    out = []
    for c in (c for c in doc["cases"] if c.get("op") == "fitclip train --grad-cache-chunk"):
        t = c["targets"]
        out += [f"`fitclip train --grad-cache-chunk {c['chunk']}`, {c['model']} (random init), {c['frames']} frames a "
                f"clip at 224 px, labeled clips only, fp32, 2 workers; peak RSS of the process, forward+backward "
                f"of the second step. A cached step at batch 32 took {_fmt(c['cached_b32_over_floor'], '.2f')}x the "
                f"encoders' two forward passes plus one backward of the batch (target <= {t['cached_over_floor']}); "
                f"from 8 to 128 clips the peak grew {_fmt(c['rss_growth_8_to_128_mb'][str(c['chunk'])])} MB with "
                f"gradient caching and {_fmt(c['rss_growth_8_to_128_mb']['0'])} MB without (target: at most "
                f"{t['cached_growth_over_plain_growth']} of it).", "",
                "| clips per step | grad cache chunk | peak RSS MB | fwd+bwd s |", "|---|---|---|---|"]
        out += [f"| {r['batch']} | {r['grad_cache_chunk'] or 'off'} | {_fmt(r['peak_rss_mb'])} | "
                f"{_fmt(r['fwd_bwd_s'], '.2f')} |" for r in c["runs"]]
        out.append("")
    return out


def grad_cache_plot(doc, path: Path) -> bool:
    rows = [c for c in doc["cases"] if c.get("op") == "fitclip train --grad-cache-chunk"]
    if not rows:
        return False
    plt = _pyplot()

    c = rows[-1]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for chunk, label in ((0, "whole batch"), (c["chunk"], f"--grad-cache-chunk {c['chunk']}")):
        runs = [r for r in c["runs"] if r["grad_cache_chunk"] == chunk]
        ax.plot([r["batch"] for r in runs], [r["peak_rss_mb"] / 1024 for r in runs], "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("clips per step")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title(f"fitclip train, {c['model']}, {c['frames']} frames a clip")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train_plot(doc, path: Path) -> bool:
    rows = [c for c in doc["cases"] if c.get("op") == "fitclip train"]
    if not rows:
        return False
    plt = _pyplot()

    c = rows[0]
    names = list(c["runs"])
    parts = [("data wait", "median_data_wait_s"), ("forward+backward", "median_fwd_bwd_s"),
             ("optimizer", "median_optimizer_s")]
    fig, ax = plt.subplots(figsize=(10, 2.8))
    for i, name in enumerate(names):
        r, left = c["runs"][name], 0.0
        for j, (label, key) in enumerate(parts):
            ax.barh(i, r[key], left=left, color=f"C{j}", label=label if i == 0 else None)
            left += r[key]
        rest = r["median_step_s"] - left
        if rest > 0:
            ax.barh(i, rest, left=left, color="0.7", label="other" if i == 0 else None)
    ax.axvline(c["floor_s"], color="k", ls="--", label="floor (student fwd+bwd + teacher fwd)")
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set_xlabel("median seconds per step")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.suptitle(f"fitclip train step breakdown, {c['model']}, {doc['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def plot(doc, path: Path) -> bool:
    return _scaling_plot(doc, "contrastive_loss", path, f"contrastive_loss on {doc['device']}")


def _scaling_plot(doc, op: str, path: Path, title: str) -> bool:
    """Time and extra memory against B of one op's CPU cases and their baselines (log-log)."""
    rows = sorted((c for c in doc["cases"] if c.get("op") == op and c.get("median_ms")), key=lambda c: c["B"])
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    bs = [c["B"] for c in rows]
    ax_t.plot(bs, [c["median_ms"] / 1e3 for c in rows], "o-", label="fitclip_ext (cpp)")
    ax_m.plot(bs, [c["peak_mb"] for c in rows], "o-", label="fitclip_ext (cpp)")
    for name in ("open_clip", "torch", "torch_compile"):
        pts = [(c["B"], _base(c, name, "median_ms")) for c in rows if _base(c, name, "median_ms")]
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1] / 1e3 for p in pts], "s--", label=name)
        pts = [(c["B"], _base(c, name, "peak_extra_mb")) for c in rows if _base(c, name, "peak_extra_mb")]
        if pts:
            ax_m.plot([p[0] for p in pts], [p[1] for p in pts], "s--", label=name)
    for ax, label in ((ax_t, "forward+backward seconds"), (ax_m, "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (D=512, fp32)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main():
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json` (measured by",
             "`pytest benchmarks/` on the CPU and `benchmarks/gpu_check.sh` on a GPU). Times are medians of",
             "interleaved runs in one process; \"x\" is baseline time / fitclip time; extra memory is the peak",
             "above the inputs during forward+backward (CPU: child-process RSS; GPU: max_memory_allocated).", ""]
    notes = HERE / "notes.md"
    if notes.exists():  # the hand-written reading of the runs, one heading level down
        lines += ["#" + ln if ln.startswith("#") else ln for ln in notes.read_text().rstrip().split("\n")] + [""]
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        if doc.get("tiny"):
            continue
        lines += [f"## {doc['device']} ({path.name})", "",
                  f"torch {doc.get('torch')}, triton {doc.get('triton', '-')}, commit {doc.get('commit')}, "
                  f"{doc.get('threads', '-')} threads", ""]
        if "ceilings" in doc:  # the GPU check's format
            lines += gpu_tables(doc)
            continue
        t = contrastive_table(doc)
        if t:
            lines += ["### contrastive_loss, forward + backward, fp32", ""] + t + [
                "", "\\* a single run in the memory-probe child process (these baselines need 8-17 GB there), "
                "not interleaved.", ""]
            png = path.with_suffix(".png")
            if plot(doc, png):
                lines += [f"![contrastive_loss]({png.relative_to(HERE).as_posix()})", ""]
        t = frames_table(doc)
        if t:
            lines += ["### frame ops, forward + backward, fp32", "",
                      "select_frames: B = C = V videos, each with its own caption; forward is the selection, "
                      "backward the chosen frames' scores. Target: topk_frame_similarity at C = V = 2048, "
                      "T = 16, D = 512, k = 4 at least 2.3x torch with at most 1/5 of its extra memory "
                      "(both counted above the inputs' gradients).", ""] + t + [""]
        t = distill_table(doc)
        if t:
            lines += ["### distillation_loss, forward + backward, fp32 (teacher scale 66.7)", ""] + t + [""]
        t = sigmoid_table(doc)
        if t:
            lines += ["### sigmoid_loss (SigLIP), forward + backward, fp32, scale 10, bias -10", ""] + t + [""]
            png = path.with_name(path.stem + "-sigmoid.png")
            if sigmoid_plot(doc, png):
                lines += [f"![sigmoid_loss]({png.relative_to(HERE).as_posix()})", ""]
        t = search_table(doc)
        if t:
            lines += ["### text-to-video search (benchmarks/bench_search.py)", ""] + t
        t = train_table(doc)
        if t:
            lines += ["### training step (benchmarks/bench_train.py)", ""] + t
            png = path.with_name(path.stem + "-train.png")
            if train_plot(doc, png):
                lines += [f"![training step breakdown]({png.relative_to(HERE).as_posix()})", ""]
        t = grad_cache_table(doc)
        if t:
            lines += ["### gradient caching: memory against batch size (benchmarks/bench_train.py)", ""] + t
            png = path.with_name(path.stem + "-grad-cache.png")
            if grad_cache_plot(doc, png):
                lines += [f"![peak memory against batch size]({png.relative_to(HERE).as_posix()})", ""]
    (HERE / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

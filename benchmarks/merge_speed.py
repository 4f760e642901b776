"""Merge speed and memory: emomerge (streamed) against mergekit run_merge and PEFT, same inputs.

Usage:
    python benchmarks/merge_speed.py --preset qwen2.5-vl-7b
    python benchmarks/merge_speed.py --preset qwen2.5-vl-7b --layers 28 --rss-layers 8 \
        --full-layers 1 --methods ties,task_arithmetic --skip peft --markdown RESULTS_run.md

Every leg runs in its own child process (this script with ``--leg``); wall time is the child's
and peak RSS is the child's own ``VmHWM`` (``/proc/self/status``). Legs:
- ``emomerge adapter``: adapter output at ``--layers`` (and ``--rss-layers``, to show peak RSS
  does not grow with depth) and at ``--full-layers`` (the PEFT comparison's inputs);
- ``emomerge full``: full-model output at ``--full-layers`` into a random base
  (``make_adapters.py --base``, vocab ``--vocab``);
- ``mergekit``: ``run_merge`` with ``lora_merge_cache`` on CPU, same base and adapters, on a
  fresh cache (cold: mergekit first bakes every base+LoRA into a full model on disk), and for
  ``--mergekit-warm`` methods once more on the baked cache (warm: repeated merges of the same
  adapters);
- ``peft``: ``add_weighted_adapter`` (ties → ties_svd, dare_ties → dare_ties_svd,
  task_arithmetic / linear → cat), adapter saved.
emomerge legs run the engine as shipped (sparse methods streamed block by block;
``--engine current`` turns the streamed path off to measure the dense one; ``ties@core`` is TIES
in the LoRA-native core space).
The machine's memory bandwidth is measured in the same run (a large tensor copy), and the
emomerge legs report the seconds spent in the element-wise mix as a fraction of the time a
bandwidth-bound pass over the same bytes would take.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))  # the folder holding the emomerge package

PEFT_TYPES = {
    "ties": "ties_svd",
    "dare_ties": "dare_ties_svd",
    "task_arithmetic": "cat",
    "linear": "cat",
}
PARAMS = {  # the same merge in all tools: 4 adapters at weight 1
    "ties": dict(density=0.5),
    "dare_ties": dict(density=0.5),
    "task_arithmetic": dict(),
    "linear": dict(),
    # LoRA-native: the same TIES, run on the lossless core-space projection (issue 7)
    "ties@core": dict(density=0.5, space="core"),
}
MERGEKIT = {  # mergekit method and global parameters giving our defaults
    "ties": ("ties", {"normalize": True}),
    "dare_ties": ("dare_ties", {"normalize": False}),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}),
    "linear": ("task_arithmetic", {"normalize": True}),  # our linear = mergekit TA normalised
}


# -- legs (child processes) ---------------------------------------------------------------------
def leg_emomerge(spec: dict) -> dict:
    from emomerge.merging import engine
    from emomerge.merging.engine import merge

    if spec.get("engine", "streamed") == "current":
        # the engine before the streamed path: dense stacked task vectors + randomized SVD
        engine._Merger._streamed = lambda self, path: False
    adapters = sorted(Path(spec["adapters"]).glob("adapter_*"))
    t0 = time.perf_counter()
    res = merge(
        spec["method"].split("@")[0],
        adapters,
        spec["out"],
        params=PARAMS[spec["method"]],
        output=spec["output"],
        base=spec.get("base"),
        force=True,
    )
    return {"seconds": time.perf_counter() - t0, "err_mean": res.manifest["errors"]["mean"]}


def leg_mergekit(spec: dict) -> dict:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    method, glob = MERGEKIT[spec["method"]]
    adapters = sorted(Path(spec["adapters"]).glob("adapter_*"))
    cfg = {
        "merge_method": method,
        "base_model": spec["base"],
        "dtype": "float32",
        "parameters": glob,
        "models": [
            {
                "model": f"{spec['base']}+{a}",
                "parameters": {"weight": 1.0, **PARAMS[spec["method"]]},
            }
            for a in adapters
        ],
    }
    t0 = time.perf_counter()
    options = MergeOptions(
        lora_merge_cache=spec["cache"],
        copy_tokenizer=False,
        lazy_unpickle=False,
        low_cpu_memory=False,
        write_model_card=False,
        quiet=True,
        random_seed=0,
        cuda=False,
    )
    run_merge(
        MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(cfg))), spec["out"], options
    )
    return {"seconds": time.perf_counter() - t0}


def leg_peft(spec: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapters = sorted(Path(spec["adapters"]).glob("adapter_*"))
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["base"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(str(a), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    kind = PEFT_TYPES[spec["method"]]
    kwargs = (
        {"density": PARAMS[spec["method"]]["density"]}
        if "density" in PARAMS[spec["method"]]
        else {}
    )
    if kind.endswith("_svd"):
        kwargs["svd_rank"] = 16
    t1 = time.perf_counter()
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=kind, **kwargs)
    model.save_pretrained(spec["out"], selected_adapters=["merged"])
    end = time.perf_counter()
    return {"seconds": end - t0, "merge_seconds": end - t1}


def leg_bandwidth(spec: dict) -> dict:
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32).fill_(1.0)  # 1 GiB
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return {"seconds": best, "gb_per_s": 2 * x.numel() * 4 / best / 1e9}  # read + write


LEGS = {
    "emomerge": leg_emomerge,
    "mergekit": leg_mergekit,
    "peft": leg_peft,
    "bandwidth": leg_bandwidth,
}


def run_leg(spec: dict, timeout: float) -> dict:
    """Run one leg in a child process; its time and peak RSS. Dirty pages left by the previous
    leg are flushed first (``os.sync``), so no leg pays for another's writeback."""
    os.sync()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--leg", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "error": f"timeout after {timeout:.0f} s", "wall": timeout}
    # The child reports its own peak RSS (VmHWM) on its last line.
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"ok": False, "error": (err or out).strip().splitlines()[-1:] or ["?"], "wall": wall}
    res = json.loads(lines[-1])
    res.update(ok=True, wall=wall)
    return res


def child(spec_json: str) -> None:
    import resource

    spec = json.loads(spec_json)
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    res = LEGS[spec["leg"]](spec)
    # VmHWM: the peak RSS of this process image. ru_maxrss would carry over the parent's peak
    # across fork+exec (it is kept in the signal struct), which inflated the first runs.
    with open("/proc/self/status") as f:
        hwm = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM"))
    res["peak_rss_gb"] = hwm * 1024 / 1e9
    res["ru_maxrss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(res), flush=True)


# -- comparison of full outputs -------------------------------------------------------------
def compare_full(ours: Path, theirs: Path) -> dict:
    import torch
    from safetensors import safe_open

    def tensors(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    out[k] = f, k
        return out

    a, b = tensors(ours), tensors(theirs)
    worst, flips, total, missing = 0.0, 0, 0, sorted(set(a) - set(b))
    for key in sorted(set(a) & set(b)):
        with safe_open(str(a[key][0]), "pt") as h:
            x = h.get_tensor(key).double()
        with safe_open(str(b[key][0]), "pt") as h:
            y = h.get_tensor(key).double()
        d = (x - y).abs()
        scale = float(y.abs().max()) or 1.0
        flips += int(
            (d > 1e-4 * scale).sum()
        )  # threshold flips (docs/DESIGN.md, Facts: ulp of the base)
        worst = max(worst, float(torch.where(d > 1e-4 * scale, 0, d).max()) if d.numel() else 0.0)
        total += d.numel()
    return {
        "max_abs_diff_rest": worst,
        "flipped": flips,
        "elements": total,
        "missing": len(missing),
    }


# -- driver -----------------------------------------------------------------------------------
def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "mergekit", "peft", "transformers", "safetensors"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing tool is reported, not fatal
            out[mod] = "missing"
    try:
        from importlib.metadata import version

        out["mergekit"] = version("mergekit")
    except Exception:  # noqa: BLE001
        pass
    return out


def machine() -> dict:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) / 1e6
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in open("/proc/cpuinfo")
            if ln.startswith("model name")
        ),
        "?",
    )
    return {"cores": os.cpu_count(), "ram_gb": round(mem, 1), "cpu": cpu, "load": os.getloadavg()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-vl-7b")
    ap.add_argument("--layers", type=int, default=28, help="depth of the adapter-output legs")
    ap.add_argument(
        "--rss-layers",
        type=int,
        default=8,
        help="second depth, to show RSS is flat in depth (0: skip)",
    )
    ap.add_argument(
        "--full-layers", type=int, default=1, help="depth of the full-output / mergekit / PEFT legs"
    )
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--count", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument(
        "--methods",
        default="ties,ties@core,task_arithmetic,dare_ties,linear",
        help="comma list; METHOD@core runs it in the LoRA-native core space",
    )
    ap.add_argument(
        "--deep-methods",
        default=None,
        help="methods run at --layers/--rss-layers (default: all of --methods)",
    )
    ap.add_argument("--peft-methods", default=None, help="methods with a PEFT leg (default: all)")
    ap.add_argument(
        "--mergekit-methods", default=None, help="methods with a mergekit leg (default: all)"
    )
    ap.add_argument(
        "--mergekit-warm",
        default="task_arithmetic,linear",
        help="methods whose mergekit leg is run a second time on its baked LoRA cache",
    )
    ap.add_argument(
        "--skip", default="", help="comma list of legs to skip: mergekit, peft, full, deep"
    )
    ap.add_argument("--engine", default="streamed", choices=("streamed", "current"))
    ap.add_argument("--timeout", type=float, default=900.0, help="per leg, seconds")
    ap.add_argument("--work", type=Path, default=Path("/tmp/emomerge_merge_speed"))
    ap.add_argument("--markdown", type=Path, help="also write the report here")
    ap.add_argument("--leg", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.leg:
        child(args.leg)
        return

    import make_adapters as MA

    # A text base name: a VLM name would make emomerge read the adapters in a VLM layout, which
    # the random text base (make_adapters --base) does not have.
    dims = {**MA.PRESETS[args.preset], "base_name": "random/text-base"}
    methods = [m for m in args.methods.split(",") if m]
    deep_methods = (
        methods if args.deep_methods is None else [m for m in args.deep_methods.split(",") if m]
    )
    skip = {s for s in args.skip.split(",") if s}
    peft_methods = (
        [m for m in methods if m in PEFT_TYPES]
        if args.peft_methods is None
        else args.peft_methods.split(",")
    )
    mk_methods = (
        [m for m in methods if m in MERGEKIT]
        if args.mergekit_methods is None
        else args.mergekit_methods.split(",")
    )
    mk_warm = [m for m in args.mergekit_warm.split(",") if m]
    tau = {
        d: args.count * sum(o * i for o, i in MA.module_shapes(dims, d).values())
        for d in {args.layers, args.rss_layers, args.full_layers}
        if d
    }
    started = dt.datetime.now(dt.timezone.utc)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    sets = {}
    depths = sorted(
        {d for d in (args.layers, args.rss_layers) if d} if "deep" not in skip else set()
    )
    for d in depths + [args.full_layers]:
        folder = work / f"inputs_{args.preset}_{d}l"
        if not (folder / "adapter_0").exists():
            MA.write_adapters(folder, dims, count=args.count, rank=args.rank, layers=d)
        sets[d] = folder
    base = work / f"inputs_{args.preset}_{args.full_layers}l" / "base"
    if not (base / "config.json").exists():
        MA.write_base(base.parent, dims, layers=args.full_layers, vocab=args.vocab)

    rows = []
    bw = run_leg({"leg": "bandwidth"}, args.timeout)
    print(
        f"memory bandwidth (1 GiB copy, read+write): {bw.get('gb_per_s', 0):.1f} GB/s", flush=True
    )

    def record(method, leg, depth, spec, *, compare_to=None):
        res = run_leg(spec, args.timeout)
        res.update(method=method, leg=leg, layers=depth, tau_elements=tau.get(depth, 0))
        rows.append(res)
        if compare_to is not None and res.get("ok"):
            res["vs"] = compare_full(Path(compare_to), Path(spec["out"]))
        status = (
            f"{res['seconds']:.1f} s, {res['peak_rss_gb']:.2f} GB"
            if res.get("ok")
            else f"FAILED: {res['error']}"
        )
        print(f"{method:16s} {leg:18s} {depth:3d} layers: {status}", flush=True)
        return res

    for method in methods:
        if method in deep_methods:
            for d in depths:
                record(
                    method,
                    "emomerge adapter",
                    d,
                    {
                        "leg": "emomerge",
                        "method": method,
                        "adapters": str(sets[d]),
                        "output": "adapter",
                        "out": str(work / f"out_{method}_ad_{d}"),
                        "engine": args.engine,
                    },
                )
        f = args.full_layers
        record(
            method,
            "emomerge adapter",
            f,
            {
                "leg": "emomerge",
                "method": method,
                "adapters": str(sets[f]),
                "output": "adapter",
                "out": str(work / f"out_{method}_ad_{f}"),
                "engine": args.engine,
            },
        )
        ours_full = work / f"out_{method}_full_{f}"
        if "full" not in skip:
            record(
                method,
                "emomerge full",
                f,
                {
                    "leg": "emomerge",
                    "method": method,
                    "adapters": str(sets[f]),
                    "output": "full",
                    "base": str(base),
                    "out": str(ours_full),
                    "engine": args.engine,
                },
            )
        if "mergekit" not in skip and method in mk_methods:
            # cold: a fresh LoRA cache, so mergekit bakes each base+LoRA into a full model first
            # (what one merge costs); warm: the same leg again on that cache (repeated merges of
            # the same adapters skip the bake)
            cache = work / f"lora_cache_{method}_{f}"
            shutil.rmtree(cache, ignore_errors=True)
            spec = {
                "leg": "mergekit",
                "method": method,
                "adapters": str(sets[f]),
                "base": str(base),
                "cache": str(cache),
                "out": str(work / f"out_{method}_mk_{f}"),
            }
            compare = ours_full if method != "dare_ties" and "full" not in skip else None
            record(method, "mergekit run_merge", f, spec, compare_to=compare)
            if method in mk_warm:
                record(method, "mergekit (warm cache)", f, spec)
            shutil.rmtree(cache, ignore_errors=True)
        if "peft" not in skip and method in peft_methods:
            record(
                method,
                f"peft {PEFT_TYPES[method]}",
                f,
                {
                    "leg": "peft",
                    "method": method,
                    "adapters": str(sets[f]),
                    "base": str(base),
                    "out": str(work / f"out_{method}_peft_{f}"),
                },
            )

    report = render(args, rows, bw, started, argv)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)


def render(args, rows, bw, started, argv) -> str:
    cmd = "python benchmarks/merge_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    mach = machine()
    lines = [
        f"Command: `{cmd}`",
        f"Date: {started.isoformat(timespec='seconds')} · machine: {mach['cores']} cores ({mach['cpu']}), "
        f"{mach['ram_gb']} GB RAM, load at end {', '.join(f'{x:.1f}' for x in mach['load'])}",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"Inputs: preset {args.preset}, {args.count} random rank-{args.rank} LoRAs on 7 modules per layer; "
        f"full-output base: random, {args.full_layers} layer(s), vocab {args.vocab}, float32.",
        f"Memory bandwidth (1 GiB tensor copy, read+write bytes / best of 5): {bw.get('gb_per_s', 0):.1f} GB/s",
        "",
        "| method | leg | layers | wall s | peak RSS GB | × emomerge (time) | notes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    ours = {}
    for r in rows:
        if r.get("ok") and r["leg"].startswith("emomerge"):
            ours[(r["method"], r["leg"], r["layers"])] = r["seconds"]
    for r in rows:
        notes = []
        ratio = ""
        if r.get("ok"):
            ref_leg = "emomerge full" if r["leg"].startswith("mergekit") else "emomerge adapter"
            ref = ours.get((r["method"], ref_leg, r["layers"]))
            if not r["leg"].startswith("emomerge") and ref:
                ratio = f"{r['seconds'] / ref:.1f}×"
            if r.get("err_mean"):
                notes.append(f"rank-16 rel. error mean {r['err_mean']:.3f}")
            if "vs" in r:
                v = r["vs"]
                notes.append(
                    f"vs ours: {v['flipped']} of {v['elements']} elements past 1e-4 (threshold flips), "
                    f"rest max |d| {v['max_abs_diff_rest']:.1e}, {v['missing']} tensors missing"
                )
            if (
                r["leg"] == "emomerge adapter"
                and r["method"] in ("ties", "dare_ties")
                and bw.get("gb_per_s")
            ):
                rate = (
                    r["tau_elements"] * 4 / r["seconds"] / 1e9
                )  # float32 τ bytes produced per second
                notes.append(
                    f"τ streamed at {rate:.2f} GB/s = {rate / bw['gb_per_s']:.1%} of copy bandwidth"
                )
            if "merge_seconds" in r:
                notes.append(f"add_weighted_adapter+save {r['merge_seconds']:.1f} s")
            wall = f"{r['seconds']:.1f}"
            rss = f"{r['peak_rss_gb']:.2f}"
        else:
            wall, rss = "—", "—"
            notes.append(f"not measured: {r.get('error')}")
        lines.append(
            f"| {r['method']} | {r['leg']} | {r['layers']} | {wall} | {rss} | {ratio} | {'; '.join(notes)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

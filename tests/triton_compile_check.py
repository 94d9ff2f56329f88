"""What the GPU compiler makes of every Triton launch of the package, without a GPU.

The public ops run on meta tensors at the models.json shapes (T = 1, 16, 4096 tokens; forward and
backward; gating, expert choice, plan, permute, grouped GEMM, fused MoE, LoRA experts; the fused MoE with
FP8 weights (block 128x128, per channel, per tensor) and weight-only int8 / int4 / mxfp4 weights, as
``QuantizedWeight``, forward) while the one
launch path (``triton_kernels/_launch.py``) records every launch instead of running it: kernels added
anywhere behind those ops show up here without a change. Each distinct launch is specialised with
Triton's own launch-time rules (its JIT binder: ints equal to 1 become constants, ints divisible by 16
and 16-byte-aligned pointers get ``tt.divisibility=16``) and compiled for sm_80 and sm_90a, with the
configs chosen for that architecture (``MOE_KERNELS_ASSUME_DEVICE``). It fails on

- shared memory above the architecture's limit per block,
- any spilled (local) bytes,
- a prefill GEMM (rows per expert >= 64) without wgmma on sm_90a, and an FP8 prefill GEMM whose wgmma
  does not take e4m3 operands;
- a GEMM kernel of bf16 inputs whose dot runs without tensor cores (neither wgmma nor mma.sync);
- a launch with a TMA flag on (``TMA_W``/``TMA_A``, set on sm_90) whose code has no ``cp.async.bulk.tensor``,

and prints a table per architecture (``--write`` also writes ``bench/results/compile_<arch>.md``).
Compiled results are cached by launch key, kernel source and Triton version
(``$MOE_KERNELS_COMPILE_CACHE``, default ``~/.cache/moe_kernels/compile_check.json``).

    python tests/triton_compile_check.py                  # every model, both architectures
    python tests/triton_compile_check.py --subset         # the representative subset of the CI test
    python tests/triton_compile_check.py --write          # and rewrite bench/results/compile_*.md
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

import moe_kernels as mk  # noqa: E402
from moe_kernels.triton_kernels import _launch  # noqa: E402

ARCHS = {"sm_80": ("sm_80", 80), "sm_90a": ("sm_90", 90)}  # table name -> (config target, compiler target)
TOKENS = (1, 16, 4096)
# The CI test's representative subset (the full table takes tens of minutes on 2 cores): grouped sigmoid
# gating over 256 experts, decode and prefill GEMMs (the wgmma rule, the fits), forward and backward.
SUBSET = ("deepseek-v3",)
SUBSET_TOKENS = (1, 4096)
SUBSET_QUANT = ("fp8 block128", "int8 channel", "mxfp4")
PREFILL_ROWS = 64
RESULT_FORMAT = "2"  # what a cached result holds (2: ptxas spill bytes; the MMA operand type where compiled since); part of the cache key
LORA_RANK = 16
# Launches of a GEMM kernel that are too thin for a 64-row MMA whatever the batch (the dW kernel computing
# a bias gradient as ones^T @ dY has one output row): exempt from the wgmma rule.
THIN = {"grouped_wgrad_kernel": lambda a: a["A"] < 64 or a["B"] < 64}
OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Quantized experts driven through fused_moe: (label, fmt, layout keywords). FP8 in DeepSeek-V3's 128x128 blocks,
# per channel and per tensor; weight-only int8 per channel, int4 in groups of 128 with zero points, mxfp4.
QUANT = (("fp8 block128", "fp8", dict(block_shape=(128, 128))), ("fp8 channel", "fp8", dict(per_channel=True)),
         ("fp8 tensor", "fp8", {}), ("int8 channel", "int8", {}), ("int4 g128 zp", "int4", dict(group_size=128, zero=True)),
         ("mxfp4", "mxfp4", dict(group_size=32)))
FP8_KERNELS = ("fp8_grouped_gemm_kernel",)


# ----- driving the ops ------------------------------------------------------------------------------

def load_models(names=None) -> dict:
    from bench.shapes import load_models as _load

    models, _ = _load()
    return {k: v for k, v in models.items() if not names or k in names}


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def drive(name: str, cfg: dict, T: int, quant=None) -> list:
    """Every launch the ops make for one model at T tokens, forward and backward, and the quantized fused MoE
    forward for the ``QUANT`` labels in ``quant`` (default: all)."""
    H, I, E, k = cfg["hidden"], cfg["intermediate"], cfg["experts"], cfg["top_k"]
    gated = cfg.get("gated", True)
    act = cfg.get("activation", "silu")
    rows = T * k / E
    out = []
    tags = dict(model=name, T=T, rows=rows)
    with _launch.record(**tags, op="gating") as rec:
        logits = _meta(T, E, dtype=torch.float32, grad=True)
        groups = cfg.get("num_groups", 1)
        bias = _meta(E, dtype=torch.float32) if cfg.get("correction_bias") else None
        w, ids = mk.topk_gating(logits, k, scoring=cfg["scoring"], renormalize=cfg["renormalize"],
                                correction_bias=bias, num_groups=groups, topk_groups=cfg.get("topk_groups", 1),
                                scaling_factor=cfg.get("scaling_factor", 1.0), backend="triton")
        w.sum().backward()
        mk.topk_gating(logits.detach(), k, scoring=cfg["scoring"], return_stats=True, backend="triton")
    out += rec
    with _launch.record(**tags, op="expert_choice") as rec:
        cap = max(1, min(2048, math.ceil(T * k / E)))
        mk.expert_choice_gating(_meta(T, E, dtype=torch.float32, grad=True), cap, backend="triton")
    out += rec
    ids = torch.empty(T, k, dtype=torch.int32, device="meta")
    w = _meta(T, k, dtype=torch.float32, grad=True)
    with _launch.record(**tags, op="plan+permute+gemm") as rec:
        cap = math.ceil(cfg.get("capacity_factor", 1.25) * T * k / E)
        mk.plan_routing(ids, E, capacity=cap, backend="triton")
        plan = mk.plan_routing(ids, E, backend="triton")
        x = _meta(T, H, grad=True)
        xs = mk.permute(x, plan, backend="triton")
        w13 = _meta(E, (2 if gated else 1) * I, H, grad=True)
        h = mk.grouped_gemm(xs, w13, plan, backend="triton")
        y = mk.unpermute(h[:, :H] if h.shape[1] >= H else xs, plan, w, backend="triton")
        y.float().sum().backward()
    out += rec
    with _launch.record(**tags, op="fused_moe") as rec:
        x = _meta(T, H, grad=True)
        w13 = _meta(E, (2 if gated else 1) * I, H, grad=True)
        w2 = _meta(E, H, I, grad=True)
        b13 = _meta(E, w13.shape[1], grad=True) if cfg.get("bias") else None
        b2 = _meta(E, H, grad=True) if cfg.get("bias") else None
        y = mk.fused_moe(x, w13, w2, w, ids, activation=act, gated=gated, w13_bias=b13, w2_bias=b2, backend="triton")
        y.float().sum().backward()
    out += rec
    with _launch.record(**tags, op="lora_moe") as rec:
        x = _meta(T, H, grad=True)
        a, b = _meta(E, LORA_RANK, H, grad=True), _meta(E, I, LORA_RANK, grad=True)
        y = mk.lora_moe(x, _meta(I, H), a, b, w, ids, backend="triton")
        y.float().sum().backward()
    out += rec
    for label, fmt, layout in QUANT:
        if quant is not None and label not in quant:
            continue
        if fmt in ("int4", "mxfp4") and (H % layout["group_size"] or I % layout["group_size"]):
            continue  # groups never straddle K (gpt-oss's I = 2880 is a multiple of 32, not of 128)
        with _launch.record(**tags, op=f"fused_moe {label}") as rec:
            x = _meta(T, H)
            w13 = quantized_meta(E, (2 if gated else 1) * I, H, fmt, layout)
            w2 = quantized_meta(E, H, I, fmt, layout)
            b13 = _meta(E, (2 if gated else 1) * I) if cfg.get("bias") else None
            b2 = _meta(E, H) if cfg.get("bias") else None
            mk.fused_moe(x, w13, w2, w.detach(), ids, activation=act, gated=gated, w13_bias=b13, w2_bias=b2,
                         backend="triton")
        out += rec
    return out


def _weight_only_on_the_assumed_target():
    """The FP8 ops choose weight-only (w8a16) from the tensors' GPU (no fp8 tensor cores before sm_89); the meta
    tensors driven here stand for ``MOE_KERNELS_ASSUME_DEVICE``: choose as that GPU would."""
    from moe_kernels import _quant_ops

    gpu_rule = _quant_ops.weight_only

    def weight_only(device):
        if device.type == "meta":
            return tuple(_launch.assumed_target().capability) < (8, 9)
        return gpu_rule(device)

    _quant_ops.weight_only = weight_only


_weight_only_on_the_assumed_target()


def quantized_meta(E: int, N: int, K: int, fmt: str, layout: dict):
    """A ``QuantizedWeight`` of dense shape ``[E, N, K]`` on the meta device, in the layouts of ``moe_kernels.quant``
    and ``moe_kernels.quant_int`` (what a checkpoint loads)."""
    from moe_kernels.quant import QuantizedWeight

    f32 = torch.float32
    if fmt == "fp8":
        data = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device="meta")
        if "block_shape" in layout:
            bn, bk = layout["block_shape"]
            return QuantizedWeight(data=data, scale=_meta(E, -(-N // bn), -(-K // bk), dtype=f32), block_shape=(bn, bk))
        return QuantizedWeight(data=data, scale=_meta(E, N, 1, dtype=f32) if layout.get("per_channel") else _meta(E, dtype=f32))
    if fmt == "int8":
        return QuantizedWeight(data=torch.empty(E, N, K, dtype=torch.int8, device="meta"), scale=_meta(E, N, dtype=f32),
                               fmt="int8")
    g = layout["group_size"]
    data = torch.empty(E, N, K // 2, dtype=torch.uint8, device="meta")
    if fmt == "mxfp4":
        return QuantizedWeight(data=data, scale=torch.empty(E, N, K // g, dtype=torch.uint8, device="meta"), fmt="mxfp4",
                               group_size=g)
    zero = torch.empty(E, N // 2, K // g, dtype=torch.uint8, device="meta") if layout.get("zero") else None
    return QuantizedWeight(data=data, scale=_meta(E, N, K // g, dtype=f32), fmt="int4", zero=zero, group_size=g)


# ----- specialisation and compilation ---------------------------------------------------------------

class _Ptr:
    """A meta tensor as the JIT binder sees a pointer argument: its dtype and its (offset) address."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self._addr = t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._addr


def specialise(rec, cc: int):
    """(signature, constexprs, attrs, options) of a launch, by Triton's own JIT binder for target cc."""
    from triton.runtime.jit import create_function_from_signature

    fn = rec.kernel
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_Ptr(a) if isinstance(a, torch.Tensor) else a for a in rec.args]
    kwargs = {k: (_Ptr(v) if isinstance(v, torch.Tensor) else v) for k, v in rec.kwargs.items()}
    bound, spec, options = binder(*args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, {k: getattr(opts, k) for k in OPTION_KEYS if hasattr(opts, k)}


def _bin(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_one(job: dict) -> dict:
    """Compile one specialised launch; read shared memory, registers, spills and the instructions used."""
    try:
        return _compile_one(job)
    except Exception as exc:  # a kernel the compiler rejects is a failure of the check, not a crash
        msg = str(exc) if len(str(exc)) <= 900 else str(exc)[:300] + " [...] " + str(exc)[-600:]  # where, and why
        return {"error": f"{exc.__class__.__name__}: {msg}", "smem": 0, "regs": -1, "stack": 0, "local": 0, "spill": 0,
                "mma": "-", "mma_in": "-", "dot": False, "cp_async": False, "tma": False, "seconds": 0}


def _compile_one(job: dict) -> dict:
    import importlib

    mod = importlib.import_module(job["module"])
    fn = getattr(mod, job["kernel"])
    constexprs = {tuple(k): v for k, v in job["constexprs"]}
    attrs = {tuple(k): v for k, v in job["attrs"]}
    src = ASTSource(fn=fn, signature=job["signature"], constexprs=constexprs, attrs=attrs)
    t0 = time.time()
    ck = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32), options=job["options"])
    ptx = ck.asm["ptx"]
    res = {"smem": int(ck.metadata.shared), "seconds": round(time.time() - t0, 1)}
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(ck.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    res["regs"], res["stack"], res["local"] = (int(m.group(1)), int(m.group(2)), int(m.group(4))) if m else (-1, -1, -1)
    res["spill"] = _spill_bytes(ptx, job["cc"]) if res["stack"] != 0 else 0  # a stack frame need not be a spill
    res["mma"] = "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
    res["mma_in"] = _mma_operands(ptx)
    res["dot"] = "tt.dot" in ck.asm["ttir"]
    res["cp_async"] = bool(re.search(r"cp\.async\.(cg|ca)", ptx))
    res["tma"] = "cp.async.bulk.tensor" in ptx
    return res


def _mma_operands(ptx: str) -> str:
    """The operand types of the tensor-core MMAs in ``ptx`` (``e4m3``, ``bf16``, ...), ``/``-joined; ``-`` if none."""
    found = set()
    for ins in re.findall(r"(?:wgmma\.mma_async|mma\.sync)[.\w]*", ptx):
        parts = ins.split(".")
        found.update(p for p in parts if p in ("e4m3", "e5m2", "bf16", "f16", "tf32", "s8", "u8"))
    return "/".join(sorted(found)) or "-"


def _spill_bytes(ptx: str, cc: int) -> int:
    """Spill stores + loads that ptxas reports for ``ptx`` (its -v output; cuobjdump shows only the stack
    frame, which calls and local arrays use too). Triton's bundled ptxas that reads its PTX version."""
    ptxas = _bin("ptxas-blackwell") if os.path.exists(_bin("ptxas-blackwell")) else _bin("ptxas")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
        out = subprocess.run([ptxas, "-v", "--gpu-name", arch, src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out.stdout + out.stderr)
    return sum(int(a) + int(b) for a, b in found) if found else -1  # -1: unknown, counted as a failure


def launch_key(rec, cc):
    sig, constexprs, attrs, options = specialise(rec, cc)
    fn = rec.kernel
    job = {"module": fn.fn.__module__, "kernel": fn.fn.__name__, "cc": cc, "signature": sig,
           "constexprs": sorted([list(k), v] for k, v in constexprs.items()),
           "attrs": sorted([list(k), v] for k, v in attrs.items()), "options": options}
    blob = json.dumps(job, sort_keys=True, default=str) + fn.cache_key + triton.__version__ + RESULT_FORMAT
    return hashlib.sha256(blob.encode()).hexdigest()[:24], job, constexprs


def _cache_path() -> Path:
    return Path(os.environ.get("MOE_KERNELS_COMPILE_CACHE", Path.home() / ".cache" / "moe_kernels" / "compile_check.json"))


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict) -> None:
    path = _cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs never rename a half-written file
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)


# ----- the check ------------------------------------------------------------------------------------

def _flags(rec, constexprs, names) -> str:
    """The constexpr flags that are on (booleans True, non-zero non-block ints), by name."""
    out = []
    for (i,), v in sorted(constexprs.items()):
        n = names[i]
        if n.startswith("BLOCK") or not rec.kernel.params[i].is_constexpr:  # not the ints the JIT made constant
            continue
        if v is True:
            out.append(n)
        elif isinstance(v, int) and not isinstance(v, bool) and v not in (0,):
            out.append(f"{n}={v}")
    return " ".join(out) or "-"


def _tiles(constexprs, names) -> str:
    return "x".join(f"{v}" for (i,), v in sorted(constexprs.items()) if names[i].startswith("BLOCK")) or "-"


def run(archs, models, jobs: int, tokens=TOKENS, quant=None) -> tuple[dict, list]:
    """Rows of the table per architecture and the failures."""
    cache = _load_cache()
    tables, failures = {}, []
    for arch in archs:
        assume, cc = ARCHS[arch]
        os.environ["MOE_KERNELS_ASSUME_DEVICE"] = assume
        limit = _launch.TARGETS[assume].smem_per_block
        distinct = {}  # key -> (job, first record, constexprs, set of drivers, prefill?)
        for name, cfg in models.items():
            for T in tokens:
                for rec in drive(name, cfg, T, quant):
                    try:
                        key, job, constexprs = launch_key(rec, cc)
                    except Exception as exc:  # an argument the JIT binder cannot specialise from a meta tensor
                        failures.append(f"{arch} {rec.name} ({name} T={T}): cannot specialise the launch: {exc}")
                        continue
                    names = rec.kernel.arg_names
                    args = dict(zip(names, rec.args))
                    thin = THIN.get(rec.name, lambda a: False)(args)
                    entry = distinct.setdefault(key, {"job": job, "rec": rec, "constexprs": constexprs, "uses": set(),
                                                      "prefill": False, "bf16": any(
                                                          isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16
                                                          for a in rec.args[:1])})
                    entry["uses"].add(f"{name} T={T} {rec.tags['op']}")
                    entry["prefill"] |= rec.tags["rows"] >= PREFILL_ROWS and not thin
        todo = [k for k in distinct if k not in cache]
        print(f"{arch}: {len(distinct)} distinct launches, {len(todo)} to compile", file=sys.stderr, flush=True)
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(compile_one, distinct[k]["job"]): k for k in todo}
            for i, f in enumerate(concurrent.futures.as_completed(futures)):
                cache[futures[f]] = f.result()
                if i % 8 == 7:  # a killed run keeps what it compiled
                    _save_cache(cache)
        _save_cache(cache)
        rows = []
        for key, e in distinct.items():
            res, rec = cache[key], e["rec"]
            names = rec.kernel.arg_names
            problems = [f"compile error: {res['error']}"] if "error" in res else []
            if res["smem"] > limit:
                problems.append(f"shared memory {res['smem']} B > {limit} B")
            if res["local"] > 0 or res.get("spill", res["stack"]) != 0:
                problems.append(f"spills ({res['local']} B local, {res.get('spill', res['stack'])} B spilled, "
                                f"{res['stack']} B stack frame)")
            if arch == "sm_90a" and e["prefill"] and res["dot"] and res["mma"] != "wgmma":
                problems.append(f"a prefill GEMM without wgmma ({res['mma']})")
            if arch == "sm_90a" and e["prefill"] and rec.name in FP8_KERNELS and "e4m3" not in res["mma_in"] \
                    and e["constexprs"].get((names.index("A_MODE"),), 0) != 0:
                problems.append(f"an FP8 prefill GEMM whose MMA does not take e4m3 operands ({res['mma_in']})")
            if "gemm" in rec.name and res["dot"] and res["mma"] == "-" and e["bf16"]:
                problems.append("a bf16 GEMM without tensor-core MMA")
            tma_on = [n for n in ("TMA_W", "TMA_A") if n in names and e["constexprs"].get((names.index(n),)) is True]
            if tma_on and not res["tma"] and "error" not in res:
                problems.append(f"{'/'.join(tma_on)} set but no cp.async.bulk.tensor in the code")
            row = {"kernel": rec.name, "flags": _flags(rec, e["constexprs"], names), "tiles": _tiles(e["constexprs"], names),
                   "warps": e["job"]["options"].get("num_warps"), "stages": e["job"]["options"].get("num_stages"),
                   **res, "uses": len(e["uses"]), "example": sorted(e["uses"])[0], "problems": problems}
            rows.append(row)
            for p in problems:
                failures.append(f"{arch} {rec.name} [{row['flags']}] {row['tiles']} ({row['example']}): {p}")
        rows.sort(key=lambda r: (r["kernel"], r["flags"], r["tiles"], r["warps"], r["stages"]))
        tables[arch] = rows
    return tables, failures


def table(arch: str, rows: list) -> str:
    limit = _launch.TARGETS[ARCHS[arch][0]].smem_per_block
    head = (f"# Triton launches compiled for {arch}\n\n"
            f"Written by `python tests/triton_compile_check.py --write` (triton {triton.__version__}): every distinct\n"
            f"launch of the ops at the models.json shapes (T = {', '.join(map(str, TOKENS))}; forward and backward; the fused\n"
            f"MoE forward with FP8 and weight-only experts: {', '.join(q[0] for q in QUANT)}),\n"
            f"specialised as the JIT does and compiled for {arch}, configs chosen for that architecture; compiled, never run.\n"
            f"MMA in: the tensor-core operand type; TMA: `cp.async.bulk.tensor` in the code.\n"
            f"Shared memory limit per block: {limit} B. Uses: how many (model, T, op) drivers make this launch.\n\n"
            "| kernel | flags | tiles | warps | stages | smem B | regs | spills B | MMA | MMA in | cp.async | TMA | uses | example | problems |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['kernel']} | {r['flags']} | {r['tiles']} | {r['warps']} | {r['stages']} | {r['smem']} | {r['regs']} | "
        f"{r['local'] + max(r.get('spill', r['stack']), 0)} | {r['mma']} | {r.get('mma_in', '-')} | {'yes' if r['cp_async'] else 'no'} | {'yes' if r['tma'] else 'no'} | "
        f"{r['uses']} | {r['example']} | {'; '.join(r['problems']) or 'ok'} |\n" for r in rows)
    return head + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="*", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--subset", action="store_true",
                    help=f"only {', '.join(SUBSET)} at T = {SUBSET_TOKENS}, quantized: {', '.join(SUBSET_QUANT)}")
    ap.add_argument("--models", nargs="*", help="model names of models.json")
    ap.add_argument("--write", action="store_true", help="write bench/results/compile_<arch>.md")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    models = load_models(a.models or (SUBSET if a.subset else None))
    t0 = time.time()
    tables, failures = run(a.arch, models, a.jobs, SUBSET_TOKENS if a.subset else TOKENS,
                           SUBSET_QUANT if a.subset else None)
    for arch, rows in tables.items():
        text = table(arch, rows)
        print(text)
        if a.write:
            (REPO / "bench" / "results" / f"compile_{arch.replace('_', '')}.md").write_text(text)
    for f in failures:
        print("FAILED", f)
    n = sum(len(r) for r in tables.values())
    print(f"{n} distinct launches over {len(models)} models, {len(failures)} failed, {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

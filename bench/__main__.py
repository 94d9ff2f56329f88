"""``python -m bench [suite] [options]``: benchmark suites of moe_kernels (default suite: ``main``)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from .harness import collect_meta, format_table, write_results
from .shapes import REPO, select_shapes

SUITES = ("main", "routing", "permute", "gemm", "moe", "lora", "ep", "load", "tune")


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in _csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, models: str | None = "all; with --quick: 3 of them",
            tokens: str = "cpu 64 quick / 256, cuda 1024 quick / 4096", quick: str = "fewer models, fewer tokens") -> None:
    """The options every suite takes (``models=None``: no ``--models``)."""
    p.add_argument("--quick", action="store_true", help=f"{quick}, shorter timing (CPU: < 1 min)")
    if models is not None:
        p.add_argument("--models", type=_csv_list, default=None, metavar="A,B",
                       help=f"model names from shared/models.json (default: {models})")
    p.add_argument("--tokens", type=_int_list, default=None, metavar="T[,T]", help=f"tokens per batch (default: {tokens})")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 with --quick or on a busy machine, else torch's choice)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", metavar="DIR",
                   help="folder for the CSV and JSON results (default: bench/results)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="suite", metavar="SUITE")
    p = sub.add_parser("main", help="MoE layer, fused_moe and every op on model shapes, all backends and baselines")
    _common(p)
    p.set_defaults(func=cmd_main)
    p = sub.add_parser("routing", help="top-k and expert-choice gating against the torch reference and a torch.compile'd chain")
    _common(p, models="deepseek-v3, qwen3-30b-a3b, mixtral-8x7b, kimi-k2",
            tokens="cpu 1,16,128,1024,4096 (quick 1,128,1024); cuda 1,16,128,1024,16384,65536 (quick 1,128,16384)",
            quick="fewer tokens")
    p.set_defaults(func=cmd_routing)
    p = sub.add_parser("permute", help="plan_routing, permute and unpermute (fwd, fwd+bwd) against the reference and a "
                                       "torch chain, eager and compiled")
    _common(p, models=None, tokens="cuda 1,64,1024,16384,65536 (quick 1,16384,65536); cpu 1,64,1024 (quick 1,1024)",
            quick="fewer T and H")
    p.add_argument("--hidden", type=_int_list, default=None, metavar="H[,H]",
                   help="hidden sizes (default: cuda 2048,4096,7168, quick 7168; cpu 128,256,448, quick 256)")
    p.add_argument("--topk", type=_int_list, default=None, metavar="K[,K]", help="k in {2 (E=8), 8 (E=256)} (default: both)")
    p.set_defaults(func=cmd_permute)
    p = sub.add_parser("lora", help="mixture of LoRA experts on a frozen projection against a per-expert loop and the base layer")
    _common(p, models="(Llama-like projections 4096x4096 and 4096x14336)", tokens="cpu 16,256; cuda 16,1024,8192",
            quick="E=8, r=16, k=2 only")
    p.set_defaults(func=cmd_lora)
    p = sub.add_parser("gemm", help="grouped GEMM of both expert layers, fwd, dX and dW, against grouped_mm, a loop "
                                    "and the reference")
    _common(p, models="mixtral-8x7b, deepseek-v3, qwen3-30b-a3b, qwen3-235b-a22b, gpt-oss-120b (quick: 3 of them)",
            tokens="cuda 1,8,64,512,4096,16384 (quick 1,64,4096); cpu 1,64", quick="3 models, fewer tokens")
    p.set_defaults(func=cmd_gemm)
    p = sub.add_parser("moe", help="MoE layer fwd and fwd+bwd against transformers' experts implementations, the "
                                   "reference and the unfused ops; writes a PNG plot")
    _common(p, models="mixtral-8x7b, deepseek-v3, qwen3-30b-a3b, gpt-oss-120b (quick: 3 of them)",
            tokens="cuda 1,16,256,4096,16384 (quick 1,256,4096); cpu 1,16,256 (quick 1,256)", quick="3 models, fewer tokens")
    p.set_defaults(func=cmd_moe)
    p = sub.add_parser("ep", help="expert-parallel dispatch/combine on CPU with gloo (2 and 4 ranks)")
    p.add_argument("--quick", action="store_true", help="T=64, one world size (2), shorter timing")
    p.add_argument("--models", type=_csv_list, default=None, metavar="A,B",
                   help="model names from shared/models.json (default: mixtral-8x7b, deepseek-v3)")
    p.add_argument("--tokens", type=_int_list, default=None, metavar="T[,T]", help="tokens per rank (default: 64,256; quick 64)")
    p.add_argument("--worlds", type=_int_list, default=None, metavar="W[,W]", help="numbers of ranks (default: 2,4; quick 2)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results", metavar="DIR",
                   help="folder for the CSV and JSON results (default: bench/results)")
    p.set_defaults(func=cmd_ep)
    p = sub.add_parser("load", help="load per expert and routing entropy over a run (MoE.run_stats); writes a PNG plot")
    _common(p, models="mixtral-8x7b, deepseek-v3, qwen3-30b-a3b (quick: 2 of them)", tokens="256 per batch",
            quick="2 models, 4 batches")
    p.set_defaults(func=cmd_load)
    p = sub.add_parser("tune", help="tile configs of the Triton grouped GEMM for the model shapes on this GPU (writes JSON)")
    p.add_argument("--models", type=_csv_list, default=None, metavar="A,B", help="model names (default: all)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="default: triton_kernels/configs")
    p.set_defaults(func=cmd_tune)
    return parser


def _device(choice: str | None) -> str:
    if choice == "cuda" and not torch.cuda.is_available():
        sys.exit("bench: --device cuda asked for, but torch.cuda.is_available() is False")
    return choice or ("cuda" if torch.cuda.is_available() else "cpu")


def _busy() -> bool:
    """Other work holds the CPU: its threads then stall torch's parallel regions badly."""
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)


def _warn_noise(device: str) -> None:
    """Say so when the timings will carry extra costs or share the CPU with other work."""
    if os.environ.get("MOE_KERNELS_POISON") == "1" or os.environ.get("MOE_KERNELS_CHECK_VALUES") == "1":
        print("bench: warning: MOE_KERNELS_POISON/MOE_KERNELS_CHECK_VALUES is set; timings include their cost", file=sys.stderr)
    if device == "cpu" and _busy():
        hint = "; --threads 1 suffers least" if torch.get_num_threads() > 1 else ""
        print(f"bench: warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU timings will be noisy{hint}",
              file=sys.stderr)


def _threads(args: argparse.Namespace, device: str) -> None:
    threads = args.threads or (1 if device == "cpu" and (args.quick or _busy()) else None)
    if threads:
        torch.set_num_threads(threads)
    _warn_noise(device)


def _run_suite(args: argparse.Namespace, suite: str, device: str, source: str, run, detail: str = "",
               table: dict | None = None, after=None) -> int:
    """Print the run header, ``run() -> (rows, facts)``, print the table and write the results;
    ``after(rows, csv_path)`` then runs and returns a line to print (e.g. a plot written beside the CSV)."""
    meta = collect_meta(device, suite, argv=sys.argv[1:], models_source=source)
    print(f"bench {suite} on {meta['device_name']} ({device}, threads={torch.get_num_threads()}); torch {meta['torch']}, "
          f"triton {meta['triton']}, commit {meta['git_commit']}; shapes from {source}{detail}", flush=True)
    t0 = time.perf_counter()
    rows, facts = run()
    wall = time.perf_counter() - t0
    meta.update(wall_s=round(wall, 1), **facts)
    print(f"backends: {', '.join(facts['backends'])}")
    for note in facts.get("notes", ()):
        print(f"note: {note}")
    print(format_table(rows, facts["ceilings"], **(table or {})))
    csv_path, json_path = write_results(rows, meta, args.out)
    print(f"\n{len(rows)} rows in {wall:.1f} s; wrote {csv_path} and {json_path}")
    if after is not None:
        print(after(rows, csv_path))
    return 0


def cmd_main(args: argparse.Namespace) -> int:
    from .suites import run_main

    device = _device(args.device)
    try:
        shapes, source = select_shapes(args.models, device, args.quick, args.tokens)
    except ValueError as exc:  # unknown model names
        sys.exit(f"bench: {exc}")
    _threads(args, device)
    return _run_suite(args, "main", device, source, lambda: run_main(shapes, device, args.quick),
                      "; CPU: H and I scaled down, fp32" if device == "cpu" else "")


def cmd_routing(args: argparse.Namespace) -> int:
    from .routing import TABLE, run_routing, select_routing

    device = _device(args.device)
    try:
        shapes, source, notes = select_routing(args.models, device, args.quick, args.tokens)
    except ValueError as exc:  # unknown model names
        sys.exit(f"bench: {exc}")
    _threads(args, device)
    return _run_suite(args, "routing", device, source, lambda: run_routing(shapes, device, args.quick, notes), table=TABLE)


def cmd_permute(args: argparse.Namespace) -> int:
    from .permute import TABLE, run_permute, select_permute

    device = _device(args.device)
    try:
        shapes, source, notes = select_permute(device, args.quick, args.tokens, args.hidden, args.topk)
    except ValueError as exc:
        sys.exit(f"bench: {exc}")
    _threads(args, device)
    return _run_suite(args, "permute", device, source, lambda: run_permute(shapes, device, args.quick, notes), table=TABLE)


def cmd_gemm(args: argparse.Namespace) -> int:
    from .gemm import TABLE, run_gemm, select_gemm

    device = _device(args.device)
    try:
        shapes, source, notes = select_gemm(args.models, device, args.quick, args.tokens)
    except ValueError as exc:  # unknown model names
        sys.exit(f"bench: {exc}")
    _threads(args, device)
    return _run_suite(args, "gemm", device, source, lambda: run_gemm(shapes, device, args.quick, notes),
                      "; CPU: H and I scaled down hard, fp32" if device == "cpu" else "", table=TABLE)


def cmd_moe(args: argparse.Namespace) -> int:
    from .moe import TABLE, plot, run_moe, select_moe

    device = _device(args.device)
    try:
        shapes, source, notes = select_moe(args.models, device, args.quick, args.tokens)
    except ValueError as exc:  # unknown model names
        sys.exit(f"bench: {exc}")
    _threads(args, device)
    return _run_suite(args, "moe", device, source, lambda: run_moe(shapes, device, args.quick, notes),
                      "; CPU: H and I scaled down, fp32" if device == "cpu" else "", table=TABLE,
                      after=lambda rows, csv_path: plot(rows, csv_path.with_suffix(".png")))


def cmd_ep(args: argparse.Namespace) -> int:
    from .ep import TABLE, _configs, run_ep

    if args.quick and args.worlds is None:
        args.worlds = [2]  # 4 ranks on a small machine take most of a minute
    try:
        _, source = _configs(args)
    except ValueError as exc:  # unknown model names
        sys.exit(f"bench: {exc}")
    table = {**TABLE, "extra": (*TABLE["extra"], ("err", "err_vs_ref", ".1e", ""))}
    return _run_suite(args, "ep", "cpu", source, lambda: run_ep(args), "; gloo over 127.0.0.1, one thread per rank",
                      table=table)


def cmd_load(args: argparse.Namespace) -> int:
    from .load import TABLE, plot, run_load, select_load

    device = _device(args.device)
    try:
        configs, source = select_load(args.models, args.quick)
    except ValueError as exc:  # unknown model names
        sys.exit(f"bench: {exc}")
    _threads(args, device)
    T = (args.tokens or [256])[0]
    return _run_suite(args, "load", device, source, lambda: run_load(configs, device, args.quick, T=T), table=TABLE,
                      after=lambda rows, csv_path: plot(rows, csv_path.with_suffix(".png")))


def cmd_lora(args: argparse.Namespace) -> int:
    from .lora import TABLE, run_lora, select_lora

    device = _device(args.device)
    shapes, source, notes = select_lora(device, args.quick, args.tokens)
    _threads(args, device)
    return _run_suite(args, "lora", device, source, lambda: run_lora(shapes, device, args.quick, notes), table=TABLE)


def cmd_tune(args: argparse.Namespace) -> int:
    from .shapes import load_models
    from .tune import run_tune

    models, _ = load_models()
    models = {n: c for n, c in models.items() if not n.startswith("_") and (not args.models or n in args.models)}
    for path in run_tune(models, out_dir=args.out):
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv.insert(0, "main")  # main is the default suite
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

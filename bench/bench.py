"""Full-size benchmark: cosybridge against the floor, the plain load-everything approach, and upstream.

    python bench/bench.py                 # `make bench`: builds fixtures once under bench/out/, 3 runs each
    python bench/bench.py --runs 5 --sizes 0.5b

Fixtures (synthetic weights, real layout and real Qwen2 vocabulary, built by cosybridge.synth):
  <size>/model     a CosyVoice2 model dir with an fp32 llm.pt (0.5B: 2.0 GB; 1.5B: 6.3 GB)
  <size>/hf_bf16   the same converted by `cosybridge to-hf --dtype bf16` (0.5B: 1.28 GB)

Directions: to-pt (bf16 HF dir → llm.pt) and to-hf (fp32 llm.pt → HF dir, --dtype bf16). Methods, each a
fresh process, interleaved run by run so that load from other users spreads over all of them:
  floor      python that imports torch + safetensors, reads every input byte, writes as many bytes as
             cosybridge's output (no fsync): the issue's reference
  floor-durable  the same, made crash-safe as cosybridge's output is: write-back started every 64 MB
             (io/writeback.py) and an fsync at the end; on this VM it is faster than the plain floor
  cosybridge the CLI, as a user runs it
  plain      same plan, but every tensor loaded whole (safetensors.torch.load_file / torch.load without
             mmap), built with torch.cat and saved with torch.save / save_file (weights only: no tokenizer)
  upstream   (to-pt) the semantics of CosyVoice's huggingface_to_pretrained.py: transformers' AutoTokenizer
             for the <|s_0|> id, safe_open().get_tensor per use, slices saved with their whole storage
Wall time, CPU time and peak RSS (ru_maxrss of the child via os.wait4) are medians of --runs; inputs are
re-read before every run (warm page cache). Output bytes are the weight files; "distinct" counts tensor
bytes once however many names or views share them. Needs ~20 GB of disk (fixtures 13 GB, kept between runs;
delete bench/out/ when done) and ~15 minutes on 2 cores; --sizes 0.5b needs 4 GB and ~5 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
MB = 1e6


# ---- the methods that run in a child process (python bench/bench.py --child NAME ...) -----------------

def child_floor(inputs: str, out: str, nbytes: str, durable: str = "") -> None:
    import safetensors.torch  # noqa: F401 - the floor pays the imports a converter pays
    import torch  # noqa: F401

    from cosybridge.io.writeback import Writeback

    buf = memoryview(bytearray(16 << 20))
    for root, _, files in os.walk(inputs):
        for name in files:
            with open(os.path.join(root, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    left = int(nbytes)
    with open(out, "wb") as f:
        writeback = Writeback(f) if durable else (lambda n: None)
        while left:
            n = f.write(buf[:min(left, len(buf))])
            writeback(n)
            left -= n
        if durable:
            f.flush()
            os.fsync(f.fileno())


def materialise(plan, tensors: dict) -> dict:
    """Every output tensor of a cosybridge plan, built whole in memory from whole source tensors."""
    import torch

    from cosybridge.io.dtypes import to_torch
    from cosybridge.plan import Fill, Rows

    out = {}
    for t in plan.tensors:
        if t.alias_of is not None:
            out[t.name] = out[t.alias_of]
            continue
        dtype, parts = to_torch(t.dtype), []
        for p in t.pieces:
            if isinstance(p, Rows):
                src = tensors[p.source]
                parts.append((src[p.start:p.stop] if src.dim() else src).to(dtype))
            elif isinstance(p, Fill):
                parts.append(torch.full((p.rows, *t.shape[1:]), p.value, dtype=dtype))
        out[t.name] = (torch.cat(parts) if t.shape else parts[0]).reshape(t.shape).contiguous()
    return out


def plain_to_pt_tensors(hf_dir: str, dtype: str = "keep") -> dict:
    """The llm.pt state dict built the plain way: load_file everything, cut and concatenate in memory."""
    from safetensors.torch import load_file

    from cosybridge.hfdir import default_base_rows, read_hf_dir
    from cosybridge.io.dtypes import CLI_DTYPES, from_torch
    from cosybridge.io.safetensors_io import SafetensorsFile
    from cosybridge.io.sharded import HFWeights
    from cosybridge.io.source import TensorInfo
    from cosybridge.plan import plan_to_pt

    hd = read_hf_dir(hf_dir)
    with HFWeights(hf_dir) as w:
        files = [f.path for f in w.files.values()]
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    side = load_file(hd.sidecar) if hd.sidecar else {}
    tensors.update(side)
    meta = SafetensorsFile(hd.sidecar).metadata if hd.sidecar else {}
    base_rows = (int(meta.get("base_vocab_size", 0)) or hd.recorded_base_rows()[0]
                 or default_base_rows()[0])
    infos = {n: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for n, t in tensors.items()}
    plan = plan_to_pt({n: i for n, i in infos.items() if n not in side}, hd.layout(base_rows),
                      dtype=CLI_DTYPES.get(dtype),
                      sidecar={n: i for n, i in infos.items() if n in side},
                      sidecar_tied=meta.get("lm_head", "tied") == "tied")
    return materialise(plan, tensors)


def child_plain_to_pt(hf_dir: str, out: str) -> None:
    import torch

    torch.save(plain_to_pt_tensors(hf_dir), out)


def plain_to_hf_tensors(model_dir: str, dtype: str = "bf16") -> tuple[dict, dict]:
    """(model, sidecar) state dicts of to-hf built the plain way: torch.load everything, then cut in memory."""
    import torch

    from cosybridge.families import TokenLayout
    from cosybridge.io.dtypes import CLI_DTYPES, from_torch
    from cosybridge.io.source import TensorInfo
    from cosybridge.modeldir import read_model_dir
    from cosybridge.plan import PT_EMBED, PT_HEAD, plan_to_hf
    from cosybridge.tokens import speech_offset

    md = read_model_dir(model_dir)
    sd = torch.load(md.llm_pt, map_location="cpu", weights_only=True)
    infos = {n: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for n, t in sd.items()}
    layout = TokenLayout(md.family, speech_offset(md.blanken, md.family), infos[PT_EMBED].rows,
                         md.llm.speech_token_size)
    tied = sd[PT_HEAD].data_ptr() == sd[PT_EMBED].data_ptr() or torch.equal(sd[PT_HEAD], sd[PT_EMBED])
    model, side = plan_to_hf(infos, layout, dtype=CLI_DTYPES.get(dtype), lm_head_tied=tied)
    return materialise(model, sd), materialise(side, sd)


def child_plain_to_hf(model_dir: str, out: str) -> None:
    from safetensors.torch import save_file

    from cosybridge.hfdir import SIDECAR

    model, side = plain_to_hf_tensors(model_dir)
    os.makedirs(out)
    save_file(model, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    save_file(side, os.path.join(out, SIDECAR))


def child_upstream_to_pt(hf_dir: str, out: str) -> None:
    """What CosyVoice's examples/grpo/cosyvoice2/huggingface_to_pretrained.py does, step for step."""
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    s0 = AutoTokenizer.from_pretrained(hf_dir).convert_tokens_to_ids("<|s_0|>")
    speech, extra = 6561 + 3, 2            # its constants: codebook + 3 specials, sos/task_id rows
    state = {}
    with safe_open(os.path.join(hf_dir, "model.safetensors"), framework="pt", device="cpu") as f:
        for key in f.keys():
            if key == "lm_head.bias":
                continue
            state["llm.model." + key] = f.get_tensor(key)
            if key == "lm_head.weight":     # a fresh full copy per get_tensor; the slice keeps all of it
                state["llm_decoder.weight"] = f.get_tensor(key)[s0:s0 + speech]
                state["llm_decoder.bias"] = torch.zeros_like(state["llm_decoder.weight"][:, 0])
            if key == "model.embed_tokens.weight":
                state["speech_embedding.weight"] = f.get_tensor(key)[s0:s0 + speech]
                state["llm_embedding.weight"] = f.get_tensor(key)[s0 + speech:s0 + speech + extra]
        embed = "llm.model.model.embed_tokens.weight"
        state[embed] = state[embed][:151936]
        state["llm.model.lm_head.weight"] = state[embed]
    torch.save(state, out)


# ---- measuring -----------------------------------------------------------------------------------------

def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MB, CPU seconds) of one child process; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss * 1024 / MB, usage.ru_utime + usage.ru_stime


def cosybridge_cmd() -> list[str]:
    script = Path(PY).with_name("cosybridge")
    return [str(script)] if script.exists() else [PY, "-m", "cosybridge"]


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def tree_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    buf = memoryview(bytearray(16 << 20))
    for p in ([path] if path.is_file() else sorted(path.rglob("*"))):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def weight_bytes(path: Path) -> tuple[int, int, int]:
    """(bytes of the weight files, distinct tensor bytes in them, largest tensor) of an output."""
    import torch

    from cosybridge.io.safetensors_io import SafetensorsFile

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pt"))
    total = distinct = largest = 0
    for p in files:
        total += p.stat().st_size
        if p.suffix == ".safetensors":
            with SafetensorsFile(str(p)) as f:
                sizes = [f.info(n).nbytes for n in f.names()]
            distinct += sum(sizes)
            largest = max([largest, *sizes])
            continue
        spans = []
        for t in torch.load(p, mmap=True, weights_only=True, map_location="cpu").values():
            start = t.data_ptr()
            spans.append((start, start + t.numel() * t.element_size()))
            largest = max(largest, spans[-1][1] - start)
        end = 0
        for a, b in sorted(spans):  # union of byte ranges: views of one storage count once
            distinct += max(0, b - max(a, end))
            end = max(end, b)
    return total, distinct, largest


def child_build(size: str, model: str) -> None:
    from cosybridge.synth import QWEN25_05B, QWEN25_15B, build_model_dir

    build_model_dir(model, "cosyvoice2", {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B}[size], dtype="F32")


def child_bytes(path: str) -> None:
    print(json.dumps(weight_bytes(Path(path))))


def build_fixtures(size: str) -> dict[str, Path]:
    """In child processes: this one stays small, since a child's peak RSS counts its parent's at fork."""
    root = OUT / size
    model, hf = root / "model", root / "hf_bf16"
    if not (model / ".complete").exists():
        remove(model)
        root.mkdir(parents=True, exist_ok=True)
        print(f"building {model} (fp32) ...", file=sys.stderr)
        subprocess.run([PY, __file__, "--child", "build", size, str(model)], env=ENV, check=True)
        (model / ".complete").touch()
    if not hf.exists():
        print(f"building {hf} (bf16) ...", file=sys.stderr)
        subprocess.run([*cosybridge_cmd(), "-q", "to-hf", str(model), "-o", str(hf), "--dtype", "bf16"],
                       env=ENV, check=True)
    return {"model": model, "hf": hf, "root": root}


def imports_of(argv: list[str]) -> set[str]:
    """Top-level modules `cosybridge ARGV` imports (python -X importtime)."""
    proc = subprocess.run([PY, "-X", "importtime", "-m", "cosybridge", *argv], env=ENV, capture_output=True,
                          text=True)
    mods = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            mods.add(name.split(".")[0])
    return mods


# ---- the benchmark -------------------------------------------------------------------------------------

def bench_direction(direction: str, fx: dict, runs: int, methods: list[str]) -> dict:
    cb = cosybridge_cmd()
    work = fx["root"] / "work"
    work.mkdir(exist_ok=True)
    src = fx["hf"] if direction == "to-pt" else fx["model"]
    outs = {m: work / (f"{direction}-{m}.pt" if direction == "to-pt" else f"{direction}-{m}") for m in methods}
    cmds = {
        "cosybridge": [*cb, "-q", direction, str(src), "-o", str(outs["cosybridge"])]
                      + (["--dtype", "bf16"] if direction == "to-hf" else []),
        "plain": [PY, __file__, "--child", f"plain-{direction}", str(src), str(outs.get("plain"))],
        "upstream": [PY, __file__, "--child", f"upstream-{direction}", str(src), str(outs.get("upstream"))],
    }
    results = {m: {"wall": [], "rss": [], "cpu": []} for m in methods}
    out_bytes = None
    for i in range(runs):
        for m in methods:
            remove(outs[m])
            warm(src)  # this VM pages out idle page cache within seconds (DAMON): re-read before every run
            cmd = cmds.get(m) or [PY, __file__, "--child", "floor", str(src), str(outs[m]), str(out_bytes),
                                  "durable" if m == "floor-durable" else ""]
            wall, rss, cpu = run(cmd)
            results[m]["wall"].append(wall)
            results[m]["rss"].append(rss)
            results[m]["cpu"].append(cpu)
            if m == "cosybridge" and out_bytes is None:
                out_bytes = tree_bytes(outs[m])
            if i == 0 and not m.startswith("floor"):
                results[m]["bytes"] = json.loads(subprocess.run(
                    [PY, __file__, "--child", "bytes", str(outs[m])], env=ENV, capture_output=True, text=True,
                    check=True).stdout)
            if i < runs - 1 or m.startswith("floor"):
                remove(outs[m])
            print(f"  {direction} {fx['root'].name} {m:10s} run {i + 1}: {wall:6.2f} s  {rss:7.0f} MB  "
                  f"cpu {cpu:5.2f} s",
                  file=sys.stderr)
    for m in methods:
        remove(outs[m])
    return results


def startup(fx: dict, runs: int) -> dict:
    cb = cosybridge_cmd()
    cmds = {"import torch": [PY, "-c", "import torch"], "cosybridge --help": [*cb, "--help"],
            "cosybridge inspect": [*cb, "inspect", str(fx["hf"])]}
    times = {k: [] for k in cmds}
    for _ in range(runs):
        for k, c in cmds.items():
            warm(fx["hf"])
            try:
                times[k].append(run(c)[0])
            except RuntimeError as e:
                times[k] = None
                print(f"  {k}: {str(e).splitlines()[0]}", file=sys.stderr)
    return {k: (statistics.median(v) if v else None) for k, v in times.items()}


def fmt_range(v: list[float]) -> str:
    return f"{statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f})"


CHILDREN = {"floor": child_floor, "plain-to-pt": child_plain_to_pt, "plain-to-hf": child_plain_to_hf,
            "upstream-to-pt": child_upstream_to_pt, "build": child_build, "bytes": child_bytes}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--sizes", default="0.5b,1.5b")
    p.add_argument("--directions", default="to-pt,to-hf")
    p.add_argument("--methods", default="cosybridge,floor,floor-durable,plain,upstream",
                   help="floor-durable, plain and upstream run at 0.5B only")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    p.add_argument("--quick", action="store_true", help="skip the start-up and import checks")
    args = p.parse_args()
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return 0

    assert "torch" not in sys.modules  # see build_fixtures
    sizes = args.sizes.split(",")
    load0 = os.getloadavg()
    t_start = time.time()
    fixtures = {s: build_fixtures(s) for s in sizes}
    data: dict = {"runs": args.runs, "sizes": sizes, "startup": {}}
    for size in sizes:
        fx = fixtures[size]
        if size == sizes[0] and not args.quick:  # first, while nothing else competes for the page cache
            data["startup"] = startup(fx, max(args.runs, 5))
        for direction in args.directions.split(","):
            # at 1.5B only what the bars need (RSS growth) and the floor: whole-model approaches need ~10 GB
            methods = [m for m in args.methods.split(",") if m in ("cosybridge", "floor") or size == "0.5b"
                       and (m in ("floor-durable", "plain") or m == "upstream" and direction == "to-pt")]
            methods.sort(key=lambda m: m != "cosybridge")  # first: the floor writes as many bytes as it did
            data[f"{direction} {size}"] = bench_direction(direction, fx, args.runs, methods)
    first = fixtures[sizes[0]]
    probes = {} if args.quick else {"to-pt": ["to-pt", str(first["hf"]), "-o", str(first["root"] / "imp.pt")],
              "to-hf": ["to-hf", str(first["model"]), "-o", str(first["root"] / "imp"), "--dtype", "bf16"],
              "inspect": ["inspect", str(first["hf"])]}
    remove(first["root"] / "imp.pt")
    remove(first["root"] / "imp")
    data["imports"] = {d: sorted({"torch", "transformers", "safetensors", "tokenizers"} & imports_of(argv))
                       for d, argv in probes.items()}
    remove(first["root"] / "imp.pt")
    remove(first["root"] / "imp")
    data["load"] = (load0, os.getloadavg())
    data["minutes"] = (time.time() - t_start) / 60
    print(report(data))
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1, default=str))
    return 0


def report(data: dict) -> str:
    lines = ["| direction | size | method | wall s, median (min–max) | × floor | CPU s | peak RSS MB | output MB | "
             "distinct MB | output / distinct |", "|---|---|---|---|---|---|---|---|---|---|"]
    bars = []
    for key, res in data.items():
        if not key.startswith("to-"):
            continue
        direction, size = key.split()
        floor = statistics.median(res["floor"]["wall"])
        for m, r in res.items():
            wall, rss = statistics.median(r["wall"]), statistics.median(r["rss"])
            total, distinct, _ = r.get("bytes", (0, 0, 0))
            lines.append(f"| {direction} | {size} | {m} | {fmt_range(r['wall'])} | {wall / floor:.2f} | "
                         f"{statistics.median(r['cpu']):.2f} | {rss:,.0f} | "
                         + (f"{total / MB:,.0f} | {distinct / MB:,.0f} | {total / distinct:.3f} |" if total
                            else "– | – | – |"))
        cb = res["cosybridge"]
        wall, rss = statistics.median(cb["wall"]), statistics.median(cb["rss"])
        total, distinct, largest = cb["bytes"]
        if size == "0.5b":
            bars += [(f"{direction} 0.5B wall ≤ 1.3 × floor", f"{wall:.2f} s vs {floor:.2f} s = {wall / floor:.2f} ×",
                      wall <= 1.3 * floor),
                     (f"{direction} 0.5B peak RSS ≤ 800 MB", f"{rss:,.0f} MB", rss <= 800)]
        bars.append((f"{direction} {size} output ≤ 1.02 × distinct", f"{total / distinct:.4f}",
                     total <= 1.02 * distinct))
        small = data.get(f"{direction} 0.5b")
        if size == "1.5b" and small:
            growth = rss - statistics.median(small["cosybridge"]["rss"])
            bars.append((f"{direction} RSS growth 0.5B → 1.5B ≤ largest tensor",
                         f"{growth:+,.0f} MB vs {largest / MB:,.0f} MB", growth <= largest / MB))
    st = data["startup"]
    torch_s = st.get("import torch")
    lines += ["", "| start-up | median s | × `import torch` |", "|---|---|---|"]
    for k, v in st.items():
        lines.append(f"| `{k}` | {v:.3f} | {v / torch_s:.2f} |" if v else f"| `{k}` | failed | – |")
    if st.get("cosybridge --help"):
        bars.append(("`cosybridge --help` < 0.5 × import torch", f"{st['cosybridge --help'] / torch_s:.2f} ×",
                     st["cosybridge --help"] < 0.5 * torch_s))
    if st.get("cosybridge inspect"):
        bars.append(("`cosybridge inspect` ≤ 1.5 × import torch", f"{st['cosybridge inspect'] / torch_s:.2f} ×",
                     st["cosybridge inspect"] <= 1.5 * torch_s))
    for d, mods in data["imports"].items():
        bars.append((f"{d} never imports transformers", "imports " + (", ".join(mods) or "none of them"),
                     "transformers" not in mods))
    lines += ["", "| bar | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**NO**'} |" for name, value, ok in bars]
    (l0, l1) = data["load"]
    lines += ["", f"{data['runs']} runs per cell, methods interleaved; load average {l0[0]:.1f} at start, "
                  f"{l1[0]:.1f} at end (2 cores, shared); {data['minutes']:.1f} min."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

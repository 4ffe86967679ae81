"""Summarises a bench/gpu/run.sh output folder as Markdown: test results, the training-step
table (latentflow vs PyTorch on the same GPU, with the ratio), and the online run."""

import json
import os
import re
import sys

out = sys.argv[1]


def read(name):
    path = os.path.join(out, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def json_lines(name):
    rows = []
    for line in read(name).splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


print("# latentflow on the GPU (bench/gpu/run.sh)\n")
print("```\n" + read("machine.txt").strip() + "\n```\n")
print("## Tests\n")
for line in read("log.txt").splitlines():
    if " rc=" in line:
        print(f"- {line}")
for name in ["kernels", "nvrtc", "parity_models", "parity_training"]:
    text = read(f"{name}.txt")
    results = re.findall(r"test result: .*", text)
    if not results:
        continue
    where = ""
    if name == "kernels":
        where = " (NO GPU FOUND: the GPU comparisons were skipped)" if "skipped: no NVIDIA GPU" in text else " (on the GPU)"
    elif name.startswith("parity"):
        where = " (on cuda:0)" if "parity on cuda:0" in text else " (NOT on a GPU: no GPU found, ran on the CPU)"
    print(f"- {name}: {results[-1]}{where}")
print()
ours = {r["batch"]: r for r in json_lines("latentflow_step.txt") if "batch" in r}
torch = {r["batch"]: r for r in json_lines("pytorch_step.txt") if "batch" in r}
print("## SD2-base UNet training step, 256 px (latents 4x32x32, text 77x1024), bf16, AdamW\n")
print("| batch | latentflow images/s | peak GiB in use | PyTorch images/s | PyTorch peak GiB allocated | ratio latentflow/PyTorch |")
print("|---|---|---|---|---|---|")
for batch in sorted(set(ours) | set(torch)):
    o, t = ours.get(batch, {}), torch.get(batch, {})
    oi, ti = o.get("images_per_s"), t.get("images_per_s")
    ratio = f"{oi / ti:.3f}" if oi and ti else "-"
    cell = lambda r, k: f"{r[k]:.1f}" if k in r else r.get("error", "-")[:60]
    print(f"| {batch} | {cell(o, 'images_per_s')} | {cell(o, 'peak_gpu_gib_in_use')} | {cell(t, 'images_per_s')} | {cell(t, 'peak_gpu_gib_allocated')} | {ratio} |")
errors = [r for r in json_lines("pytorch_step.txt") if "batch" not in r]
for r in errors:
    print(f"\nPyTorch baseline: {r.get('error')}")
memory = [int(x) for x in read("gpu-memory-mib.txt").split() if x.isdigit()]
if memory:
    print(f"\nPeak GPU memory in use over the whole run (nvidia-smi, 200 ms samples): {max(memory) / 1024:.1f} GiB")
print("\n## The step's pieces alone, batch 32 (CUDA events, ms per forward + backward)\n")
ours = {r["component"]: r for r in json_lines("components.txt") if "component" in r}
torch = {r["component"]: r for r in json_lines("pytorch_components.txt") if "component" in r}
if ours or torch:
    print("| piece | latentflow ms | PyTorch ms | ratio PyTorch/latentflow (>1: latentflow faster) |")
    print("|---|---|---|---|")
    for name in list(ours) + [n for n in torch if n not in ours]:
        o, t = ours.get(name, {}), torch.get(name, {})
        value = lambda r: f"{r['ms']:.2f}" if "ms" in r else (str(r["count"]) if "count" in r else r.get("error", "-")[:60])
        ratio = f"{t['ms'] / o['ms']:.2f}" if "ms" in o and "ms" in t and o["ms"] > 0 else "-"
        print(f"| {name} | {value(o)} | {value(t)} | {ratio} |")
else:
    print("- no component timings: see components.txt and pytorch_components.txt")
print("\n## Encoders alone, warm, no grad (SD2 VAE at 256 px; OpenCLIP ViT-H text tower, 77 tokens)\n")
ours = {(r["encoder"], r["precision"]): r for r in json_lines("encoders.txt") if "encoder" in r}
torch = {(r["encoder"], r["precision"]): r for r in json_lines("pytorch_encoders.txt") if "encoder" in r}
rates = {}
if ours or torch:
    print("| encoder | precision | batch | latentflow per s | PyTorch per s | ratio latentflow/PyTorch |")
    print("|---|---|---|---|---|---|")
    for key in sorted(set(ours) | set(torch)):
        o, t = ours.get(key, {}), torch.get(key, {})
        cell = lambda r: f"{r['per_s']:.1f}" if "per_s" in r else r.get("error", "-")[:60]
        ratio = f"{o['per_s'] / t['per_s']:.2f}" if "per_s" in o and "per_s" in t else "-"
        if "per_s" in o and key[1] == "bf16":
            rates[key[0]] = o["per_s"]
        print(f"| {key[0]} | {key[1]} | {o.get('batch', t.get('batch', '-'))} | {cell(o)} | {cell(t)} | {ratio} |")
else:
    print("- no encoder timings: see encoders.txt and pytorch_encoders.txt")
print("\n## Encoder topologies on one GPU (bench/gpu/*-encode-1gpu.toml)\n")
for line in read("log.txt").splitlines():
    if line.startswith("encode_") and " rc=" in line:
        name = line.split()[0]
        text = read(f"{name}.txt")
        tail = [l for l in text.splitlines() if l.strip()][-1:] or ["(no output)"]
        print(f"- {line}: {tail[0][:200]}")
print("\n## Online topology, real-size encoders and trainer on one GPU\n")
steps = {r["batch"]: r for r in json_lines("latentflow_step.txt") if "images_per_s" in r}
if 32 in steps and "vae" in rates and "text" in rates:
    bound = 1 / (1 / steps[32]["images_per_s"] + 1 / rates["vae"] + 1 / rates["text"])
    print(f"- the GPU's bound from the parts measured alone (train at batch 32, VAE, text, bf16): {bound:.1f} samples/s; the goal is >= 90 % of it")
metrics = os.path.join(out, "online", "runs", "gpu-online-sd2-base", "metrics.jsonl")
rows = [json.loads(l) for l in open(metrics)] if os.path.exists(metrics) else []
if rows:
    later = rows[len(rows) // 4:] or rows  # leave out the first quarter (warm-up, compiles)
    samples = sum(r.get("samples", 0) for r in later)
    seconds = sum(r.get("step_s", 0) + r.get("wait_s", 0) for r in later)
    wait = sum(r.get("wait_s", 0) for r in later)
    print(f"- steps: {len(rows)}; after warm-up: {samples / seconds:.2f} samples/s, trainer waiting for data {100 * wait / seconds:.1f} % of the time")
else:
    print("- no metrics.jsonl: see online.txt\n\n```\n" + read("online.txt")[-3000:] + "\n```")
profile_path = os.path.join(out, "online-profile.json")
if os.path.exists(profile_path):
    profile = json.load(open(profile_path))
    train = next((o for o in profile.get("operators", []) if o.get("type") == "train"), None)
    if train:
        # How the encoders' rows reached the trainer's device (issue 27): views, one copy per
        # batch between devices (two handles on one GPU count as two devices), or host uploads.
        print(f"- the trainer's rows: {train.get('counted', {})}")
    if profile.get("peak_rss_bytes"):
        print(f"- peak host memory: {profile['peak_rss_bytes'] / 2**30:.2f} GiB (goal <= 3 GB)")
